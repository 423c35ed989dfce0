"""Element-wise statistics of two capture arrays: |Δ| (mean, max, outliers) and Pearson r.

This module owns the streamed, block-by-block pass over two [T, V] logprob
arrays that ``compare.metrics`` reports as max/mean |Δ|, outliers and Pearson
(one pass, float64 moments about a shift, no temporaries per block). It works on
arrays in memory only; it must not know prompts, tokens, files or verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .kernels import Scratch, block_rows, map_row_blocks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r in float64; NaN when fewer than 2 points or a side is constant."""
    if x.size < 2:
        return float("nan")
    x = x.astype(np.float64, copy=False)
    y = y.astype(np.float64, copy=False)
    xc = x - x.mean()
    yc = y - y.mean()
    denom = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))


@dataclass
class _Elementwise:
    """|Δ| statistics and Pearson moments over the entries finite on both sides."""

    count: int = 0
    sum_abs: float = 0.0
    max_abs: float = -math.inf
    worst: int | None = None  # row holding max_abs (first one)
    outliers: int = 0
    # sums of x - shift_x, y - shift_y and their products (float64); a shift near
    # the mean keeps the one-pass variance free of cancellation
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0
    lo_x: float = math.inf
    hi_x: float = -math.inf
    lo_y: float = math.inf
    hi_y: float = -math.inf

    def add(self, other: _Elementwise, row_offset: int) -> None:
        if other.count == 0:
            return
        if other.max_abs > self.max_abs:
            self.max_abs, self.worst = other.max_abs, row_offset + other.worst
        for name in ("count", "sum_abs", "outliers", "sx", "sy", "sxx", "syy", "sxy"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lo_x, self.hi_x = min(self.lo_x, other.lo_x), max(self.hi_x, other.hi_x)
        self.lo_y, self.hi_y = min(self.lo_y, other.lo_y), max(self.hi_y, other.hi_y)

    def pearson(self) -> float:
        """As ``pearson`` on the same entries, up to float rounding."""
        n = self.count
        if n < 2 or self.lo_x == self.hi_x or self.lo_y == self.hi_y:
            return float("nan")  # a constant side
        vx = self.sxx - self.sx * self.sx / n
        vy = self.syy - self.sy * self.sy / n
        if not (vx > 0.0 and vy > 0.0):
            return float("nan")
        cov = self.sxy - self.sx * self.sy / n
        return float(np.clip(cov / math.sqrt(vx * vy), -1.0, 1.0))


def elementwise(ref: np.ndarray, tgt: np.ndarray, eps: float) -> _Elementwise:
    """Element-wise statistics of two [T, V] arrays, streamed by blocks of rows."""
    n, width = ref.shape
    shift = _pearson_shift(ref, tgt)
    step = block_rows(width)
    parts = map_row_blocks(
        lambda s, scratch: _elementwise_block(ref[s : s + step], tgt[s : s + step], eps, shift, scratch), n, step)
    total = _Elementwise()
    for start, part in zip(range(0, n, step), parts):
        total.add(part, start)
    return total


def _pearson_shift(ref: np.ndarray, tgt: np.ndarray) -> tuple[float, float]:
    """The means of the first row that has entries finite on both sides."""
    for i in range(ref.shape[0]):
        both = np.isfinite(ref[i]) & np.isfinite(tgt[i])
        if both.any():
            return float(ref[i][both].mean(dtype=np.float64)), float(tgt[i][both].mean(dtype=np.float64))
    return 0.0, 0.0


def _elementwise_block(ref: np.ndarray, tgt: np.ndarray, eps: float, shift: tuple[float, float],
                       scratch: Scratch) -> _Elementwise:
    out = _Elementwise()
    lo_x, hi_x, lo_y, hi_y = (float(f(a)) for a in (ref, tgt) for f in (np.min, np.max)) if ref.size else (0,) * 4
    if all(math.isfinite(v) for v in (lo_x, hi_x, lo_y, hi_y)):
        # every entry finite on both sides (the full-vocabulary case): no masks, no copies
        diff = np.subtract(tgt, ref, out=scratch.get("diff", ref.shape, np.result_type(ref, tgt)))
        np.abs(diff, out=diff)
        x = np.subtract(ref, shift[0], out=scratch.get("x", ref.shape), dtype=np.float64).ravel()
        y = np.subtract(tgt, shift[1], out=scratch.get("y", ref.shape), dtype=np.float64).ravel()
        out.lo_x, out.hi_x, out.lo_y, out.hi_y = lo_x, hi_x, lo_y, hi_y
    else:
        both = np.isfinite(ref) & np.isfinite(tgt)
        with np.errstate(invalid="ignore"):  # -inf - -inf outside `both` is masked out
            diff = np.where(both, np.abs(tgt - ref), 0.0)
        x_raw, y_raw = ref[both], tgt[both]
        if x_raw.size:
            out.lo_x, out.hi_x, out.lo_y, out.hi_y = (float(f(a)) for a in (x_raw, y_raw) for f in (np.min, np.max))
        x = x_raw.astype(np.float64) - shift[0]
        y = y_raw.astype(np.float64) - shift[1]
    out.count = int(x.size)
    if not out.count:
        return out
    row_max = diff.max(axis=1)
    out.worst = int(row_max.argmax())
    out.max_abs = float(row_max[out.worst])
    out.sum_abs = float(diff.sum(dtype=np.float64))
    out.outliers = int(np.count_nonzero(np.greater_equal(diff, eps, out=scratch.get("mask", diff.shape, bool))))
    # numpy's own loops rather than BLAS dot: BLAS may start its threads inside ours
    out.sx, out.sy = float(x.sum()), float(y.sum())
    out.sxx, out.syy, out.sxy = (float(np.einsum("i,i->", a, b)) for a, b in ((x, x), (y, y), (x, y)))
    return out
