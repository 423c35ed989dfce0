"""KL between rows that are not whole distributions: rows with holes, and top-N rows with a tail bucket.

``kl_with_holes``: rows where some entry is -inf, +inf or NaN; a row whose mass is off by more than
``MASS_TOLERANCE`` is renormalised first (``renormalize``), and an entry the reference supports but the
target gives -inf makes the position's KL +inf. ``kl_tail_bucket``: rows of which only some entries are
known (a top-N capture, or a server that gives only its top N): the entries known on both sides are
compared one by one and the rest of each side's probability mass (1 minus what its known entries hold) as
one more bucket. Merging outcomes never raises KL (the data-processing inequality), so this is a lower
bound on the KL of the whole distributions, exact when the known entries hold all the mass; nothing bounds
it from above (the target may put any of its tail anywhere). Rows are taken as they are, true logprobs
over the whole vocabulary (vLLM's and the engines' top-N values are), never renormalised. Tail masses
below ``TAIL_RESOLUTION`` are rounding (float32 logprobs of ~20 entries summed) and count as empty: a
top-N that holds all the mass then compares exactly like the full rows would. A tail below
``-MASS_TOLERANCE`` (known entries holding more than all the mass) is an error, never an empty bucket. Pure numpy/scipy, called by
``distribution`` per block of rows; it must not aggregate, judge or touch files.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import HarnessError

MASS_TOLERANCE = 1e-3
# A float32 logprob is off by up to ~6e-8 relative; summed over ~20 known probabilities the known mass,
# and so the tail (1 minus it), is uncertain by ~1e-6 at most.
TAIL_RESOLUTION = 1e-6


def kl_with_holes(ref: np.ndarray, tgt: np.ndarray):
    """KL per row where some entry is -inf, +inf or NaN (top-N fillers, holes): float64 copies
    and masks. Returns (kl, reference shift, target shift, reference renormalised, target renormalised)."""
    ref, ref_fix, ref_shift = renormalize(ref.astype(np.float64))
    tgt, tgt_fix, tgt_shift = renormalize(tgt.astype(np.float64))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        # KL is taken between exactly normalised rows, whatever the mass tolerance
        # says: a mass off by 1e-4 (rounding, q16) would otherwise add 1e-4 to KL.
        ref = ref - np.where(np.isfinite(r := logsumexp(ref, axis=1)), r, 0.0)[:, None]
        tgt = tgt - np.where(np.isfinite(t := logsumexp(tgt, axis=1)), t, 0.0)[:, None]
        support = ref > -np.inf
        hole = support & (tgt == -np.inf)
        terms = np.where(support & ~hole, np.exp(ref) * (ref - tgt), 0.0)
        kl = np.maximum(terms.sum(axis=1), 0.0)
        kl[hole.any(axis=1)] = np.inf
        kl[np.isnan(ref).any(axis=1) | np.isnan(tgt).any(axis=1)] = np.nan
    return kl, ref_shift, tgt_shift, ref_fix, tgt_fix


def kl_tail_bucket(ref: np.ndarray, tgt: np.ndarray):
    """KL per row over the entries finite on both sides plus one bucket for the rest of each side's mass
    (a lower bound on the whole rows' KL). Same return as ``kl_with_holes``; nothing is renormalised.
    Known entries whose probabilities sum above 1 + MASS_TOLERANCE (a negative tail) are not
    log-probabilities: HarnessError, never a tail of 0 and a KL clipped to 0 (a server's +5.0 once passed so)."""
    ref = ref.astype(np.float64)
    tgt = tgt.astype(np.float64)
    known = np.isfinite(ref) & np.isfinite(tgt)
    r, t = np.where(known, ref, 0.0), np.where(known, tgt, 0.0)
    p, q = np.where(known, np.exp(r), 0.0), np.where(known, np.exp(t), 0.0)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        terms = (p * (r - t)).sum(axis=1)
        p_tail, q_tail = 1.0 - p.sum(axis=1), 1.0 - q.sum(axis=1)
        _refuse_negative_tails(p_tail, q_tail)
        q_tail = np.maximum(q_tail, TAIL_RESOLUTION)
        p_tail = np.where(p_tail > TAIL_RESOLUTION, p_tail, 0.0)  # within [-tol, 1e-6]: rounding, empty
        tail = np.where(p_tail > 0, p_tail * np.log(p_tail / q_tail), 0.0)
        kl = terms + tail
        # within the tolerance a bucket KL is >= -MASS_TOLERANCE (Gibbs with masses off by the tolerance)
        if (kl < -MASS_TOLERANCE).any():
            raise HarnessError(f"a top-N row's KL came out at {float(np.nanmin(kl)):.3g}, below 0: its values are "
                               "not log-probabilities")
        kl = np.maximum(kl, 0.0)
    kl[np.isnan(ref).any(axis=1) | np.isnan(tgt).any(axis=1)] = np.nan
    none = np.zeros(ref.shape[0], dtype=bool)
    return kl, np.zeros(ref.shape[0]), np.zeros(ref.shape[0]), none, none.copy()


def _refuse_negative_tails(p_tail: np.ndarray, q_tail: np.ndarray) -> None:
    for side, tail in (("reference", p_tail), ("target", q_tail)):
        bad = np.flatnonzero(tail < -MASS_TOLERANCE)
        if bad.size:
            raise HarnessError(f"the {side}'s known probabilities of a top-N row sum to {1.0 - tail[bad[0]]:.6g}, "
                               f"above 1 + {MASS_TOLERANCE:g} (a negative tail): these are not log-probabilities")


def logsumexp(rows: np.ndarray, axis: int) -> np.ndarray:
    from scipy.special import logsumexp as lse  # here: scipy made every CLI start 2 s slower (-X importtime)
    return lse(rows, axis=axis)


def renormalize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subtract logsumexp from rows whose mass is off by more than MASS_TOLERANCE;
    returns (rows, which rows, the shift per row: logsumexp there, else 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = logsumexp(rows, axis=1)
    fix = np.isfinite(lse) & (np.abs(np.exp(lse) - 1.0) > MASS_TOLERANCE)
    shift = np.where(fix, lse, 0.0)
    if fix.any():
        rows = rows.copy()
        rows[fix] -= lse[fix, None]
    return rows, fix, shift
