#!/usr/bin/env bash
# Localisation with vLLM on CUDA as the target: the GPU example of docs/localize.md and tests/gpu/test_gpu_localize.py.
#
#   scripts/gpu_localize.sh OUT_DIR
#
# On a machine with one NVIDIA GPU, vLLM importable and this checkout's src/ on PYTHONPATH (for the slim
# vLLM 0.24 bundle: PYTHONPATH=/tmp/site:$PWD/src:$PWD VLLM_USE_FLASHINFER_SAMPLER=0). One after the other
# (side by side on one GPU, a vLLM engine's start-up memory profiling failed when the other process's
# memory changed meanwhile):
#   example   tiny-llama3 with layer 1's o_proj scaled x2 on the target (vLLM CUDA bf16, compile and CUDA graphs
#             on for the run, eager for the localisation pass) against transformers float32 on the CPU,
#             with --localize, --html and --json: the report names the layer, the page draws it
#   tests     python -m pytest tests/gpu/test_gpu_localize.py (honest cuda-fp32: no layer; the fault: named)
# Writes OUT_DIR/{example.log,example.json,example.html,tests.log}; exits with the worse of the two codes
# (the example's 1 is expected: the fault fails parity too).
set -uo pipefail
OUT=$(realpath -m "${1:?usage: gpu_localize.sh OUT_DIR}")
mkdir -p "$OUT"
W=${VRE_WORK:-/tmp/vre-localize}
mkdir -p "$W"
python3 - "$W" <<'EOF' || exit 9
import sys
from pathlib import Path
from vllm_rbln_exec.setup.models import resolve_model
from vllm_rbln_exec.setup.tiny import make_tiny_model
from tests.model_edits import plant_fault
w = Path(sys.argv[1])
resolved = resolve_model("tiny-llama3", w / "models")
make_tiny_model(resolved.path, **resolved.tiny)
plant_fault(resolved.path, w / "tiny-fault", "model.layers.1.self_attn.o_proj.weight", scale=2.0)
print("made", resolved.path, "and", w / "tiny-fault")
EOF
( python3 -m vllm_rbln_exec --model tiny-llama3 --cache-dir "$W" --run-dir "$W/example" --target cuda \
    --target-model "$W/tiny-fault" --reference-engine transformers --max-tokens 8 --num-prompts 2 --no-color \
    --no-inspect-logits --target-args '{"gpu_memory_utilization": 0.3}' --localize \
    --json "$OUT/example.json" --html "$OUT/example.html" > "$OUT/example.log" 2>&1
  echo "=== example: exit $?" >> "$OUT/example.log" )
( python3 -m pytest -q tests/gpu/test_gpu_localize.py -v -p no:cacheprovider > "$OUT/tests.log" 2>&1
  echo "=== tests: exit $?" >> "$OUT/tests.log" )
cp "$W/example/localize/error_by_layer.png" "$OUT/" 2>/dev/null
cat "$OUT/example.log" "$OUT/tests.log"
e=$(sed -n 's/^=== example: exit //p' "$OUT/example.log"); t=$(sed -n 's/^=== tests: exit //p' "$OUT/tests.log")
(( ${e:-9} <= 1 && ${t:-9} == 0 ))
