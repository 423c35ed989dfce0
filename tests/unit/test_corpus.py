"""The corpus command's logic: windows, perplexity and KL maths, target specs, sizes, the journal, the table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tests.fakes.tensorfile import write_safetensors

from vllm_rbln_exec.capture.journal import Journal
from vllm_rbln_exec.capture.store import FULL, CaptureWriter, PromptRecord, SideInfo
from vllm_rbln_exec.compare.corpus import COLUMNS, compare_corpus, corpus_summary, perplexity, window_stats
from vllm_rbln_exec.compare.distribution import position_stats
from vllm_rbln_exec.core.errors import HarnessError, UsageError
from vllm_rbln_exec.outputs.corpus_view import corpus_plots, markdown_table, table_rows
from vllm_rbln_exec.setup.corpus import BUILTIN, CorpusPlan, cut_windows, read_corpus_text
from vllm_rbln_exec.setup.corpus_options import build_corpus_options, parse_target
from vllm_rbln_exec.setup.sizes import checkpoint_dtype, weight_size


# -- windows ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", [[], [99]])
@pytest.mark.parametrize("window,stride", [(8, 4), (8, 1), (8, 7), (6, 5)])
def test_windows_tile_the_corpus_once_each_with_enough_context(prefix, window, stride):
    ids = list(range(100, 140))
    windows = cut_windows(ids, prefix, window, stride)
    body = window - len(prefix)
    assert all(len(w.ids) == window and list(w.ids[:len(prefix)]) == prefix for w in windows)
    assert [w.start for w in windows] == list(range(0, len(ids) - body + 1, stride))
    # the scored tokens of consecutive windows follow each other in the corpus: none twice, none skipped
    scored = [t for w in windows for t in w.targets]
    first = ids.index(windows[0].targets[0])
    assert scored == ids[first:first + len(scored)]
    assert all(w.scored == min(stride, window - 1) for w in windows)
    assert all(len(w.context) >= window - stride for w in windows)  # every scored token sees that much before it
    assert windows[0].context + windows[0].targets == windows[0].ids


def test_windows_refuse_what_cannot_work():
    with pytest.raises(UsageError, match="--window 1"):
        cut_windows(list(range(50)), [], 1, 1)
    with pytest.raises(UsageError, match="more than the 1 token"):
        cut_windows(list(range(50)), [7], 1, 1)
    with pytest.raises(UsageError, match="--stride 9"):
        cut_windows(list(range(50)), [], 8, 9)
    with pytest.raises(UsageError, match="fewer than one window"):
        cut_windows(list(range(5)), [], 8, 4)
    # a stride as long as the window: non-overlapping windows, each scoring all but its first token
    windows = cut_windows(list(range(16)), [], 8, 8)
    assert [w.targets for w in windows] == [tuple(range(1, 8)), tuple(range(9, 16))]


def test_the_plan_digest_is_what_the_engines_are_fed():
    windows = tuple(cut_windows(list(range(40)), [], 8, 4))
    plan = CorpusPlan("x", "h", 40, len(windows), (), 8, 4, windows)
    same = CorpusPlan("y", "other", 40, len(windows), (), 8, 4, windows)
    fewer = CorpusPlan("x", "h", 40, len(windows), (), 8, 4, windows[:-1])
    assert plan.digest() == same.digest() != fewer.digest()
    data = plan.to_json()
    assert data["scored_tokens"] == 4 * len(windows) and data["digest"] == plan.digest()


def test_corpus_text_builtin_and_files(tmp_path):
    name, text = read_corpus_text(BUILTIN)
    assert name == BUILTIN and len(text.split()) > 1500  # enough for 16 windows of 256 SmolLM2 tokens
    good = tmp_path / "c.txt"
    good.write_text("some text\n", encoding="utf-8")
    assert read_corpus_text(str(good)) == (str(good), "some text\n")
    with pytest.raises(UsageError, match="no such file"):
        read_corpus_text(str(tmp_path / "missing.txt"))
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(UsageError, match="not UTF-8"):
        read_corpus_text(str(bad))
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(UsageError, match="holds no text"):
        read_corpus_text(str(empty))


# -- perplexity and KL --------------------------------------------------------------------------
def test_perplexity_is_exp_of_the_mean_negative_logprob():
    assert perplexity(np.log(np.full(10, 0.25))) == pytest.approx(4.0)
    assert perplexity(np.array([math.log(0.5), math.log(0.125)])) == pytest.approx(4.0)  # geometric mean
    assert math.isnan(perplexity(np.array([])))
    assert perplexity(np.array([0.0, -np.inf])) == math.inf


def _rows(rng, n, vocab, scale=3.0):
    z = rng.standard_normal((n, vocab)) * scale
    return (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)


def test_corpus_summary_of_a_uniform_side_and_of_itself():
    rng = np.random.default_rng(0)
    vocab, n = 16, 40
    ref = _rows(rng, n, vocab)
    tokens = rng.integers(0, vocab, n)
    uniform = np.full((n, vocab), -math.log(vocab), dtype=np.float32)
    out = corpus_summary([position_stats(ref, uniform, tokens)])
    assert out["ppl"] == pytest.approx(vocab, rel=1e-5)  # a uniform model's perplexity is the vocabulary size
    expected_ref = math.exp(-float(np.mean(ref[np.arange(n), tokens])))
    assert out["ppl_reference"] == pytest.approx(expected_ref, rel=1e-5)
    assert out["ppl_ratio"] == pytest.approx(out["ppl"] / out["ppl_reference"], rel=1e-6)
    p = np.exp(ref.astype(np.float64))
    kl = (p * (ref + math.log(vocab))).sum(axis=1)
    assert out["kl_mean"] == pytest.approx(kl.mean(), rel=1e-5)
    assert out["kl_sem"] == pytest.approx(kl.std(ddof=1) / math.sqrt(n), rel=1e-4)
    assert out["kl_median"] == pytest.approx(np.median(kl), rel=1e-5)
    same = corpus_summary([position_stats(ref[:20], ref[:20], tokens[:20]), position_stats(ref[20:], ref[20:],
                                                                                             tokens[20:])])
    assert same["kl_mean"] == 0 and same["ppl_ratio"] == pytest.approx(1.0) and same["top1_rate"] == 1.0
    assert same["positions"] == n and len(same["per_window"]) == 2
    assert {key for key, _, _ in COLUMNS} <= set(same)


def _capture(root, rows_by_window, tokens_by_window, context=(1, 2)):
    info = SideInfo(side=root.name, device="cpu", engine="fake", dtype="float32")
    writer = CaptureWriter(root, info, {}, FULL)
    for i, (rows, tokens) in enumerate(zip(rows_by_window, tokens_by_window)):
        writer.add(i, f"window {i}", list(context), list(tokens), "", rows)
    return writer.finish(vocab_size=rows_by_window[0].shape[1])


def test_compare_corpus_reads_windows_and_refuses_other_tokens(tmp_path):
    rng = np.random.default_rng(1)
    ref_rows = [_rows(rng, 5, 12) for _ in range(3)]
    tokens = [rng.integers(0, 12, 5) for _ in range(3)]
    reference = _capture(tmp_path / "ref", ref_rows, tokens)
    shifted = _capture(tmp_path / "tgt", [r + 0.0 for r in ref_rows], tokens)
    out = compare_corpus(reference, shifted)
    assert out["kl_mean"] == 0 and out["positions"] == 15
    stats = window_stats(reference, shifted)
    assert [len(s) for s in stats] == [5, 5, 5]
    other = _capture(tmp_path / "other", ref_rows, [t[::-1] for t in tokens])
    with pytest.raises(HarnessError, match="window 0 holds other tokens"):
        compare_corpus(reference, other)


# -- target specs and options ---------------------------------------------------------------------
def test_target_specs_in_their_three_forms():
    plain = parse_target("exports/smollm2-135m-w4a16/", 0)
    assert plain.label == "smollm2-135m-w4a16" and plain.side.checkpoint == "exports/smollm2-135m-w4a16/"
    assert (plain.side.device, plain.side.engine, plain.side.dtype) == ("cpu", "vllm", None)
    items = parse_target("exports/w8a8, label=W8A8 ,engine=transformers", 1)
    assert (items.label, items.side.checkpoint, items.side.engine) == ("W8A8", "exports/w8a8", "transformers")
    dtype_only = parse_target("dtype=bfloat16", 2)
    assert dtype_only.side.checkpoint is None and dtype_only.label == "bfloat16"
    as_json = parse_target('{"model": "m", "args": {"enforce_eager": false}, "device": "cuda"}', 3)
    assert as_json.side.engine_args == {"enforce_eager": False} and as_json.side.device == "cuda"
    assert parse_target("device=cpu", 4).label == "target-5"


@pytest.mark.parametrize("spec,message", [
    ("", "empty"), ("modle=x", "Did you mean 'model'"), ("dtype=bf17", "unknown dtype"), ("a,b", "twice"),
    ("{not json", "not a JSON object"), ('{"modle": "x"}', "Did you mean 'model'"), ("x,label=has space", "label"),
])
def test_bad_target_specs_name_the_problem(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_target(spec, 0)


BASE = dict(model="m", corpus="builtin", window=16, stride=8, max_windows=4, reference_engine="vllm",
            reference_dtype=None, reference_device=None, reference_args=None, yardstick="auto",
            num_hidden_layers=None, store="q16", use_cache=False, run_dir=None, runs_dir="runs", resume=False,
            html=None, plots=None, json=None, cache_dir="cache", devices_file=None, timeout=10.0, kv_cache_gib=None,
            trust_remote_code=False, topk=5, no_color=False)


def test_options_are_checked_before_anything_runs():
    options = build_corpus_options(["a", "b,label=B"], **BASE)
    assert [t.label for t in options.targets] == ["a", "B"]
    assert "run_dir" not in options.plan_json() and options.plan_json()["window"] == 16
    for targets, changes, message in (([], {}, "at least one --target"), (["a", "a"], {}, "share the label 'a'"),
                                      (["label=reference,dtype=bfloat16"], {}, "reference"),
                                      (["a"], {"stride": 0}, "--stride"), (["a"], {"store": "q8"}, "store"),
                                      (["a"], {"resume": True}, "--run-dir"), (["a"], {"max_windows": 0}, "max-windows")):
        with pytest.raises(UsageError, match=message):
            build_corpus_options(targets, **{**BASE, **changes})


# -- sizes ----------------------------------------------------------------------------------------
def _folder(path, tensors, dtype="float32"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"torch_dtype": dtype, "num_hidden_layers": 1}))
    write_safetensors(tensors, path / "model.safetensors")
    return path


def test_sizes_count_floats_at_the_run_dtype_and_packed_weights_as_stored(tmp_path):
    out_f, in_f = 32, 64
    dense = {"model.embed_tokens.weight": np.zeros((10, in_f), np.float32),
             "model.layers.0.mlp.up_proj.weight": np.zeros((out_f, in_f), np.float32),
             "model.norm.weight": np.zeros(in_f, np.float32)}
    reference = _folder(tmp_path / "ref", dense)
    full = weight_size(reference, "float32", reference)
    assert full["weights"] == 10 * in_f + out_f * in_f + in_f
    assert full["bits_per_weight"] == pytest.approx(32) and full["linear_bits_per_weight"] == pytest.approx(32)
    half = weight_size(reference, "bfloat16", reference)
    assert half["bytes"] == full["bytes"] // 2 and half["linear_bits_per_weight"] == pytest.approx(16)
    packed = {"model.embed_tokens.weight": np.zeros((10, in_f), np.float16),
              "model.layers.0.mlp.up_proj.weight_packed": np.zeros((out_f, in_f // 8), np.int32),  # 4 bits
              "model.layers.0.mlp.up_proj.weight_scale": np.zeros((out_f, in_f // 32), np.float16),  # group 32
              "model.layers.0.mlp.up_proj.weight_shape": np.array([out_f, in_f], np.int64),
              "model.norm.weight": np.zeros(in_f, np.float16)}
    w4 = weight_size(_folder(tmp_path / "w4", packed, "bfloat16"), "bfloat16", reference)
    assert w4["linear_bits_per_weight"] == pytest.approx(4 + 16 / 32 + 8 * 16 / (out_f * in_f))
    int8 = {"model.layers.0.mlp.up_proj.weight": np.zeros((out_f, in_f), np.int8),
            "model.layers.0.mlp.up_proj.weight_scale": np.zeros((out_f, 1), np.float16)}
    w8 = weight_size(_folder(tmp_path / "w8", int8, "bfloat16"), "bfloat16", reference)
    assert w8["linear_bits_per_weight"] == pytest.approx(8 + 16 / in_f)
    assert checkpoint_dtype(tmp_path / "w8") == "bfloat16" and checkpoint_dtype(reference) == "float32"


# -- the journal of an unfinished capture ---------------------------------------------------------
def test_the_journal_restores_finished_windows_and_drops_damaged_ones(tmp_path):
    journal = Journal(tmp_path)
    for i in range(3):
        np.save(tmp_path / f"p{i:04d}.logprobs.npy", np.zeros((2, 5), np.float32))
        journal.append(PromptRecord(i, f"window {i}", [1], [2, 3], "", f"p{i:04d}.logprobs.npy"))
    np.save(tmp_path / "p0001.logprobs.npy", np.zeros((1, 5), np.float32))  # rows of the wrong shape
    (tmp_path / "p0002.logprobs.npy").write_bytes(b"garbage")
    with open(journal.path, "a") as f:
        f.write('{"index": 3, "prompt": "win')  # a line cut short by the interruption
    kept = journal.restore(5)
    assert list(kept) == [0] and kept[0].token_ids == [2, 3] and kept[0].prompt == "window 0"
    assert Journal(tmp_path / "nowhere").restore(5) == {}


# -- the table and the charts' values ----------------------------------------------------------
def _side(label, role, bpw, kl=None, ppl=None, quant=None):
    summary = None if role == "reference" else {"ppl": ppl, "ppl_reference": 10.0, "ppl_ratio": ppl / 10.0,
                                                "kl_mean": kl, "kl_sem": kl / 10, "kl_median": kl / 2,
                                                "kl_p99": kl * 5, "top1_rate": 0.9, "dp_rms": 0.01}
    return {"label": label, "role": role, "engine": "vllm", "device": "cpu", "dtype": "bfloat16",
            "quantization": quant, "summary": summary,
            "size": {"bytes": int(bpw * 2**20), "bits_per_weight": bpw, "linear_bits_per_weight": bpw}}


def test_table_and_charts_of_a_saved_result():
    result = {"model": "m", "corpus": {"source": "builtin", "windows": 2, "window": 8, "stride": 4,
                                       "scored_tokens": 8, "scored_per_window": 4},
              "sides": [_side("reference", "reference", 32), _side("yardstick", "yardstick", 16, 1e-3, 10.1),
                        _side("w4", "target", 4.25, 5e-2, 11.0, {"weights": "int4/g64", "activations": None})]}
    rows = table_rows(result)
    assert [r[0] for r in rows] == ["reference", "yardstick", "w4"]
    assert rows[0][5] == "10" and rows[0][7] == "0"  # the reference's perplexity, and KL 0 against itself
    assert rows[2][1] == "vllm/cpu: W int4/g64, A bf16" and rows[2][7] == "5.000e-02"
    assert markdown_table(result).count("\n") == 5
    plots = corpus_plots(result)
    assert [p.name for p in plots] == ["corpus-bits", "corpus-memory"]
    points = {p["label"]: p for p in plots[0].data["points"]}
    assert points["reference"]["kl_mean"] is None and points["reference"]["ppl"] == 10.0
    assert points["w4"]["bpw"] == 4.25 and points["yardstick"]["role"] == "yardstick"
    alone = corpus_plots({**result, "sides": result["sides"][:1]})
    assert alone[0].data is None and "fewer than two" in alone[0].missing


def test_sides_that_score_identically_are_named():
    from vllm_rbln_exec.pipeline.corpus import corpus_notes

    windows = tuple(cut_windows(list(range(40)), [], 8, 4))
    plan = CorpusPlan("x", "h", 40, len(windows) + 3, (), 8, 4, windows)
    same = {"per_window": [{"kl_mean": 0.3, "ppl": 9.0}], "ppl": 9.0}
    rows = [{"label": "reference", "summary": None}, {"label": "W4A16", "summary": same},
            {"label": "W4A8", "summary": dict(same)}, {"label": "W8A8", "summary": {**same, "ppl": 8.0}},
            {"label": "bf16", "summary": None, "resumed_windows": 2}]
    notes = corpus_notes(plan, rows)
    assert any(n.startswith("W4A8 scored exactly as W4A16") for n in notes)
    assert not any("W8A8" in n for n in notes)
    assert any("of the corpus's" in n for n in notes) and any("interrupted run: bf16" in n for n in notes)


def test_chart_labels_of_points_on_top_of_each_other_are_joined():
    from vllm_rbln_exec.outputs.plots import _label_groups

    points = [{"label": "W4A16", "bpw": 4.25, "kl": 0.369}, {"label": "W4A8", "bpw": 4.25, "kl": 0.369},
              {"label": "W8A8", "bpw": 8.02, "kl": 0.026}, {"label": "FP8", "bpw": 8.02, "kl": 0.022},
              {"label": "W8A16", "bpw": 8.25, "kl": 0.0025}]
    groups = {label: (x, y) for label, x, y in _label_groups(points, "bpw", "kl", log=True)}
    assert set(groups) == {"W4A8, W4A16", "W8A8, FP8", "W8A16"}
    assert groups["W8A8, FP8"] == (8.02, 0.026)  # at the cluster's highest point


def test_a_window_longer_than_the_model_is_refused_before_reading_anything(tmp_path):
    from vllm_rbln_exec.setup.corpus import plan_corpus

    with pytest.raises(UsageError, match="does not fit the model's 256 positions"):
        plan_corpus("builtin", tmp_path, 256, 128, None, max_positions=256)
