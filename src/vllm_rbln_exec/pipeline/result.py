"""The saved form of a run: ``RunResult`` and one ``SideResult`` per side, as they go into ``parity.json``.

Every output (the terminal report, JSON, JUnit, Markdown, ``compare RUN``) is
made from ``RunResult.to_json()``, so a live and a saved run render the same.
Schema 2 adds ``options`` (what was asked), ``resolved`` (what the run decided)
and per side its engine arguments and effective settings; schema-1 reports
still load. This module computes nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .. import __version__
from ..capture.store import Capture
from ..compare.metrics import PromptComparison, RunSummary
from ..compare.yardstick import ratio_table

REPORT_SCHEMA_VERSION = 2


@dataclass
class SideResult:
    side: str
    device: str
    engine: str
    platform: str
    engine_version: str
    dtype: str
    elapsed_s: float
    source: str  # worker, cache or file
    capture_dir: str
    timings: dict[str, float] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None  # {"dir", "traces"} when this side ran under the profiler
    engine_args: dict[str, Any] = field(default_factory=dict)  # --X-args as given
    effective: dict[str, Any] = field(default_factory=dict)  # what the engine reported deciding the numbers
    torch_device: str | None = None


@dataclass
class RunResult:
    run_dir: str
    model: str
    model_path: str
    target: str
    settings: dict[str, Any]  # the flat settings in force (schema 1's shape; gates and reports read it)
    prompts: list[str]
    sides: dict[str, SideResult]
    comparisons: list[PromptComparison]
    summary: RunSummary
    notes: list[str]
    cache: dict[str, Any]
    reference_tokens: list[list[int]] = field(default_factory=list)
    repeats: list[dict[str, Any]] = field(default_factory=list)  # --repeat: reports of the extra target runs
    reference_self: dict[str, Any] | None = None  # --repeat: the reference against a second capture of itself
    options: dict[str, Any] = field(default_factory=dict)  # what the user asked for
    resolved: dict[str, Any] = field(default_factory=dict)  # what the run decided on its own
    # an honest side at the target's precision against the same reference: {why, side, cache, summary,
    # comparisons}; to_json adds its ratios. None: the run had no yardstick (and reports before it have no key)
    yardstick: dict[str, Any] | None = None
    harness_version: str = __version__
    schema_version: int = REPORT_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        data = {
            "schema_version": self.schema_version,
            "harness_version": self.harness_version,
            "run_dir": self.run_dir,
            "model": self.model,
            "model_path": self.model_path,
            "target": self.target,
            "settings": self.settings,
            "options": self.options,
            "resolved": self.resolved,
            "prompts": self.prompts,
            "sides": {k: asdict(v) for k, v in self.sides.items()},
            "comparisons": [c.to_json() for c in self.comparisons],
            "summary": self.summary.to_json(),
            "notes": self.notes,
            "cache": self.cache,
            "reference_tokens": self.reference_tokens,
            "repeats": self.repeats,
            "reference_self": self.reference_self,
            "yardstick": dict(self.yardstick) if self.yardstick else None,
        }
        if self.yardstick:
            data["yardstick"]["ratios"] = ratio_table(data)
        return data


def side_result(capture: Capture, elapsed: float, source: str, engine_args: dict[str, Any] | None = None, torch_device: str | None = None,
                profile: dict[str, Any] | None = None) -> SideResult:
    info = capture.info
    return SideResult(
        side=info.side, device=info.device, engine=info.engine, platform=info.platform,
        engine_version=info.engine_version, dtype=info.dtype, elapsed_s=float(elapsed), source=source,
        capture_dir=str(capture.root), timings=dict(info.timings),
        env=info.env, profile=profile,
        engine_args=dict(engine_args or {}), effective=dict(capture.settings.get("effective") or {}),
        torch_device=torch_device,
    )
