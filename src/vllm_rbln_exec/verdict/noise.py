"""The noise floor: how much each reported metric moves from run to run.

This module owns turning several comparison reports of the same setup into a
per-metric spread that ``K*noise`` tolerances (see ``expressions`` and
``gates``) scale with, and its JSON form. It reads report dicts only; it must
not run captures, compare logprobs, judge gates (it imports nothing of the
verdict), or import torch or vLLM. Which metrics exist, how a value is read
from a report and its value between identical captures come from
:mod:`~vllm_rbln_exec.compare.catalogue`, shared with the verdict so both
always agree.

Two ways to measure:

* ``repeats``: N >= 2 reports comparing repeated target captures against the
  same reference. A metric's noise is its **range** over the repeats,
  max_i,j |v_i - v_j|. The range is what a tolerance is up against (one run
  against another), it needs no assumption about the distribution, and it is
  defined for N = 2, where a standard deviation is a poor estimate (it is also
  reported, with ddof=1).
* ``self``: reports comparing a side against a repeat of itself (reference vs
  reference, or target vs target). There each value already is a run-to-run
  distance, so a metric's noise is its largest distance from the value of two
  identical captures (0 for KL, |Δ| and mismatch counts, 1 for agreement rates,
  Pearson and the perplexity ratio). Metrics without such an identity value
  (counts, log-perplexities) fall back to the range.

On deterministic hardware (the CPU reference) every noise is exactly 0; a
``K*noise`` tolerance then means "any nonzero value fails", which is the right
reading: a deterministic side that moves at all has changed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..compare.catalogue import OVERALL, PROMPT, identity, metric_paths, metric_value
from ..core.errors import UsageError
from ..core.jsonio import strict_json

NOISE_SCHEMA_VERSION = 1
REPEATS = "repeats"
SELF = "self"
MODES = (REPEATS, SELF)

@dataclass
class MetricSpread:
    values: list[float | None]
    mean: float | None
    std: float | None  # sample standard deviation (ddof=1); None with fewer than 2 values
    noise: float | None  # see the module docstring; None when no run had a value

    def to_json(self) -> dict[str, Any]:
        return strict_json(asdict(self))


@dataclass
class NoiseFloor:
    mode: str
    runs: int
    overall: dict[str, MetricSpread] = field(default_factory=dict)
    prompts: list[dict[str, MetricSpread]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # run folders, for the record

    def value(self, path: str, prompt_index: int | None = None) -> float | None:
        """The noise of a metric, overall (``prompt_index`` None) or of one prompt; None if not measured."""
        table = self.overall if prompt_index is None else (
            self.prompts[prompt_index] if 0 <= prompt_index < len(self.prompts) else {})
        spread = table.get(path)
        return None if spread is None else spread.noise


def measure_noise(runs: list[dict[str, Any]], mode: str = REPEATS) -> NoiseFloor:
    """Spread of every metric over several reports (``RunResult.to_json()`` dicts, or bare summaries).

    Per-prompt noise is measured when every item carries ``comparisons`` over
    the same prompts; bare summary dicts give the overall noise only.
    """
    if mode not in MODES:
        raise UsageError(f"unknown noise mode {mode!r}; known: {', '.join(MODES)}")
    if not runs:
        raise UsageError("a noise floor needs at least one report")
    if mode == REPEATS and len(runs) < 2:
        raise UsageError("a noise floor from repeats needs at least 2 repeated runs (one run has no spread)")
    summaries = [r["summary"] if "summary" in r else r for r in runs]
    floor = NoiseFloor(mode=mode, runs=len(runs), sources=[str(r.get("run_dir", "")) for r in runs if "summary" in r])
    floor.overall = {path: _spread([metric_value(s, path) for s in summaries], path, mode)
                     for path in metric_paths(OVERALL)}
    per_run = [r.get("comparisons") for r in runs]
    if all(isinstance(c, list) for c in per_run):
        _check_same_prompts(runs)
        floor.prompts = [
            {path: _spread([metric_value(comps[i], path) for comps in per_run], path, mode)
             for path in metric_paths(PROMPT)}
            for i in range(len(per_run[0]))
        ]
    return floor


def merge_noise(*floors: NoiseFloor) -> NoiseFloor:
    """The larger noise of each metric over several floors (e.g. repeats and a reference self-comparison)."""
    floors = tuple(f for f in floors if f is not None)
    if not floors:
        raise UsageError("nothing to merge: no noise floor given")

    def larger(spreads: list[MetricSpread | None]) -> MetricSpread:
        # The floor with the larger noise, whole: pooling its values with another
        # floor's would mix metric values (repeats) with distances from identity (self).
        present = [s for s in spreads if s is not None]
        measured = [s for s in present if s.noise is not None]
        if not measured:
            return present[0] if present else MetricSpread(values=[], mean=None, std=None, noise=None)
        return max(measured, key=lambda s: s.noise)

    overall_paths = sorted({p for f in floors for p in f.overall})
    n_prompts = max(len(f.prompts) for f in floors)
    return NoiseFloor(
        mode="+".join(dict.fromkeys(f.mode for f in floors)),
        runs=sum(f.runs for f in floors),
        overall={p: larger([f.overall.get(p) for f in floors]) for p in overall_paths},
        prompts=[
            {p: larger([f.prompts[i].get(p) if i < len(f.prompts) else None for f in floors])
             for p in sorted({p for f in floors if i < len(f.prompts) for p in f.prompts[i]})}
            for i in range(n_prompts)
        ],
        sources=[s for f in floors for s in f.sources],
    )


def noise_to_json(noise: NoiseFloor | None) -> dict[str, Any] | None:
    if noise is None:
        return None
    return {
        "schema_version": NOISE_SCHEMA_VERSION,
        "mode": noise.mode,
        "runs": noise.runs,
        "estimator": "range over repeats" if noise.mode == REPEATS else "largest distance from identical captures",
        "sources": list(noise.sources),
        "overall": {p: s.to_json() for p, s in noise.overall.items()},
        "prompts": [{p: s.to_json() for p, s in table.items()} for table in noise.prompts],
    }


def noise_from_json(data: dict[str, Any]) -> NoiseFloor:
    version = data.get("schema_version")
    if version != NOISE_SCHEMA_VERSION:
        raise UsageError(f"noise floor of schema version {version!r}; this harness reads {NOISE_SCHEMA_VERSION}")

    def spread(d: dict[str, Any]) -> MetricSpread:
        return MetricSpread(values=list(d.get("values") or []), mean=d.get("mean"), std=d.get("std"),
                            noise=d.get("noise"))

    return NoiseFloor(
        mode=data.get("mode", REPEATS),
        runs=int(data.get("runs", 0)),
        overall={p: spread(d) for p, d in (data.get("overall") or {}).items()},
        prompts=[{p: spread(d) for p, d in table.items()} for table in data.get("prompts") or []],
        sources=list(data.get("sources") or []),
    )


def _spread(values: list[float | None], path: str, mode: str) -> MetricSpread:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        noise = None
    elif mode == SELF and (same := identity(path)) is not None:
        noise = max(abs(v - same) for v in finite)
    else:
        noise = max(finite) - min(finite)
    return MetricSpread(values=list(values), mean=float(np.mean(finite)) if finite else None, std=_std(finite),
                        noise=noise)


def _std(values: list[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) >= 2 else None


def _check_same_prompts(runs: list[dict[str, Any]]) -> None:
    first = [c.get("prompt") for c in runs[0]["comparisons"]]
    for i, run in enumerate(runs[1:], start=1):
        other = [c.get("prompt") for c in run["comparisons"]]
        if other != first:
            raise UsageError(f"report {i} of the noise floor compared other prompts than report 0 "
                             f"({len(other)} vs {len(first)} prompts); repeats must share their prompts")
