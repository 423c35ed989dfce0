#!/usr/bin/env bash
# vLLM CUDA as the target, against a vLLM CPU reference file: the repeatable set of GPU runs.
#
#   scripts/gpu_parity.sh OUT_DIR MODEL REFERENCE_FILE [RUNS] [-- OPTIONS...]
#
# On a machine with one NVIDIA GPU, with vLLM importable and this checkout's src/ on PYTHONPATH (for the
# project's slim vLLM 0.24 bundle: PYTHONPATH=/tmp/site:$PWD/src VLLM_USE_FLASHINFER_SAMPLER=0, see
# docs/gpu-vllm-h200.md). REFERENCE_FILE was made on a CPU machine with the same MODEL, e.g.
#   vllm-rbln-exec --model smollm2-135m --target cpu --save-reference smol-ref.vre
# and fixes the prompts and the number of tokens; pass the same --num-prompts/--max-tokens after `--` so
# that the runs with a GPU reference compare the same positions. RUNS is a comma-separated subset of:
#   vllm-bf16           vLLM CUDA as shipped (bfloat16, torch.compile and CUDA graphs on)
#   vllm-fp32           the same in float32 (Triton attention: TF32 dots, warned about)
#   vllm-fp32-ieee      --target cuda-fp32: float32 with IEEE fp32 Triton dots (true float32)
#   hf-fp32, hf-bf16    transformers on CUDA, for comparison
#   vllm-bf16-profiled  vllm-bf16 under the torch profiler (CUDA kernels in the device table)
#   gpuref-hf-fp32      no file: transformers CUDA float32 as the reference, vLLM CUDA bf16 as the target
#   gpuref-vllm-fp32    no file: vLLM cuda-fp32 as the reference, vLLM CUDA bf16 as the target
#   vllm-bf16-tp2       vllm-bf16 with --tp 2 (a machine with two GPUs; NVLink multicast off, as in the profile)
#   vllm-fp32-ieee-tp2  vllm-fp32-ieee with --tp 2
#   ab-PRESET           no file: --ab PRESET on vLLM CUDA as shipped (both sides on the GPU, docs/ab.md)
#   ab-PRESET-fp32      the same on --target cuda-fp32 (true float32)
#   ab-PRESET-bi        the same as ab-PRESET with VLLM_BATCH_INVARIANT=1 (vLLM's batch-invariant kernels)
# (default: all but the ab- and tp2 runs; --ab tp is ab-tp). The runs go side by side, each with its own cache folder (no compile cache is shared,
# so an ieee run cannot reuse a TF32 kernel) and one shared folder of converted models; vLLM sides share
# the GPU through a fixed 256 MiB KV cache (no memory profiling), which changes no number.
# Writes OUT_DIR/NAME.{log,json,md} per run and OUT_DIR/summary.txt; exits with the worst run's code.
set -uo pipefail
OUT=${1:?usage: gpu_parity.sh OUT_DIR MODEL REFERENCE_FILE [RUNS] [-- OPTIONS...]}
MODEL=${2:?model}
REF=$(realpath "${3:?reference file}")
ALL=vllm-bf16,vllm-fp32,vllm-fp32-ieee,hf-fp32,hf-bf16,vllm-bf16-profiled,gpuref-hf-fp32,gpuref-vllm-fp32
RUNS=$ALL
shift 3
if [[ $# -gt 0 && $1 != -- ]]; then RUNS=$1; shift; fi
[[ ${1:-} == -- ]] && shift
EXTRA=("$@")
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
W=${VRE_WORK:-/tmp/vre-$(basename "$OUT")}
mkdir -p "$W/models"
VRE=(python3 -m vllm_rbln_exec --model "$MODEL" --no-color "${EXTRA[@]}")
SMALL='{"gpu_memory_utilization": 0.04, "kv_cache_memory_bytes": 268435456}'
FILE=(--reference "$REF")

args_of() {  # the options of one run, by name
  case $1 in
    vllm-bf16) echo --target cuda ;;
    vllm-fp32) echo --target cuda --target-dtype float32 ;;
    vllm-fp32-ieee) echo --target cuda-fp32 ;;
    vllm-bf16-tp2) echo --target cuda --tp 2 ;;
    vllm-fp32-ieee-tp2) echo --target cuda-fp32 --tp 2 ;;
    hf-fp32) echo --target cuda --target-engine transformers --target-dtype float32 ;;
    hf-bf16) echo --target cuda --target-engine transformers ;;
    vllm-bf16-profiled) echo --target cuda --profile-side target --profile-dir "$W/profile" ;;
    gpuref-hf-fp32) echo --target cuda --reference-device cuda --reference-engine transformers \
      --reference-dtype float32 ;;
    gpuref-vllm-fp32) echo --target cuda --reference-device cuda-fp32 --reference-dtype float32 ;;
    ab-*-fp32) local p=${1#ab-}; echo --ab "${p%-fp32}" --target cuda-fp32 ;;
    ab-*-bi) local p=${1#ab-}; echo --ab "${p%-bi}" --target cuda ;;
    ab-*) echo --ab "${1#ab-}" --target cuda ;;
    *) return 1 ;;
  esac
}

job() {  # one harness run in the background; its printed output in $OUT/NAME.log
  local name=$1 cache=$W/cache-$1
  local -a opts extra=()
  read -r -a opts <<< "$(args_of "$name")" || { echo "unknown run $name (one of $ALL)" >&2; return 1; }
  local -a env=()
  [[ $name == gpuref-* || $name == ab-* ]] || extra+=("${FILE[@]}")
  [[ $name == hf-* ]] || extra+=(--target-args "$SMALL")
  [[ $name == gpuref-vllm-* || $name == ab-* ]] && extra+=(--reference-args "$SMALL")
  [[ $name == ab-*-bi ]] && env+=(VLLM_BATCH_INVARIANT=1)
  mkdir -p "$cache" && ln -sfn "$W/models" "$cache/models"  # one conversion, under the harness's own lock
  echo "=== $name: ${VRE[*]} ${opts[*]} ${extra[*]}" > "$OUT/$name.log"
  ( s=$(date +%s)
    env "${env[@]}" timeout "${VRE_RUN_TIMEOUT:-480}" "${VRE[@]}" "${opts[@]}" "${extra[@]}" --cache-dir "$cache" \
      --run-dir "$W/runs/$name" --json "$OUT/$name.json" --markdown "$OUT/$name.md" >> "$OUT/$name.log" 2>&1
    echo "=== $name: exit $? after $(( $(date +%s) - s )) s" >> "$OUT/$name.log" ) &
}

t0=$(date +%s)
IFS=, read -r -a names <<< "$RUNS"
for name in "${names[@]}"; do job "$name" || exit 2; done
wait
worst=0
for name in "${names[@]}"; do
  cat "$OUT/$name.log"; echo
  rc=$(sed -n 's/^=== .*: exit \([0-9]*\) after.*/\1/p' "$OUT/$name.log" | tail -1)
  (( ${rc:-9} > worst )) && worst=${rc:-9}
  echo "$name exit ${rc:-none}" >> "$OUT/summary.txt"
done
echo "all runs of $MODEL done $(( $(date +%s) - t0 )) s after the start; worst exit $worst" | tee -a "$OUT/summary.txt"
find "$W/profile" -type f -printf '%s %p\n' > "$OUT/profile-files.txt" 2>/dev/null
exit "$worst"
