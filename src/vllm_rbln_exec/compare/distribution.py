"""Distribution metrics between a reference and a target over aligned positions (pure numpy/scipy).

This module owns the per-position statistics of two log-probability rows that
saw the same context (KL, top-1 agreement, Δp of the reference token, top-K
overlap, perplexity of the reference tokens) and their aggregation over a run.
It works on arrays already in memory and must not touch engines, processes,
files or the element-wise metrics in :mod:`vllm_rbln_exec.compare.metrics` (which
imports this module, never the reverse); block iteration, scratch buffers and
top-k selection come from :mod:`vllm_rbln_exec.compare.kernels`. Callers decide
which positions are aligned (see the metrics module's docstring) and pass only
those rows here.

Conventions:

* Rows are log-softmax outputs, float32 ``[T, V]``, ``-inf`` where a token has
  zero probability (or was absent from a top-N capture, see ``metrics.to_dense``).
* When either side holds top-N rows (``tail``), nothing is renormalised: the
  values are true logprobs, KL compares the entries known on both sides and the
  rest of the mass as one bucket (a lower bound, ``partial.kl_tail_bucket``),
  and Δp of a token outside the target's top N takes its probability as 0 (a
  bound). Otherwise a row whose probability mass differs from 1 by more than
  ``MASS_TOLERANCE`` is renormalised with ``logsumexp`` before KL, top-1
  probability and Δp are computed; the per-token logprobs kept for perplexity
  are the raw values either way.
* KL(reference || target) is in nats. Entries where the reference is ``-inf``
  contribute 0; an entry the reference supports but the target gives ``-inf``
  makes the position's KL ``+inf``; a NaN anywhere in either row makes it NaN.
  Tiny negative values from rounding are clipped to 0.
* Summary KL statistics are taken over positions with finite KL; the rest are
  counted in ``kl_nonfinite`` (and are still counted in every other statistic).
* Ties in top-K and argmax are broken by the lower token id.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ..core.jsonio import strict_json
from .kernels import Scratch, block_rows, map_row_blocks, topk_ids
from .partial import MASS_TOLERANCE, kl_tail_bucket, kl_with_holes

_kl_general = kl_with_holes  # the name the kernel tests compare the finite path against
DEFAULT_TIE_MARGIN = 0.5  # nats between the reference's top-2 logprobs
BUCKET_EDGES = (0.0, 0.25, 0.5, 0.75, 0.95, 1.0)
BUCKET_LABELS = ("[0,0.25)", "[0.25,0.5)", "[0.5,0.75)", "[0.75,0.95)", "[0.95,1]")
SERIES_VERSION = 1  # the ``series`` block of a prompt's saved comparison (see ``position_series``)
SERIES_DIGITS = 5  # significant digits kept per saved value: plots need no more, and the report stays small


@dataclass
class PositionStats:
    """Per-position statistics; every array has length T (positions)."""

    kl: np.ndarray  # float64, KL(ref || tgt) in nats
    top1_match: np.ndarray  # bool, argmax(ref) == argmax(tgt)
    ref_top1_prob: np.ndarray  # float64, reference's largest probability
    ref_margin: np.ndarray  # float64, reference top-1 minus top-2 logprob (inf if V == 1)
    near_tie: np.ndarray  # bool, ref_margin < tie_margin
    ref_argmax: np.ndarray  # int64
    tgt_argmax: np.ndarray  # int64
    ref_tokens: np.ndarray  # int64, the token both sides were fed next
    dp: np.ndarray  # float64, p_tgt[tok] - p_ref[tok]
    jaccard: np.ndarray  # float64, |A∩B| / |A∪B| of the finite top-K id sets
    rank_agreement: np.ndarray  # float64, share of the ref's top-K ids at the same rank in the target's
    ref_logprob: np.ndarray  # float64, raw reference logprob of tok
    tgt_logprob: np.ndarray  # float64, raw target logprob of tok
    ref_renormalized: np.ndarray  # bool, the reference row was renormalised
    tgt_renormalized: np.ndarray  # bool
    topk: int = 5
    tie_margin: float = DEFAULT_TIE_MARGIN

    def __len__(self) -> int:
        return int(self.kl.shape[0])

    @classmethod
    def concat(cls, parts: list[PositionStats]) -> PositionStats:
        """Join several prompts' stats (indices then run over the concatenation)."""
        if not parts:
            return _from_blocks([], DEFAULT_TIE_MARGIN, 0)
        topk, margin = parts[0].topk, parts[0].tie_margin
        if any(p.topk != topk or p.tie_margin != margin for p in parts):
            raise ValueError("cannot concatenate PositionStats with different topk or tie_margin")
        arrays = {f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls) if _is_array(f.name)}
        return cls(**arrays, topk=topk, tie_margin=margin)


@dataclass
class DistributionSummary:
    positions: int
    kl_mean: float
    kl_sem: float
    kl_median: float
    kl_p90: float
    kl_p99: float
    kl_p999: float
    kl_max: float
    kl_nonfinite: int  # positions whose KL is inf or NaN (left out of the kl_* statistics)
    top1_rate: float
    top1_se: float  # binomial standard error sqrt(p(1-p)/n)
    top1_mismatches: int
    mismatches_near_tie: int  # of those, positions whose reference top-2 margin < tie_margin
    dp_mean: float
    dp_rms: float
    dp_p01: float
    dp_p99: float
    dp_abs_p99: float
    jaccard_mean: float
    rank_agreement_mean: float
    logppl_reference: float
    logppl_target: float
    ppl_ratio: float  # exp(logppl_target - logppl_reference)
    renormalized_reference: int
    renormalized_target: int
    topk: int
    tie_margin: float
    kl_buckets: list[dict[str, Any]]  # by reference top-1 probability

    def to_json(self) -> dict[str, Any]:
        return strict_json(asdict(self))


def position_stats(
    ref_rows: np.ndarray,
    tgt_rows: np.ndarray,
    ref_tokens: np.ndarray,
    topk: int = 5,
    tie_margin: float = DEFAULT_TIE_MARGIN,
    *,
    ranked: tuple[np.ndarray, np.ndarray] | None = None,
    tail: bool = False,
) -> PositionStats:
    """Statistics of each aligned position of one prompt (rows ``[T, V]``, tokens ``[T]``).

    ``ranked``: each side's ``topk_ids`` of these rows with at least ``max(topk, 2)``
    columns (or all V), when the caller already has them; they are not recomputed.
    ``tail``: a side holds top-N rows (-inf: not given): KL over the known entries and one tail
    bucket, a lower bound (``partial.kl_tail_bucket``), and no row is renormalised.
    """
    ref_rows = np.asarray(ref_rows)
    tgt_rows = np.asarray(tgt_rows)
    tokens = np.asarray(ref_tokens, dtype=np.int64).reshape(-1)
    if ref_rows.ndim != 2 or ref_rows.shape != tgt_rows.shape:
        raise ValueError(f"rows must be [T, V] of one shape (reference {ref_rows.shape}, target {tgt_rows.shape})")
    n_pos, vocab = ref_rows.shape
    if tokens.shape[0] != n_pos:
        raise ValueError(f"{tokens.shape[0]} reference tokens for {n_pos} positions")
    if topk < 1:
        raise ValueError("topk must be >= 1")
    if n_pos and (vocab == 0 or tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(f"reference token ids out of range for a vocabulary of {vocab}")
    step = block_rows(vocab)  # blocks of about kernels.BLOCK_ELEMS entries

    def block(s: int, scratch: Scratch) -> dict[str, np.ndarray]:
        part = None if ranked is None else (ranked[0][s : s + step], ranked[1][s : s + step])
        return _block(ref_rows[s : s + step], tgt_rows[s : s + step], tokens[s : s + step], topk, tie_margin, part,
                      scratch, tail)

    return _from_blocks(map_row_blocks(block, n_pos, step), tie_margin, min(topk, vocab))


def summarize_positions(stats: PositionStats | list[PositionStats]) -> DistributionSummary:
    """Aggregate per-position statistics (one prompt, or several joined) into a summary."""
    if not isinstance(stats, PositionStats):
        stats = PositionStats.concat(list(stats))
    n = len(stats)
    kl_ok = np.isfinite(stats.kl)
    kl = stats.kl[kl_ok]
    dp = stats.dp[np.isfinite(stats.dp)]
    top1 = _mean(stats.top1_match)
    mismatch = ~stats.top1_match
    with np.errstate(over="ignore", invalid="ignore"):
        logppl_ref = -_mean(stats.ref_logprob)
        logppl_tgt = -_mean(stats.tgt_logprob)
        ppl_ratio = float(np.exp(logppl_tgt - logppl_ref))
    return DistributionSummary(
        positions=n,
        kl_mean=_mean(kl),
        kl_sem=float(np.std(kl, ddof=1) / math.sqrt(kl.size)) if kl.size >= 2 else math.nan,
        kl_median=_quantile(kl, 0.5),
        kl_p90=_quantile(kl, 0.9),
        kl_p99=_quantile(kl, 0.99),
        kl_p999=_quantile(kl, 0.999),
        kl_max=float(kl.max()) if kl.size else math.nan,
        kl_nonfinite=int(n - kl_ok.sum()),
        top1_rate=top1,
        top1_se=math.sqrt(top1 * (1.0 - top1) / n) if n else math.nan,
        top1_mismatches=int(mismatch.sum()),
        mismatches_near_tie=int((mismatch & stats.near_tie).sum()),
        dp_mean=_mean(dp),
        dp_rms=math.sqrt(_mean(dp * dp)) if dp.size else math.nan,
        dp_p01=_quantile(dp, 0.01),
        dp_p99=_quantile(dp, 0.99),
        dp_abs_p99=_quantile(np.abs(dp), 0.99),
        jaccard_mean=_mean(stats.jaccard[~np.isnan(stats.jaccard)]),
        rank_agreement_mean=_mean(stats.rank_agreement[~np.isnan(stats.rank_agreement)]),
        logppl_reference=logppl_ref,
        logppl_target=logppl_tgt,
        ppl_ratio=ppl_ratio,
        renormalized_reference=int(stats.ref_renormalized.sum()),
        renormalized_target=int(stats.tgt_renormalized.sum()),
        topk=int(stats.topk),
        tie_margin=float(stats.tie_margin),
        kl_buckets=_buckets(stats),
    )


def position_series(stats: PositionStats | None) -> dict[str, Any]:
    """The per-position values a report keeps for plots: ``{"series": {...}}``, or ``{}`` without stats.

    Versioned (``version``), one list per quantity, index = position: ``kl`` (nats; null where inf or NaN),
    ``top1`` (1 where the argmax agrees), ``p_top1`` (the reference's top-1 probability), ``margin`` (its
    top-2 logprob margin, nats), ``dp`` (p_target - p_reference of the reference token). Rounded to
    ``SERIES_DIGITS`` significant digits; the summaries are computed from the unrounded values.
    """
    if stats is None:
        return {}

    def series(a: np.ndarray) -> list[float | None]:
        return [float(f"{v:.{SERIES_DIGITS}g}") if math.isfinite(v) else None for v in a.tolist()]

    return {"series": {
        "version": SERIES_VERSION, "kl": series(stats.kl), "top1": stats.top1_match.astype(int).tolist(),
        "p_top1": series(stats.ref_top1_prob), "margin": series(stats.ref_margin), "dp": series(stats.dp),
    }}  # fmt: skip


def divergence_point(stats: PositionStats, tie_margin: float = DEFAULT_TIE_MARGIN) -> dict[str, Any] | None:
    """First position whose target argmax is not the reference token, or None.

    ``kind`` is ``"near-tie"`` when the reference's own top-2 margin there is
    below ``tie_margin`` nats (the reference barely preferred its token), else
    ``"disagreement"``.
    """
    diff = np.flatnonzero(stats.tgt_argmax != stats.ref_tokens)
    if not diff.size:
        return None
    t = int(diff[0])
    margin = float(stats.ref_margin[t])
    return {
        "position": t,
        "reference_token": int(stats.ref_tokens[t]),
        "target_token": int(stats.tgt_argmax[t]),
        "margin": margin,
        "kind": "near-tie" if margin < tie_margin else "disagreement",
        "reference_top1_prob": float(stats.ref_top1_prob[t]),
        "kl": float(stats.kl[t]),
    }


def phase_kl(stats: PositionStats) -> tuple[float, float]:
    """(KL at position 0, mean finite KL over positions 1..): the prompt's forward pass (prefill) against
    the steps after it (decode, reading the KV cache). NaN where a phase has no finite position."""
    kl = stats.kl
    first = float(kl[0]) if kl.size and np.isfinite(kl[0]) else math.nan
    rest = kl[1:][np.isfinite(kl[1:])]
    return first, (float(rest.mean()) if rest.size else math.nan)


def phase_means(prompts: list[tuple[float, float, int]]) -> dict[str, float]:
    """The run's ``kl_prefill`` (mean over prompts) and ``kl_decode`` (position-weighted) from each prompt's
    (kl_prefill, kl_decode, decode positions)."""
    first = [f for f, _, _ in prompts if not math.isnan(f)]
    rest = [(d, n) for _, d, n in prompts if not math.isnan(d) and n > 0]
    weight = sum(n for _, n in rest)
    return {"kl_prefill": sum(first) / len(first) if first else math.nan,
            "kl_decode": sum(d * n for d, n in rest) / weight if weight else math.nan}


def worst_positions(stats: PositionStats, n: int = 5) -> list[int]:
    """Indices of the ``n`` largest-KL positions, KL descending, ties by index (NaN last)."""
    idx = np.arange(len(stats))
    order = np.lexsort((idx, -stats.kl))
    return [int(i) for i in order[: max(n, 0)]]


def _block(
    ref: np.ndarray,
    tgt: np.ndarray,
    tok: np.ndarray,
    topk: int,
    tie_margin: float,
    ranked: tuple[np.ndarray, np.ndarray] | None = None,
    scratch: Scratch | None = None,
    tail: bool = False,
) -> dict[str, np.ndarray]:
    """Statistics of a block of rows, in float64.

    Renormalising subtracts one constant per row (``shift``, 0 where the mass is
    fine), which changes no order, so argmax and top-K are taken on the raw rows
    and every renormalised value is formed as ``raw - shift`` only where needed.
    """
    rows = np.arange(ref.shape[0])
    k = min(topk, ref.shape[1])
    if ranked is None:
        ranked = (topk_ids(ref, max(k, 2)), topk_ids(tgt, k))
    k_ref2 = ranked[0][:, : max(k, 2)]  # at least two columns for the margin
    k_ref, k_tgt = k_ref2[:, :k], ranked[1][:, :k]
    finite = ref.size and all(math.isfinite(f(a)) for a in (ref, tgt) for f in (np.min, np.max))
    if tail:
        kl, ref_shift, tgt_shift, ref_fix, tgt_fix = kl_tail_bucket(ref, tgt)
    elif finite:
        kl, ref_shift, tgt_shift, ref_fix, tgt_fix = _kl_finite(ref, tgt, scratch or Scratch())
    else:
        kl, ref_shift, tgt_shift, ref_fix, tgt_fix = kl_with_holes(ref, tgt)
    ref_lp = ref[rows, tok].astype(np.float64)  # raw, for perplexity
    tgt_lp = tgt[rows, tok].astype(np.float64)

    with np.errstate(invalid="ignore", over="ignore"):
        ref_argmax, tgt_argmax = ref.argmax(axis=1), tgt.argmax(axis=1)
        top1 = ref[rows, ref_argmax].astype(np.float64) - ref_shift
        if k_ref2.shape[1] > 1:
            margin = top1 - (ref[rows, k_ref2[:, 1]].astype(np.float64) - ref_shift)
        else:
            margin = np.full(rows.shape, np.inf)

        # Top-K sets hold only finite entries (a top-N row may have fewer than K).
        ok_r = np.take_along_axis(ref, k_ref, axis=1) > -np.inf
        ok_t = np.take_along_axis(tgt, k_tgt, axis=1) > -np.inf
        both = (k_ref[:, :, None] == k_tgt[:, None, :]) & ok_r[:, :, None] & ok_t[:, None, :]
        inter = both.any(axis=2).sum(axis=1)
        union = ok_r.sum(axis=1) + ok_t.sum(axis=1) - inter
        jaccard = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
        n_ref = ok_r.sum(axis=1)
        same = ((k_ref == k_tgt) & ok_r & ok_t).sum(axis=1)
        rank = np.where(n_ref > 0, same / np.maximum(n_ref, 1), np.nan)
        dp = np.exp(tgt_lp - tgt_shift) - np.exp(ref_lp - ref_shift)

    return {
        "kl": kl,
        "top1_match": ref_argmax == tgt_argmax,
        "ref_top1_prob": np.exp(top1),
        "ref_margin": margin,
        "near_tie": margin < tie_margin,
        "ref_argmax": ref_argmax.astype(np.int64),
        "tgt_argmax": tgt_argmax.astype(np.int64),
        "ref_tokens": tok.astype(np.int64),
        "dp": dp,
        "jaccard": jaccard.astype(np.float64),
        "rank_agreement": rank.astype(np.float64),
        "ref_logprob": ref_lp,
        "tgt_logprob": tgt_lp,
        "ref_renormalized": ref_fix,
        "tgt_renormalized": tgt_fix,
    }


def _kl_finite(ref: np.ndarray, tgt: np.ndarray, scratch: Scratch):
    """``partial.kl_with_holes`` for rows finite everywhere (full-vocabulary captures), without masks or
    full float64 copies. With p = softmax(x) and a, b the exact logsumexps of the two rows,
    KL = sum_i p_i (x_i - y_i) + b - a: the KL of the exactly normalised rows, whatever their
    stored mass (rounding or q16 can leave it 1e-4 off, which would otherwise land in KL).
    Both exps stay float64: they weight terms whose sum nearly cancels when the sides are
    close (a float32 exp, 1e-7 relative, would swamp a KL of 1e-12 between two runs of one
    CPU), and identical rows go through identical arithmetic, so their KL is exactly 0."""
    m_ref, e, s_ref = _exp_rows(ref, scratch.get("e", ref.shape))
    lse = m_ref + np.log(s_ref)
    ref_fix = np.abs(np.exp(lse) - 1.0) > MASS_TOLERANCE
    ref_shift = np.where(ref_fix, lse, 0.0)
    m_tgt, _, s_tgt = _exp_rows(tgt, scratch.get("d", tgt.shape))
    lse_tgt = m_tgt + np.log(s_tgt)
    tgt_fix = np.abs(np.exp(lse_tgt) - 1.0) > MASS_TOLERANCE
    tgt_shift = np.where(tgt_fix, lse_tgt, 0.0)
    d = np.subtract(ref, tgt, out=scratch.get("d", ref.shape), dtype=np.float64)
    kl = np.einsum("ij,ij->i", e, d) / s_ref + (lse_tgt - lse)
    return np.maximum(kl, 0.0), ref_shift, tgt_shift, ref_fix, tgt_fix


def _exp_rows(rows: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row max, exp(rows - max) in float64 written to ``out``, its row sums)."""
    m = rows.max(axis=1).astype(np.float64)
    e = np.subtract(rows, m[:, None], out=out, dtype=np.float64)
    np.exp(e, out=e)
    return m, e, e.sum(axis=1)


_DTYPES = {
    "top1_match": bool, "near_tie": bool, "ref_renormalized": bool, "tgt_renormalized": bool,
    "ref_argmax": np.int64, "tgt_argmax": np.int64, "ref_tokens": np.int64,
}  # fmt: skip


def _is_array(name: str) -> bool:
    return name not in ("topk", "tie_margin")


def _from_blocks(blocks: list[dict[str, np.ndarray]], tie_margin: float, topk: int) -> PositionStats:
    names = [f.name for f in fields(PositionStats) if _is_array(f.name)]
    arrays = {
        name: np.concatenate([b[name] for b in blocks]) if blocks else np.empty(0, dtype=_DTYPES.get(name, np.float64))
        for name in names
    }
    return PositionStats(**arrays, topk=int(topk), tie_margin=float(tie_margin))


def _buckets(stats: PositionStats) -> list[dict[str, Any]]:
    """KL mean/max and top-1 rate by reference top-1 probability (last bucket closed at 1)."""
    prob = stats.ref_top1_prob
    idx = np.where(np.isnan(prob), -1, np.searchsorted(np.asarray(BUCKET_EDGES[1:-1]), prob, side="right"))
    finite = np.isfinite(stats.kl)
    out = []
    for b, label in enumerate(BUCKET_LABELS):
        in_b = idx == b
        kl = stats.kl[in_b & finite]
        out.append({
            "range": label,
            "count": int(in_b.sum()),
            "kl_mean": _mean(kl),
            "kl_max": float(kl.max()) if kl.size else math.nan,
            "top1_rate": _mean(stats.top1_match[in_b]),
        })  # fmt: skip
    return out


def _mean(a: np.ndarray) -> float:
    return float(np.mean(a, dtype=np.float64)) if a.size else math.nan


def _quantile(a: np.ndarray, q: float) -> float:
    return float(np.quantile(a, q)) if a.size else math.nan
