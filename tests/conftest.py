"""Shared fixtures: the real CLI in a subprocess, a per-test cache that shares
the converted default model, and GPU detection for the `gpu` marker.

Tiers: tests/unit (in-process, no engine, no subprocess), tests/plumbing (the
real CLI and workers on the fake engine, seconds), tests/integration (real
engines on the CPU, minutes), tests/gpu (needs a CUDA GPU).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from tests.helpers import CliResult, make_cache_dir, run_cli


@pytest.fixture
def cli(tmp_path):
    """Run the real CLI: cli(args..., run="name") -> CliResult (cache in tmp, models shared)."""
    cache = make_cache_dir(tmp_path)
    counter = {"n": 0}

    def _run(*args: str, run: str | None = None, env: dict | None = None, cache_dir: Path | None = None,
             timeout: float = 900) -> CliResult:
        counter["n"] += 1
        run_dir = tmp_path / (run or f"run{counter['n']}")
        proc = run_cli(["--cache-dir", str(cache_dir or cache), "--run-dir", str(run_dir), *args],
                       cwd=tmp_path, env=env, timeout=timeout)
        return CliResult(proc.returncode, proc.stdout, proc.stderr, run_dir)

    return _run


def no_gpu_reason_cheap() -> str | None:
    """Why there is surely no CUDA GPU, found without importing torch; None when there may be one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    dev = Path("/dev")
    # /dev/nvidiaN on Linux; /dev/dxg is WSL2's GPU; nvidia-smi: a driver whose devices live elsewhere
    if not any(dev.glob("nvidia[0-9]*")) and not (dev / "dxg").exists() and shutil.which("nvidia-smi") is None:
        return "no NVIDIA device (/dev/nvidia*) or driver (nvidia-smi) on this machine"
    return None


def no_gpu_reason() -> str | None:
    """None if torch sees a CUDA GPU; else why not. Imports torch only when the cheap signals allow a GPU."""
    reason = no_gpu_reason_cheap()
    if reason is not None:
        return reason
    try:
        import torch

        return None if torch.cuda.is_available() else "torch sees no CUDA GPU"
    except Exception as exc:  # torch missing or broken: no GPU test can run
        return f"torch cannot check for a GPU ({type(exc).__name__}: {exc})"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:  # the common case: nothing to decide, torch stays unimported
        return
    reason = no_gpu_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {reason}")
    for item in gpu_items:
        item.add_marker(skip)
