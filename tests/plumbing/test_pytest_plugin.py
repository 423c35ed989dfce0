"""The pytest plugin, loaded through its entry point in a separate pytest run, on the fake engine.

One passing and one failing parity test (the target runs a checkpoint whose logits carry a bias), a
device-marked test that is skipped here, and the JUnit file pytest writes for them; and harness errors
turned into clear failures.

Its subject is the plugin (the fixture, the markers, the session options, the failure text, JUnit), not the
engine: it ran on vLLM's CPU engine until three engine starts made it the tier's 13th slowest test (65 s in the
lead's clean-clone rehearsal of 2026-12-07, a busy machine); the same library call on vLLM is what
tests/integration/test_parity_cli.py runs. Here it takes seconds, beside the engines (issue 25).
"""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from tests.fakes.model import DEFAULT_VOCAB, make_fake_model
from tests.helpers import fake_env, make_cache_dir

from vllm_rbln_exec.verdict.defaults import DEFAULT_TOLERANCES

pytestmark = pytest.mark.plumbing
pytest_plugins = ["pytester"]

COMMON = dict(max_tokens=6, num_prompts=2, store="fp32", use_cache=True, reference_engine="fake",
              target_engine="fake")


@pytest.fixture
def fake_engine(monkeypatch):
    """The inner pytest run and the workers it starts find the fake engine (as the plumbing CLI runs do)."""
    for name, value in fake_env().items():
        monkeypatch.setenv(name, value)


def test_plugin_fixture_passes_fails_and_selects_devices(pytester, tmp_path, fake_engine):
    cache = make_cache_dir(tmp_path)
    model = make_fake_model(tmp_path / "fake-model", num_hidden_layers=2)
    bias = np.random.default_rng(0).standard_normal(DEFAULT_VOCAB) * 0.5
    perturbed = make_fake_model(tmp_path / "perturbed", num_hidden_layers=2, bias=bias)
    pytester.makepyfile(test_parity=textwrap.dedent(f"""
        import pytest

        COMMON = {COMMON!r}

        def test_cpu_matches(parity):
            outcome = parity.check(model={str(model)!r}, target="cpu", **COMMON).assert_ok()
            assert outcome.run["summary"]["distribution"]["kl_max"] == 0.0

        @pytest.mark.parity(target="cpu", **COMMON)
        def test_perturbed_checkpoint_fails(parity):
            parity.check(model={str(model)!r}, target_model={str(perturbed)!r}).assert_ok()

        @pytest.mark.parity_device("rbln")
        def test_rbln(parity):
            parity.check(model={str(model)!r}, max_tokens=4).assert_ok()
    """))
    junit = tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess("--parity-cache-dir", str(cache), f"--junitxml={junit}", "-rs",
                                           timeout=300)
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    out = result.stdout.str()
    flat = " ".join(out.split())
    # the failure names prompt, position, metric, value and tolerance
    assert f"parity fails for {model} on cpu" in flat
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
