"""Localisation on real engines (vLLM's CPU build and transformers, float32): a planted single-layer
fault is named, and honest comparisons name no layer.

The default model cut to 4 layers; the fault is layer 2's ``o_proj`` scaled by 1.02 (a copy of the
checkpoint). One CLI run with ``--localize`` (vLLM reference, transformers target on the faulty copy)
checks the command end to end; ``localize RUN_DIR`` then reruns the hidden states of the same run (its
new vLLM reference against the first one: identical sides), and two more hidden-state workers at the
same positions (vLLM on the faulty copy, transformers on the clean one) give the other pairs without
more parity runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import SHARED_MODELS, make_cache_dir, run_cli
from tests.model_edits import plant_fault

pytestmark = pytest.mark.integration

LAYERS, FAULT_LAYER = 4, 2


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    from vllm_rbln_exec.setup.models import resolve_model, truncate_model

    root = tmp_path_factory.mktemp("localize")
    cache = make_cache_dir(root)
    clean = truncate_model(resolve_model("smollm2-135m", SHARED_MODELS).path, LAYERS, SHARED_MODELS)
    fault = plant_fault(clean, root / "fault", f"model.layers.{FAULT_LAYER}.self_attn.o_proj.weight", scale=1.02)
    run_dir = root / "run"
    proc = run_cli(["--cache-dir", str(cache), "--run-dir", str(run_dir), "--model", str(clean), "--target", "cpu",
                    "--target-engine", "transformers", "--target-model", str(fault), "--max-tokens", "4",
                    "--num-prompts", "1", "--no-inspect-logits", "--no-color", "--localize"], cwd=root,
                   env={"COLUMNS": "160"})
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return {"root": root, "cache": cache, "clean": clean, "fault": fault, "run_dir": run_dir, "proc": proc}


def test_localize_names_the_edited_layer_transformers_against_vllm(faulty_run):
    proc, run_dir = faulty_run["proc"], faulty_run["run_dir"]
    report = json.loads((run_dir / "parity.json").read_text())["run"]["localization"]
    assert report["verdict"] == "created" and report["layer"] == f"layers.{FAULT_LAYER}", report["layers"]
    assert report["shows_at"] == ["prefill", "decode"]
    assert report["sides"]["reference"]["engine"] == "vllm" and report["sides"]["target"]["engine"] == "transformers"
    assert report["sides"]["reference"]["pass"]["enforce_eager"] is True
    assert report["yardstick"] is None  # float32 on both sides: the precision's floor is the scale
    by_name = {r["name"]: r for r in report["layers"]}
    assert by_name["layers.1"]["ratio"] < 1 < 5 < by_name["layers.2"]["ratio"]
    assert Path(report["plot"]).is_file() and Path(report["plot"]).stat().st_size > 1000
    assert f"the difference is created at layers.{FAULT_LAYER}" in proc.stdout
    assert "error by layer" in proc.stdout


def _hidden_jobs(faulty_run, specs):
    """Hidden-state workers at the positions the run localised, on other engines or checkpoints."""
    from dataclasses import replace

    from vllm_rbln_exec.pipeline.context import RunContext
    from vllm_rbln_exec.pipeline.localize import _job, choose_positions, sides_from_run

    run_json = json.loads((faulty_run["run_dir"] / "parity.json").read_text())
    run, verdict = run_json["run"], run_json["verdict"]
    chosen, _ = choose_positions(run, verdict)
    reference, _ = sides_from_run(run)
    ctx = RunContext.create(str(faulty_run["cache"]), None, 900.0)
    jobs = []
    for label, engine, checkpoint in specs:
        side = replace(reference, role="target", engine=engine, checkpoint=str(checkpoint),
                       engine_args={} if engine == "transformers" else reference.engine_args)
        jobs.append(_job(ctx, run, side, label, faulty_run["root"] / "extra" / label, chosen, False, {}))
    return chosen, jobs


@pytest.fixture(scope="module")
def relocalized(faulty_run):
    """``localize RUN_DIR`` on the run, the first localisation's reference kept aside."""
    first = faulty_run["root"] / "first-reference"
    shutil.copytree(faulty_run["run_dir"] / "localize" / "reference" / "hidden", first)
    res = run_cli(["localize", str(faulty_run["run_dir"]), "--no-color", "--cache-dir", str(faulty_run["cache"])],
                  cwd=faulty_run["root"], env={"COLUMNS": "160"})
    return res, first


@pytest.fixture(scope="module")
def other_pairs(faulty_run, relocalized):
    from vllm_rbln_exec.capture.hidden import load_hidden
    from vllm_rbln_exec.worker.spawn import start_worker, wait_workers

    chosen, jobs = _hidden_jobs(faulty_run, [("vllm-fault", "vllm", faulty_run["fault"]),
                                             ("hf-clean", "transformers", faulty_run["clean"])])
    results = wait_workers([start_worker(j) for j in jobs])
    caps = {j.task.label: load_hidden(Path(r["hidden"])) for j, r in zip(jobs, results)}
    caps["vllm-ref"] = load_hidden(faulty_run["run_dir"] / "localize" / "reference" / "hidden")
    caps["vllm-first"] = load_hidden(relocalized[1])
    return chosen, caps


def _report(chosen, caps, ref, tgt):
    from vllm_rbln_exec.pipeline.localize import build_report

    return build_report({"reference": caps[ref], "target": caps[tgt]}, chosen, "test", False)


def test_vllm_against_vllm_names_the_edited_layer(other_pairs):
    report = _report(*other_pairs, "vllm-ref", "vllm-fault")
    assert report["verdict"] == "created" and report["layer"] == f"layers.{FAULT_LAYER}", report["layers"]
    # before the edited layer the two vLLM runs agree bit for bit
    assert all(r["rel_l2"] == 0.0 for r in report["layers"][: FAULT_LAYER + 1])


def test_honest_and_identical_sides_name_no_layer(other_pairs):
    chosen, caps = other_pairs
    identical = _report(chosen, caps, "vllm-first", "vllm-ref")  # two vLLM workers on the same checkpoint
    assert identical["verdict"] == "none" and max(r["rel_l2"] for r in identical["layers"]) == 0.0
    honest = _report(chosen, caps, "vllm-ref", "hf-clean")
    assert honest["verdict"] == "none", honest["layers"]
    errs = [r["rel_l2"] for r in honest["layers"]]
    assert 0.0 < max(errs) < 1e-5  # two float32 implementations: close, not equal
    assert np.isfinite(errs).all()


def test_localize_command_reruns_only_the_hidden_states(faulty_run, relocalized):
    res = relocalized[0]
    assert res.returncode == 1, res.stdout + res.stderr  # a layer departs
    assert f"the difference is created at layers.{FAULT_LAYER}" in res.stdout
    report = json.loads((faulty_run["run_dir"] / "parity.json").read_text())["run"]["localization"]
    assert report["layer"] == f"layers.{FAULT_LAYER}"
    assert not (faulty_run["run_dir"] / "localize" / "reference" / "capture").exists()  # no logprob capture
