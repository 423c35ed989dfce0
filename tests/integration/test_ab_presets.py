"""``--ab NAME`` end to end on vLLM's CPU engine: both sides on the CPU, differing in one feature.

One run per preset the CPU build supports (2 layers, 2 prompts, 4 tokens): it must give a verdict, name
the differing engine arguments at the top of the report and record the preset. The numbers these presets
measure on the CPU, and the tolerances set from them, are in docs/ab.md.
"""

from __future__ import annotations

import json

import pytest
from tests.helpers import make_cache_dir, run_cli

pytestmark = pytest.mark.integration

SMALL = ["--target", "cpu", "--num-hidden-layers", "2", "--max-tokens", "4", "--num-prompts", "2", "--no-color",
         "--no-inspect-logits"]
DIFFERS = {
    "prefix-caching": "engine arg enable_prefix_caching: false vs true",
    "chunked-prefill": "engine arg max_num_batched_tokens: null vs 64",
    "batch-invariance": "engine arg max_num_seqs: 1 vs null",
    "spec-decode": "engine arg speculative_config: null vs",
}


@pytest.mark.parametrize("preset", sorted(DIFFERS))
def test_ab_preset_runs_on_the_cpu_and_names_what_differs(tmp_path, preset):
    cache = make_cache_dir(tmp_path)
    run_dir = tmp_path / "run"
    # spec-decode: 4 tokens of 2 prompts gave n-gram lookup nothing to draft (0 draft tokens); 8 do
    more = ["--max-tokens", "8"] if preset == "spec-decode" else []
    proc = run_cli(["--ab", preset, "--cache-dir", str(cache), "--run-dir", str(run_dir), *SMALL, *more],
                   cwd=tmp_path)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # a verdict, pass or fail: not a usage/harness error
    head = proc.stdout.split("summary over all prompts")[0]
    assert f"A/B          {preset}:" in head
    assert DIFFERS[preset] in head, proc.stdout
    saved = json.loads((run_dir / "parity.json").read_text())
    run = saved["run"]
    assert run["resolved"]["ab"]["preset"] == preset
    assert run["sides"]["reference"]["device"] == run["sides"]["target"]["device"] == "cpu"
    assert run["summary"]["positions_compared"] > 0
    assert "passed" in saved["verdict"]
    if preset == "spec-decode":
        spec = run["sides"]["target"]["effective"]["spec_decode"]
        assert spec["draft_tokens"] > 0 and 0.0 <= spec["acceptance_rate"] <= 1.0
        assert "acceptance" in proc.stdout
        assert run["settings"]["align"] == "free"
    else:
        assert proc.returncode == 0, proc.stdout  # measured on the CPU within the preset's tolerance
