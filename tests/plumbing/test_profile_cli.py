"""The profile-summary command and the profiling options, through the real command line (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.trace_samples import trace_folder

pytestmark = pytest.mark.plumbing


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "vllm_rbln_exec", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_profile_summary_command(tmp_path):
    root = tmp_path / "profile"
    trace_folder(root, "reference_m_20250101-000000",
                 {"side": "reference", "engine": "vllm", "platform": "cpu",
                  "timings": {"capture_total_s": 1.0, "generated_tokens": 16.0}})
    trace_folder(root, "target_m_20250101-000000",
                 {"side": "target", "engine": "transformers", "platform": "cuda",
                  "timings": {"capture_total_s": 3.0, "generated_tokens": 16.0}})
    p = _cli("profile-summary", str(root), "--top", "3", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "reference (vllm cpu): top 3 of 5 CPU ops by self time" in out
    assert "target (transformers cuda): top 2 of 2 device kernels" in out
    assert "aten::addmm" in out and "sgemm_kernel" in out
    assert "speed of the measured generation" in out
    assert "3.00" in out  # the target took three times the reference's wall time
    assert "Traceback" not in p.stderr


def test_profile_summary_bad_dir_exits_2(tmp_path):
    p = _cli("profile-summary", str(tmp_path / "nope"), cwd=tmp_path)
    assert p.returncode == 2
    assert "does not exist" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.json").write_text("[1, 2")
    p = _cli("profile-summary", str(tmp_path / "t"), cwd=tmp_path)
    assert p.returncode == 2
    assert "not a readable chrome trace" in p.stderr


@pytest.mark.parametrize("args, option", [
    (["--profile-memory"], "--profile-memory needs --profile"),
    (["--profile-side", "both"], "--profile-side must be one of reference, target"),
])
def test_cli_refuses_bad_profiling_options_before_any_worker(tmp_path, args, option):
    # llama3-8b's weights are absent: a regression past the checks would end in exit 3, not 2
    p = _cli("--target", "cpu", "--model", "llama3-8b", "--cache-dir", str(tmp_path / "cache"), *args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert option in " ".join(p.stderr.split())
    assert not (tmp_path / "runs").exists() and not (tmp_path / "profile").exists()
