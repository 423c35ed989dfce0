"""What a format costs over a text corpus: perplexity and the distance from the reference, per side.

Each side's capture holds, per corpus window, the full-vocabulary rows that predict the window's scored
tokens (``setup.corpus``). Against the reference's rows of the same windows this computes, with the
per-position statistics of ``distribution`` (so KL, top-1 and Δp mean here what they mean in a parity
run): KL(reference || side) mean with its standard error, median, p99 and max, the same-top-1 rate, Δp
RMS, and the perplexity of the corpus tokens under each side, ``exp(mean negative log-likelihood)``, with
its ratio to the reference's. Perplexity is computed from the rows' own logprob of each corpus token (the
raw values; a full-vocabulary row needs no renormalising). It reads captures and must not judge, render or
know where the captures came from.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..capture.store import Capture
from ..core.errors import HarnessError
from ..core.jsonio import strict_json
from .distribution import PositionStats, position_stats, summarize_positions

# The corpus table's numbers: (key, label, catalogue path it shares its meaning with, or None: defined here).
COLUMNS = (
    ("ppl", "perplexity", None),
    ("ppl_ratio", "PPL ratio", "distribution.ppl_ratio"),
    ("kl_mean", "KL mean (nats)", "distribution.kl_mean"),
    ("kl_sem", "± s.e.", "distribution.kl_sem"),
    ("kl_median", "KL median", "distribution.kl_median"),
    ("kl_p99", "KL p99", "distribution.kl_p99"),
    ("kl_max", "KL max", "distribution.kl_max"),
    ("top1_rate", "same top-1", "distribution.top1_rate"),
    ("dp_rms", "Δp RMS", "distribution.dp_rms"),
)


def perplexity(logprobs: np.ndarray) -> float:
    """``exp(-mean(logprobs))`` of the corpus tokens' logprobs (nats); NaN for none, inf where one is -inf."""
    values = np.asarray(logprobs, dtype=np.float64).reshape(-1)
    if not values.size:
        return math.nan
    with np.errstate(over="ignore"):
        return float(np.exp(-values.mean()))


def check_comparable(reference: Capture, side: Capture) -> None:
    """HarnessError unless both captures hold the same windows, scored tokens and vocabulary."""
    if reference.vocab_size != side.vocab_size:
        raise HarnessError(f"vocabulary sizes differ: reference {reference.vocab_size}, {side.info.side} "
                           f"{side.vocab_size}")
    if len(reference.prompts) != len(side.prompts):
        raise HarnessError(f"{side.info.side} holds {len(side.prompts)} windows, the reference "
                           f"{len(reference.prompts)}")
    for i, (r, s) in enumerate(zip(reference.prompts, side.prompts)):
        if r.prompt_token_ids != s.prompt_token_ids or r.token_ids != s.token_ids:
            raise HarnessError(f"window {i} holds other tokens in {side.info.side} than in the reference")


def window_stats(reference: Capture, side: Capture, topk: int = 5) -> list[PositionStats]:
    """Per-position statistics of each window (reference rows against the side's, on the corpus tokens)."""
    check_comparable(reference, side)
    return [position_stats(reference.logprobs(i), side.logprobs(i), np.asarray(r.token_ids), topk)
            for i, r in enumerate(reference.prompts)]


def corpus_summary(stats: list[PositionStats]) -> dict[str, Any]:
    """The corpus table's numbers of one side (``COLUMNS``) and the rest of the distribution summary."""
    joined = PositionStats.concat(stats)
    summary = summarize_positions(joined).to_json()
    out = {
        "positions": summary["positions"],
        "ppl": perplexity(joined.tgt_logprob),
        "ppl_reference": perplexity(joined.ref_logprob),
        **{key: summary[path.removeprefix("distribution.")] for key, _, path in COLUMNS if path},
        "top1_mismatches": summary["top1_mismatches"],
        "kl_nonfinite": summary["kl_nonfinite"],
        "per_window": [{"kl_mean": _mean(s.kl), "ppl": perplexity(s.tgt_logprob)} for s in stats],
    }
    return strict_json(out)


def compare_corpus(reference: Capture, side: Capture, topk: int = 5) -> dict[str, Any]:
    return corpus_summary(window_stats(reference, side, topk))


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan
