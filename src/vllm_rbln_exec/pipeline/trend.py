"""``compare RUN_A RUN_B ...``: several saved runs, each judged, checked to be comparable, in the order given.

This module owns the order of those steps for a trend: load every run
(``check.load_saved``: bad paths and damaged reports become usage errors),
judge each with the same tolerances, refuse runs of different models, layer
cuts or prompts unless told otherwise (naming the difference), and hand the
result to ``outputs`` to print and draw. It computes no metric, renders nothing
and never imports torch, vLLM or matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.errors import UsageError
from ..outputs.trend import differences, run_name
from ..setup.options import GateOptions
from .check import judge_run, load_gates, load_saved


@dataclass
class Trend:
    names: list[str]
    runs: list[dict[str, Any]]
    verdicts: list[dict[str, Any]]  # Verdict.to_json() of each run
    notes: list[str] = field(default_factory=list)  # differences accepted with --allow-mismatch

    @property
    def exit_code(self) -> int:
        """The verdict of the last (newest) run: what a CI job that compares its build with earlier ones needs."""
        return 0 if self.verdicts[-1].get("passed") else 1


def load_trend(paths: list[str], options: GateOptions, allow_mismatch: bool = False) -> Trend:
    spec = load_gates(options)
    names = _unique([run_name(p) for p in paths])
    runs, verdicts = [], []
    for path in paths:
        run, noise = load_saved(path)
        runs.append(run)
        verdicts.append(judge_run(run, options, spec, noise).to_json())
    found = differences(names, runs)
    if found and not allow_mismatch:
        raise UsageError("these runs are not of the same model and prompts: " + "; ".join(found)
                         + " (add --allow-mismatch to put them side by side anyway)", option="--allow-mismatch")
    return Trend(names, runs, verdicts, [f"not comparable as they stand: {d}" for d in found])


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out
