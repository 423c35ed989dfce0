"""The streamed metric kernels, q16 blocks and tokens-only captures give what the plain definitions give."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vllm_rbln_exec.capture import q16 as cap
from vllm_rbln_exec.capture.archive import pack_capture, unpack_capture
from vllm_rbln_exec.capture.q16 import dequantize_q16, quantize_q16
from vllm_rbln_exec.capture.store import (
    TOKENS,
    CaptureError,
    CaptureWriter,
    SideInfo,
    load_capture,
)
from vllm_rbln_exec.compare import distribution as dist
from vllm_rbln_exec.compare import elementwise, kernels, metrics


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=1, keepdims=True))).astype(np.float32)


def topk_by_sorting(rows: np.ndarray, k: int) -> np.ndarray:
    """The definition: value descending, ties by lower id."""
    k = max(1, min(k, rows.shape[1]))
    ids = np.arange(rows.shape[1])
    return np.stack([np.lexsort((ids, -row))[:k] for row in rows])


@pytest.mark.parametrize("kind", ["normal", "ties", "few_finite", "float64", "ties_across_chunks", "inf"])
def test_topk_ids_prefilter_matches_the_definition(kind):
    rng = np.random.default_rng(7)
    for vocab in (10, 600, 3000, 49152):
        rows = rng.standard_normal((5, vocab)).astype(np.float32)
        if kind == "ties":
            rows = rng.integers(0, 3, (5, vocab)).astype(np.float32)
        elif kind == "few_finite":  # a top-N row made dense: mostly -inf fillers
            rows[:] = -np.inf
            for r in rows:
                r[rng.choice(vocab, 3, replace=False)] = rng.standard_normal(3)
        elif kind == "float64":
            rows = rows.astype(np.float64)
        elif kind == "ties_across_chunks":
            rows[:, ::257] = 9.0
        elif kind == "inf":
            rows[:, [1, vocab - 1]] = np.inf
        for k in (1, 2, 5, 12):
            got = kernels.topk_ids(rows, k)
            np.testing.assert_array_equal(got, topk_by_sorting(rows, k))
            np.testing.assert_array_equal(got, kernels._topk_exact(rows, min(k, vocab)))


def masked_rows(rng, n, vocab, holes=True):
    ref = log_softmax(rng.standard_normal((n, vocab)) * 3)
    tgt = log_softmax(ref + rng.standard_normal((n, vocab)) * 0.05)
    if holes:
        ref[0, : vocab // 4] = -np.inf
        tgt[-1, 3] = -np.inf
    return ref, tgt


@pytest.mark.parametrize("holes", [False, True])
def test_streamed_elementwise_statistics_match_the_whole_array_ones(monkeypatch, holes):
    monkeypatch.setattr(kernels, "BLOCK_ELEMS", 1000)  # many blocks of 2 rows
    ref, tgt = masked_rows(np.random.default_rng(3), 9, 500, holes)
    both = np.isfinite(ref) & np.isfinite(tgt)
    with np.errstate(invalid="ignore"):
        diff = np.where(both, np.abs(tgt - ref), 0.0)
    ew = elementwise.elementwise(ref, tgt, eps=0.1)
    assert ew.count == both.sum()
    assert ew.max_abs == diff.max()
    assert ew.worst == np.unravel_index(diff.argmax(), diff.shape)[0]
    assert ew.outliers == (diff >= np.float32(0.1)).sum()
    assert ew.sum_abs == pytest.approx(diff.sum(dtype=np.float64), rel=1e-12)
    assert ew.pearson() == pytest.approx(elementwise.pearson(ref[both], tgt[both]), rel=1e-12)


def test_streamed_pearson_nan_for_a_constant_side():
    ref = log_softmax(np.random.default_rng(0).standard_normal((3, 40)))
    const = np.full_like(ref, -math.log(40))
    assert math.isnan(elementwise.elementwise(ref, const, 0.5).pearson())
    assert math.isnan(elementwise.pearson(ref.ravel(), const.ravel()))


def test_results_do_not_depend_on_threads_or_blocks(monkeypatch):
    ref, tgt = masked_rows(np.random.default_rng(4), 11, 700, holes=False)
    tgt[2] += 0.3  # an unnormalised target row: renormalised
    tokens = ref.argmax(axis=1).tolist()

    def run():
        c = metrics.compare_prompt(0, "p", {"token_ids": tokens, "logprobs": ref},
                                   {"token_ids": tokens, "logprobs": tgt}, vocab_size=700, aligned=True)
        return c.to_json(), c.position_stats

    monkeypatch.setattr(kernels, "BLOCK_ELEMS", 1400)  # both metric modules block by this
    monkeypatch.setattr(kernels, "_THREADS", 1)
    base_json, base = run()
    for threads in (2, 3):  # same blocks, combined in the same order: bit for bit
        monkeypatch.setattr(kernels, "_THREADS", threads)
        other_json, other = run()
        assert other_json == base_json
        np.testing.assert_array_equal(other.kl, base.kl)
    for block in (700, 10**6):  # other blocks only regroup float64 sums
        monkeypatch.setattr(kernels, "BLOCK_ELEMS", block)
        other_json, other = run()
        assert other_json["pearson"] == pytest.approx(base_json["pearson"], rel=1e-12)
        assert other_json["mean_abs_diff"] == pytest.approx(base_json["mean_abs_diff"], rel=1e-12)
        assert {k: v for k, v in other_json.items() if k not in ("pearson", "mean_abs_diff")} == \
            {k: v for k, v in base_json.items() if k not in ("pearson", "mean_abs_diff")}
    assert base.tgt_renormalized[2] and base.tgt_renormalized.sum() == 1


def test_finite_and_general_kl_paths_agree():
    rng = np.random.default_rng(5)
    ref, tgt = masked_rows(rng, 6, 300, holes=False)
    tgt[1] -= 0.2  # renormalised
    finite = dist._kl_finite(ref, tgt, kernels.Scratch())
    general = dist._kl_general(ref, tgt)
    np.testing.assert_allclose(finite[0], general[0], rtol=1e-9, atol=1e-15)
    for a, b in zip(finite[1:], general[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_identical_unnormalised_rows_give_zero_kl():
    rows = log_softmax(np.random.default_rng(6).standard_normal((4, 1000))) + 0.5
    st = dist.position_stats(rows, rows.copy(), rows.argmax(axis=1))
    assert st.ref_renormalized.all() and st.tgt_renormalized.all()
    assert np.all(st.kl == 0.0) and np.all(st.dp == 0.0)


def test_position_stats_with_ranked_ids_is_the_same():
    ref, tgt = masked_rows(np.random.default_rng(8), 7, 400, holes=True)
    tokens = ref.argmax(axis=1)
    ranked = (kernels.topk_ids(ref, 5), kernels.topk_ids(tgt, 5))
    a = dist.position_stats(ref, tgt, tokens, topk=5)
    b = dist.position_stats(ref, tgt, tokens, topk=5, ranked=ranked)
    assert dist.summarize_positions(a).to_json() == dist.summarize_positions(b).to_json()


# -- q16 in blocks ------------------------------------------------------------------
def quantize_reference(rows):
    """The q16 definition, whole array at once in float64."""
    rows = np.asarray(rows, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        top = np.where(np.isfinite(rows), rows, -np.inf).max(axis=1)
    top = np.where(np.isfinite(top), top, 0.0).astype(np.float32)
    floor = (top - cap.Q16_RANGE).astype(np.float32)
    scaled = (rows.astype(np.float64) - floor[:, None].astype(np.float64)) / cap.Q16_STEP
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(scaled), 0, 65534) + 1
    q[~np.isfinite(rows)] = 0
    return q.astype(np.uint16), floor


def test_q16_blocks_match_the_whole_array_definition(monkeypatch):
    monkeypatch.setattr(cap, "_BLOCK_ELEMS", 300)  # 3 rows per block, a short last block
    rows = log_softmax(np.random.default_rng(9).standard_normal((10, 100)) * 4)
    rows[1, 5] = -np.inf
    rows[4] = -np.inf
    rows[6, 2] = np.nan
    rows[7, 9] = np.inf
    levels, floor = quantize_q16(rows)
    want_levels, want_floor = quantize_reference(rows)
    np.testing.assert_array_equal(levels, want_levels)
    np.testing.assert_array_equal(floor, want_floor)
    back = dequantize_q16(levels, floor)
    want = (floor.astype(np.float64)[:, None] + (levels.astype(np.float64) - 1) * cap.Q16_STEP).astype(np.float32)
    want[levels == 0] = -np.inf
    np.testing.assert_array_equal(back, want)


# -- tokens-only captures (capture "plain") ----------------------------------------------
def test_tokens_capture_round_trips_and_refuses_logprobs(tmp_path):
    info = SideInfo(side="bench", device="cpu", engine="fake")
    writer = CaptureWriter(tmp_path / "c", info, {"max_tokens": 2}, TOKENS)
    writer.add(0, "a", [1, 2], [3, 4], " x y")
    writer.add(1, "b", [5], [6, 7], " z w")
    with pytest.raises(CaptureError, match="no arrays"):
        writer.add(2, "c", [1], [2], "t", logprobs=np.zeros((1, 3)))
    writer.records.pop(2, None)
    capture = writer.finish(store="q16")
    assert capture.mode == TOKENS and capture.settings["store"] is None
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["capture.json"]
    loaded = load_capture(tmp_path / "c", verify_arrays=True)
    assert [p.token_ids for p in loaded.prompts] == [[3, 4], [6, 7]]
    with pytest.raises(CaptureError, match="tokens only"):
        loaded.logprobs(0)
    assert loaded.top_ids(0) is None
    pack_capture(tmp_path / "c", tmp_path / "c.tar")
    assert unpack_capture(tmp_path / "c.tar", tmp_path / "u").prompts == loaded.prompts


def test_a_full_capture_without_its_logprobs_file_is_refused(tmp_path, make_capture):
    import json

    from vllm_rbln_exec.capture.store import metadata_digest

    make_capture(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "capture.json").read_text())
    meta["prompts"][0]["logprobs_file"] = None
    meta["digest"] = metadata_digest(meta)  # a well-formed file that says so, not a damaged one
    (tmp_path / "c" / "capture.json").write_text(json.dumps(meta))
    with pytest.raises(CaptureError, match="logprobs file"):
        load_capture(tmp_path / "c", verify_arrays=True)


def test_q16_store_time_is_recorded(tmp_path):
    writer = CaptureWriter(tmp_path / "c", SideInfo(side="r", device="cpu", engine="fake"), {}, "full")
    writer.add(0, "p", [1], [0, 1], "t", logprobs=log_softmax(np.zeros((2, 8))))
    assert writer.finish(store="q16").info.timings["store_s"] >= 0.0


def test_peak_rss_is_reported_in_mib():
    from vllm_rbln_exec.worker.main import peak_rss

    rss = peak_rss()
    assert 1 < rss["peak_rss_mib"] < 1 << 20 and rss["peak_rss_children_mib"] >= 0
