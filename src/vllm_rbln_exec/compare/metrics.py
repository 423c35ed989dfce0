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
from .distribution import (  # noqa: I001
    divergence_point,
    phase_kl,
    phase_means,
    position_series,
    position_stats,
    summarize_positions,
    worst_positions,
)
from .elementwise import elementwise
from .kernels import ranked_ids

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
        """The saved form: every field, and the per-position series for plots (``distribution.position_series``)."""
        stats, self.position_stats = self.position_stats, None
        try:
            return strict_json(asdict(self)) | position_series(stats)
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

    # a top-N side: KL with the unknown mass as one bucket, a lower bound (compare.partial)
    tail = reference.get("ids") is not None or target.get("ids") is not None
    stats = position_stats(ref_rows, tgt_rows, np.asarray(ref_tokens[:n_pos], dtype=np.int64), topk, tie_margin,
                           ranked=ranked, tail=tail)
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
        eps=float(eps), topk=int(topk),
        topk_overlap=overlap, topk_order_match=order,
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
