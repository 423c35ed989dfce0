"""The real CLI end to end on vLLM's CPU engine (default model, a few layers and tokens).

One baseline run computes the reference (and saves it as a portable file); the
other tests reuse that file or the cache so that only the side under test runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import make_cache_dir, run_cli

from vllm_rbln_exec.capture.store import load_capture

pytestmark = pytest.mark.integration

# fp32 storage: these tests compare two capture paths to 1e-6, below q16's resolution
BASE = ["--target", "cpu", "--num-hidden-layers", "4", "--max-tokens", "8", "--num-prompts", "2", "--store", "fp32"]


def _no_nan(name: str):
    raise AssertionError(f"{name} in a JSON report: reports must be strict JSON")


def _processes_mentioning(path: Path) -> list[str]:
    # -ww: without it ps cuts lines at $COLUMNS (80 under pytest), cutting off the path
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line and "ps -ww" not in line]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    cache = make_cache_dir(root)
    run_dir = root / "run"
    ref_file = root / "reference.tar"
    proc = run_cli(["--cache-dir", str(cache), "--run-dir", str(run_dir), *BASE, "--use-cache",
                    "--save-reference", str(ref_file)], cwd=root)
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


def test_second_run_with_cache_starts_no_reference_worker(baseline, tmp_path):
    run_dir = tmp_path / "cached"
    proc = run_cli(["--cache-dir", str(baseline["cache"]), "--run-dir", str(run_dir), *BASE, "--use-cache",
                    "--no-inspect-logits"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "parity.json").read_text())["run"]
    assert report["cache"]["hit"] is True
    assert report["sides"]["reference"]["source"] == "cache"
    assert not (run_dir / "reference" / "worker.log").exists()
    assert (run_dir / "target" / "worker.log").exists()
    assert "reference loaded from cache" in proc.stderr
    assert report["summary"]["max_abs_diff"] == 0.0


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


def test_q16_store_is_compact_and_within_its_stated_error(baseline, cli):
    from vllm_rbln_exec.capture.q16 import Q16_MAX_ERROR, Q16_RANGE

    args = [a for a in BASE if a not in ("--store", "fp32")]
    res = cli(*args, "--align", "free", "--no-inspect-logits")  # both sides at once; q16 is the default
    assert res.returncode == 0, res.stderr
    assert res.report["summary"]["max_abs_diff"] == 0.0  # identical sides quantize identically
    q16 = load_capture(res.run_dir / "reference" / "capture", verify_arrays=True)
    fp32 = load_capture(baseline["run_dir"] / "reference" / "capture", verify_arrays=True)
    assert q16.settings["store"] == "q16" and fp32.settings["store"] == "fp32"
    for i in range(len(q16.prompts)):
        stored = np.load(q16.root / q16.prompts[i].logprobs_file, mmap_mode="r")
        assert stored.dtype == np.uint16 and stored.shape == (8, 49152)
        exact = np.asarray(fp32.logprobs(i), dtype=np.float64)
        approx = np.asarray(q16.logprobs(i), dtype=np.float64)
        within = exact >= exact.max(axis=1, keepdims=True) - Q16_RANGE
        assert np.abs(approx - exact)[within].max() <= Q16_MAX_ERROR * 1.001
        # entries below the floor are clipped up to it, never raised above it
        floor = exact.max(axis=1, keepdims=True) - Q16_RANGE
        assert np.all(approx[~within] <= np.broadcast_to(floor, exact.shape)[~within] + Q16_MAX_ERROR)


def test_reference_file_with_other_settings_is_refused(baseline, cli):
    res = cli("--target", "cpu", "--num-hidden-layers", "4", "--max-tokens", "4", "--reference",
              str(baseline["ref_file"]))
    assert res.returncode == 2
    assert "--max-tokens" in res.stderr and "file: 8" in res.stderr
    res = cli("--target", "cpu", "--num-hidden-layers", "3", "--reference", str(baseline["ref_file"]))
    assert res.returncode == 2
    assert "num_hidden_layers" in res.stderr and "weights" in res.stderr


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


def test_perturbed_target_model_shows_larger_kl(baseline, tmp_path, cli):
    from safetensors.numpy import load_file, save_file

    src = Path(baseline["report"]["model_path"])
    perturbed = tmp_path / "perturbed"
    shutil.copytree(src, perturbed)
    tensors = load_file(str(perturbed / "model.safetensors"))
    rng = np.random.default_rng(0)
    name = "model.layers.2.mlp.down_proj.weight"
    w = tensors[name]
    tensors[name] = (w + rng.normal(scale=float(w.std()) * 2.0, size=w.shape)).astype(w.dtype)
    save_file(tensors, str(perturbed / "model.safetensors"))

    out = tmp_path / "reports"
    res = cli(*BASE, "--reference", str(baseline["ref_file"]), "--target-model", str(perturbed),
              "--no-inspect-logits", "--fail-on", "prompt:kl_max>0.01", "--json", str(out / "r.json"),
              "--junit", str(out / "r.xml"), "--markdown", str(out / "r.md"))
    # the built-in fp32 tolerances catch it: exit 1, every violation listed
    assert res.returncode == 1, res.stdout + res.stderr
    d = res.report["summary"]["distribution"]
    assert d["kl_mean"] > 1e-3  # the identical run has exactly 0
    assert d["kl_max"] > baseline["report"]["summary"]["distribution"]["kl_max"]
    # and an earlier divergence: the identical run's target argmax never leaves the reference
    assert baseline["report"]["summary"]["argmax_divergences"] == 0
    assert res.report["summary"]["argmax_divergences"] >= 1
    assert d["top1_rate"] < 1.0
    assert "worst positions by KL" in res.stdout
    assert "PARITY FAILS" in res.stdout
    flat = " ".join(res.stdout.split())
    assert "kl_mean" in flat and "(tolerance kl_mean>1e-4)" in flat

    report = json.loads((out / "r.json").read_text(), parse_constant=_no_nan)
    verdict = report["verdict"]
    assert report["passed"] is False and verdict["passed"] is False
    gates = {v["gate"] for v in verdict["violations"]}
    assert "kl_mean>1e-4" in gates and "prompt:kl_max>0.01" in gates
    per_prompt = [v for v in verdict["violations"] if v["gate"] == "prompt:kl_max>0.01"]
    assert {v["prompt_index"] for v in per_prompt} == {0, 1}
    assert all(v["position"] is not None and v["value"] > 0.01 for v in per_prompt)
    assert report["run"]["sides"]["target"]["env"]["set"]["VLLM_PLUGINS"] == "cpu"
    assert report["run"]["cache"]["key"]

    import xml.etree.ElementTree as ET

    suite = ET.parse(out / "r.xml").getroot().find("testsuite")
    assert suite.get("tests") == "3" and int(suite.get("failures")) >= 2
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"overall", "prompt_0", "prompt_1"}
    for name in ("prompt_0", "prompt_1"):
        failure = cases[name].find("failure")
        assert failure is not None and "prompt:kl_max>0.01" in (failure.get("message", "") + (failure.text or ""))
    overall = cases["overall"].find("failure")
    assert overall is not None and "kl_mean>1e-4" in overall.get("message", "") + (overall.text or "")

    md = (out / "r.md").read_text()
    assert "❌" in md and "kl_mean>1e-4" in md

    # re-judged without any model: looser tolerances pass, exit 0
    proc = run_cli(["compare", str(res.run_dir), "--no-default-gates", "--fail-on", "kl_mean>10"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PARITY HOLDS" in proc.stdout
    proc = run_cli(["compare", str(out / "r.json")], cwd=tmp_path)
    assert proc.returncode == 1 and "kl_mean>1e-4" in " ".join(proc.stdout.split())


def test_passing_run_with_noise_floor_and_reports(baseline, cli, tmp_path):
    out = tmp_path / "reports"
    res = cli(*BASE, "--reference", str(baseline["ref_file"]), "--repeat", "2", "--fail-on", "kl_mean>3*noise",
              "--no-inspect-logits", "--json", str(out / "r.json"), "--junit", str(out / "r.xml"),
              "--markdown", str(out / "r.md"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PARITY HOLDS" in res.stdout and "noise floor" in res.stdout
    assert (res.run_dir / "target-r2" / "capture" / "capture.json").is_file()
    report = json.loads((out / "r.json").read_text(), parse_constant=_no_nan)
    assert report["passed"] is True and report["verdict"]["violations"] == []
    noise = report["noise"]
    assert noise["runs"] == 2
    # the CPU engine is deterministic: two target runs agree exactly
    assert noise["overall"]["distribution.kl_mean"]["noise"] == 0.0
    assert any(c["gate"] == "kl_mean>3*noise" for c in report["verdict"]["checked"])

    import xml.etree.ElementTree as ET

    suite = ET.parse(out / "r.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and suite.get("tests") == "3"
    assert "✅" in (out / "r.md").read_text()


def test_require_cache_refuses_to_compute_a_reference(baseline, cli):
    res = cli("--target", "cpu", "--num-hidden-layers", "4", "--max-tokens", "5", "--num-prompts", "1",
              "--require-cache")
    assert res.returncode == 3
    assert "--require-cache" in res.stderr and "cache import" in " ".join(res.stderr.split())
    assert not (res.run_dir / "reference" / "worker.log").exists()


def test_target_model_with_another_vocabulary_is_refused_before_any_engine(baseline, cli):
    res = cli(*BASE, "--reference", str(baseline["ref_file"]), "--target-model", "tiny-llama3")
    assert res.returncode == 2
    assert "vocabulary" in res.stderr
    assert not (res.run_dir / "target").exists()


def test_platform_mismatch_stops_the_run(baseline, cli, tmp_path):
    devices = tmp_path / "devices.toml"
    devices.write_text(
        '[device.fakeaccel]\nplatform = "rbln"\ndescription = "claims rbln, runs on the CPU"\n'
        'env = { VLLM_PLUGINS = "cpu", VLLM_TARGET_DEVICE = "cpu", VLLM_ENABLE_V1_MULTIPROCESSING = "0", '
        'VLLM_CPU_KVCACHE_SPACE = "1" }\n'
        '[device.fakeaccel.engine]\ndtype = "float32"\nenforce_eager = true\nblock_size = 128\n'
    )
    res = cli(*BASE, "--target", "fakeaccel", "--devices", str(devices), "--reference", str(baseline["ref_file"]),
              "--block", "128")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "target worker" in res.stderr
    assert "platform 'cpu'" in res.stderr
    assert _processes_mentioning(res.run_dir) == []


def test_crashing_worker_exits_3_with_its_log_and_leaves_nothing(baseline, cli, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(Path(baseline["report"]["model_path"]), broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    res = cli("--target", "cpu", "--model", str(broken), "--max-tokens", "4", "--num-prompts", "1")
    assert res.returncode == 3
    assert "reference worker" in res.stderr
    assert "last lines of the reference worker's log" in res.stderr
    assert "NoSuchModelForCausalLM" in res.stderr
    assert _processes_mentioning(res.run_dir) == []


def test_hanging_worker_is_stopped_at_the_timeout(cli):
    res = cli(*BASE, "--timeout", "4")
    assert res.returncode == 3
    assert "timed out after 4 s" in res.stderr
    assert _processes_mentioning(res.run_dir) == []


def test_sigterm_stops_the_workers_and_exits_143(baseline, tmp_path):
    # CI cancelling a job or `timeout` sends SIGTERM, which by default ends Python
    # without unwinding: the workers, in their own sessions, would run on.
    import os
    import signal
    import sys
    import time

    run_dir = tmp_path / "run"
    err_path = tmp_path / "stderr.txt"
    with open(tmp_path / "stdout.txt", "w") as out, open(err_path, "w") as err_file:  # files: a pipe could fill
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_rbln_exec", "--cache-dir", str(baseline["cache"]), "--run-dir", str(run_dir),
             *BASE], cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=err_file)

    def workers():  # the reference comes from the baseline's cache: the worker is the target's
        return [line for line in _processes_mentioning(run_dir) if "vllm_rbln_exec.worker" in line]

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not workers():
        time.sleep(0.5)
    assert workers(), "no worker ever started"
    time.sleep(2)  # into the engine start
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = err_path.read_text()
    assert proc.returncode == 143, err
    assert "interrupted" in err and "Traceback" not in err
    assert _processes_mentioning(run_dir) == []
