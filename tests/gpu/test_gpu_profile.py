"""--profile-side target on a CUDA transformers target: the trace must hold CUDA kernels.

Both sides run on transformers (the reference on the CPU) with the tiny model, so
no vLLM build and no downloaded weights are needed on the GPU machine. Skipped
without a GPU (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_rbln_exec.profiling.traces import summarize_folder

pytestmark = pytest.mark.gpu

ENV = {"NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb"}


def test_cuda_target_profile_shows_kernels(cli, tmp_path):
    traces = tmp_path / "traces"
    r = cli("--model", "tiny-llama3", "--target", "cuda", "--reference-engine", "transformers",
            "--target-engine", "transformers", "--max-tokens", "8", "--num-prompts", "2", "--no-inspect-logits",
            "--profile-side", "target", "--profile-dir", str(traces), env=ENV)
    # bfloat16 on the GPU against float32 on the CPU may or may not pass parity; the profile is under test
    assert r.returncode in (0, 1), r.stdout + r.stderr
    sides = r.report["sides"]
    assert sides["reference"]["profile"] is None
    folder = Path(sides["target"]["profile"]["dir"])
    assert folder.parent == traces.resolve()

    summary = summarize_folder(folder)
    assert summary.stats.device, "no CUDA kernels in the trace"
    assert summary.stats.device_us > 0
    assert any(name.startswith(("cuda", "cu")) for name in summary.stats.host), "no CUDA runtime calls on the host"

    out = " ".join(r.stdout.split())
    assert "target (transformers cuda): top" in out
    assert "device kernels by time" in out
    assert summary.stats.top("device", 1)[0].name[:40] in out
    assert "speed of the measured generation" in out
