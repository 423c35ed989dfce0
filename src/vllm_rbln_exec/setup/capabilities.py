"""What this machine's vLLM CPU build can run, found before a side starts, without importing torch or vLLM.

vLLM's CPU wheel (0.32) ships three kernel libraries and ``vllm/platforms/cpu.py`` (``import_kernels``) loads
one of them by the processor, through torch's checks (``at::cpu::is_avx512_supported``: avx512f, avx512vl,
avx512bw and avx512dq; ``is_avx512_bf16_supported``: avx512_bf16):

* ``vllm/_C``        AVX-512 with AVX512-BF16 (this project's Intel Xeon);
* ``vllm/_C_AVX512`` AVX-512 without BF16;
* ``vllm/_C_AVX2``   no AVX-512 (e.g. an AMD EPYC with AVX2 only).

They do not hold the same operators: ``cpu_gemm_wna16``, the kernel of every int4-weight scheme on the CPU
(``CPUWNA16LinearKernel``: compressed-tensors W4A16 and W4A8, GPTQ, AWQ), is in ``_C`` and ``_C_AVX512`` but
not in ``_C_AVX2``, where such an export loads, the engine starts (45 s) and the first forward pass dies with
``AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'`` (issue 25). bf16 and the
W8A8 (oneDNN) and FP8 (torch emulation) paths exist in all three. An operator's presence is read from the
library's bytes (its registered schema ``name(``), as ``grep -c`` does.

``kernel_gap`` is pure (flags, the library's text, the checkpoint's config -> a sentence or None);
``vllm_cpu_gap`` reads them from this machine. ``missing_op_sentence`` turns the worker's AttributeError,
should a gap slip past, into one sentence. This module must not import torch or vLLM or start anything.
"""

from __future__ import annotations

import importlib.util
import json
import mmap
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .devices import installed_version
from .sides import Side

AVX512_FLAGS = ("avx512f", "avx512vl", "avx512bw", "avx512dq")  # torch's is_avx512_supported
AVX512_BF16_FLAG = "avx512_bf16"  # torch's is_avx512_bf16_supported
X86_MACHINES = ("x86_64", "amd64", "i386", "i686")
WNA16_OP = "cpu_gemm_wna16"
INSTEAD = ("measure it with engine=transformers (--target-engine transformers), or measure a W8A8 or FP8 "
           "export, which this build runs")


@dataclass(frozen=True)
class Library:
    """The kernel library vLLM's CPU platform loads on a processor, and why."""

    name: str  # "_C", "_C_AVX512", "_C_AVX2"
    why: str


def read_cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first processor's flags from /proc/cpuinfo (None where there is no such file: not Linux)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    return parse_cpu_flags(text)


def parse_cpu_flags(text: str) -> frozenset[str]:
    match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


def cpu_model(path: str | Path = "/proc/cpuinfo") -> str | None:
    try:
        match = re.search(r"^model name\s*:\s*(.*)$", Path(path).read_text(errors="replace"), re.MULTILINE)
    except OSError:
        return None
    return match.group(1).strip() if match else None


def vllm_cpu_library(flags: frozenset[str], machine: str) -> Library:
    """The library ``import_kernels`` loads, by the same checks torch makes (``at::cpu`` over cpuinfo)."""
    if machine.lower() not in X86_MACHINES:
        return Library("_C", f"the {machine} build")
    missing = [f for f in AVX512_FLAGS if f not in flags]
    if missing:
        return Library("_C_AVX2", f"loaded on processors without AVX-512 (this one lacks {', '.join(missing)})")
    if AVX512_BF16_FLAG not in flags:
        return Library("_C_AVX512", f"loaded on processors with AVX-512 but without {AVX512_BF16_FLAG}")
    return Library("_C", "loaded on processors with AVX-512 and AVX512-BF16")


def needed_op(config: dict[str, Any]) -> tuple[str, str] | None:
    """(the scheme as a name like W4A16, the vLLM CPU operator its linear layers need) or None.

    Only the schemes whose CPU kernel some library lacks are named: int4 weights (compressed-tensors with
    4-bit int weights, GPTQ, AWQ) all go through ``CPUWNA16LinearKernel`` on vLLM 0.32's CPU (W4A8 too: its
    activations are left unquantized there, docs/corpus.md)."""
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method") or "").lower()
    if method in ("gptq", "awq") and q.get("bits", 4) == 4:
        return f"{method.upper()} int4", WNA16_OP
    if method != "compressed-tensors":
        return None
    for group in (q.get("config_groups") or {}).values():
        if not isinstance(group, dict):
            continue
        weights, acts = group.get("weights") or {}, group.get("input_activations") or {}
        if weights.get("type", "int") == "int" and weights.get("num_bits") == 4:
            return f"W4A{acts.get('num_bits') or 16}", WNA16_OP
    return None


def kernel_gap(flags: frozenset[str], machine: str, has_op: Callable[[str, str], bool | None],
               config: dict[str, Any], version: str | None = None) -> str | None:
    """One sentence naming what a checkpoint needs that vLLM's CPU build for this processor lacks, else None.

    ``has_op(library, op)`` says whether a library holds an operator (None: cannot tell, so no refusal)."""
    needed = needed_op(config)
    if needed is None:
        return None
    scheme, op = needed
    library = vllm_cpu_library(flags, machine)
    if has_op(library.name, op) is not False:
        return None
    build = f"vLLM {version}'s CPU build" if version else "vLLM's CPU build"
    return (f"{scheme} needs the kernel {op}, which {build} does not have for this processor "
            f"(vllm/{library.name}, {library.why}); {INSTEAD}")


@cache
def library_has_op(folder: str, library: str, op: str) -> bool | None:
    """Whether ``folder/library.*.so`` registers ``op`` (its schema ``op(`` is in the file); None: no library."""
    found = sorted(Path(folder).glob(f"{library}.*so"))
    if not found:
        return None
    try:
        with open(found[0], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(op.encode() + b"(") >= 0
    except (OSError, ValueError):
        return None


def vllm_folder() -> str | None:
    """The installed vllm package's folder (finding a top-level package's spec does not import it)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(next(iter(spec.submodule_search_locations)))


def vllm_cpu_gap(checkpoint: str | Path, version: str | None = None) -> str | None:
    """``kernel_gap`` for a vLLM side on this machine's CPU: the checkpoint's config, /proc/cpuinfo, the build."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or needed_op(config) is None:
        return None
    flags, folder = read_cpu_flags(), vllm_folder()
    if flags is None or folder is None:
        return None
    return kernel_gap(flags, platform.machine(), lambda lib, op: library_has_op(folder, lib, op), config, version)


MISSING_OP = re.compile(r"'_OpNamespace' '(\w+)' object has no attribute '(\w+)'")


def missing_op_sentence(error: BaseException) -> str | None:
    """One sentence for a worker whose engine called a torch operator its kernel library lacks, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        match = MISSING_OP.search(str(error)) if isinstance(error, AttributeError) else None
        if match:
            namespace, op = match.groups()
            flags = read_cpu_flags() or frozenset()
            library = vllm_cpu_library(flags, platform.machine())
            return (f"the engine called torch.ops.{namespace}.{op}, a kernel its build does not have for this "
                    f"processor (vLLM's CPU platform loads vllm/{library.name}, {library.why}); {INSTEAD}")
        error = error.__cause__ or error.__context__
    return None


def side_gap(side: Side) -> str | None:
    """``vllm_cpu_gap`` for a side that runs vLLM on the CPU platform; None for any other side."""
    if side.engine != "vllm" or side.platform != "cpu" or side.url:
        return None
    return vllm_cpu_gap(side.checkpoint, installed_version("vllm", "vllm-cpu"))
