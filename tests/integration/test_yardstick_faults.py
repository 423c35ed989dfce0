"""The built-in verdict on real engines: a planted 1 % kernel-scale fault fails at float32, identical sides
pass, and an honest bfloat16 target passes against its yardstick (default model, 4 layers, few tokens).

The fault is made by the project itself (``setup.faults``) from the converted default model, and the
run is judged by the built-in tolerances only (no --fail-on): this is what the defaults can see.
"""

from __future__ import annotations

import json

import pytest
from tests.helpers import make_cache_dir, run_cli

from vllm_rbln_exec.setup.faults import parse_fault, plant
from vllm_rbln_exec.setup.models import resolve_model

pytestmark = pytest.mark.integration

BASE = ["--target", "cpu", "--num-hidden-layers", "4", "--max-tokens", "8", "--num-prompts", "2", "--use-cache",
        "--no-inspect-logits"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("yardstick")
    cache = make_cache_dir(root)
    model = resolve_model("smollm2-135m", cache / "models")
    if model.path is None or not (model.path / "config.json").is_file():
        pytest.skip("the default model is not converted yet (run tests/integration/test_parity_cli.py first)")
    fault = plant(model.path, root / "fault-o_proj", parse_fault("scale:2:o_proj:1.01"))
    return root, cache, fault


def run(setup, name: str, *args: str) -> tuple[int, dict, str]:
    root, cache, _ = setup
    proc = run_cli(["--cache-dir", str(cache), "--run-dir", str(root / name), *BASE, *args], cwd=root)
    data = json.loads((root / name / "parity.json").read_text())
    return proc.returncode, data, proc.stdout + proc.stderr


def test_identical_sides_pass_and_a_one_percent_scale_fault_fails_at_float32(setup):
    code, data, out = run(setup, "identical", "--target-dtype", "float32")
    assert code == 0, out
    assert data["run"]["yardstick"] is None  # float32 against float32: auto adds none
    code, data, out = run(setup, "fault", "--target-dtype", "float32", "--target-model", str(setup[2]))
    assert code == 1, out
    failed = {v["path"] for v in data["verdict"]["violations"]}
    assert "distribution.kl_mean" in failed, data["verdict"]["violations"]
    assert any("position 0" in f for f in data["verdict"]["findings"])  # a weight fault is there from prefill on


def test_honest_bfloat16_passes_against_its_yardstick(setup):
    code, data, out = run(setup, "bf16", "--target-dtype", "bfloat16", "--markdown", str(setup[0] / "bf16.md"))
    assert code == 0, out
    yard = data["run"]["yardstick"]
    assert yard["side"]["dtype"] == "bfloat16" and yard["side"]["engine"] == "vllm"
    ratio = yard["ratios"]["overall"]["distribution.kl_mean"]
    assert yard["summary"]["distribution"]["kl_mean"] > 0 and 0.5 < ratio["ratio"] < 2, ratio
    assert any("*yardstick" in c["gate"] for c in data["verdict"]["checked"])
    assert "**Yardstick**" in (setup[0] / "bf16.md").read_text()
