"""A side this machine's vLLM CPU build cannot run (setup.capabilities, issue 25), through the real CLI.

The machine is made to lack the W4A16 kernel whatever its processor: a stand-in ``vllm`` package first on
PYTHONPATH whose three kernel libraries hold no ``cpu_gemm_wna16`` (the main process reads them as bytes, as it
does the real ones; no engine is imported). A W4A16 checkpoint on vLLM is then refused in one sentence before
any engine starts (a run: exit 3), or skipped while the other sides are scored (corpus). A worker that still
calls a missing kernel (the fake engine raises what torch raises) ends in one sentence, not a traceback."""

from __future__ import annotations

import json

import pytest
from tests.fakes.model import make_fake_model
from tests.helpers import fake_env, run_cli

pytestmark = pytest.mark.plumbing

W4A16 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64}}}}


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """(env with a vLLM build lacking the WNA16 kernel, reference model, W4A16 model, another target)."""
    root = tmp_path_factory.mktemp("no-wna16")
    package = root / "site" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('a stand-in: only its kernel libraries are read')\n")
    for library in ("_C", "_C_AVX512", "_C_AVX2"):
        (package / f"{library}.abi3.so").write_bytes(b"\x7fELF rms_norm(Tensor out) onednn_scaled_mm(Tensor c)")
    ref = make_fake_model(root / "ref", num_hidden_layers=2)
    w4a16 = make_fake_model(root / "w4a16", num_hidden_layers=2, seed=1)
    config = json.loads((w4a16 / "config.json").read_text())
    (w4a16 / "config.json").write_text(json.dumps({**config, "quantization_config": W4A16}))
    other = make_fake_model(root / "other", num_hidden_layers=2, seed=2)
    env = fake_env()
    env["PYTHONPATH"] = f"{package.parent}:{env['PYTHONPATH']}"
    return env, ref, w4a16, other


def test_a_run_refuses_a_w4a16_target_in_one_sentence_before_any_engine_starts(tmp_path, machine):
    env, ref, w4a16, _ = machine
    proc = run_cli(["--model", str(ref), "--reference-engine", "fake", "--target", "cpu", "--target-engine", "vllm",
                    "--target-model", str(w4a16), "--max-tokens", "4", "--num-prompts", "1",
                    "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run")],
                   cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    said = " ".join(proc.stderr.split())  # one sentence, however the terminal wraps it
    assert said.startswith("error: the target cannot run on this machine: W4A16 needs the kernel cpu_gemm_wna16")
    assert said.count("error") == 1 and "Traceback" not in said and said.endswith("which this build runs"), said
    assert "engine=transformers" in said
    assert not list(tmp_path.glob("run/*/worker.log"))  # no worker started


def test_corpus_skips_the_w4a16_side_and_scores_the_others(tmp_path, machine):
    env, ref, w4a16, other = machine
    proc = run_cli(["corpus", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"),
                    "--model", str(ref), "--reference-engine", "fake", "--yardstick", "none",
                    "--target", f"{other},engine=fake,label=other", "--target", f"{w4a16},engine=vllm,label=W4A16",
                    "--window", "48", "--stride", "16", "--max-windows", "2", "--markdown", str(tmp_path / "c.md")],
                   cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "run" / "corpus.json").read_text())
    assert [s["label"] for s in result["sides"]] == ["reference", "other"]
    assert result["sides"][1]["summary"]["positions"] == 2 * 16
    (skipped,) = result["skipped"]
    assert skipped["label"] == "W4A16" and "cpu_gemm_wna16" in skipped["why"]
    assert any(n.startswith("W4A16 skipped: W4A16 needs the kernel cpu_gemm_wna16") for n in result["notes"])
    assert "| W4A16 |" in (tmp_path / "c.md").read_text() and "skipped" in (tmp_path / "c.md").read_text()
    assert "W4A16 skipped" in " ".join(proc.stdout.split())
    assert not (tmp_path / "run" / "targets" / "W4A16").exists()  # no worker started for it


def test_a_worker_that_calls_a_missing_kernel_ends_in_one_sentence(fake_cli):
    res = fake_cli(switches={"crash": "missing_op", "sides": "target"})
    assert res.returncode == 3, res.stdout + res.stderr
    assert "target worker: the engine called torch.ops._C.cpu_gemm_wna16" in " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr and "last lines" not in res.stderr
    assert "full log:" in res.stderr  # the traceback is kept there
