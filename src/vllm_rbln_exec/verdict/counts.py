"""Counts judged with their statistics: argmax flips of a target against a yardstick's, by an exact test.

A flip count is small (0-10 in a CI run of ~100 positions) and noisy, so a ratio
of two such counts means little: 4 flips against a yardstick's 1 is a ratio of 4
and, as a test of two counts, p = 0.19 that equal rates give at least that many
to the target. This module owns that test. Given the target's count ``t`` over
``n_t`` positions and the yardstick's ``y`` over ``n_y`` (the same forced tokens,
so the same positions), a ``count>K*yardstick`` tolerance asks whether the
target's flip rate exceeds ``K`` times the yardstick's. Conditioned on the total
``t + y``, two Poisson counts split binomially, so under the boundary of that
hypothesis ``t ~ Binomial(t + y, q)`` with ``q = K n_t / (K n_t + n_y)``, and the
tolerance fails when ``P(T >= t) < COUNT_ALPHA``. A target whose true flip rate
is at most ``K`` times the yardstick's is failed at most ``COUNT_ALPHA`` of the
time (fewer when the rates are equal, and fewer still because flips of two
honest sides fall at the same near-tie positions, which makes the counts move
together); tests/unit/test_counts.py checks both on simulated counts.

Pure arithmetic on numbers read from a report: it must not read reports itself,
judge, or import numpy, torch or vLLM.
"""

from __future__ import annotations

import math

# The count metrics judged by the test (dotted paths of the catalogue) rather than as a floored ratio.
COUNT_PATHS = frozenset({"distribution.top1_mismatches", "distribution.mismatches_near_tie", "confident_mismatches"})
# The false-alarm rate of one count tolerance, per run, for a target whose flip rate is exactly K times the
# yardstick's (the boundary of "honest"); honest sides at K = 2 are failed far less often (simulated in
# tests/unit/test_counts.py: equal rates, 128 positions, 1-10 % flips: <= 0.1 % of runs). At 1 % a team running
# twenty models every night meets a false alarm from this rule about once in five nights at the boundary and
# about once a year at equal rates; the gross flips (a confident reference, margin >= 0.5 nats) are the argmax
# rule's, which fails on one.
COUNT_ALPHA = 0.01


def binomial_tail(k: int, n: int, q: float) -> float:
    """P(X >= k) for X ~ Binomial(n, q), exactly (log-space terms: no overflow for thousands of positions)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lq, lr = math.log(q), math.log1p(-q)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lq + (n - i) * lr
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def excess_p_value(t: float, y: float, k: float = 1.0, n_t: float | None = None, n_y: float | None = None) -> float:
    """One-sided p-value of "the target's count rate exceeds ``k`` times the yardstick's" (see the module
    docstring); equal exposures when the position counts are unknown."""
    t, y = int(round(t)), int(round(y))
    n_t = float(n_t) if n_t and n_t > 0 else 1.0
    n_y = float(n_y) if n_y and n_y > 0 else n_t
    q = k * n_t / (k * n_t + n_y)
    return binomial_tail(t, t + y, q)


def critical_count(y: float, k: float = 1.0, n_t: float | None = None, n_y: float | None = None,
                   alpha: float = COUNT_ALPHA, limit: int = 100_000) -> int:
    """The smallest target count that the test fails against a yardstick count ``y`` (for messages: the
    tolerance reads ``count > critical - 1``)."""
    t = max(0, int(k * y * (n_t or 1.0) / (n_y or n_t or 1.0)))  # at the expected count p >= ~0.5 > alpha
    while t < limit and excess_p_value(t, y, k, n_t, n_y) >= alpha:
        t += 1
    return t


def confident_flip_test(t: float, y: float, n_t: float | None = None, n_y: float | None = None) -> tuple[bool, str]:
    """Confident argmax flips of a target against those of a yardstick that has some: whether the target has
    significantly more (equal rates, ``k`` = 1, at ``COUNT_ALPHA``), and the sentence saying so. Where honest
    rounding at the target's precision flips confident argmaxes itself (an MoE router's top-k at a near-tie:
    zoo-mixtral's vLLM bf16 yardstick flips 1 of 64, docs/gating.md), one flip of the target is not a fault."""
    p = excess_p_value(t, y, 1.0, n_t, n_y)
    over = f" over {int(n_y)} positions" if n_y else ""
    head = f"{int(round(t))} confident flips against the yardstick's {int(round(y))}{over}"
    if p < COUNT_ALPHA:
        return True, (f"{head}: more than honest rounding gives (one-sided exact test p = {p:.2g} < "
                      f"{COUNT_ALPHA:g}; {critical_count(y, 1.0, n_t, n_y)} or more fail)")
    return False, f"{head}: as honest rounding gives (one-sided exact test p = {p:.2g} >= {COUNT_ALPHA:g})"
