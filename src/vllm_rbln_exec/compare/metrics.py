"""Comparison metrics between a reference and a target capture (pure numpy/scipy).

This module owns one prompt's comparison record (``PromptComparison``: the
element-wise |Δ| and Pearson statistics, top-K agreement, the alignment of the
two sides) and the run's summary of them; the per-position distribution
statistics come from :mod:`~vllm_rbln_exec.compare.distribution` and the block
iteration and top-k selection from :mod:`~vllm_rbln_exec.compare.kernels`.
Everything here works on arrays already in memory (or memory mapped) and is
vectorised over the vocabulary; it must not touch engines, processes, files or
verdicts. One prompt is compared at a time so memory stays bounded by the
largest prompt, never the whole run.

Position alignment: at generated position ``t`` both sides saw the same context
only while every earlier generated token agrees. In free-running mode the
compared positions are therefore ``0..d`` where ``d`` is the first position whose
tokens differ (that position itself still shares its context); in forced mode
the target was fed the reference tokens, so every position is comparable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..core.jsonio import strict_json
from .distribution import divergence_point, phase_kl, phase_means, position_stats, summarize_positions, worst_positions
from .kernels import Scratch, block_rows, map_row_blocks, ranked_ids

PEARSON_PASS = 0.99


@dataclass
class PositionTopK:
    """Top-K of both sides at one position (for the report)."""

    position: int
    target_ids: list[int]
    target_vals: list[float]
    reference_ids: list[int]
    reference_vals: list[float]


@dataclass
class PromptComparison:
    index: int
    prompt: str
    reference_text: str
    target_text: str
    reference_tokens: int
    target_tokens: int
    texts_equal: bool
    tokens_equal: bool
    first_divergence: int | None  # first position whose generated tokens differ
    positions_compared: int
    vocab_size: int
    finite_overlap: float  # fraction of compared entries finite on both sides
    finite_entries: int
    max_abs_diff: float
    mean_abs_diff: float
    pearson: float
    outliers: int  # entries with |Δ| >= eps
    eps: float
    topk: int
    topk_overlap: float  # mean |topK_ref ∩ topK_tgt| / K over positions
    topk_order_match: float  # fraction of positions whose top-K lists are identical in order
    top1_match: float  # fraction of positions whose argmax agrees
    worst_position: int | None  # position holding max|Δ|
    first_position_topk: PositionTopK | None = None
    snippet: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    aligned: bool = False
    # distribution metrics over the compared positions (see ``distribution``)
    distribution: dict[str, Any] = field(default_factory=dict)
    argmax_divergence: dict[str, Any] | None = None  # first target argmax != reference token, classified
    worst_positions: list[dict[str, Any]] = field(default_factory=list)
    position_stats: Any = field(default=None, repr=False, compare=False)
    kl_prefill: float = math.nan  # KL at position 0: the prompt's forward pass
    kl_decode: float = math.nan  # mean KL over positions 1..: decode steps

    @property
    def pearson_ok(self) -> bool:
        return not math.isnan(self.pearson) and self.pearson >= PEARSON_PASS

    def to_json(self) -> dict[str, Any]:
        stats, self.position_stats = self.position_stats, None
        try:
            return strict_json(asdict(self))
        finally:
            self.position_stats = stats


def first_divergence(a: list[int] | np.ndarray, b: list[int] | np.ndarray) -> int | None:
    """Index of the first differing token, ``min(len)`` if one is a prefix, None if equal."""
    a = np.asarray(a)
    b = np.asarray(b)
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    if diff.size:
        return int(diff[0])
    return None if len(a) == len(b) else n


def to_dense(vals: np.ndarray, ids: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """Top-N (ids, vals) rows as dense [T, V] rows with -inf where a token is absent."""
    if ids is None:
        return np.asarray(vals, dtype=np.float32)
    dense = np.full((vals.shape[0], vocab_size), -np.inf, dtype=np.float32)
    rows = np.repeat(np.arange(vals.shape[0]), vals.shape[1])
    dense[rows, np.asarray(ids).reshape(-1)] = np.asarray(vals, dtype=np.float32).reshape(-1)
    return dense


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


def compare_prompt(
    index: int,
    prompt: str,
    reference: dict[str, Any],
    target: dict[str, Any],
    *,
    vocab_size: int,
    eps: float = 0.5,
    topk: int = 5,
    aligned: bool = False,
    snippet_elems: int = 5,
    tie_margin: float = 0.5,
    n_worst: int = 3,
) -> PromptComparison:
    """Compare one prompt. ``reference``/``target`` hold ``token_ids``, ``text``,
    ``logprobs`` ([T, V] or [T, N]) and optional ``ids`` ([T, N], top-N mode)."""
    ref_tokens = list(reference["token_ids"])
    tgt_tokens = list(target["token_ids"])
    div = first_divergence(ref_tokens, tgt_tokens)
    available = min(len(ref_tokens), len(tgt_tokens), len(reference["logprobs"]), len(target["logprobs"]))
    if aligned or div is None:
        n_pos = available
    else:
        n_pos = min(div + 1, available)
    ref_rows, tgt_rows = _dense_rows(index, reference, target, n_pos, vocab_size)

    element = _elementwise_fields(ref_rows, tgt_rows, eps)
    overlap = order = top1 = float("nan")
    first_topk = ranked = None
    if n_pos:
        topk, ranked = _ranking(reference, target, ref_rows, tgt_rows, topk)
        overlap, order, top1, first_topk = _topk_agreement(ref_rows, tgt_rows, ranked, topk)

    stats = position_stats(ref_rows, tgt_rows, np.asarray(ref_tokens[:n_pos], dtype=np.int64), topk, tie_margin,
                           ranked=ranked)
    worst_list = _worst_list(stats, ref_rows, tgt_rows, ranked, topk, n_worst) if n_pos else []

    snippet = {side: _head_tail(rows[0], snippet_elems) for side, rows in (("reference", ref_rows),
                                                                          ("target", tgt_rows))
               } if n_pos and snippet_elems > 0 else {}
    return PromptComparison(
        index=index,
        prompt=prompt,
        reference_text=reference.get("text", ""),
        target_text=target.get("text", ""),
        reference_tokens=len(ref_tokens),
        target_tokens=len(tgt_tokens),
        texts_equal=reference.get("text", "") == target.get("text", ""),
        tokens_equal=ref_tokens == tgt_tokens,
        first_divergence=div,
        positions_compared=int(n_pos),
        vocab_size=int(ref_rows.shape[1]),
        **element,
        eps=float(eps),
        topk=int(topk),
        topk_overlap=overlap,
        topk_order_match=order,
        top1_match=top1,
        first_position_topk=first_topk,
        snippet=snippet,
        notes=_notes(n_pos, element["finite_entries"]),
        aligned=bool(aligned),
        distribution=summarize_positions(stats).to_json(),
        argmax_divergence=divergence_point(stats, tie_margin),
        worst_positions=worst_list,
        position_stats=stats,
        **dict(zip(("kl_prefill", "kl_decode"), phase_kl(stats))),
    )


def _notes(n_pos: int, finite_entries: int) -> list[str]:
    if n_pos == 0:
        return ["no comparable position (a side generated nothing)"]
    return [] if finite_entries else ["no entry is finite on both sides (disjoint top-N lists?)"]


def _dense_rows(index: int, reference: dict[str, Any], target: dict[str, Any], n_pos: int,
                vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' first ``n_pos`` rows as dense [T, V]; ValueError when their vocabularies differ."""
    ref_rows = to_dense(np.asarray(reference["logprobs"][:n_pos]), _ids(reference, n_pos), vocab_size)
    tgt_rows = to_dense(np.asarray(target["logprobs"][:n_pos]), _ids(target, n_pos), vocab_size)
    if ref_rows.shape[1] != tgt_rows.shape[1]:
        raise ValueError(f"prompt {index}: vocabulary sizes differ (reference {ref_rows.shape[1]}, "
                         f"target {tgt_rows.shape[1]})")
    return ref_rows, tgt_rows


def _elementwise_fields(ref_rows: np.ndarray, tgt_rows: np.ndarray, eps: float) -> dict[str, Any]:
    """PromptComparison's element-wise fields, over the entries finite on both sides (NaN when none is)."""
    ew = elementwise(ref_rows, tgt_rows, eps)
    finite_entries, total = ew.count, ref_rows.size
    out: dict[str, Any] = {"finite_entries": finite_entries,
                           "finite_overlap": float(finite_entries / total) if total else float("nan")}
    if finite_entries:
        out.update(max_abs_diff=ew.max_abs, mean_abs_diff=ew.sum_abs / finite_entries, pearson=ew.pearson(),
                   outliers=ew.outliers, worst_position=ew.worst)
    else:
        nan = float("nan")
        out.update(max_abs_diff=nan, mean_abs_diff=nan, pearson=nan, outliers=0, worst_position=None)
    return out


def _ranking(reference: dict[str, Any], target: dict[str, Any], ref_rows: np.ndarray, tgt_rows: np.ndarray,
             topk: int) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
    """The K actually compared and each side's ranked ids (at least 2 columns, for the margin)."""
    # with top-N captures only N entries are real; the rest are -inf fillers
    widths = [np.asarray(side["logprobs"]).shape[1] for side in (reference, target) if side.get("ids") is not None]
    topk = min([topk, *widths])
    # ranked once per side; every top-K below (and in the distribution stats) is a prefix
    ref_ranked, tgt_ranked = (ranked_ids(rows, max(topk, 2)) for rows in (ref_rows, tgt_rows))
    return topk, (ref_ranked, tgt_ranked)


def _topk_agreement(ref_rows: np.ndarray, tgt_rows: np.ndarray, ranked: tuple[np.ndarray, np.ndarray],
                    topk: int) -> tuple[float, float, float, PositionTopK]:
    """(top-K overlap, top-K order match, top-1 match, both top-K at position 0) over the positions."""
    k = max(1, min(topk, ref_rows.shape[1]))
    k_ref, k_tgt = ranked[0][:, :k], ranked[1][:, :k]
    # |A ∩ B| per row without a Python loop over positions: sort and compare.
    inter = (k_ref[:, :, None] == k_tgt[:, None, :]).any(axis=2).sum(axis=1)
    overlap = float((inter / k).mean())
    order = float((k_ref == k_tgt).all(axis=1).mean())
    top1 = float((k_ref[:, 0] == k_tgt[:, 0]).mean())
    first_topk = PositionTopK(
        position=0,
        target_ids=k_tgt[0].tolist(),
        target_vals=tgt_rows[0, k_tgt[0]].tolist(),
        reference_ids=k_ref[0].tolist(),
        reference_vals=ref_rows[0, k_ref[0]].tolist(),
    )
    return overlap, order, top1, first_topk


def _worst_list(stats: Any, ref_rows: np.ndarray, tgt_rows: np.ndarray, ranked: tuple[np.ndarray, np.ndarray],
                topk: int, n_worst: int) -> list[dict[str, Any]]:
    """The ``n_worst`` largest-KL positions with both sides' top-5 (at most top-K) there."""
    k_ref_w, k_tgt_w = (ids[:, : max(1, min(topk, 5))] for ids in ranked)
    return [{
        "position": int(pos),
        "kl": float(stats.kl[pos]),
        "reference_token": int(stats.ref_tokens[pos]),
        "target_argmax": int(stats.tgt_argmax[pos]),
        "reference_top1_prob": float(stats.ref_top1_prob[pos]),
        "reference_topk": [[int(i), float(ref_rows[pos, i])] for i in k_ref_w[pos]],
        "target_topk": [[int(i), float(tgt_rows[pos, i])] for i in k_tgt_w[pos]],
    } for pos in worst_positions(stats, n_worst)]  # fmt: skip


@dataclass
class RunSummary:
    prompts: int
    positions_compared: int
    max_abs_diff: float
    mean_abs_diff: float  # entry-weighted over all prompts
    min_pearson: float
    outliers: int
    texts_equal: int
    tokens_equal: int
    top1_match: float  # position-weighted
    topk_overlap: float
    earliest_divergence: int | None
    distribution: dict[str, Any] = field(default_factory=dict)  # over every compared position of every prompt
    argmax_divergences: int = 0  # prompts whose target argmax left the reference tokens
    disagreements: int = 0  # ... of those, where the reference was not at a near-tie
    kl_prefill: float = math.nan  # mean over prompts of the KL at position 0 (the prompt's forward pass)
    kl_decode: float = math.nan  # mean KL over every prompt's positions 1.. (decode steps)

    def to_json(self) -> dict[str, Any]:
        return strict_json(asdict(self))


def summarize(comparisons: list[PromptComparison]) -> RunSummary:
    def finite(values):
        return [v for v in values if v is not None and not math.isnan(v)]

    weights = [c.finite_entries for c in comparisons]
    positions = [c.positions_compared for c in comparisons]
    mean_abs = (sum(c.mean_abs_diff * w for c, w in zip(comparisons, weights) if w) / sum(weights)
                if sum(weights) else float("nan"))

    def pos_weighted(attr):
        pairs = [(getattr(c, attr), p) for c, p in zip(comparisons, positions) if p and not math.isnan(getattr(c, attr))]
        total = sum(p for _, p in pairs)
        return sum(v * p for v, p in pairs) / total if total else float("nan")

    parts = [c.position_stats for c in comparisons if c.position_stats is not None]
    maxes = finite(c.max_abs_diff for c in comparisons)
    pearsons = finite(c.pearson for c in comparisons)
    divs = [c.first_divergence for c in comparisons if c.first_divergence is not None]
    return RunSummary(
        prompts=len(comparisons),
        positions_compared=sum(positions),
        max_abs_diff=max(maxes) if maxes else float("nan"),
        mean_abs_diff=mean_abs,
        min_pearson=min(pearsons) if pearsons else float("nan"),
        outliers=sum(c.outliers for c in comparisons),
        texts_equal=sum(c.texts_equal for c in comparisons),
        tokens_equal=sum(c.tokens_equal for c in comparisons),
        top1_match=pos_weighted("top1_match"),
        topk_overlap=pos_weighted("topk_overlap"),
        earliest_divergence=min(divs) if divs else None,
        distribution=summarize_positions(parts).to_json() if parts else {},
        argmax_divergences=sum(c.argmax_divergence is not None for c in comparisons),
        disagreements=sum(
            c.argmax_divergence is not None and c.argmax_divergence.get("kind") == "disagreement"
            for c in comparisons
        ),
        **phase_means([(c.kl_prefill, c.kl_decode, c.positions_compared - 1) for c in comparisons]),
    )



def _ids(side: dict[str, Any], n_pos: int) -> np.ndarray | None:
    ids = side.get("ids")
    return None if ids is None else np.asarray(ids[:n_pos])


def _head_tail(row: np.ndarray, n: int) -> list[float]:
    if row.size <= 2 * n:
        return row.tolist()
    return np.concatenate([row[:n], row[-n:]]).tolist()
