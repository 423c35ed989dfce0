"""``corpus`` on the real CPU engines: exports of a 2-layer SmolLM2 made by scripts/quantize_exports.py (a bf16
copy, W8A8 int8, W4A16), loaded by vLLM's CPU engine, scored over two windows of the built-in corpus.

One run of the CLI (a reference and three targets: four engine starts) serves every assert: the rows taken by
the hook equal vLLM's own prompt logprobs, the sizes are the formats', and the order holds that any sound
measurement must show (a bf16 copy far closer than 8-bit weights and activations, 8-bit far closer than 4-bit).

W4A16 needs vLLM's ``cpu_gemm_wna16`` kernel, which its CPU build lacks on a processor without AVX-512 (issue 25):
there the same run must skip that side with the reason and score the others, the W4A16 checks skip naming what
is missing, and a test checks the skip instead."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from tests.helpers import REPO, SHARED_MODELS, make_cache_dir, run_cli

from vllm_rbln_exec.setup.capabilities import vllm_cpu_gap

pytestmark = pytest.mark.integration

FORMATS = ("bf16", "w8a8", "w4a16")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    if importlib.util.find_spec("compressed_tensors") is None:  # it comes with vLLM, which pins it
        pytest.skip("compressed-tensors is not installed: the exports cannot be made (it comes with vLLM)")
    cache = make_cache_dir(tmp_path_factory.mktemp("corpus-cache"))
    out = SHARED_MODELS / "exports"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "quantize_exports.py"), "--model", "smollm2-135m",
                           "--num-hidden-layers", "2", "--formats", ",".join(FORMATS), "--out", str(out),
                           "--cache-dir", str(cache)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folders = {fmt: next(out.glob(f"smollm2-135m-*-L2-r*-{fmt}")) for fmt in FORMATS}
    return cache, folders


@pytest.fixture(scope="module")
def result(exports, tmp_path_factory):
    cache, folders = exports
    root = tmp_path_factory.mktemp("corpus-run")
    targets = [arg for fmt in FORMATS for arg in ("--target", f"{folders[fmt]},label={fmt}")]
    proc = run_cli(["corpus", "--cache-dir", str(cache), "--run-dir", str(root / "run"), "--num-hidden-layers", "2",
                    "--max-windows", "2", "--yardstick", "none", "--plots", str(root / "plots"), *targets],
                   cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((root / "run" / "corpus.json").read_text()), proc.stdout, root


def w4a16_gap(folders) -> str | None:
    """Why vLLM's CPU build cannot run the W4A16 export on this processor, None where it can."""
    return vllm_cpu_gap(folders["w4a16"])


def test_exports_load_and_are_what_they_say(exports, result):
    _, folders = exports
    data, _, _ = result
    sides = {s["label"]: s for s in data["sides"]}
    ran = [f for f in FORMATS if f in sides]
    manifest = json.loads((folders["w4a16"] / "vre-export.json").read_text())
    assert manifest["group_size"] == 64 and manifest["layers"] == 14  # 576 = 4.5 x 128: groups of 64; 2 x 7 linears
    assert sides["w8a8"]["quantization"]["activations"] == "int8/tok dyn"
    assert all(sides[f]["effective"]["model_dtype"] == "bfloat16" for f in ran)  # as saved
    assert sides["reference"]["effective"]["model_dtype"] == "float32"
    linear = {label: s["size"]["linear_bits_per_weight"] for label, s in sides.items()}
    assert linear["reference"] == 32 and linear["bf16"] == 16 and 8 < linear["w8a8"] < 8.1
    assert ran == (["bf16", "w8a8"] if w4a16_gap(folders) else list(FORMATS))


def test_rows_are_vllms_prompt_logprobs_and_the_formats_keep_their_order(result):
    data, stdout, root = result
    sides = {s["label"]: s for s in data["sides"]}
    for label, side in sides.items():
        assert side["effective"]["max_abs_diff_vs_vllm_prompt_logprobs"] == 0.0, label
    kl = {f: sides[f]["summary"]["kl_mean"] for f in sides if f != "reference"}
    assert 0 < kl["bf16"] < kl["w8a8"] / 3, kl
    assert all(sides[f]["summary"]["positions"] == 2 * 128 for f in kl)
    assert "w8a8" in stdout and "KL mean" in stdout
    assert (root / "plots" / "corpus-bits.png").stat().st_size > 10_000


def test_w4a16_is_far_from_8_bit_where_this_processor_runs_it(exports, result):
    _, folders = exports
    gap = w4a16_gap(folders)
    if gap:
        pytest.skip(f"vLLM cannot run W4A16 on this processor: {gap}")
    data, stdout, _ = result
    sides = {s["label"]: s for s in data["sides"]}
    assert sides["w4a16"]["quantization"]["weights"] == "int4/g64"
    assert 4.25 <= sides["w4a16"]["size"]["linear_bits_per_weight"] < 4.3
    kl = {f: sides[f]["summary"]["kl_mean"] for f in FORMATS}
    assert kl["w8a8"] < kl["w4a16"] / 3, kl
    assert sides["bf16"]["summary"]["top1_rate"] > sides["w4a16"]["summary"]["top1_rate"]
    assert "w4a16" in stdout


def test_w4a16_is_skipped_with_the_reason_where_this_processor_cannot_run_it(exports, result):
    _, folders = exports
    gap = w4a16_gap(folders)
    if not gap:
        pytest.skip("this processor's vLLM CPU library has cpu_gemm_wna16: W4A16 runs (the test above)")
    data, stdout, _ = result
    (skipped,) = data["skipped"]
    assert skipped["label"] == "w4a16" and skipped["why"] == gap and "cpu_gemm_wna16" in gap
    assert f"w4a16 skipped: {gap}" in data["notes"]
    assert "w4a16 skipped" in " ".join(stdout.split())
