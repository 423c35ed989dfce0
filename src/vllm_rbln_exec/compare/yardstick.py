"""The yardstick's numbers beside the target's: a metric of each, read from a report, and their ratio.

A yardstick is an honest side at the target's precision, compared with the same
reference on the same forced tokens (``pipeline`` captures it). Its metrics say
how far from the reference rounding alone puts a side at that precision; the
ratio of the target's metric to the yardstick's says whether the target is
within that (about 1) or beyond it (a bug). This module owns reading the
yardstick's record of a report, the floored value and the ratio, and the ratio
table that reports show; the floors themselves are the catalogue's. It reads
report dicts only: it must not compute metrics from logprobs, judge, render, or
import numpy, torch or vLLM.
"""

from __future__ import annotations

import math
from typing import Any

from .catalogue import floor, metric_value, prompt_counterpart

# The metrics whose ratio reports show and built-in tolerances gate.
RATIO_METRICS = ("distribution.kl_mean", "distribution.kl_p99", "distribution.dp_rms",
                 "distribution.top1_mismatches")
# Argmax flips where the reference's top-2 margin was at least the tie margin (derived from the stored counts).
CONFIDENT_PATH = "confident_mismatches"


def yardstick_record(run_json: dict[str, Any], index: int | None = None) -> dict[str, Any] | None:
    """The yardstick's summary (``index`` None) or its comparison of one prompt; None without a yardstick."""
    yard = run_json.get("yardstick")
    if not isinstance(yard, dict):
        return None
    if index is None:
        return yard.get("summary")
    comps = yard.get("comparisons") or []
    return comps[index] if 0 <= index < len(comps) else None


def yardstick_value(run_json: dict[str, Any], path: str, index: int | None = None) -> float | None:
    """The yardstick's value of a metric, raised to the metric's floor; None where there is none."""
    record = yardstick_record(run_json, index)
    value = None if record is None else metric_value(record, path)
    return None if value is None else max(value, floor(path))


def confident_flips(run_json: dict[str, Any]) -> dict[str, Any] | None:
    """The run's confident argmax flips, the target's and the yardstick's, with the positions each compared; None
    without a yardstick, or where a count is not in the report (saved without the near-tie count)."""
    yard = yardstick_record(run_json)
    summary = run_json.get("summary") or {}
    t = metric_value(summary, CONFIDENT_PATH)
    y = None if yard is None else metric_value(yard, CONFIDENT_PATH)
    if t is None or y is None:
        return None
    return {"target": t, "yardstick": y, "target_positions": summary.get("positions_compared"),
            "yardstick_positions": yard.get("positions_compared")}


def ratio(target: float | None, yardstick: float | None, path: str) -> float | None:
    """target / max(yardstick, floor). Argmax flips have floor 1: 0 flips against 0 is 0, 3 against 0 is 3,
    3 against 2 is 1.5 (the count a tolerance ``mismatches>K*yardstick`` compares with K)."""
    if target is None or yardstick is None:
        return None
    base = max(yardstick, floor(path))
    if base <= 0:
        return None if target <= 0 else math.inf
    return target / base


def ratio_row(target_record: dict[str, Any], yard_record: dict[str, Any] | None, path: str) -> dict[str, Any]:
    t = metric_value(target_record, path)
    y = None if yard_record is None else metric_value(yard_record, path)
    return {"target": t, "yardstick": y, "ratio": ratio(t, y, path)}


def ratio_table(run_json: dict[str, Any]) -> dict[str, Any]:
    """{"overall": {path: {target, yardstick, ratio}}, "prompts": [...], "floors": {path: floor}} of a report
    with a yardstick (the prompts of the target and the yardstick are matched by position)."""
    yard_summary = yardstick_record(run_json)
    overall = {p: ratio_row(run_json.get("summary") or {}, yard_summary, p) for p in RATIO_METRICS}
    prompts = []
    for i, comp in enumerate(run_json.get("comparisons") or []):
        yard = yardstick_record(run_json, i)
        prompts.append({p: ratio_row(comp, yard, prompt_counterpart(p) or p) for p in RATIO_METRICS})
    return {"overall": overall, "prompts": prompts, "floors": {p: floor(p) for p in RATIO_METRICS}}
