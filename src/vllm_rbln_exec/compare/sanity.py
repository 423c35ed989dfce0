"""Numbers that cannot be log-probabilities: found before anything is compared, so they never score a pass.

A log-probability is at most 0 and a distribution's probabilities sum to 1. A server that returned +5.0 (a
probability of 148) once made a run pass: the tail bucket of a top-N row went negative, its KL was clipped to
0 and Δp came out at 147.9. ``impossible_entries`` says what is wrong with one position's values: NaN, +inf,
a value above ``log1p(MASS_TOLERANCE)``, probabilities summing above ``1 + MASS_TOLERANCE`` (any row: the
entries a server gives are part of the distribution), or, for a whole row, summing below ``1 -
MASS_TOLERANCE``. ``MASS_TOLERANCE`` (1e-3) is far above rounding: float32 rows sum to 1 within ~1e-6 and
q16 storage moves a row's mass by at most 2.44e-4. ``impossible_rows`` applies the cheap part to a capture
read from a file, cache or worker (the row maxima only, one pass; NaN there stays a parity failure,
``kl_nonfinite``, as a broken kernel's NaN is). Pure numpy; it must not judge, render or touch files.
"""

from __future__ import annotations

import math

import numpy as np

from .partial import MASS_TOLERANCE

MAX_LOGPROB = math.log1p(MASS_TOLERANCE)  # 1e-3 nats: a single entry above it is a probability above 1 + tol


def impossible_entries(vals: np.ndarray, full: bool) -> str | None:
    """What makes one position's logprob values impossible (None: nothing). ``full``: they are the whole row."""
    vals = np.asarray(vals, dtype=np.float64)
    if np.isnan(vals).any():
        return "a logprob is NaN"
    if np.isposinf(vals).any():
        return "a logprob is +Infinity"
    top = float(vals.max()) if vals.size else -math.inf
    if top > MAX_LOGPROB:
        return f"a logprob is {top:+.6g}, above 0 (a probability of {math.exp(min(top, 700.0)):.4g}, above 1)"
    mass = float(np.exp(vals).sum())
    if mass > 1.0 + MASS_TOLERANCE:
        return f"the probabilities sum to {mass:.6g}, above 1 + {MASS_TOLERANCE:g}"
    if full and mass < 1.0 - MASS_TOLERANCE:
        return f"the row's probabilities sum to {mass:.6g}, below 1 - {MASS_TOLERANCE:g}"
    return None


def first_impossible(rows: np.ndarray, full: bool) -> tuple[int, str] | None:
    """(position, what) of the first impossible row of ``rows`` [T, W], or None."""
    for t in range(rows.shape[0]):
        problem = impossible_entries(rows[t], full)
        if problem:
            return t, problem
    return None


def impossible_rows(rows: np.ndarray, side: str, prompt: int) -> str | None:
    """A sentence naming the first value of a captured prompt's rows above ``MAX_LOGPROB`` (a positive or +inf
    logprob), or None. Cheap: one max per row of arrays already in memory."""
    if rows is None or not rows.size:
        return None
    with np.errstate(invalid="ignore"):
        peak = rows.max(axis=1)
    bad = np.flatnonzero(peak > MAX_LOGPROB)
    if not bad.size:
        return None
    t = int(bad[0])
    return (f"the {side}'s logprobs at prompt {prompt}, position {t} hold {float(peak[t]):+.6g}, which no "
            "log-probability can be (a probability above 1): the capture is damaged or was not made by an engine")
