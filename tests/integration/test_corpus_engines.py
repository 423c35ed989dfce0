"""``corpus`` on the real CPU engines: exports of a 2-layer SmolLM2 made by scripts/quantize_exports.py (a bf16
copy, W8A8 int8, W4A16), loaded by vLLM's CPU engine, scored over two windows of the built-in corpus.

One run of the CLI (a reference and three targets: four engine starts) serves every assert: the rows taken by
the hook equal vLLM's own prompt logprobs, the sizes are the formats', and the order holds that any sound
measurement must show (a bf16 copy far closer than 8-bit weights and activations, 8-bit far closer than 4-bit)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from tests.helpers import REPO, SHARED_MODELS, make_cache_dir, run_cli

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


def test_exports_load_and_are_what_they_say(exports, result):
    _, folders = exports
    data, _, _ = result
    sides = {s["label"]: s for s in data["sides"]}
    manifest = json.loads((folders["w4a16"] / "vre-export.json").read_text())
    assert manifest["group_size"] == 64 and manifest["layers"] == 14  # 576 = 4.5 x 128: groups of 64; 2 x 7 linears
    assert sides["w4a16"]["quantization"]["weights"] == "int4/g64"
    assert sides["w8a8"]["quantization"]["activations"] == "int8/tok dyn"
    assert all(sides[f]["effective"]["model_dtype"] == "bfloat16" for f in FORMATS)  # as saved
    assert sides["reference"]["effective"]["model_dtype"] == "float32"
    linear = {label: s["size"]["linear_bits_per_weight"] for label, s in sides.items()}
    assert linear["reference"] == 32 and linear["bf16"] == 16
    assert 8 < linear["w8a8"] < 8.1 and 4.25 <= linear["w4a16"] < 4.3


def test_rows_are_vllms_prompt_logprobs_and_the_formats_keep_their_order(result):
    data, stdout, root = result
    sides = {s["label"]: s for s in data["sides"]}
    for label, side in sides.items():
        assert side["effective"]["max_abs_diff_vs_vllm_prompt_logprobs"] == 0.0, label
    kl = {f: sides[f]["summary"]["kl_mean"] for f in FORMATS}
    assert 0 < kl["bf16"] < kl["w8a8"] / 3 and kl["w8a8"] < kl["w4a16"] / 3, kl
    top1 = {f: sides[f]["summary"]["top1_rate"] for f in FORMATS}
    assert top1["bf16"] > top1["w4a16"]
    assert all(sides[f]["summary"]["positions"] == 2 * 128 for f in FORMATS)
    assert "w4a16" in stdout and "KL mean" in stdout
    assert (root / "plots" / "corpus-bits.png").stat().st_size > 10_000
