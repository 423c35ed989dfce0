"""q16: full-vocabulary logprob rows as 16-bit levels below each row's top, and back.

The codec only: arrays in, arrays out, in cache-sized float64 blocks. The
capture format (which files hold levels and floors) is ``store``'s; nothing
here reads or writes files.
"""

from __future__ import annotations

import numpy as np

# Compact storage (after llama.cpp's KL-divergence files): each full-vocabulary
# row is kept as 16-bit levels over [row max - Q16_RANGE, row max]. Level 0 is
# reserved for -inf; entries further below the max than Q16_RANGE are stored as
# the floor. Within the range the error is at most half a step:
# Q16_RANGE / (2 * 65534) = 2.44e-4 nats. Why 32 nats and not llama.cpp's 16:
# raising the clipped tail to the floor adds up to V * e^-RANGE of probability to
# a row. At 16 nats and a 128k vocabulary that is ~1% (measured 0.4-1.4%), enough
# to move KL by several percent after renormalisation; at 32 nats it is at most
# 1.6e-9, below anything a tolerance can see, while element-wise |Δ| of tail
# entries stays meaningful (clipped, never invented). The price is a twice
# coarser step, whose effect on KL (~step^2/12 = 2e-8) is as invisible.
Q16_RANGE = 32.0
Q16_STEP = Q16_RANGE / 65534.0
Q16_MAX_ERROR = Q16_STEP / 2


_BLOCK_ELEMS = 1 << 18  # entries per block in (de)quantisation: a float64 buffer of 2 MiB stays in cache


def quantize_q16(rows: np.ndarray, span: float = Q16_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """[T, V] float rows -> (uint16 levels [T, V], float32 floors [T]) over ``span`` nats below each row's top."""
    step = span / 65534.0
    rows = np.asarray(rows, dtype=np.float32)
    n, width = rows.shape
    levels = np.empty(rows.shape, dtype=np.uint16)
    floor = np.empty(n, dtype=np.float32)
    # Float64 arithmetic, as the error bound is stated for it: in float32,
    # ``x - floor`` rounds to the ulp of 16 (1e-6), enough to pick the wrong
    # level next to a rounding midpoint. Speed comes from cache-sized blocks and
    # one reused buffer instead (fresh temporaries cost a page fault per 4 KiB).
    chunk = max(1, _BLOCK_ELEMS // max(1, width))
    buf = np.empty((min(chunk, n), width), dtype=np.float64)
    for start in range(0, n, chunk):
        block = rows[start:start + chunk]
        b = buf[: block.shape[0]]
        top = block.max(axis=1)
        # min and max are both finite only when the row holds no inf and no NaN
        clean = np.isfinite(top) & np.isfinite(block.min(axis=1))
        if not clean.all():
            with np.errstate(invalid="ignore"):
                finite_top = np.where(np.isfinite(block), block, -np.inf).max(axis=1)
            top = np.where(clean, top, np.where(np.isfinite(finite_top), finite_top, 0.0)).astype(np.float32)
        f = floor[start:start + chunk]
        f[:] = top - np.float32(span)
        np.subtract(block, f[:, None], out=b, dtype=np.float64)
        np.divide(b, step, out=b)
        with np.errstate(invalid="ignore"):  # non-finite entries are set to level 0 below
            np.rint(b, out=b)
            np.clip(b, 0, 65534, out=b)
            b += 1
            np.copyto(levels[start:start + chunk], b, casting="unsafe")
        for j in np.flatnonzero(~clean):
            levels[start + j][~np.isfinite(block[j])] = 0
    return levels, floor


def dequantize_q16(levels: np.ndarray, floor: np.ndarray, span: float = Q16_RANGE) -> np.ndarray:
    step = span / 65534.0
    levels = np.asarray(levels)
    floor = np.asarray(floor, dtype=np.float64)
    n, width = levels.shape
    out = np.empty(levels.shape, dtype=np.float32)
    chunk = max(1, _BLOCK_ELEMS // max(1, width))
    buf = np.empty((min(chunk, n), width), dtype=np.float64)
    for start in range(0, n, chunk):
        block = levels[start:start + chunk]
        b = buf[: block.shape[0]]
        np.copyto(b, block)
        b -= 1
        b *= step
        b += floor[start:start + chunk, None]
        np.copyto(out[start:start + chunk], b, casting="same_kind")
        if block.size and block.min() == 0:
            out[start:start + chunk][block == 0] = -np.inf
    return out
