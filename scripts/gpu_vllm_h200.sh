#!/usr/bin/env bash
# The harness with vLLM 0.24 on one NVIDIA H200, all runs of docs/gpu-vllm-h200.md in one device call.
#
#   bash .gpu/gpu_vllm_h200.sh OUT_DIR
#
# Run from the repository root of the device machine's copy, with .gpu/ carried and holding: the two
# parts of the vLLM bundle and vllm-site.sha256 (../shared/gpu-vllm/build-bundle.sh), tiny-ref.vre (a
# vLLM CPU reference file of tiny-llama3), src/ (this worktree's source), this script and
# devices-cuda-fp32.toml. The runs go side by side (each with its own cache folder, so no compile
# cache is shared); vLLM runs share the GPU through a small fixed KV cache (no memory profiling).
# Writes OUT_DIR/results.tar.gz: logs, --json/--markdown reports and each run folder's parity.json.
set -uo pipefail
OUT=${1:?usage: gpu_vllm_h200.sh OUT_DIR}
G=$PWD/.gpu
W=/tmp/vre
R=$W/reports
mkdir -p "$R"
t0=$(date +%s)
(cd "$G" && sha256sum -c vllm-site.sha256) || exit 9
cat "$G"/vllm-site.tar.xz.part-* | xz -dc -T0 | tar -xf - -C /tmp || exit 9
export PYTHONPATH=/tmp/site:$G/src VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
echo "unpacked in $(( $(date +%s) - t0 )) s"

nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
nvidia-smi | head -4 | tail -2
python3 - <<'EOF'
import sys, importlib.metadata as md
for name in ("torch", "triton", "transformers", "vllm", "numpy", "scipy", "rich", "typer", "diskcache",
             "tokenizers", "safetensors"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
# what the harness's main process imports: a run's modules, then the third-party ones that came with them
before = set(sys.modules)
import vllm_rbln_exec.cli, vllm_rbln_exec.pipeline.run, vllm_rbln_exec.pipeline.check  # noqa: E401,F401
import vllm_rbln_exec.outputs.terminal, vllm_rbln_exec.outputs.files, vllm_rbln_exec.capture.cache  # noqa
third = sorted({m.split(".")[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names) - {"vllm_rbln_exec"})
print("main process imports (third-party):", ", ".join(third))
print("torch/vllm in main process:", [m for m in ("torch", "vllm", "transformers") if m in sys.modules])
import torch
print("python", sys.version.split()[0], "| cuda", torch.version.cuda, "|",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF

VRE=(python3 -m vllm_rbln_exec --model tiny-llama3 --no-color)
SMALL='"gpu_memory_utilization": 0.04, "kv_cache_memory_bytes": 268435456'
job() {  # job NAME ARGS...: one harness run in the background, its output in $R/NAME.log
  local name=$1; shift
  echo "=== $name: ${VRE[*]} $* --cache-dir $W/cache-$name --run-dir $W/runs/$name --json $R/$name.json --markdown $R/$name.md" > "$R/$name.log"
  ( s=$(date +%s)
    timeout 430 "${VRE[@]}" "$@" --cache-dir "$W/cache-$name" --run-dir "$W/runs/$name" \
      --json "$R/$name.json" --markdown "$R/$name.md" >> "$R/$name.log" 2>&1
    echo "=== $name: exit $? after $(( $(date +%s) - s )) s" >> "$R/$name.log" ) &
}
REF=(--reference "$G/tiny-ref.vre")
job a-vllm-bf16 --target cuda "${REF[@]}" --target-args "{$SMALL}"
job b-vllm-fp32 --target cuda --target-dtype float32 "${REF[@]}" --target-args "{$SMALL}"
job c1-vllm-fp32-ieee --devices "$G/devices-cuda-fp32.toml" --target cuda-fp32 "${REF[@]}" --target-args "{$SMALL}"
job c2-vllm-fp32-flex --target cuda --target-dtype float32 "${REF[@]}" \
  --target-args "{$SMALL, \"attention_config\": {\"backend\": \"FLEX_ATTENTION\"}}"
job d-hf-fp32 --target cuda --target-engine transformers --target-dtype float32 "${REF[@]}"
job e-vllm-bf16-profiled --target cuda "${REF[@]}" --target-args "{$SMALL}" --profile-side target \
  --profile-dir "$W/profile-e"
# both sides on the GPU (--reference-device cuda), lossless store: true-fp32 level, no q16 floor
GPUREF=(--reference-device cuda --reference-engine transformers --reference-dtype float32 --store fp32
        --num-prompts 4 --max-tokens 32)
job f-hf-fp32-gpu-vs-vllm-fp32-ieee --devices "$G/devices-cuda-fp32.toml" --target cuda-fp32 "${GPUREF[@]}" \
  --target-args "{$SMALL}"
job g-hf-fp32-gpu-vs-vllm-fp32 --target cuda --target-dtype float32 "${GPUREF[@]}" --target-args "{$SMALL}"
wait
for f in "$R"/*.log; do cat "$f"; echo; done
echo "all runs done $(( $(date +%s) - t0 )) s after the start"
nvidia-smi --query-gpu=memory.used --format=csv
# keep what is small: reports, logs, each run folder less its capture arrays; the profile's file list
find "$W/profile-e" -type f -printf '%s %p\n' > "$R/profile-e-files.txt" 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$W" --exclude='*.npy' --exclude='*.pt.trace.json*' --exclude='*.vre' \
  reports runs
ls -la "$OUT"
