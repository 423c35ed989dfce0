"""Profiles of the measured generation: where traces go, what they say, how it is shown.

Owns the trace folder layout (``profile/<side>_<model>_<time>/``), reading the
chrome-trace JSON files the torch profiler writes (plain or gzipped), the
self-time aggregation per operator and per device kernel, the side-by-side speed
table, and their rendering. Pure Python and json (plus rich for output): it runs
in the main process and on saved traces alone, so it never imports torch or vLLM
and never starts a worker. Starting and stopping the profiler is the workers'
business (``worker/profiling.py``).
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UsageError
from .request import META

RUN_FILES = ("parity.json", "report.json")  # a run folder's report (report.json: schema 1, before parity.json)

SIDES = ("reference", "target")
DEFAULT_TOP = 15

# Kineto names its categories in lower case today; older builds used capitalised
# ones ("Operator", "Kernel", "Runtime"), so categories are compared lower-cased.
HOST_CATEGORIES = frozenset({
    "cpu_op", "operator", "user_annotation", "cuda_runtime", "cuda_driver", "runtime", "driver",
    "xpu_runtime", "xpu_driver", "privateuse1_runtime", "privateuse1_driver", "mtia_runtime",
})
DEVICE_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset", "memcpy", "memset"})


class ProfileError(UsageError):
    """A folder or file that holds no readable trace (bad usage: exit 2)."""

    def __init__(self, message: str):
        super().__init__(message, option="DIR")


def is_trace_file(path: Path) -> bool:
    name = path.name
    return path.is_file() and name != META and (name.endswith(".json") or name.endswith(".json.gz"))


def find_trace_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_trace_file(p))


# -- reading and aggregating ------------------------------------------------------------
def load_trace_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of one chrome trace: ``{"traceEvents": [...]}`` or a bare list."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path} is not a readable chrome trace ({type(exc).__name__}: {exc})") from exc
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ProfileError(f"{path} is JSON but not a chrome trace (no traceEvents list)")
    return [e for e in events if isinstance(e, dict)]


@dataclass
class OpStat:
    name: str
    calls: int = 0
    self_us: float = 0.0
    total_us: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "calls": self.calls, "self_us": self.self_us, "total_us": self.total_us}


@dataclass
class TraceStats:
    """Self time per name on the host (CPU) and on the device, over one or more traces."""

    host: dict[str, OpStat] = field(default_factory=dict)
    device: dict[str, OpStat] = field(default_factory=dict)
    events: int = 0
    start_us: float = math.inf
    end_us: float = -math.inf

    @property
    def span_us(self) -> float:
        return self.end_us - self.start_us if self.end_us >= self.start_us else 0.0

    @property
    def host_self_us(self) -> float:
        return sum(s.self_us for s in self.host.values())

    @property
    def device_us(self) -> float:
        return sum(s.self_us for s in self.device.values())

    def top(self, where: str = "host", n: int = DEFAULT_TOP) -> list[OpStat]:
        table = self.host if where == "host" else self.device
        return sorted(table.values(), key=lambda s: (-s.self_us, s.name))[:n]


def _complete_events(events: Iterable[dict[str, Any]]) -> list[tuple[str, str, Any, float, float]]:
    """(category, name, thread key, start, duration) of every complete ("X") event."""
    out = []
    for e in events:
        if e.get("ph") != "X":
            continue
        try:
            ts = float(e["ts"])
            dur = float(e.get("dur", 0.0))
        except (KeyError, TypeError, ValueError):
            continue
        if not (math.isfinite(ts) and math.isfinite(dur)) or dur < 0:
            continue
        out.append((str(e.get("cat", "")).lower(), str(e.get("name", "")), (e.get("pid"), e.get("tid")), ts, dur))
    return out


def _add(table: dict[str, OpStat], name: str, self_us: float, total_us: float) -> None:
    stat = table.get(name)
    if stat is None:
        stat = table[name] = OpStat(name)
    stat.calls += 1
    stat.self_us += self_us
    stat.total_us += total_us


def _host_self_times(table: dict[str, OpStat], thread_events: list[tuple[str, float, float]]) -> None:
    """Self time = duration minus the durations of the direct children on the same
    thread, as torch's own ``key_averages`` counts it."""
    thread_events.sort(key=lambda e: (e[1], -e[2]))
    children = [0.0] * len(thread_events)
    open_until: list[tuple[float, int]] = []  # (end, index) of enclosing events
    for i, (_, ts, dur) in enumerate(thread_events):
        while open_until and open_until[-1][0] <= ts:
            open_until.pop()
        if open_until:
            children[open_until[-1][1]] += dur
        open_until.append((ts + dur, i))
    for (name, _, dur), child in zip(thread_events, children):
        _add(table, name, max(0.0, dur - child), dur)


def aggregate_events(events: Iterable[dict[str, Any]], stats: TraceStats | None = None) -> TraceStats:
    """Fold one trace's events into ``stats`` (a new one when None)."""
    stats = stats or TraceStats()
    complete = _complete_events(events)
    known = any(cat in HOST_CATEGORIES or cat in DEVICE_CATEGORIES for cat, *_ in complete)
    threads: dict[Any, list[tuple[str, float, float]]] = {}
    for cat, name, thread, ts, dur in complete:
        if cat in DEVICE_CATEGORIES:
            _add(stats.device, name, dur, dur)  # kernels on a stream do not nest
        elif cat in HOST_CATEGORIES or not known:  # a trace from elsewhere: every slice counts
            threads.setdefault(thread, []).append((name, ts, dur))
        else:
            continue  # python_function, gpu_user_annotation, the profiler's own span, ...
        stats.events += 1
        stats.start_us = min(stats.start_us, ts)
        stats.end_us = max(stats.end_us, ts + dur)
    for thread_events in threads.values():
        _host_self_times(stats.host, thread_events)
    return stats


@dataclass
class ProfileSummary:
    """One trace folder: its files, their aggregated stats and the worker's notes."""

    folder: Path
    files: list[Path]
    stats: TraceStats
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        side = self.meta.get("side") or self.folder.name.split("_", 1)[0]
        where = " ".join(str(self.meta[k]) for k in ("engine", "platform") if self.meta.get(k))
        return f"{side} ({where})" if where else side


def read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(folder) / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def summarize_folder(folder: str | Path) -> ProfileSummary:
    folder = Path(folder)
    files = find_trace_files(folder)
    if not files:
        raise ProfileError(f"{folder} holds no trace files (*.json or *.json.gz)")
    stats = TraceStats()
    for path in files:
        aggregate_events(load_trace_events(path), stats)
    return ProfileSummary(folder=folder, files=files, stats=stats, meta=read_meta(folder))


def resolve_trace_folders(path: str | Path) -> list[Path]:
    """Trace folders under DIR: DIR itself, its subfolders (the ``profile/`` root),
    or the folders a run folder's ``parity.json`` (``report.json`` before schema 2) names."""
    root = Path(path)
    if not root.exists():
        raise ProfileError(f"{root} does not exist")
    if root.is_file():
        raise ProfileError(f"{root} is a file; give a trace folder, the profile/ folder or a run folder")
    report = next((root / n for n in RUN_FILES if (root / n).is_file()), None)
    if report is not None:
        try:
            data = json.loads(report.read_text())
            sides = (data.get("run") if report.name == RUN_FILES[0] else data).get("sides", {})
        except (OSError, ValueError, AttributeError) as exc:
            raise ProfileError(f"{report} cannot be read: {exc}") from exc
        named = [Path(s["profile"]["dir"]) for s in sides.values()
                 if isinstance(s, dict) and isinstance(s.get("profile"), dict) and s["profile"].get("dir")]
        if not named:
            raise ProfileError(f"the run in {root} was not profiled (run it with --profile or --profile-side)")
        missing = [str(p) for p in named if not find_trace_files(p)]
        if missing:
            raise ProfileError(f"the run in {root} names trace folders that hold no traces: {', '.join(missing)}")
        return named
    if find_trace_files(root):
        return [root]
    folders = sorted(p for p in root.iterdir() if p.is_dir() and find_trace_files(p))
    if not folders:
        raise ProfileError(f"no traces in {root}: expected *.json(.gz) trace files in it or in its subfolders")
    return folders


def load_summaries(path: str | Path) -> list[ProfileSummary]:
    return [summarize_folder(folder) for folder in resolve_trace_folders(path)]


# -- speed ------------------------------------------------------------------------------------
@dataclass
class SpeedRow:
    label: str
    wall_s: float | None
    tokens: float | None
    profiled: bool
    source: str = "worker"

    @property
    def tokens_per_s(self) -> float | None:
        if not self.wall_s or not self.tokens:
            return None
        return self.tokens / self.wall_s

    @property
    def ms_per_token(self) -> float | None:
        if not self.wall_s or not self.tokens:
            return None
        return 1000.0 * self.wall_s / self.tokens


def speed_row_from_timings(label: str, timings: dict[str, Any], profiled: bool, source: str = "worker") -> SpeedRow:
    def num(key: str) -> float | None:
        value = timings.get(key)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    return SpeedRow(label, num("capture_total_s"), num("generated_tokens"), profiled, source)


def speed_rows_from_run(run: dict[str, Any]) -> list[SpeedRow]:
    """Speed rows from a run's saved form (its ``sides``)."""
    rows = []
    sides = run.get("sides") or {}
    for side in SIDES:
        r = sides.get(side)
        if not r:
            continue
        rows.append(speed_row_from_timings(f"{side} ({r.get('engine')} {r.get('platform')})", r.get("timings") or {},
                                           bool(r.get("profile")), r.get("source", "worker")))
    return rows


def speed_rows_from_summaries(summaries: list[ProfileSummary]) -> list[SpeedRow]:
    return [speed_row_from_timings(s.label, s.meta.get("timings") or {}, True, s.folder.name)
            for s in summaries if s.meta.get("timings")]
