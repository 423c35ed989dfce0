"""``vllm-rbln-exec corpus`` through the real CLI and real workers (fake engine): the table and every output,
the reference cache, a run killed mid-side and continued with --resume, and the usage errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.fakes.model import DEFAULT_VOCAB, make_fake_model
from tests.helpers import fake_env, run_cli

pytestmark = pytest.mark.plumbing


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The reference and two targets whose logits are the reference's plus a small and a large bias."""
    root = tmp_path_factory.mktemp("corpus-models")
    rng = np.random.default_rng(7)
    ref = make_fake_model(root / "ref", num_hidden_layers=2)
    near = make_fake_model(root / "near", num_hidden_layers=2, bias=rng.standard_normal(DEFAULT_VOCAB) * 0.05)
    far = make_fake_model(root / "far", num_hidden_layers=2, bias=rng.standard_normal(DEFAULT_VOCAB) * 0.5)
    return ref, near, far


def corpus(tmp_path, models, *args, run="run", switches=None):
    ref, near, far = models
    argv = ["corpus", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / run), "--model", str(ref),
            "--reference-engine", "fake", "--target", f"{near},engine=fake,label=near",
            "--target", f"model={far},engine=fake,label=far", "--window", "48", "--stride", "16",
            "--max-windows", "4", *args]
    proc = run_cli(argv, cwd=tmp_path, env=fake_env(**(switches or {})), timeout=120)
    result = tmp_path / run / "corpus.json"
    return proc, (json.loads(result.read_text()) if result.is_file() else None)


def test_the_table_outputs_and_the_cache(tmp_path, models):
    out = tmp_path / "out"
    proc, result = corpus(tmp_path, models, "--target", "engine=fake,dtype=bfloat16,label=bf16", "--use-cache",
                          "--html", str(out / "c.html"), "--plots", str(out / "plots"), "--markdown", str(out / "c.md"),
                          "--json", str(out / "c.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sides = {s["label"]: s for s in result["sides"]}
    assert list(sides) == ["reference", "yardstick", "near", "far", "bf16"]
    assert result["corpus"]["windows"] == 4 and result["corpus"]["scored_tokens"] == 4 * 16
    near, far = sides["near"]["summary"], sides["far"]["summary"]
    assert 0 < near["kl_mean"] < far["kl_mean"] and near["top1_rate"] >= far["top1_rate"]
    assert near["positions"] == 64 and near["ppl_reference"] == far["ppl_reference"]
    # the fake engine ignores the dtype: the bf16 side and the yardstick are the reference itself
    assert sides["bf16"]["summary"]["kl_mean"] == 0 and sides["yardstick"]["summary"]["ppl_ratio"] == 1
    assert "coarser than the reference's float32" in result["yardstick"]["why"]
    assert sides["bf16"]["size"]["bits_per_weight"] == 16 and sides["near"]["size"]["bits_per_weight"] == 32
    assert sides["reference"]["source"] == "worker" and sides["yardstick"]["source"] == "worker"
    flat = " ".join(proc.stdout.split())
    assert "KL mean" in flat and "near" in flat and "yardstick: auto" in flat
    assert (out / "c.html").read_text().count("<svg") == 2
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["corpus-bits.png", "corpus-bits.svg",
                                                                 "corpus-memory.png", "corpus-memory.svg"]
    assert "| far |" in (out / "c.md").read_text()
    assert json.loads((out / "c.json").read_text())["sides"][2]["label"] == "near"

    again_proc, again = corpus(tmp_path, models, "--target", "engine=fake,dtype=bfloat16,label=bf16", "--use-cache",
                               run="again")
    assert again_proc.returncode == 0, again_proc.stderr
    cached = {s["label"]: s for s in again["sides"]}
    assert cached["reference"]["source"] == "cache" and cached["yardstick"]["source"] == "cache"
    assert not (tmp_path / "again" / "reference" / "worker.log").exists()
    assert cached["far"]["summary"]["kl_mean"] == far["kl_mean"]


def test_a_run_killed_mid_side_continues_with_resume(tmp_path, models):
    killed, _ = corpus(tmp_path, models, "--yardstick", "none", switches={"crash": "kill", "sides": "target"})
    assert killed.returncode == 3, killed.stdout + killed.stderr
    journal = tmp_path / "run" / "targets" / "near" / "capture" / "journal.jsonl"
    assert len(journal.read_text().splitlines()) == 1  # the first window was written before the kill
    assert "killed" in killed.stderr

    other, _ = corpus(tmp_path, models, "--yardstick", "none", "--resume", "--window", "40")
    assert other.returncode == 2 and "window" in other.stderr  # another plan: refused, nothing overwritten

    resumed, result = corpus(tmp_path, models, "--yardstick", "none", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    sides = {s["label"]: s for s in result["sides"]}
    assert sides["reference"]["source"] == "resumed"
    assert sides["near"]["source"] == "worker" and sides["near"]["resumed_windows"] == 1
    assert sides["far"]["resumed_windows"] == 0
    assert any("continued from an interrupted run" in n for n in result["notes"])

    _, clean = corpus(tmp_path, models, "--yardstick", "none", run="clean")
    for label in ("near", "far"):
        kept = next(s for s in result["sides"] if s["label"] == label)["summary"]
        fresh = next(s for s in clean["sides"] if s["label"] == label)["summary"]
        assert kept["kl_mean"] == fresh["kl_mean"] and kept["ppl"] == fresh["ppl"]


def test_usage_errors_before_any_worker(tmp_path, models):
    ref, _, _ = models
    short = tmp_path / "short.txt"
    short.write_text("too short")
    for args, message in ((["--corpus", str(short)], "fewer than one window"),
                          (["--target", "device=nowhere"], "unknown device 'nowhere'"),
                          (["--window", "8", "--stride", "9"], "--stride 9")):
        proc, _ = corpus(tmp_path, models, *args, run=f"bad{len(message)}")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert message in " ".join(proc.stderr.split())
        assert not (tmp_path / f"bad{len(message)}" / "reference").exists()
    proc = run_cli(["corpus", "--model", str(ref), "--cache-dir", str(tmp_path / "cache")], cwd=tmp_path,
                   env=fake_env())
    assert proc.returncode == 2 and "at least one --target" in proc.stderr
