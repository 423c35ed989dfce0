"""Streaming kernels shared by the element-wise and the distribution metrics (pure numpy).

This module owns how a prompt's ``[T, V]`` rows are walked: blocks of rows of
about ``BLOCK_ELEMS`` entries, a small thread pool, per-thread scratch buffers,
and top-k selection by value with ties broken by the lower id. It sits under
both :mod:`~vllm_rbln_exec.compare.metrics` and
:mod:`~vllm_rbln_exec.compare.distribution` and must not import either (nor
anything above ``core``); it knows nothing of what the statistics mean.

A prompt's rows are [T, V] per side (256 x 128256 float32 is 131 MB). Each
statistic is computed block by block of about ``BLOCK_ELEMS`` entries, so the
temporaries stay small and in cache instead of full-size float64 copies, and
blocks run in threads (numpy releases the GIL inside its loops). Blocks are
combined in order, so the result does not depend on the number of threads.
"""

from __future__ import annotations

import math
import os
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

BLOCK_ELEMS = 1 << 18  # 2 rows of a 128k vocabulary: measured best among 1, 2, 4 and 8 rows
_THREADS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
_TOPK_CHUNK = 256  # entries per chunk in topk_ids' prefilter (one max each)


def block_rows(width: int) -> int:
    """Rows per block for rows of ``width`` entries (at least 1); read at call time, so tests can patch it."""
    return max(1, BLOCK_ELEMS // max(1, width))


class Scratch:
    """Buffers one worker reuses from block to block.

    Fresh multi-MiB temporaries are what made the first streamed version slow and
    erratic on a small VM: the allocator hands freed memory back, so every block
    faulted its pages in again (and numpy asks for huge pages from 4 MiB up).
    Measured on 2 cores: exp over a float64 block 4.7 ns per entry into a reused
    buffer, 6-17 ns into a fresh one.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
        size, dtype = math.prod(shape), np.dtype(dtype)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = self._buffers[name] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)


def map_row_blocks(fn: Callable[[int, Scratch], Any], n_rows: int, step: int) -> list[Any]:
    """``[fn(start, scratch) for start in range(0, n_rows, step)]``, in threads when there are
    several blocks; each thread has its own ``Scratch``."""
    starts = list(range(0, n_rows, max(1, step)))
    threads = min(_THREADS, len(starts))
    if threads <= 1:
        scratch = Scratch()
        return [fn(s, scratch) for s in starts]
    free: queue.SimpleQueue[Scratch] = queue.SimpleQueue()
    for _ in range(threads):
        free.put(Scratch())

    def run(start: int) -> Any:
        scratch = free.get()
        try:
            return fn(start, scratch)
        finally:
            free.put(scratch)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, starts))


def topk_ids(rows: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row, by value descending, ties by lower id.

    A prefilter does the O(V) work with one max per chunk of ``_TOPK_CHUNK``
    entries: the k-th largest chunk maximum is a lower bound of the k-th largest
    entry (k chunks each hold an entry at least that large), so the top k, ties at
    the k-th value included, all lie in the few chunks whose maximum reaches it.
    Only those candidates are sorted (value descending, then id). Rows the bound
    cannot handle (NaN, a bound at -inf in a row of top-N fillers) take the exact
    selection of ``_topk_exact``; both give the same ids.
    """
    rows = np.asarray(rows)
    n, width = rows.shape
    k = max(1, min(k, width))
    size = _TOPK_CHUNK
    full = width // size
    out = np.empty((n, k), dtype=np.intp)
    done = np.zeros(n, dtype=bool)
    if n and full >= 2 * k:
        chunks = rows[:, : full * size].reshape(n, full, size)
        cmax = chunks.max(axis=2)
        tail = width - full * size
        if tail:
            cmax = np.concatenate([cmax, rows[:, full * size :].max(axis=1, keepdims=True)], axis=1)
        n_chunks = cmax.shape[1]
        bound = np.partition(cmax, n_chunks - k, axis=1)[:, n_chunks - k]
        done = np.isfinite(bound) & ~np.isnan(cmax).any(axis=1)
        r, c = np.nonzero((cmax >= bound[:, None]) & done[:, None])
        if r.size:
            vals = np.full((r.size, size), -np.inf, dtype=rows.dtype)
            in_full = c < full
            vals[in_full] = chunks[r[in_full], c[in_full]]
            if not in_full.all():  # the shorter last chunk
                vals[~in_full, :tail] = rows[r[~in_full], full * size :]
            pair, col = np.nonzero(vals >= bound[r, None])
            cand_row, cand_id, cand_val = r[pair], c[pair] * size + col, vals[pair, col]
            order = np.lexsort((cand_id, -cand_val, cand_row))
            cand_id = cand_id[order]
            counts = np.bincount(cand_row, minlength=n)
            starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
            picked = np.flatnonzero(done)
            out[picked] = cand_id[starts[picked, None] + np.arange(k)]
    rest = np.flatnonzero(~done)
    if rest.size:
        out[rest] = _topk_exact(rows[rest], k)
    return out


def _topk_exact(rows: np.ndarray, k: int) -> np.ndarray:
    """topk_ids by full selection: argpartition finds the k-th value; entries equal
    to it are then taken lowest id first, so ties never depend on partition order."""
    part = np.argpartition(-rows, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(rows, part, axis=1).min(axis=1, keepdims=True)
    above = rows > kth
    need = k - above.sum(axis=1, keepdims=True)
    at = rows == kth
    take = above | (at & (np.cumsum(at, axis=1) <= need))
    cols = np.nonzero(take)[1].reshape(rows.shape[0], k)
    vals = np.take_along_axis(rows, cols, axis=1)
    order = np.lexsort((cols, -vals), axis=1)
    return np.take_along_axis(cols, order, axis=1)


def ranked_ids(rows: np.ndarray, k: int) -> np.ndarray:
    """topk_ids by blocks of rows, in threads."""
    step = block_rows(rows.shape[1])
    parts = map_row_blocks(lambda s, _scratch: topk_ids(rows[s : s + step], k), rows.shape[0], step)
    return np.concatenate(parts) if parts else topk_ids(rows, k)
