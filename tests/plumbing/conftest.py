"""The plumbing tier: the real command line and real worker subprocesses, with no real engine.

Runs take seconds: both sides use the numpy-only fake engine (tests/fakes/engine.py),
registered through VLLM_RBLN_EXEC_ENGINES, on a small model folder it accepts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.fakes.model import make_fake_model
from tests.helpers import FAKE_CLI, CliResult, fake_args, fake_env, run_cli


@pytest.fixture(scope="session")
def fake_model(tmp_path_factory) -> Path:
    """A 4-layer fake-engine model folder with the default 257-token vocabulary."""
    return make_fake_model(tmp_path_factory.mktemp("fake-model") / "fake-4l", num_hidden_layers=4)


@pytest.fixture
def fake_cli(tmp_path, fake_model):
    """fake_cli(args..., run="name", switches={...}) -> CliResult: the real CLI on the fake engine
    (cache in tmp_path/cache unless ``cache_dir`` is given; later options override the defaults)."""
    counter = {"n": 0}

    def _run(*args: str, run: str | None = None, switches: dict | None = None, cache_dir: Path | None = None,
             timeout: float = 120) -> CliResult:
        counter["n"] += 1
        run_dir = tmp_path / (run or f"run{counter['n']}")
        proc = run_cli(["--cache-dir", str(cache_dir or tmp_path / "cache"), "--run-dir", str(run_dir),
                        *fake_args(fake_model), *args],
                       cwd=tmp_path, env=fake_env(**(switches or {})), timeout=timeout, module=FAKE_CLI)
        return CliResult(proc.returncode, proc.stdout, proc.stderr, run_dir)

    return _run
