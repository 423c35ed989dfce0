"""Findings: the sentences a verdict opens with, beside pass or fail.

Two, read from a run's saved form: whether the error is already there at
position 0 (the prompt's forward pass: prefill kernels) or appears only at the
decode steps after it (decode kernels, the KV cache), from ``kl_prefill`` and
``kl_decode``; and, where the run has a yardstick, how far the target is from
the reference compared with honest arithmetic at its precision. This module
judges nothing (no pass or fail comes from it), computes no metric and must not
import torch or vLLM.
"""

from __future__ import annotations

from typing import Any

from ..compare.catalogue import floor, metric_value
from ..compare.yardstick import ratio, yardstick_record

# Below this share of the decode KL, position 0 is taken as clean. Measured on SmolLM2 (4 x 32): position 0
# is the more sensitive one, honest bf16 puts 3.6-3.8x the decode KL there and honest fp32 6.7x; weight
# faults put 0.6-5x there (docs/yardstick.md). A KV-cache or decode-kernel fault leaves position 0 at the
# honest level while the later positions grow, so position 0 under a tenth of the rest is decode's.
DECODE_ONLY_SHARE = 0.1
# Ratios to the yardstick at or below this read as rounding (honest engines at one precision: 0.7-1.4x).
ROUNDING_RATIO = 2.0


def findings(run_json: dict[str, Any]) -> list[str]:
    out = [phase_sentence(run_json), yardstick_sentence(run_json)]
    return [s for s in out if s]


def phase_sentence(run_json: dict[str, Any]) -> str | None:
    summary = run_json.get("summary") or {}
    first, rest = metric_value(summary, "kl_prefill"), metric_value(summary, "kl_decode")
    if first is None and rest is None:
        return None
    numbers = f"KL {_fmt(first)} at position 0 (the prompt's forward pass), {_fmt(rest)} after it (decode steps)"
    limit = 10 * floor("kl_prefill")
    if max(first or 0.0, rest or 0.0) <= limit:
        return f"Prefill or decode: {numbers}: both within 10x the q16 store's floor, nothing to place."
    if rest is not None and (first or 0.0) < DECODE_ONLY_SHARE * rest:
        return (f"Prefill or decode: the error appears only after position 0 ({numbers}): look at the decode "
                "kernels and the KV cache (cache writes, paged attention).")
    return (f"Prefill or decode: the error is already there at position 0 ({numbers}): look at what the "
            "prompt's forward pass runs (prefill attention, and what both phases share: weights, norms, matmuls).")


def yardstick_sentence(run_json: dict[str, Any]) -> str | None:
    yard = yardstick_record(run_json)
    if yard is None:
        missing = (run_json.get("resolved") or {}).get("yardstick_missing")
        return (f"Yardstick: missing ({missing}), so no ratio: the verdict rests on the fixed tolerances alone, "
                "and a tolerance relative to the yardstick is skipped." if missing else None)
    path = "distribution.kl_mean"
    t, y = metric_value(run_json.get("summary") or {}, path), metric_value(yard, path)
    r = ratio(t, y, path)
    side = (run_json.get("yardstick") or {}).get("side") or {}
    what = f"{side.get('engine', '?')} {side.get('dtype', '?')} on {side.get('device', '?')}"
    if r is None:
        return f"Yardstick ({what}): no KL to compare."
    reading = ("within what honest rounding at this precision gives" if r <= ROUNDING_RATIO
               else "beyond what honest rounding at this precision gives")
    return (f"Yardstick ({what}): the target's KL mean {_fmt(t)} is {r:.2g}x the yardstick's {_fmt(y)} "
            f"(floor {floor(path):g}): {reading}.")


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.3g}"
