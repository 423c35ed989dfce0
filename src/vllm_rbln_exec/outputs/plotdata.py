"""What each plot of the HTML report and of ``--plots`` shows, read from a run's saved form (no drawing).

This module owns turning a report dict (``RunResult.to_json()``, or a saved
``parity.json``/``report.json``, schema 1 or 2) into the plain values each plot
draws, and saying why a plot cannot be drawn when the report lacks what it needs.
It must not draw (``plots`` does, with matplotlib), compute metrics beyond
selecting and counting saved values, or import matplotlib, torch or vLLM.

Plots must not lie: a value the report does not hold is ``missing`` with a
reason, never drawn as zero; a KL of +inf or NaN (saved as null) is counted and
named, never dropped silently.

Keys read, all optional except ``summary`` and ``comparisons``:

* ``comparisons[i].series`` (``compare.distribution.position_series``, version 1):
  per-position ``kl``, ``top1``, ``p_top1``, ``margin``, ``dp``. Reports saved
  before it existed draw the plots that the summaries allow and name the others.
* ``summary.distribution``: the KL quantiles, ``kl_buckets`` and ``tie_margin``.
* ``yardstick`` (issue 13, a third side measured against the same reference):
  ``{"label": str, "summary": {"distribution": {"kl_mean": ..., ...}},
  "comparisons": [{"series": {"kl": [...]}}, ...]}``; ``label`` and the
  per-position ``comparisons`` are optional, and ``yardstick.distribution`` is
  read where ``summary`` is absent.
* ``localization`` (``pipeline.localize``): ``{"layers": [{"name": str, "rel_l2": float,
  "yardstick_rel_l2": float or null, ...}, ...], "layer": the first departing entry or null,
  "verdict": str, "yardstick": side or null, "rule": {"k", "floor", ...}}`` (the largest relative L2
  error of each entry over the localised positions). A null ``rel_l2`` is an entry that was not measured.
* ``sides.*.profile`` and ``sides.*.timings``: the speed of profiled sides.
* the noise floor (``verdict.noise`` JSON or ``NoiseFloor``) and ``reference_self``/``repeats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..compare.catalogue import metric_value
from ..profiling.traces import speed_rows_from_run

NO_SERIES = ("this report was saved without per-position values (a run from before they were kept); "
             "re-run to draw it")


@dataclass
class Plot:
    """One plot: its id (file stem and HTML anchor), title, what to draw, or why it is not drawn."""

    name: str
    title: str
    data: dict[str, Any] | None = None
    missing: str | None = None
    notes: list[str] = field(default_factory=list)  # said under the plot: zeros, infinities, fallbacks


def has_series(run: dict[str, Any]) -> bool:
    comps = run.get("comparisons") or []
    return bool(comps) and all(isinstance(c.get("series"), dict) and c["series"].get("kl") is not None
                               for c in comps)


def tie_margin(run: dict[str, Any]) -> float:
    dist = (run.get("summary") or {}).get("distribution") or {}
    value = dist.get("tie_margin", (run.get("settings") or {}).get("tie_margin"))
    return float(value) if isinstance(value, (int, float)) else 0.5


def noise_value(noise: Any, path: str) -> float | None:
    """The noise of one overall metric from a ``NoiseFloor`` or its JSON form; None if not measured."""
    if noise is None:
        return None
    if hasattr(noise, "value"):
        return noise.value(path)
    spread = ((noise.get("overall") or {}) if isinstance(noise, dict) else {}).get(path) or {}
    value = spread.get("noise") if isinstance(spread, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def yardstick_distribution(run: dict[str, Any]) -> dict[str, Any]:
    yard = run.get("yardstick")
    if not isinstance(yard, dict):
        return {}
    return ((yard.get("summary") or {}).get("distribution") or yard.get("distribution") or {})


def _flat_kl(comparisons: list[dict[str, Any]]) -> list[float | None]:
    return [v for c in comparisons for v in ((c.get("series") or {}).get("kl") or [])]


# -- the plots ----------------------------------------------------------------------------------
def kl_by_position(run: dict[str, Any]) -> Plot:
    plot = Plot("kl-positions", "KL(reference ‖ target) at each position, per prompt")
    if not has_series(run):
        plot.missing = NO_SERIES
        return plot
    margin = tie_margin(run)
    rows = []
    for i, c in enumerate(run.get("comparisons") or []):
        s = c["series"]
        top1, margins = s.get("top1") or [], s.get("margin") or []
        flips = [t for t, ok in enumerate(top1) if not ok]
        near = [t for t in flips if t < len(margins) and margins[t] is not None and margins[t] < margin]
        rows.append({"index": c.get("index", i), "kl": list(s["kl"]), "flips": flips, "near_ties": near})
    plot.data = {"rows": rows, "tie_margin": margin}
    nonfinite = sum(v is None for r in rows for v in r["kl"])
    if nonfinite:
        plot.notes.append(f"{nonfinite} position(s) with an infinite or NaN KL are drawn as hatched cells")
    zeros = sum(v == 0 for r in rows for v in r["kl"])
    if zeros:
        plot.notes.append(f"{zeros} position(s) with KL exactly 0 are drawn at the bottom of the colour scale")
    return plot


def kl_distribution(run: dict[str, Any], noise: Any = None) -> Plot:
    plot = Plot("kl-distribution", "Distribution of KL over all positions (log scale)")
    dist = (run.get("summary") or {}).get("distribution") or {}
    if not dist.get("positions"):
        plot.missing = "the report has no distribution metrics (no aligned positions)"
        return plot
    lines = [("mean", dist.get("kl_mean")), ("p99", dist.get("kl_p99"))]
    noise_kl = noise_value(noise, "distribution.kl_mean")
    lines.append(("noise floor (KL mean)", noise_kl))
    yard = yardstick_distribution(run)
    lines.append(("yardstick KL mean", yard.get("kl_mean")))
    data: dict[str, Any] = {"lines": [(label, v) for label, v in lines if isinstance(v, (int, float)) and v > 0]}
    if noise_kl is None:
        plot.notes.append("no noise floor measured (run with --repeat 2 or more to draw it)")
    elif noise_kl == 0:
        plot.notes.append("noise floor measured: the KL mean did not move between repeats (0; no line on a log axis)")
    if not yard:
        plot.notes.append("no yardstick in this run")
    if has_series(run):
        values = _flat_kl(run.get("comparisons") or [])
        data["values"] = [v for v in values if v is not None and v > 0]
        _count_notes(plot, values)
        extra = {"noise floor (reference vs itself)": (run.get("reference_self") or {}).get("comparisons"),
                 "yardstick": (run.get("yardstick") or {}).get("comparisons")}
        data["others"] = {}
        for label, comps in extra.items():
            if comps and has_series({"comparisons": comps}):
                kept = [v for v in _flat_kl(comps) if v is not None and v > 0]
                if kept:
                    data["others"][label] = kept
                else:
                    plot.notes.append(f"{label}: KL exactly 0 at every position (nothing on a log axis)")
    else:
        data["quantiles"] = [(q, dist.get(k)) for q, k in (("median", "kl_median"), ("p90", "kl_p90"),
                             ("p99", "kl_p99"), ("p99.9", "kl_p999"), ("max", "kl_max"))
                             if isinstance(dist.get(k), (int, float))]
        plot.notes.append("per-position values were not saved with this report: its summary quantiles are drawn")
    plot.data = data
    return plot


def _count_notes(plot: Plot, values: list[float | None]) -> None:
    zeros, nonfinite = sum(v == 0 for v in values), sum(v is None for v in values)
    if zeros:
        plot.notes.append(f"{zeros} of {len(values)} positions have KL exactly 0 (not on a log axis)")
    if nonfinite:
        plot.notes.append(f"{nonfinite} of {len(values)} positions have an infinite or NaN KL (not drawn)")


def kl_by_confidence(run: dict[str, Any]) -> Plot:
    plot = Plot("kl-confidence", "KL by the reference's top-1 probability")
    buckets = ((run.get("summary") or {}).get("distribution") or {}).get("kl_buckets") or []
    if not buckets:
        plot.missing = "the report has no KL buckets (no aligned positions)"
        return plot
    plot.data = {"buckets": [{"range": b.get("range"), "count": b.get("count") or 0, "kl_mean": b.get("kl_mean"),
                              "kl_max": b.get("kl_max"), "top1_rate": b.get("top1_rate")} for b in buckets]}
    empty = [b["range"] for b in plot.data["buckets"] if not b["count"]]
    if empty:
        plot.notes.append("no positions in " + ", ".join(empty) + " (no bar drawn)")
    return plot


def delta_p(run: dict[str, Any]) -> Plot:
    plot = Plot("delta-p", "Δp of the reference token (p_target − p_reference) by position")
    if not has_series(run):
        plot.missing = NO_SERIES
        return plot
    dist = (run.get("summary") or {}).get("distribution") or {}
    plot.data = {"rows": [{"index": c.get("index", i), "dp": list(c["series"].get("dp") or [])}
                          for i, c in enumerate(run.get("comparisons") or [])],
                 "p01": dist.get("dp_p01"), "p99": dist.get("dp_p99")}
    return plot


def flips_and_ties(run: dict[str, Any]) -> Plot:
    plot = Plot("flips", "KL against the reference's top-2 margin: do the flips sit at near-ties?")
    if not has_series(run):
        plot.missing = NO_SERIES
        return plot
    points = []
    for c in run.get("comparisons") or []:
        s = c["series"]
        for kl, margin, ok in zip(s.get("kl") or [], s.get("margin") or [], s.get("top1") or []):
            if kl is not None and margin is not None:
                points.append((margin, kl, bool(ok)))
    plot.data = {"points": points, "tie_margin": tie_margin(run)}
    flips = sum(not ok for _, _, ok in points)
    plot.notes.append(f"{flips} position(s) where the target's argmax is not the reference's"
                      if flips else "the target's argmax is the reference's at every position")
    return plot


def layer_errors(run: dict[str, Any]) -> Plot:
    plot = Plot("layers", "Relative error of the target's hidden state, layer by layer")
    loc = run.get("localization")
    if not isinstance(loc, dict):
        plot.missing = "the run was not localised (no per-layer errors in the report)"
        return plot
    rows = [(str(r.get("name", i)), r.get("rel_l2"), r.get("yardstick_rel_l2"))
            for i, r in enumerate(loc.get("layers") or []) if isinstance(r, dict)]
    if not rows:
        plot.missing = "the localisation in this report lists no layers"
        return plot
    rule = loc.get("rule") or {}
    # without a yardstick an entry departs above K x the precision's floor: that line is the threshold
    threshold = (rule["k"] * rule["floor"] if loc.get("yardstick") is None and isinstance(rule.get("k"), (int, float))
                 and isinstance(rule.get("floor"), (int, float)) else None)
    plot.data = {"layers": rows, "threshold": threshold, "first_over": loc.get("layer"),
                 "verdict": loc.get("verdict")}
    unmeasured = [name for name, v, _ in rows if v is None]
    if unmeasured:
        plot.notes.append(f"not measured (no point drawn): {', '.join(unmeasured[:8])}"
                          + (" …" if len(unmeasured) > 8 else ""))
    return plot


def speed(run: dict[str, Any]) -> Plot:
    plot = Plot("speed", "Speed of the measured generation, per side")
    sides = run.get("sides") or {}
    if not any((s or {}).get("profile") for s in sides.values()):
        plot.missing = "no side was profiled (run with --profile or --profile-side)"
        return plot
    rows = [(r.label, r.ms_per_token, r.profiled) for r in speed_rows_from_run(run)]
    plot.data = {"rows": [r for r in rows if r[1] is not None]}
    if len({p for _, _, p in rows}) > 1:
        plot.notes.append("one side ran under the profiler and the other did not: its overhead is in its time")
    return plot


def run_plots(run: dict[str, Any], noise: Any = None) -> list[Plot]:
    """Every plot of a run's report, in the order the HTML shows them."""
    return [kl_by_position(run), kl_distribution(run, noise), kl_by_confidence(run), delta_p(run),
            flips_and_ties(run), layer_errors(run), speed(run)]


def summary_value(record: dict[str, Any], path: str) -> float | None:
    value = metric_value(record, path)
    return None if value is None or (isinstance(value, float) and math.isinf(value)) else value
