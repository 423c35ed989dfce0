"""The harness's own plumbing end to end: the real CLI, real worker processes, the fake engine.

Each run takes seconds. What a real engine computes is left to tests/integration;
here the subject is what the harness does around the engines: spawning, ending
every process, timeouts, crashes, the platform check, the reference cache and
files, teacher forcing, storage, the verdict and its reports, and re-judging.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from tests.fakes.model import make_fake_model
from tests.fakes.tensorfile import read_safetensors, write_safetensors
from tests.helpers import (
    FAKE_CLI,
    FAKE_MAX_TOKENS,
    FAKE_PROMPTS,
    fake_args,
    fake_env,
    processes_mentioning,
    run_cli,
)

from vllm_rbln_exec.capture.q16 import Q16_MAX_ERROR, Q16_RANGE
from vllm_rbln_exec.capture.store import load_capture

pytestmark = pytest.mark.plumbing

POSITIONS = FAKE_MAX_TOKENS * FAKE_PROMPTS
TARGET_ONLY = {"sides": "target"}


def _no_nan(name: str):
    raise AssertionError(f"{name} in a JSON report: reports must be strict JSON")


def _flat(text: str) -> str:
    return " ".join(text.split())


# -- a passing run ------------------------------------------------------------------------------------------
def test_identical_sides_pass_with_exit_0(fake_cli):
    res = fake_cli("--store", "fp32")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for expected in ("vllm-rbln-exec parity run", "Prompt 0:", "Prompt 1:", "summary over all prompts",
                     "top-5 at position 0", "pearson 1.000000 PASS", "logprobs full vocabulary (257)",
                     "PARITY HOLDS"):
        assert expected in out, f"missing {expected!r} in:\n{out}"
    report = res.report
    for side in ("reference", "target"):
        record = report["sides"][side]
        assert (record["engine"], record["platform"], record["source"]) == ("fake", "cpu", "worker")
        assert record["engine_version"] == "fake-1"
        assert (res.run_dir / side / "worker.log").is_file()
    summary = report["summary"]
    assert summary["positions_compared"] == POSITIONS
    assert summary["max_abs_diff"] == 0.0
    assert summary["distribution"]["kl_max"] == 0.0 and summary["distribution"]["top1_rate"] == 1.0
    # the worker environment was built by the cpu profile
    assert report["sides"]["target"]["env"]["set"]["VLLM_PLUGINS"] == "cpu"
    assert json.loads((res.run_dir / "parity.json").read_text(), parse_constant=_no_nan)["passed"] is True
    assert processes_mentioning(res.run_dir) == []


def test_forced_target_follows_the_reference_tokens(fake_cli):
    # the target is shifted everywhere, so its own argmax would leave the reference's tokens
    res = fake_cli("--store", "fp32", "--no-inspect-logits", switches={**TARGET_ONLY, "shift": "8"})
    assert res.returncode == 1, res.stdout + res.stderr
    ref = load_capture(res.run_dir / "reference" / "capture", verify_arrays=True)
    tgt = load_capture(res.run_dir / "target" / "capture", verify_arrays=True)
    assert tgt.settings["align"] == "forced" and ref.settings["align"] == "free"
    for i, (r, t) in enumerate(zip(ref.prompts, tgt.prompts, strict=True)):
        assert len(r.token_ids) == FAKE_MAX_TOKENS
        assert t.token_ids == r.token_ids  # fed the reference's tokens, not its own argmax
        ref_rows = np.asarray(ref.logprobs(i))
        tgt_rows = np.asarray(tgt.logprobs(i))
        assert ref_rows.shape == (FAKE_MAX_TOKENS, 257)
        assert ref_rows.argmax(axis=1).tolist() == r.token_ids  # greedy
        assert (tgt_rows.argmax(axis=1) != ref_rows.argmax(axis=1)).all()  # the shift moved every argmax
        assert np.allclose(np.logaddexp.reduce(ref_rows.astype(np.float64), axis=1), 0.0, atol=1e-5)
    assert res.report["summary"]["positions_compared"] == POSITIONS


def test_top_n_capture(fake_cli):
    res = fake_cli("--logprobs", "5", "--no-inspect-logits")
    assert res.returncode == 0, res.stdout + res.stderr
    ref = load_capture(res.run_dir / "reference" / "capture", verify_arrays=True)
    assert ref.mode == "topn"
    ids = ref.top_ids(0)
    assert ids.shape == (FAKE_MAX_TOKENS, 5) and ids[:, 0].tolist() == ref.prompts[0].token_ids
    assert res.report["summary"]["max_abs_diff"] == 0.0


# -- a failing verdict -------------------------------------------------------------------------------------
def test_shifted_target_fails_with_exit_1_naming_the_prompt_and_position(fake_cli, tmp_path):
    report_file = tmp_path / "reports" / "r.json"
    res = fake_cli("--store", "fp32", "--json", str(report_file), switches={**TARGET_ONLY, "shift": "6@1:3"})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "PARITY FAILS" in res.stdout
    flat = _flat(res.stdout)
    assert "prompt 1" in flat and "position 3" in flat
    report = json.loads(report_file.read_text(), parse_constant=_no_nan)
    violations = report["verdict"]["violations"]
    assert violations and all(v["prompt_index"] == 1 for v in violations if v["prompt_index"] is not None)
    assert {v["position"] for v in violations if v["position"] is not None} == {3}
    # only that one row differs
    ref = load_capture(res.run_dir / "reference" / "capture")
    tgt = load_capture(res.run_dir / "target" / "capture")
    for i in range(FAKE_PROMPTS):
        differs = np.nonzero((np.asarray(ref.logprobs(i)) != np.asarray(tgt.logprobs(i))).any(axis=1))[0]
        assert differs.tolist() == ([3] if i == 1 else [])


def _perturbed(src: Path, dest: Path, scale: float) -> Path:
    shutil.copytree(src, dest)
    tensors = read_safetensors(dest / "model.safetensors")
    rng = np.random.default_rng(0)
    tensors["lm_head.bias"] = (tensors["lm_head.bias"] + rng.normal(scale=scale, size=257)).astype(np.float32)
    write_safetensors(tensors, dest / "model.safetensors")
    return dest


def test_perturbed_target_model_fails_with_reports_and_compare_rejudges(fake_cli, fake_model, tmp_path):
    baseline = fake_cli("--store", "fp32", "--no-inspect-logits")
    assert baseline.returncode == 0, baseline.stderr
    perturbed = _perturbed(fake_model, tmp_path / "perturbed", scale=2.0)
    out = tmp_path / "reports"
    res = fake_cli("--store", "fp32", "--target-model", str(perturbed), "--no-inspect-logits",
                   "--fail-on", "prompt:kl_max>0.01", "--json", str(out / "r.json"), "--junit", str(out / "r.xml"),
                   "--markdown", str(out / "r.md"))
    # the built-in fp32 tolerances catch it: exit 1, every violation listed
    assert res.returncode == 1, res.stdout + res.stderr
    d = res.report["summary"]["distribution"]
    assert d["kl_mean"] > 1e-3 and d["kl_max"] > baseline.report["summary"]["distribution"]["kl_max"]
    assert baseline.report["summary"]["argmax_divergences"] == 0
    assert res.report["summary"]["argmax_divergences"] >= 1
    assert d["top1_rate"] < 1.0
    assert "worst positions by KL" in res.stdout and "PARITY FAILS" in res.stdout
    flat = _flat(res.stdout)
    assert "kl_mean" in flat and "(tolerance kl_mean>3e-8)" in flat

    report = json.loads((out / "r.json").read_text(), parse_constant=_no_nan)
    verdict = report["verdict"]
    assert report["passed"] is False and verdict["passed"] is False
    gates = {v["gate"] for v in verdict["violations"]}
    assert "kl_mean>3e-8" in gates and "prompt:kl_max>0.01" in gates
    per_prompt = [v for v in verdict["violations"] if v["gate"] == "prompt:kl_max>0.01"]
    assert {v["prompt_index"] for v in per_prompt} == {0, 1}
    assert all(v["position"] is not None and v["value"] > 0.01 for v in per_prompt)
    assert report["run"]["sides"]["target"]["env"]["set"]["VLLM_PLUGINS"] == "cpu"
    assert report["run"]["cache"]["key"]

    suite = ET.parse(out / "r.xml").getroot().find("testsuite")
    assert suite.get("tests") == "3" and int(suite.get("failures")) >= 2
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"overall", "prompt_0", "prompt_1"}
    for name in ("prompt_0", "prompt_1"):
        failure = cases[name].find("failure")
        assert failure is not None and "prompt:kl_max>0.01" in (failure.get("message", "") + (failure.text or ""))
    overall = cases["overall"].find("failure")
    assert overall is not None and "kl_mean>3e-8" in overall.get("message", "") + (overall.text or "")
    md = (out / "r.md").read_text()
    assert "❌" in md and "kl_mean>3e-8" in md

    # re-judged without any model: looser tolerances pass (exit 0), the saved report fails again (exit 1)
    proc = run_cli(["compare", str(res.run_dir), "--no-default-gates", "--fail-on", "kl_mean>10"], cwd=tmp_path,
                   env=fake_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PARITY HOLDS" in proc.stdout
    proc = run_cli(["compare", str(out / "r.json")], cwd=tmp_path, env=fake_env())
    assert proc.returncode == 1 and "kl_mean>3e-8" in _flat(proc.stdout)
    assert not list(res.run_dir.glob("*-r2"))  # compare started no worker


def test_target_model_with_another_vocabulary_is_refused_before_any_engine(fake_cli, tmp_path):
    other = make_fake_model(tmp_path / "other-vocab", vocab_size=300, num_hidden_layers=4)
    res = fake_cli("--target-model", str(other))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "vocabulary" in res.stderr and "300" in res.stderr
    assert not (res.run_dir / "target").exists() and not (res.run_dir / "reference").exists()


# -- workers that fail ---------------------------------------------------------------------------------------
def test_a_model_the_engine_refuses_exits_3_with_its_log(fake_cli, fake_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fake_model, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    res = fake_cli("--model", str(broken))
    assert res.returncode == 3, res.stdout + res.stderr
    assert "reference worker" in res.stderr
    assert "last lines of the reference worker's log" in res.stderr
    assert "NoSuchModelForCausalLM" in res.stderr
    assert "Traceback" not in res.stderr.split("last lines")[0]  # the CLI's own message is no traceback
    assert not (res.run_dir / "target").exists()  # forced mode: the target never started
    assert processes_mentioning(res.run_dir) == []


@pytest.mark.parametrize("side, stage", [("reference", "start"), ("target", "generate")])
def test_an_engine_error_exits_3_naming_the_side(fake_cli, side, stage):
    res = fake_cli(switches={"sides": side, "crash": stage, "child": "1"})
    assert res.returncode == 3, res.stdout + res.stderr
    assert f"{side} worker" in res.stderr
    assert f"fake engine crashed at {stage}" in res.stderr
    assert f"last lines of the {side} worker's log" in res.stderr
    assert f"full log: {res.run_dir / side / 'worker.log'}" in _flat(res.stderr)
    assert processes_mentioning(res.run_dir) == []


def test_a_killed_worker_exits_3_with_its_log_tail_and_leaves_no_process(fake_cli):
    # SIGKILL mid-generation: no result file, and the engine's child process is orphaned
    # in the worker's process group; the harness must end it
    res = fake_cli(switches={**TARGET_ONLY, "crash": "kill", "child": "1"})
    assert res.returncode == 3, res.stdout + res.stderr
    flat = _flat(res.stderr)
    assert "target worker" in flat and "crashed: the process was killed by signal 9 without a result" in flat
    assert "last lines of the target worker's log" in res.stderr
    assert "fake engine: started child process" in res.stderr
    assert "fake engine: killing itself with SIGKILL" in res.stderr
    assert processes_mentioning(res.run_dir) == []


def test_a_hanging_worker_is_stopped_at_the_timeout(fake_cli):
    t0 = time.monotonic()
    res = fake_cli("--timeout", "3", switches={"hang": "start", "child": "1"})
    elapsed = time.monotonic() - t0
    assert res.returncode == 3, res.stdout + res.stderr
    assert "timed out after 3 s" in res.stderr and "reference worker" in res.stderr
    assert "fake engine: hanging at start" in res.stderr  # the log tail comes with it
    assert elapsed < 60
    assert processes_mentioning(res.run_dir) == []


def test_a_hang_mid_generation_is_stopped_too(fake_cli):
    res = fake_cli("--timeout", "3", switches={**TARGET_ONLY, "hang": "generate", "child": "1"})
    assert res.returncode == 3, res.stdout + res.stderr
    assert "target worker" in res.stderr and "timed out after 3 s" in res.stderr
    assert (res.run_dir / "reference" / "capture" / "capture.json").is_file()
    assert processes_mentioning(res.run_dir) == []


def test_platform_mismatch_stops_the_run_naming_both_platforms(fake_cli, tmp_path):
    devices = tmp_path / "devices.toml"
    devices.write_text('[device.fakeaccel]\nplatform = "fakeaccel"\ntorch_device = "fakeaccel"\n'
                       'description = "claims an accelerator, runs on the CPU"\n')
    # first the profile works: the engine reports the torch device it was given
    ok = fake_cli("--target", "fakeaccel", "--devices", str(devices), "--no-inspect-logits")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.report["sides"]["target"]["platform"] == "fakeaccel"
    res = fake_cli("--target", "fakeaccel", "--devices", str(devices), switches={**TARGET_ONLY, "platform": "cpu"})
    assert res.returncode == 3, res.stdout + res.stderr
    flat = _flat(res.stderr)
    assert "target worker" in flat
    assert "asked for device 'fakeaccel' (platform 'fakeaccel') but fake ran on platform 'cpu'" in flat
    assert processes_mentioning(res.run_dir) == []


def test_sigterm_mid_run_stops_the_workers_and_exits_143(tmp_path, fake_model):
    # CI cancelling a job or `timeout` sends SIGTERM, which by default ends Python
    # without unwinding: the workers, in their own sessions, would run on.
    run_dir = tmp_path / "run"
    err_path = tmp_path / "stderr.txt"
    env = fake_env(sides="target", delay="0.5", child="1")
    with open(tmp_path / "stdout.txt", "w") as out, open(err_path, "w") as err_file:  # files: a pipe could fill
        proc = subprocess.Popen(
            [sys.executable, "-m", FAKE_CLI, "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(run_dir),
             *fake_args(fake_model)], cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out,
            stderr=err_file)
    events = run_dir / "target" / "events.jsonl"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (events.is_file() and '"generate"' in events.read_text()):
            time.sleep(0.1)
        assert events.is_file(), "the target worker never started"
        workers = [line for line in processes_mentioning(run_dir) if "vllm_rbln_exec.worker" in line]
        assert workers and "fake-engine-child" in " ".join(processes_mentioning(run_dir))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err_path.read_text()
    assert proc.returncode == 143, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (run_dir / "target" / "capture" / "capture.json").exists()  # stopped mid-generation
    assert processes_mentioning(run_dir) == []


# -- the reference cache and reference files -------------------------------------------------------------------
def test_second_run_with_cache_starts_no_reference_worker(fake_cli, tmp_path):
    first = fake_cli("--use-cache", "--no-inspect-logits")
    assert first.returncode == 0, first.stderr
    assert first.report["cache"]["hit"] is False and first.report["cache"]["miss_reason"] == "not cached"
    res = fake_cli("--use-cache", "--no-inspect-logits")
    assert res.returncode == 0, res.stderr
    report = res.report
    assert report["cache"]["hit"] is True and report["cache"]["key"] == first.report["cache"]["key"]
    assert report["sides"]["reference"]["source"] == "cache"
    assert not (res.run_dir / "reference" / "worker.log").exists()
    assert (res.run_dir / "target" / "worker.log").exists()
    assert "reference loaded from cache" in res.stderr
    assert report["summary"]["max_abs_diff"] == 0.0
    # another setting is another key: computed again
    other = fake_cli("--use-cache", "--no-inspect-logits", "--max-tokens", "4")
    assert other.returncode == 0 and other.report["cache"]["hit"] is False
    assert (other.run_dir / "reference" / "worker.log").exists()


def test_require_cache_refuses_to_compute_a_reference(fake_cli):
    res = fake_cli("--require-cache")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "--require-cache" in res.stderr and "cache import" in _flat(res.stderr)
    assert not (res.run_dir / "reference" / "worker.log").exists()
    assert not (res.run_dir / "target").exists()
    # once it is cached, the same run passes without a reference worker
    assert fake_cli("--use-cache", "--no-inspect-logits").returncode == 0
    again = fake_cli("--require-cache", "--no-inspect-logits")
    assert again.returncode == 0, again.stderr
    assert again.report["sides"]["reference"]["source"] == "cache"


def test_reference_file_replaces_the_reference_worker(fake_cli, tmp_path):
    ref_file = tmp_path / "reference.tar"
    saved = fake_cli("--num-hidden-layers", "2", "--max-tokens", "8", "--save-reference", str(ref_file),
                     "--no-inspect-logits")
    assert saved.returncode == 0, saved.stderr
    assert ref_file.is_file()
    res = fake_cli("--num-hidden-layers", "2", "--max-tokens", "8", "--reference", str(ref_file),
                   "--no-inspect-logits")
    assert res.returncode == 0, res.stderr
    assert res.report["sides"]["reference"]["source"] == "file"
    assert not (res.run_dir / "reference" / "worker.log").exists()
    assert res.report["summary"]["max_abs_diff"] == 0.0 and res.report["summary"]["tokens_equal"] == FAKE_PROMPTS

    # a file captured with other settings is refused before any worker
    res = fake_cli("--num-hidden-layers", "2", "--max-tokens", "4", "--reference", str(ref_file))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "--max-tokens" in res.stderr and "file: 8" in res.stderr
    res = fake_cli("--num-hidden-layers", "3", "--max-tokens", "8", "--reference", str(ref_file))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "num_hidden_layers" in res.stderr and "weights" in res.stderr
    assert not (res.run_dir / "target").exists()


# -- storage, free alignment, repeats -------------------------------------------------------------------------
def test_q16_store_is_compact_and_within_its_stated_error(fake_cli, tmp_path):
    # a bias pushes a quarter of the vocabulary ~40 nats down, below the q16 floor
    bias = np.zeros(257, dtype=np.float32)
    bias[::4] = -40.0
    model = make_fake_model(tmp_path / "deep-tail", num_hidden_layers=4, bias=bias)
    fp32 = fake_cli("--model", str(model), "--store", "fp32", "--no-inspect-logits")
    assert fp32.returncode == 0, fp32.stderr
    res = fake_cli("--model", str(model), "--align", "free", "--no-inspect-logits")  # both sides at once; q16
    assert res.returncode == 0, res.stderr
    assert res.report["summary"]["max_abs_diff"] == 0.0  # identical sides quantize identically
    q16 = load_capture(res.run_dir / "reference" / "capture", verify_arrays=True)
    exact_capture = load_capture(fp32.run_dir / "reference" / "capture", verify_arrays=True)
    assert q16.settings["store"] == "q16" and exact_capture.settings["store"] == "fp32"
    clipped = 0
    for i in range(len(q16.prompts)):
        stored = np.load(q16.root / q16.prompts[i].logprobs_file, mmap_mode="r")
        assert stored.dtype == np.uint16 and stored.shape == (FAKE_MAX_TOKENS, 257)
        exact = np.asarray(exact_capture.logprobs(i), dtype=np.float64)
        approx = np.asarray(q16.logprobs(i), dtype=np.float64)
        within = exact >= exact.max(axis=1, keepdims=True) - Q16_RANGE
        assert np.abs(approx - exact)[within].max() <= Q16_MAX_ERROR * 1.001
        # entries below the floor are clipped up to it, never raised above it
        floor = exact.max(axis=1, keepdims=True) - Q16_RANGE
        assert np.all(approx[~within] <= np.broadcast_to(floor, exact.shape)[~within] + Q16_MAX_ERROR)
        clipped += int((~within).sum())
    assert clipped > 0


def test_free_alignment_runs_both_sides_and_follows_each_argmax(fake_cli):
    res = fake_cli("--align", "free", "--store", "fp32", "--no-inspect-logits",
                   switches={**TARGET_ONLY, "shift": "8@0:2"})
    assert res.returncode == 1, res.stdout + res.stderr
    ref = load_capture(res.run_dir / "reference" / "capture")
    tgt = load_capture(res.run_dir / "target" / "capture")
    assert tgt.settings["align"] == "free"
    r, t = ref.prompts[0].token_ids, tgt.prompts[0].token_ids
    assert r[:2] == t[:2] and r[2] != t[2]  # the target followed its own (shifted) argmax
    assert ref.prompts[1].token_ids == tgt.prompts[1].token_ids
    comparisons = res.report["comparisons"]
    assert [c["first_divergence"] for c in comparisons] == [2, None]
    assert res.report["summary"]["earliest_divergence"] == 2


def test_repeat_measures_a_noise_floor_and_writes_reports(fake_cli, tmp_path):
    out = tmp_path / "reports"
    res = fake_cli("--repeat", "2", "--fail-on", "kl_mean>3*noise", "--no-inspect-logits",
                   "--json", str(out / "r.json"), "--junit", str(out / "r.xml"), "--markdown", str(out / "r.md"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PARITY HOLDS" in res.stdout and "noise floor" in res.stdout
    for folder in ("target-r2", "reference-r2"):  # the reference was computed here, so it repeats too
        assert (res.run_dir / folder / "capture" / "capture.json").is_file(), folder
    report = json.loads((out / "r.json").read_text(), parse_constant=_no_nan)
    assert report["passed"] is True and report["verdict"]["violations"] == []
    noise = report["noise"]
    assert noise["runs"] >= 2
    assert noise["overall"]["distribution.kl_mean"]["noise"] == 0.0  # the fake engine is deterministic
    assert any(c["gate"] == "kl_mean>3*noise" for c in report["verdict"]["checked"])
    suite = ET.parse(out / "r.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and suite.get("tests") == "3"
    assert "✅" in (out / "r.md").read_text()

    # and re-judged from the folder, the noise floor is read back
    proc = run_cli(["compare", str(res.run_dir), "--fail-on", "kl_mean>3*noise"], cwd=tmp_path, env=fake_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "noise floor" in proc.stdout and "PARITY HOLDS" in proc.stdout


def test_slow_engine_progress_reaches_the_terminal(fake_cli):
    res = fake_cli("--no-inspect-logits", switches={"delay": "0.05"})
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in (res.run_dir / "target" / "events.jsonl").read_text().splitlines()]
    stages = [e["stage"] for e in events]
    assert stages[0] == "engine_start" and "engine_ready" in stages
    assert [e["done"] for e in events if e["stage"] == "generate"] == list(range(FAKE_PROMPTS + 1))
    timings = res.report["sides"]["target"]["timings"]
    assert timings["generate_s"] >= 0.05 * POSITIONS * 0.9
    assert timings["generated_tokens"] == POSITIONS
