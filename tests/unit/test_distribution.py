"""Hand-checkable cases for vllm_rbln_exec.compare.distribution."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vllm_rbln_exec.compare import kernels
from vllm_rbln_exec.compare.distribution import (
    PositionStats,
    divergence_point,
    position_stats,
    summarize_positions,
    worst_positions,
)


def logp(probs, dtype=np.float32):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(probs, dtype=np.float64)).astype(dtype)


def peaked(q, vocab=20, top=0):
    """A row with probability q on ``top`` and the rest spread evenly."""
    row = np.full(vocab, (1.0 - q) / (vocab - 1))
    row[top] = q
    return row


def test_identical_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 50))
    rows = (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32)
    tokens = rows.argmax(axis=1)
    st = position_stats(rows, rows.copy(), tokens, topk=5)
    assert np.all(st.kl == 0.0)
    assert st.top1_match.all()
    assert np.all(st.dp == 0.0)
    assert np.all(st.jaccard == 1.0) and np.all(st.rank_agreement == 1.0)
    s = summarize_positions(st)
    assert s.positions == 7 and s.kl_mean == 0.0 and s.kl_max == 0.0
    assert s.top1_rate == 1.0 and s.top1_se == 0.0
    assert s.ppl_ratio == pytest.approx(1.0)
    assert s.renormalized_reference == 0 and s.renormalized_target == 0


def test_two_token_kl_exact():
    ref = logp([[0.5, 0.5]], np.float64)
    tgt = logp([[0.9, 0.1]], np.float64)
    st = position_stats(ref, tgt, np.array([0]), topk=2)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert st.kl[0] == pytest.approx(expected, rel=1e-12)
    assert st.dp[0] == pytest.approx(0.4)
    # float32 input stays within float32 rounding
    st32 = position_stats(ref.astype(np.float32), tgt.astype(np.float32), np.array([0]), topk=2)
    assert st32.kl[0] == pytest.approx(expected, rel=1e-6)


def test_target_minus_inf_where_reference_has_mass():
    ref = logp([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]])
    tgt = logp([[1.0, 0.0, 0.0], [0.2, 0.8, 0.0]])  # position 1: target has mass only where ref does
    st = position_stats(ref, tgt, np.array([0, 1]), topk=2)
    assert st.kl[0] == np.inf
    assert st.kl[1] == pytest.approx(0.0, abs=1e-7)  # ref -inf entries contribute 0
    s = summarize_positions(st)
    assert s.kl_nonfinite == 1 and s.kl_max == pytest.approx(0.0, abs=1e-7)
    assert worst_positions(st, n=1) == [0]


def test_bucket_assignment():
    qs = [0.1, 0.3, 0.6, 0.8, 0.97, 1.0, 0.3]
    rows = logp([peaked(q) for q in qs])
    tgt = rows.copy()
    tgt[1] = logp(peaked(0.3, top=1))  # one position in [0.25,0.5) disagrees
    st = position_stats(rows, tgt, np.zeros(len(qs), dtype=int))
    assert st.ref_top1_prob[5] == 1.0
    b = {x["range"]: x for x in summarize_positions(st).kl_buckets}
    assert list(b) == ["[0,0.25)", "[0.25,0.5)", "[0.5,0.75)", "[0.75,0.95)", "[0.95,1]"]
    assert [x["count"] for x in b.values()] == [1, 2, 1, 1, 2]
    assert b["[0.25,0.5)"]["top1_rate"] == 0.5
    assert b["[0.25,0.5)"]["kl_max"] > 0 and b["[0,0.25)"]["kl_mean"] == 0.0
    assert b["[0.95,1]"]["top1_rate"] == 1.0


def test_top1_binomial_error():
    ref = logp([peaked(0.7)] * 4)
    tgt = ref.copy()
    tgt[2] = logp(peaked(0.7, top=3))
    s = summarize_positions(position_stats(ref, tgt, np.zeros(4, dtype=int)))
    assert s.top1_rate == 0.75
    assert s.top1_se == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert s.top1_mismatches == 1


def test_near_tie_vs_disagreement():
    ref = logp([[0.8, 0.15, 0.05], [0.45, 0.40, 0.15]])
    tgt = logp([[0.8, 0.15, 0.05], [0.40, 0.45, 0.15]])
    st = position_stats(ref, tgt, np.array([0, 0]), topk=2)
    d = divergence_point(st, tie_margin=0.5)
    assert d["position"] == 1 and d["reference_token"] == 0 and d["target_token"] == 1
    assert d["margin"] == pytest.approx(math.log(0.45 / 0.40), rel=1e-5)
    assert d["kind"] == "near-tie"
    assert summarize_positions(st).mismatches_near_tie == 1

    ref = logp([[0.8, 0.15, 0.05]])
    tgt = logp([[0.1, 0.8, 0.1]])
    d = divergence_point(position_stats(ref, tgt, np.array([0])))
    assert d["kind"] == "disagreement" and d["margin"] == pytest.approx(math.log(0.8 / 0.15), rel=1e-5)

    same = position_stats(ref, ref, np.array([0]))
    assert divergence_point(same) is None


def test_jaccard_and_rank_agreement():
    ref = logp([[0.4, 0.3, 0.2, 0.05, 0.03, 0.02], [0.4, 0.3, 0.2, 0.05, 0.03, 0.02]])
    tgt = logp([[0.02, 0.4, 0.3, 0.2, 0.05, 0.03], [0.4, 0.2, 0.3, 0.05, 0.03, 0.02]])
    st = position_stats(ref, tgt, np.array([0, 0]), topk=3)
    # position 0: {0,1,2} vs {1,2,3} -> 2/4; ranks [0,1,2] vs [1,2,3] -> 0 same
    # position 1: {0,1,2} vs {0,2,1} -> 3/3; ranks: only id 0 keeps its rank -> 1/3
    np.testing.assert_allclose(st.jaccard, [0.5, 1.0])
    np.testing.assert_allclose(st.rank_agreement, [0.0, 1.0 / 3.0])
    s = summarize_positions(st)
    assert s.jaccard_mean == pytest.approx(0.75)
    assert s.rank_agreement_mean == pytest.approx(1.0 / 6.0)


def test_perplexity_ratio_for_known_shift():
    ref = logp([[0.5, 0.5]] * 3)
    tgt = logp([[0.25, 0.75]] * 3)
    s = summarize_positions(position_stats(ref, tgt, np.zeros(3, dtype=int)))
    assert s.logppl_reference == pytest.approx(math.log(2), rel=1e-6)
    assert s.logppl_target == pytest.approx(math.log(4), rel=1e-6)
    assert s.ppl_ratio == pytest.approx(2.0, rel=1e-6)
    assert s.dp_mean == pytest.approx(-0.25) and s.dp_rms == pytest.approx(0.25)


def test_renormalises_truncated_rows_only():
    # a top-N capture holding half the mass: renormalised for KL, raw for perplexity
    ref = logp([[0.3, 0.2, 0.0, 0.0]])
    tgt = logp([[0.6, 0.4, 0.0, 0.0]])
    st = position_stats(ref, tgt, np.array([0]), topk=2)
    assert st.ref_renormalized.tolist() == [True] and st.tgt_renormalized.tolist() == [False]
    assert st.kl[0] == pytest.approx(0.0, abs=1e-6)
    assert st.ref_top1_prob[0] == pytest.approx(0.6, rel=1e-6)
    assert st.ref_logprob[0] == pytest.approx(math.log(0.3), rel=1e-6)


def test_worst_positions_ties_by_position():
    st = position_stats(logp([[0.5, 0.5]] * 4), logp([[0.5, 0.5]] * 4), np.zeros(4, dtype=int))
    st.kl[:] = [0.1, 0.3, 0.1, 0.3]
    assert worst_positions(st, n=3) == [1, 3, 0]
    assert worst_positions(st, n=10) == [1, 3, 0, 2]


def test_empty_is_nan_safe():
    st = position_stats(np.empty((0, 8), np.float32), np.empty((0, 8), np.float32), np.empty(0, int))
    s = summarize_positions(st)
    assert s.positions == 0 and math.isnan(s.kl_mean) and math.isnan(s.top1_rate) and math.isnan(s.ppl_ratio)
    assert [b["count"] for b in s.kl_buckets] == [0] * 5
    j = s.to_json()
    json.dumps(j, allow_nan=False)
    assert j["kl_mean"] is None and j["kl_buckets"][0]["kl_mean"] is None
    assert summarize_positions([]).positions == 0
    assert divergence_point(st) is None and worst_positions(st) == []


def test_concat_and_chunking_match(monkeypatch):
    rng = np.random.default_rng(1)

    def rows(n, v):
        x = rng.normal(size=(n, v)) * 3
        return (x - np.log(np.exp(x).sum(axis=1, keepdims=True))).astype(np.float32)

    ref, tgt = rows(9, 30), rows(9, 30)
    tok = ref.argmax(axis=1)
    whole = position_stats(ref, tgt, tok, topk=4)
    monkeypatch.setattr(kernels, "BLOCK_ELEMS", 64)  # two rows per block
    chunked = position_stats(ref, tgt, tok, topk=4)
    parts = [position_stats(ref[:4], tgt[:4], tok[:4], topk=4), position_stats(ref[4:], tgt[4:], tok[4:], topk=4)]
    joined = PositionStats.concat(parts)
    for other in (chunked, joined):
        np.testing.assert_allclose(other.kl, whole.kl, rtol=1e-12)
        np.testing.assert_array_equal(other.tgt_argmax, whole.tgt_argmax)
    assert summarize_positions(parts).to_json() == summarize_positions(whole).to_json()
    assert whole.kl.min() > 0 and np.isfinite(summarize_positions(whole).kl_sem)


@pytest.mark.parametrize("with_hole", [False, True])
def test_kl_ignores_a_small_mass_error(with_hole):
    # A row whose stored mass is off by a constant factor below MASS_TOLERANCE (rounding,
    # q16) is the same distribution: KL must not report the mass error as divergence.
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=2.0, size=(6, 300))
    ref = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    tgt = ref - 4e-4  # mass e^-4e-4: inside the tolerance, so not flagged as renormalised
    if with_hole:  # the general path (a -inf where neither side has mass)
        ref[:, 0] = tgt[:, 0] = -np.inf
    st = position_stats(ref, tgt, ref.argmax(axis=1), topk=5)
    assert np.abs(st.kl).max() < 1e-12
    if not with_hole:  # removing column 0 takes more than the tolerance from some rows
        assert summarize_positions(st).renormalized_target == 0
