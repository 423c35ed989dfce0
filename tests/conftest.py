"""Shared fixtures: the real CLI in a subprocess, a per-test cache that shares
the converted default model, and GPU detection for the `gpu` marker."""

from __future__ import annotations

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


def gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
