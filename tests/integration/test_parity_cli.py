"""The real CLI end to end on vLLM's CPU engine (default model, a few layers and tokens).

One baseline run computes the reference (and saves it as a portable file); the
other tests reuse that file so that only the side under test runs. The subject
here is what real engines compute (bitwise agreement of two vLLM CPU runs,
teacher forcing in vLLM, its logprobs API against the logits processor,
transformers against vLLM). The harness's own plumbing (cache, reference files,
timeouts, crashes, signals, platform check, storage, reports, re-judging) is
tested on the fake engine in tests/plumbing, in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.helpers import make_cache_dir, run_cli

from vllm_rbln_exec.capture.store import load_capture

pytestmark = pytest.mark.integration

# fp32 storage: these tests compare two capture paths to 1e-6, below q16's resolution
BASE = ["--target", "cpu", "--num-hidden-layers", "4", "--max-tokens", "8", "--num-prompts", "2", "--store", "fp32"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    cache = make_cache_dir(root)
    run_dir = root / "run"
    ref_file = root / "reference.tar"
    proc = run_cli(["--cache-dir", str(cache), "--run-dir", str(run_dir), *BASE, "--save-reference", str(ref_file),
                    "--save-yardsticks", "none"],  # the float32 paths under test need no yardstick
                   cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((run_dir / "parity.json").read_text())["run"]
    return {"root": root, "cache": cache, "run_dir": run_dir, "ref_file": ref_file, "report": report,
            "stdout": proc.stdout, "stderr": proc.stderr}


def test_cpu_against_cpu_prints_the_report_and_agrees_exactly(baseline):
    out = baseline["stdout"]
    for expected in ("vllm-rbln-exec parity run", "Prompt 0:", "Prompt 1:", "summary over all prompts",
                     "top-5 at position 0", "pearson 1.000000 PASS", "KL by the reference's top-1 probability",
                     "logprobs full vocabulary (49152)"):
        assert expected in out, f"missing {expected!r} in:\n{out}"
    report = baseline["report"]
    assert report["sides"]["reference"]["platform"] == "cpu"
    assert report["sides"]["target"]["platform"] == "cpu"
    assert report["sides"]["target"]["source"] == "worker"
    summary = report["summary"]
    assert summary["positions_compared"] == 16
    assert summary["max_abs_diff"] == 0.0  # same engine, same platform, same batch: bitwise equal
    assert summary["distribution"]["kl_max"] == 0.0
    assert summary["distribution"]["top1_rate"] == 1.0
    # the worker environment record shows the profile at work
    env = report["sides"]["target"]["env"]
    assert env["set"]["VLLM_PLUGINS"] == "cpu"
    assert "VLLM_USE_V1" in env["skipped_unknown"]  # vLLM 0.32 no longer reads it


def test_forced_target_follows_the_reference_tokens(baseline):
    run_dir = baseline["run_dir"]
    ref = load_capture(run_dir / "reference" / "capture", verify_arrays=True)
    tgt = load_capture(run_dir / "target" / "capture", verify_arrays=True)
    assert tgt.settings["align"] == "forced"
    for i, (r, t) in enumerate(zip(ref.prompts, tgt.prompts, strict=True)):
        assert len(r.token_ids) == 8
        assert t.token_ids == r.token_ids
        rows = np.asarray(ref.logprobs(i))
        assert rows.shape == (8, 49152)
        # greedy: every generated token is the argmax of the row it was sampled from
        assert rows.argmax(axis=1).tolist() == r.token_ids
        # rows are log-probabilities
        assert np.allclose(np.logaddexp.reduce(rows.astype(np.float64), axis=1), 0.0, atol=1e-4)


def test_reference_file_replaces_the_reference_worker_and_api_capture_matches(baseline, cli):
    # the target captures through vLLM's logprobs API instead of the logits processor
    res = cli(*BASE, "--reference", str(baseline["ref_file"]), "--capture", "api", "--no-inspect-logits")
    assert res.returncode == 0, res.stderr
    report = res.report
    assert report["sides"]["reference"]["source"] == "file"
    assert not (res.run_dir / "reference" / "worker.log").exists()
    # fast path (reference) and API path (target) give the same numbers
    assert report["summary"]["max_abs_diff"] <= 1e-6
    assert report["summary"]["tokens_equal"] == 2


def test_transformers_target_against_the_vllm_reference(baseline, cli):
    # the default model in fp32: transformers eager on the CPU against vLLM on the CPU
    res = cli(*BASE, "--reference", str(baseline["ref_file"]), "--target-engine", "transformers",
              "--no-inspect-logits")
    assert res.returncode == 0, res.stderr
    report = res.report
    assert report["sides"]["target"]["engine"] == "transformers"
    assert report["sides"]["target"]["platform"] == "cpu"
    summary = report["summary"]
    d = summary["distribution"]
    for name in ("kl_mean", "kl_max", "kl_p99", "top1_rate", "ppl_ratio"):
        assert np.isfinite(d[name]), (name, d[name])
    assert np.isfinite(summary["max_abs_diff"]) and np.isfinite(summary["min_pearson"])
    # two fp32 implementations of the same model: summation order only
    assert d["kl_max"] < 1e-4
    assert summary["max_abs_diff"] < 5e-3
    assert d["top1_rate"] == 1.0
    assert summary["min_pearson"] > 0.9999




def test_engine_arguments_reach_the_vllm_target_and_the_report(baseline, cli):
    # prefix caching on the target only, against the saved reference: the report names the difference
    res = cli(*BASE, "--reference", str(baseline["ref_file"]), "--target-args", '{"enable_prefix_caching": true}',
              "--no-inspect-logits")
    assert res.returncode == 0, res.stdout + res.stderr
    report = res.report
    assert report["sides"]["target"]["engine_args"] == {"enable_prefix_caching": True}
    assert report["sides"]["target"]["effective"]["engine_args"]["enable_prefix_caching"] is True
    assert ["engine arg enable_prefix_caching", None, True] in report["resolved"]["differences"]
    assert "differs      engine arg enable_prefix_caching: null vs true" in res.stdout
    assert report["summary"]["max_abs_diff"] == 0.0  # a cache of prompt blocks changes nothing here


@pytest.mark.parametrize("value, message", [
    ('{"enable_prefix_cachin": true}', "unknown vllm engine argument 'enable_prefix_cachin'. Did you mean "
                                       "'enable_prefix_caching'"),
    ('{"dtype": "float16"}', "'dtype' is set by the harness; use --target-dtype"),
    ('[1, 2]', "must be a JSON object"),
    ('{not json', "must be a JSON object"),
])
def test_bad_engine_arguments_exit_2_before_any_engine(cli, value, message):
    res = cli(*BASE, "--target-args", value)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in " ".join(res.stderr.split()) and "--target-args" in res.stderr
    assert not (res.run_dir / "reference").exists()
