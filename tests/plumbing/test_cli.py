"""The real command line, run as a subprocess (plumbing tier). Every case fails (or lists) before any engine starts.

As a safety net the runs that are meant to fail early also name a model whose weights
are absent (HF_HUB_CACHE points at an empty folder), so a regression in the early checks
ends in exit 3 instead of starting a worker.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vllm_rbln_exec.setup.devices import USER_FILE_ENV

pytestmark = pytest.mark.plumbing

ABSENT_MODEL = ["--model", "llama3-8b"]


@pytest.fixture
def cli_run(tmp_path):
    hub = tmp_path / "empty-hf-hub"
    hub.mkdir()
    env = dict(os.environ)
    env.pop(USER_FILE_ENV, None)
    env.update(HF_HUB_CACHE=str(hub), NO_COLOR="1", COLUMNS="200", TERM="dumb")
    cache_dir = tmp_path / "cache"

    def run(*args: str, cache: bool = True) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "vllm_rbln_exec", *args]
        if cache:
            argv += ["--cache-dir", str(cache_dir)]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        proc.flat_err = " ".join(proc.stderr.split())  # rich wraps long lines
        proc.flat_out = " ".join(proc.stdout.split())
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    run.tmp_path = tmp_path
    return run


def assert_nothing_ran(tmp_path):
    assert not (tmp_path / "runs").exists(), "a run folder was made: the CLI got past its early checks"


def test_max_tokens_zero(cli_run):
    p = cli_run("--max-tokens", "0", "--target", "cpu", *ABSENT_MODEL)
    assert p.returncode == 2, p.stderr
    assert "--max-tokens" in p.flat_err
    assert "usage error" in p.flat_err
    assert_nothing_ran(cli_run.tmp_path)


def test_logprobs_zero(cli_run):
    p = cli_run("--logprobs", "0", "--target", "cpu", *ABSENT_MODEL)
    assert p.returncode == 2, p.stderr
    assert "--logprobs" in p.flat_err


def test_unknown_model_lists_the_aliases(cli_run):
    p = cli_run("--model", "no-such-model", "--target", "cpu")
    assert p.returncode == 2, p.stderr
    assert "unknown model 'no-such-model'" in p.flat_err
    for alias in ("smollm2-135m", "llama3-8b", "qwen3-1.7b"):
        assert alias in p.flat_err
    assert_nothing_ran(cli_run.tmp_path)


def test_near_miss_model_gets_a_did_you_mean(cli_run):
    p = cli_run("--model", "smollm2-135", "--target", "cpu")
    assert p.returncode == 2, p.stderr
    assert "Did you mean 'smollm2-135m'?" in p.flat_err


def test_unknown_target_lists_the_devices(cli_run):
    p = cli_run("--target", "nosuch", *ABSENT_MODEL)
    assert p.returncode == 2, p.stderr
    assert "unknown device 'nosuch'" in p.flat_err
    assert "cpu, cuda, cuda-fp32, rbln" in p.flat_err
    assert_nothing_ran(cli_run.tmp_path)


def test_parallelism_the_target_lacks(cli_run, tmp_path):
    # the shipped cpu profile accepts --tp (vLLM's CPU backend has tensor parallelism), so a
    # user device file takes it away; --pp is refused by the shipped profile itself
    devices = tmp_path / "devices.toml"
    devices.write_text("[device.cpu]\nparallel = []\n")
    p = cli_run("--target", "cpu", "--tp", "2", "--devices", str(devices), *ABSENT_MODEL)
    assert p.returncode == 2, p.stderr
    assert "does not support --tp" in p.flat_err

    p = cli_run("--target", "cpu", "--pp", "2", *ABSENT_MODEL)
    assert p.returncode == 2, p.stderr
    assert "does not support --pp (allowed: --tp)" in p.flat_err
    assert_nothing_ran(tmp_path)


def test_missing_weights_exit_3_without_traceback(cli_run):
    p = cli_run("--target", "cpu", *ABSENT_MODEL)
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr
    assert "error:" in p.flat_err and "usage error" not in p.flat_err
    assert "--model DIR" in p.flat_err
    assert "meta-llama/Meta-Llama-3-8B" in p.flat_err
    assert_nothing_ran(cli_run.tmp_path)


def test_models_subcommand(cli_run):
    p = cli_run("models", cache=False)
    assert p.returncode == 0, p.stderr
    for alias in ("smollm2-135m", "gemma3-270m", "llama3-8b", "qwen3-moe-30b"):
        assert alias in p.stdout
    assert "(needs --ep)" in p.stdout
    gemma = next(line for line in p.stdout.splitlines() if line.startswith("gemma3-270m"))
    assert "Gemma terms of use apply" in gemma and "--max-model-len 1024" in gemma


def test_devices_subcommand(cli_run, tmp_path):
    p = cli_run("devices", cache=False)
    assert p.returncode == 0, p.stderr
    for name in ("cpu", "rbln", "cuda"):
        assert f"platform={name}" in p.flat_out

    extra = tmp_path / "devices.toml"
    extra.write_text('[device.mynpu]\nplatform = "npu"\ndescription = "added"\n')
    p = cli_run("devices", "--devices", str(extra), cache=False)
    assert p.returncode == 0, p.stderr
    assert "mynpu platform=npu" in p.flat_out

    extra.write_text('[device.mynpu]\nplatfrom = "npu"\n')
    p = cli_run("devices", "--devices", str(extra), cache=False)
    assert p.returncode == 2
    assert "platform" in p.flat_err


def test_help_mentions_exit_codes(cli_run):
    p = cli_run("--help", cache=False)
    assert p.returncode == 0, p.stderr
    assert "Exit codes" in p.flat_out
    assert "2 bad usage" in p.flat_out
    assert "3 the harness could not run" in p.flat_out


def test_run_options_before_a_subcommand_are_refused_not_dropped(cli_run):
    report = cli_run.tmp_path / "r.json"
    report.write_text("{}")
    p = cli_run("--fail-on", "kl_mean>0", "--json", "x.json", "compare", str(report), cache=False)
    assert p.returncode == 2, p.stderr
    assert "--fail-on, --json belong(s) to the parity run" in p.flat_err and "'compare'" in p.flat_err
    p = cli_run("--no-color", "models", cache=False)  # the one option both share is fine
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("content, message", [
    ('{"summary": {}, "comparisons": "x"}', "comparisons is the string 'x', where a list belongs"),
    ('{"summary": [], "comparisons": []}', "summary is a list, where an object belongs"),
    ('{"summary": {}, "comparisons": []}', "compares no positions"),
    ('{"summary": {"positions_compared": 0}, "comparisons": [{"index": 0, "prompt": "a"}]}',
     "compares no positions"),
    ('{"summary": {"positions_compared": 3}, "comparisons": [{}]}', "comparisons[0] has no index, prompt"),
])
def test_compare_refuses_a_malformed_or_empty_report(cli_run, content, message):
    # an empty report must not be judged "PARITY HOLDS"
    report = cli_run.tmp_path / "r.json"
    report.write_text(content)
    p = cli_run("compare", str(report), cache=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.flat_err and "PARITY HOLDS" not in p.flat_out


def test_a_spec_that_is_not_utf8_is_a_usage_error(cli_run):
    spec = cli_run.tmp_path / "bin.toml"
    spec.write_bytes(b"\xff\xfe[x]\n")
    p = cli_run("--spec", str(spec), "--target", "cpu", *ABSENT_MODEL)
    assert p.returncode == 2, p.stderr
    assert "is not valid TOML" in p.flat_err
    assert_nothing_ran(cli_run.tmp_path)


def test_a_report_path_that_cannot_be_written_is_refused_before_the_run(cli_run):
    blocker = cli_run.tmp_path / "a-file"
    blocker.write_text("")
    p = cli_run("--junit", str(blocker / "sub" / "r.xml"), "--target", "cpu", *ABSENT_MODEL)
    assert p.returncode == 2, p.stderr
    assert "--junit" in p.flat_err and "is not a writable folder" in p.flat_err
    assert_nothing_ran(cli_run.tmp_path)


@pytest.mark.parametrize("value, hint", [("bogus", "Known: auto"), ("vlm:bf16", "Did you mean 'vllm'")])
def test_bad_yardstick_lists_the_choices(cli_run, value, hint):
    p = cli_run("--yardstick", value, "--target", "cpu", "--target-dtype", "bfloat16", *ABSENT_MODEL)
    assert p.returncode == 2, p.stderr
    assert "--yardstick" in p.flat_err and hint in p.flat_err and "ENGINE[:DTYPE]" in p.flat_err
    assert_nothing_ran(cli_run.tmp_path)
