"""The pytest plugin, loaded through its entry point in a separate pytest run, on vLLM's CPU engine.

One passing and one failing parity test (the target runs a checkpoint with
perturbed weights), a device-marked test that is skipped here, and the JUnit
file pytest writes for them.
"""

from __future__ import annotations

import shutil
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import make_cache_dir

from vllm_rbln_exec.verdict.defaults import DEFAULT_TOLERANCES

pytestmark = pytest.mark.integration
pytest_plugins = ["pytester"]

COMMON = dict(num_hidden_layers=2, max_tokens=6, num_prompts=2, store="fp32", use_cache=True)


def _perturbed_model(dest: Path, cache: Path) -> Path:
    """A copy of the default model's 2-layer cut with noise in one MLP weight."""
    from safetensors.numpy import load_file, save_file

    from vllm_rbln_exec.setup.models import resolve_model, truncate_model

    resolved = resolve_model("smollm2-135m", cache / "models")
    if resolved.needs_conversion:
        pytest.skip("the default model is not converted yet (the CLI tests convert it)")
    src = truncate_model(resolved.path, 2, cache / "models")
    shutil.copytree(src, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    w = tensors[name]
    tensors[name] = (w + np.random.default_rng(0).normal(scale=float(w.std()), size=w.shape)).astype(w.dtype)
    save_file(tensors, str(dest / "model.safetensors"))
    return dest


def test_plugin_fixture_passes_fails_and_selects_devices(pytester, tmp_path):
    cache = make_cache_dir(tmp_path)
    perturbed = _perturbed_model(tmp_path / "perturbed", cache)
    pytester.makepyfile(test_parity=textwrap.dedent(f"""
        import pytest

        COMMON = {COMMON!r}

        def test_cpu_matches(parity):
            outcome = parity.check(model="smollm2-135m", target="cpu", **COMMON).assert_ok()
            assert outcome.run["summary"]["distribution"]["kl_max"] == 0.0

        @pytest.mark.parity(target="cpu", **COMMON)
        def test_perturbed_checkpoint_fails(parity):
            parity.check(model="smollm2-135m", target_model={str(perturbed)!r}).assert_ok()

        @pytest.mark.parity_device("rbln")
        def test_rbln(parity):
            parity.check(model="smollm2-135m", max_tokens=4).assert_ok()
    """))
    junit = tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess("--parity-cache-dir", str(cache), f"--junitxml={junit}", "-rs",
                                           timeout=1500)
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    out = result.stdout.str()
    flat = " ".join(out.split())
    # the failure names prompt, position, metric, value and tolerance
    assert "parity fails for smollm2-135m on cpu" in flat
    kl_gate = next(expr for expr, _ in DEFAULT_TOLERANCES["float32"] if expr.startswith("kl_mean>"))
    assert f"(tolerance {kl_gate})" in flat
    assert 'prompt 0 "' in flat and "position" in flat
    assert "parity device rbln is not present here" in flat

    suite = ET.parse(junit).getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["test_cpu_matches"].find("failure") is None
    failure = cases["test_perturbed_checkpoint_fails"].find("failure")
    assert failure is not None and kl_gate in (failure.get("message", "") + (failure.text or ""))
    assert cases["test_rbln"].find("skipped") is not None


def test_plugin_turns_a_harness_error_into_a_clear_failure(pytester):
    pytester.makepyfile(test_bad="""
        def test_unknown_option(parity):
            parity.check(model="smollm2-135m", no_such_option=1)

        def test_unknown_model(parity):
            parity.check(model="no-such-model", target="cpu")

        def test_bad_value(parity):
            parity.check(model="smollm2-135m", max_tokens=0)
    """)
    result = pytester.runpytest_subprocess(timeout=300)
    result.assert_outcomes(failed=3)
    flat = " ".join(result.stdout.str().split())
    assert "unknown option 'no_such_option'" in flat
    assert "parity.check could not run (exit 2)" in flat and "no-such-model" in flat
    assert "max-tokens" in flat or "max_tokens" in flat
    assert "Traceback" not in flat
