"""Hand-checkable cases for vllm_rbln_exec.compare.metrics (compare_prompt, summarize and helpers)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from vllm_rbln_exec.compare.elementwise import pearson
from vllm_rbln_exec.compare.kernels import topk_ids
from vllm_rbln_exec.compare.metrics import (
    PromptComparison,
    compare_prompt,
    first_divergence,
    summarize,
    to_dense,
)

NEG_INF = -np.inf


def side(tokens, rows, ids=None, text="text"):
    out = {"token_ids": list(tokens), "text": text, "logprobs": np.asarray(rows, dtype=np.float32)}
    if ids is not None:
        out["ids"] = np.asarray(ids, dtype=np.int32)
    return out


def integer_rows(positions: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Rows of distinct negative integers (exact in float32, so differences are exact too)."""
    rng = np.random.default_rng(seed)
    return np.stack([-(rng.permutation(vocab) + 1.0) for _ in range(positions)]).astype(np.float32)


def compare(ref, tgt, vocab, **kw) -> PromptComparison:
    return compare_prompt(0, "prompt", ref, tgt, vocab_size=vocab, **kw)


# -- compare_prompt ------------------------------------------------------------
def test_identical_vectors():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 10))
    rows = (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32)
    tokens = rows.argmax(axis=1).tolist()
    c = compare(side(tokens, rows), side(tokens, rows.copy()), 10)

    assert c.max_abs_diff == 0.0
    assert c.mean_abs_diff == 0.0
    assert c.pearson == pytest.approx(1.0, abs=1e-12)
    assert c.pearson_ok
    assert c.outliers == 0
    assert c.topk_overlap == 1.0
    assert c.topk_order_match == 1.0
    assert c.top1_match == 1.0
    assert c.finite_overlap == 1.0
    assert c.finite_entries == 40
    assert c.positions_compared == 4
    assert c.first_divergence is None
    assert c.tokens_equal and c.texts_equal
    assert c.vocab_size == 10
    assert c.notes == []
    assert c.first_position_topk.reference_ids == c.first_position_topk.target_ids
    assert c.first_position_topk.reference_ids[0] == tokens[0]


def test_constant_shift_of_point_three():
    ref = integer_rows(3, 6)
    tgt = ref + np.float32(0.3)
    tokens = [1, 2, 3]
    c = compare(side(tokens, ref), side(tokens, tgt), 6, eps=0.5)

    assert c.max_abs_diff == pytest.approx(0.3, abs=1e-6)
    assert c.mean_abs_diff == pytest.approx(0.3, abs=1e-6)
    assert c.outliers == 0
    assert c.pearson == pytest.approx(1.0, abs=1e-9)
    assert c.topk_overlap == 1.0 and c.top1_match == 1.0 and c.topk_order_match == 1.0

    c25 = compare(side(tokens, ref), side(tokens, tgt), 6, eps=0.25)
    assert c25.outliers == ref.size == 18
    assert c25.eps == 0.25


def test_shift_with_some_entries_beyond_eps():
    ref = integer_rows(4, 8, seed=3)
    tgt = ref.copy()
    tgt[1, 2] += 0.75  # outlier, the largest
    tgt[2, 5] -= 0.5  # exactly eps: |Δ| >= eps counts
    tgt[3, 0] += 0.25  # below eps
    tokens = [0, 1, 2, 3]
    c = compare(side(tokens, ref), side(tokens, tgt), 8, eps=0.5)

    assert c.outliers == 2
    assert c.max_abs_diff == 0.75
    assert c.worst_position == 1
    assert c.mean_abs_diff == pytest.approx((0.75 + 0.5 + 0.25) / 32)
    assert c.finite_entries == 32
    assert c.outliers == compare(side(tokens, ref), side(tokens, tgt), 8, eps=0.75).outliers + 1
    assert compare(side(tokens, ref), side(tokens, tgt), 8, eps=0.2).outliers == 3
    assert compare(side(tokens, ref), side(tokens, tgt), 8, eps=0.8).outliers == 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_neg_inf_on_one_side_uses_entries_finite_on_both_only():
    ref = integer_rows(2, 5, seed=7)
    tgt = ref.copy()
    tgt[0, 1] = tgt[0, 4] = tgt[1, 3] = NEG_INF  # 3 of 10 entries absent on the target
    finite_cols = [c for c in range(5) if c not in (1, 4)]
    tgt[0, finite_cols[0]] += 0.25  # the only finite difference
    c = compare(side([0, 1], ref), side([0, 1], tgt), 5, eps=0.2)

    assert c.finite_entries == 7
    assert c.finite_overlap == pytest.approx(0.7)
    assert c.max_abs_diff == 0.25  # not inf
    assert c.mean_abs_diff == pytest.approx(0.25 / 7)
    assert c.outliers == 1
    both = np.isfinite(ref) & np.isfinite(tgt)
    assert c.pearson == pytest.approx(pearson(ref[both], tgt[both]))
    assert math.isfinite(c.pearson)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_disjoint_top_n_lists():
    ref = side([0], [[-0.1, -2.5]], ids=[[0, 1]])
    tgt = side([2], [[-0.2, -2.0]], ids=[[2, 3]])
    c = compare(ref, tgt, 6, topk=2)

    assert c.finite_entries == 0
    assert c.finite_overlap == 0.0
    assert math.isnan(c.max_abs_diff) and math.isnan(c.mean_abs_diff) and math.isnan(c.pearson)
    assert c.outliers == 0
    assert c.worst_position is None
    assert not c.pearson_ok
    assert any("finite on both" in n for n in c.notes)
    assert c.topk_overlap == 0.0
    assert c.top1_match == 0.0
    assert c.first_position_topk.reference_ids == [0, 1]
    assert c.first_position_topk.target_ids == [2, 3]
    # NaN becomes null so the JSON stays strict
    data = c.to_json()
    json.dumps(data, allow_nan=False)
    assert data["max_abs_diff"] is None and data["pearson"] is None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_top_n_with_shared_ids_in_other_order():
    ref = side([5], [[-0.3, -2.0, -3.0]], ids=[[5, 1, 7]])
    tgt = side([5], [[-3.0, -0.3, -2.0]], ids=[[7, 5, 1]])  # same (id, value) pairs, listed differently
    c = compare(ref, tgt, 10, topk=3)
    assert c.finite_entries == 3
    assert c.finite_overlap == pytest.approx(3 / 10)
    assert c.max_abs_diff == 0.0
    assert c.topk_overlap == 1.0 and c.topk_order_match == 1.0
    assert c.first_position_topk.reference_ids == [5, 1, 7]


def test_vocab_size_mismatch_raises():
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        compare(side([0], np.zeros((1, 4))), side([0], np.zeros((1, 5))), 4)


# -- position alignment ----------------------------------------------------------
def test_first_divergence_cases():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([], []) is None
    assert first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert first_divergence([4, 2], [1, 2]) == 0
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # prefix: min length
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert first_divergence(np.array([1, 2, 3]), np.array([1, 2, 4])) == 2
    assert isinstance(first_divergence([1, 2], [1, 3]), int)


def test_free_mode_compares_up_to_the_divergence_inclusive_aligned_all():
    ref = integer_rows(5, 6, seed=11)
    tgt = ref.copy()
    tgt[2] += 0.25  # the divergence position itself: still compared in free mode
    tgt[3] += 3.0  # after the divergence: contexts differ, ignored in free mode
    tgt[4, 0] -= 2.0
    ref_tokens, tgt_tokens = [1, 2, 3, 4, 5], [1, 2, 7, 8, 9]

    free = compare(side(ref_tokens, ref), side(tgt_tokens, tgt), 6)
    assert free.first_divergence == 2
    assert free.positions_compared == 3
    assert free.finite_entries == 18
    assert free.max_abs_diff == 0.25
    assert free.worst_position == 2
    assert not free.tokens_equal

    aligned = compare(side(ref_tokens, ref), side(tgt_tokens, tgt), 6, aligned=True)
    assert aligned.first_divergence == 2
    assert aligned.positions_compared == 5
    assert aligned.finite_entries == 30
    assert aligned.max_abs_diff == 3.0
    assert aligned.worst_position == 3
    assert aligned.outliers == 6 + 1


def test_free_mode_prefix_and_empty_side():
    ref = integer_rows(3, 4)
    c = compare(side([1, 2, 3], ref), side([1, 2], ref[:2]), 4)
    assert c.first_divergence == 2
    assert c.positions_compared == 2  # only what both sides have

    empty = compare(side([1, 2, 3], ref), side([], np.zeros((0, 4))), 4)
    assert empty.positions_compared == 0
    assert empty.first_divergence == 0
    assert math.isnan(empty.topk_overlap) and math.isnan(empty.top1_match)
    assert empty.first_position_topk is None
    assert any("no comparable position" in n for n in empty.notes)


def test_snippet_head_and_tail():
    ref = integer_rows(1, 12)
    c = compare(side([0], ref), side([0], ref), 12, snippet_elems=3)
    assert c.snippet["reference"] == ref[0, :3].tolist() + ref[0, -3:].tolist()
    short = compare(side([0], ref), side([0], ref), 12, snippet_elems=6)
    assert short.snippet["target"] == ref[0].tolist()
    assert compare(side([0], ref), side([0], ref), 12, snippet_elems=0).snippet == {}


# -- helpers ---------------------------------------------------------------------
def test_topk_ids_orders_by_value_then_id():
    rows = np.array(
        [
            [1.0, 3.0, 3.0, 2.0, 0.0],
            [5.0, 5.0, 5.0, 5.0, 5.0],
            [0.0, 2.0, 2.0, 1.0, 2.0],
            [-1.0, -0.5, -3.0, -0.5, -2.0],
        ]
    )
    got = topk_ids(rows, 4)
    assert got.tolist() == [[1, 2, 3, 0], [0, 1, 2, 3], [1, 2, 4, 3], [1, 3, 0, 4]]
    assert topk_ids(rows, 1)[:, 0].tolist() == [1, 0, 1, 1]


def test_topk_ids_clamps_k():
    rows = np.array([[0.1, 0.3, 0.2]])
    assert topk_ids(rows, 10).tolist() == [[1, 2, 0]]
    assert topk_ids(rows, 0).tolist() == [[1]]


def test_topk_ids_selection_at_a_tie_prefers_low_ids():
    row = np.zeros((1, 1000))
    row[0, 500] = 1.0
    assert topk_ids(row, 3).tolist() == [[500, 0, 1]]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_topk_overlap_ignores_absent_entries_when_n_is_below_k():
    vals = [[-0.3, -2.0, -3.0]]
    c = compare(side([0], vals, ids=[[0, 1, 2]]), side([0], vals, ids=[[0, 1, 3]]), 1000, topk=5)
    assert c.topk_overlap == pytest.approx(2 / 3)


def test_to_dense():
    vals = np.array([[-0.1, -2.0], [-0.5, -1.0]], dtype=np.float32)
    ids = np.array([[3, 0], [1, 2]])
    dense = to_dense(vals, ids, 4)
    expected = np.array([[-2.0, NEG_INF, NEG_INF, -0.1], [NEG_INF, -0.5, -1.0, NEG_INF]], dtype=np.float32)
    assert dense.dtype == np.float32
    np.testing.assert_array_equal(dense, expected)

    full = np.array([[-1.0, -2.0]], dtype=np.float64)
    out = to_dense(full, None, 2)
    assert out.dtype == np.float32 and out.shape == (1, 2)
    np.testing.assert_array_equal(out, full.astype(np.float32))


def test_pearson_values_and_nan_cases():
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert math.isnan(pearson(np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.0, 3.0])))
    assert math.isnan(pearson(np.array([1.0, 2.0]), np.array([4.0, 4.0])))
    assert math.isnan(pearson(np.array([1.0]), np.array([1.0])))
    assert math.isnan(pearson(np.array([]), np.array([])))


def test_constant_target_gives_nan_pearson_and_fails_the_check():
    ref = integer_rows(2, 5)
    c = compare(side([0, 1], ref), side([0, 1], np.full((2, 5), -1.6)), 5)
    assert math.isnan(c.pearson)
    assert not c.pearson_ok
    assert math.isfinite(c.max_abs_diff)


# -- summarize --------------------------------------------------------------------
def test_summarize_weights():
    rows = integer_rows(2, 4)
    base = compare(side([0, 1], rows), side([0, 1], rows), 4)
    a = replace(base, finite_entries=4, mean_abs_diff=0.5, max_abs_diff=0.9, pearson=0.995,
                positions_compared=1, top1_match=1.0, topk_overlap=1.0, outliers=3,
                texts_equal=True, tokens_equal=True, first_divergence=None)
    b = replace(base, finite_entries=12, mean_abs_diff=0.25, max_abs_diff=0.4, pearson=0.97,
                positions_compared=3, top1_match=2 / 3, topk_overlap=0.6, outliers=1,
                texts_equal=False, tokens_equal=False, first_divergence=5)
    nan = float("nan")
    empty = replace(base, finite_entries=0, mean_abs_diff=nan, max_abs_diff=nan, pearson=nan,
                    positions_compared=0, top1_match=nan, topk_overlap=nan, outliers=0,
                    texts_equal=False, tokens_equal=False, first_divergence=0)
    s = summarize([a, b, empty])

    assert s.prompts == 3
    assert s.positions_compared == 4
    assert s.mean_abs_diff == pytest.approx((0.5 * 4 + 0.25 * 12) / 16)  # entry-weighted: 0.3125
    assert s.max_abs_diff == 0.9
    assert s.min_pearson == 0.97
    assert s.outliers == 4
    assert s.texts_equal == 1 and s.tokens_equal == 1
    assert s.top1_match == pytest.approx((1.0 * 1 + 2 / 3 * 3) / 4)  # position-weighted: 0.75
    assert s.topk_overlap == pytest.approx((1.0 * 1 + 0.6 * 3) / 4)  # 0.7
    assert s.earliest_divergence == 0

    assert summarize([a, b]).earliest_divergence == 5
    assert summarize([a]).earliest_divergence is None


def test_summarize_nothing_comparable():
    s = summarize([])
    assert s.prompts == 0 and s.positions_compared == 0 and s.outliers == 0
    assert math.isnan(s.mean_abs_diff) and math.isnan(s.max_abs_diff) and math.isnan(s.min_pearson)
    assert math.isnan(s.top1_match)
    assert s.earliest_divergence is None
    data = s.to_json()
    json.dumps(data, allow_nan=False)
    assert data["mean_abs_diff"] is None
