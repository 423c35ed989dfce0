"""Helpers for tests that drive the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO / "cache" / "models"


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def report(self) -> dict:
        return json.loads((self.run_dir / "report.json").read_text())


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vllm_rbln_exec", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_cache_dir(root: Path) -> Path:
    """A fresh reference cache whose models/ is the shared folder (conversion happens once)."""
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    SHARED_MODELS.mkdir(parents=True, exist_ok=True)
    link = cache / "models"
    if not link.exists():
        link.symlink_to(SHARED_MODELS, target_is_directory=True)
    return cache
