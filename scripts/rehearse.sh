#!/usr/bin/env bash
# Rehearse CI on a fresh machine (docs/install.md): a clean clone of the committed HEAD in a new temporary
# folder, run by .ci/run with a new, empty HOME and none of the cache folders the suite's tools keep
# (matplotlib's font list, Hugging Face, vLLM, torch inductor, Triton, pip), so first-run state that a
# machine where the suite already ran has and a new one lacks shows up here and not in CI (issue 25: a cold
# matplotlib font cache, a processor without AVX-512). Prints the machine it ran on (CPU model, the flags
# vLLM's CPU build chooses its kernels by, cores, memory, disk) and the time it took.
#
#   scripts/rehearse.sh            # or: make rehearse
#   KEEP=1 scripts/rehearse.sh     # keep the clone, HOME and log afterwards (kept anyway when it fails)
#
# What it cannot make fresh: the operating system's packages (Chromium, fontconfig: `make browser`) and the
# local package index pip reads from /etc/pip.conf, which a CI machine has as this one does.
set -euo pipefail

repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=$(mktemp -d "${TMPDIR:-/tmp}/vre-rehearse.XXXXXX")
log="$work/rehearse.log"
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
  echo "note: $repo has uncommitted changes; the rehearsal runs the committed HEAD, as CI would"
fi
git clone -q --no-hardlinks "$repo" "$work/repo"

flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2 || true)
relevant=""
for f in avx2 avx512f avx512vl avx512bw avx512dq avx512_bf16 avx512_vnni avx512_fp16 amx_tile amx_bf16 amx_int8; do
  case " $flags " in *" $f "*) relevant="$relevant $f" ;; *) relevant="$relevant -$f" ;; esac
done
library=$(PYTHONPATH="$work/repo/src" python3 -c 'import platform
from vllm_rbln_exec.setup.capabilities import read_cpu_flags, vllm_cpu_library
lib = vllm_cpu_library(read_cpu_flags() or frozenset(), platform.machine())
print(f"vllm/{lib.name} ({lib.why})")' 2>/dev/null || echo "unknown")
{
  echo "== rehearsal of .ci/run on a fresh clone: $(git -C "$work/repo" log -1 --format='%h %s' | cut -c1-100)"
  echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores," \
       "$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo),"\
       "$(df -h --output=avail "$work" | tail -1 | tr -d ' ') free under $work, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "flags (- absent):$relevant"
  echo "vLLM's CPU kernels here: $library"
  echo "clone and HOME: $work"
} | tee "$log"

mkdir -p "$work/home"
start=$(date +%s)
rc=0
(
  cd "$work/repo"
  # a new user: empty HOME, and every cache location the tools would otherwise take from the environment
  unset XDG_CACHE_HOME XDG_CONFIG_HOME XDG_DATA_HOME MPLCONFIGDIR HF_HOME HF_HUB_CACHE HF_DATASETS_CACHE \
        TRANSFORMERS_CACHE VLLM_CACHE_ROOT VLLM_CONFIG_ROOT TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR \
        TORCH_HOME PIP_CACHE_DIR PYTHONPATH VIRTUAL_ENV
  export HOME="$work/home"
  .ci/run
) 2>&1 | tee -a "$log" || rc=$?
minutes=$(awk -v s="$(( $(date +%s) - start ))" 'BEGIN {printf "%.1f", s / 60}')
echo "== .ci/run exited $rc after $minutes min (load average now $(cut -d' ' -f1-3 /proc/loadavg)); log: $log" \
  | tee -a "$log"
if [ "$rc" = 0 ] && [ -z "${KEEP:-}" ]; then
  cp "$log" "${TMPDIR:-/tmp}/vre-rehearse-last.log"
  rm -rf "$work"
  echo "removed $work (log kept in ${TMPDIR:-/tmp}/vre-rehearse-last.log)"
fi
exit "$rc"
