#!/usr/bin/env bash
# Cross-device parity on an NVIDIA GPU with the transformers engine (no vLLM needed there).
#
#   scripts/gpu_parity.sh REFERENCE_FILE [OUT_DIR]
#
# REFERENCE_FILE is a reference captured on a CPU machine with vLLM, e.g.
#   vllm-rbln-exec --model tiny-llama3 --target cpu --max-tokens 32 --num-prompts 4 \
#       --save-reference tiny-llama3-vllm-cpu.tar
# The tiny model is made again here from its seed; its fingerprint must match the
# file's, which is checked before anything runs. Three runs, each gated by the
# built-in tolerances of its dtype pair, reports written to OUT_DIR:
#   a) transformers on CUDA, bfloat16, against the carried vLLM CPU reference file
#   b) the same in float32 (how close fp32 on a GPU comes to fp32 on a CPU)
#   c) transformers on CPU (reference) against transformers on CUDA (bfloat16),
#      both on this machine, the target profiled with the torch profiler
# The script goes on after a failing verdict (exit 1) so every table is printed,
# and exits with the worst code of the three.
set -uo pipefail

REF=${1:?usage: scripts/gpu_parity.sh REFERENCE_FILE [OUT_DIR]}
OUT_DIR=${2:-runs/gpu-parity}
mkdir -p "$OUT_DIR"
if command -v vllm-rbln-exec >/dev/null 2>&1; then
  VRE=(vllm-rbln-exec)
else
  VRE=(python -m vllm_rbln_exec)  # a plain checkout: PYTHONPATH=src
fi
COMMON=(--model tiny-llama3 --target cuda --target-engine transformers --no-inspect-logits --no-color)
worst=0
step() {
  local name=$1; shift
  echo
  echo "=== $name: ${VRE[*]} $*"
  "${VRE[@]}" "$@" --run-dir "$OUT_DIR/$name" --json "$OUT_DIR/$name.json" --markdown "$OUT_DIR/$name.md" \
    --profile-dir "$OUT_DIR/profile"
  local rc=$?
  echo "=== $name: exit $rc"
  (( rc > worst )) && worst=$rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '/ transformers', transformers.__version__)"

step a-vllm-cpu-file-vs-cuda-bf16 "${COMMON[@]}" --reference "$REF" --target-dtype bfloat16
step b-vllm-cpu-file-vs-cuda-fp32 "${COMMON[@]}" --reference "$REF" --target-dtype float32
step c-hf-cpu-vs-cuda-bf16 "${COMMON[@]}" --reference-engine transformers --target-dtype bfloat16 \
  --max-tokens 32 --num-prompts 4 --profile-side target
exit $worst
