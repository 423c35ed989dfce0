"""A trend across saved runs: are they comparable, the side-by-side table, and what the trend plot draws.

This module owns ``compare RUN_A RUN_B ...``'s view of several saved runs, given
in order (oldest first): which differences make them incomparable (model, its
layer cut, prompts), the key metrics of each side by side in the terminal, and
the series the trend plot draws. It reads report dicts and verdicts only: it
must not load files (``pipeline.trend`` does), judge, draw (``plots``) or
import matplotlib, torch or vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..compare.catalogue import LOWER, OVERALL, key_metrics, lookup, metric_value

TREND_METRICS = key_metrics(OVERALL)  # (label, dotted path), the same key metrics every report shows


def run_name(path: str | Path) -> str:
    """How a run is named in the table: its folder, or a report file's stem (``parity``: its folder)."""
    path = Path(path)
    if path.is_file() or path.suffix == ".json":
        return path.parent.name if path.stem in ("parity", "report") else path.stem
    return path.name or str(path)


def _short(text: Any, width: int = 50) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def differences(names: list[str], runs: list[dict[str, Any]]) -> list[str]:
    """Why these runs cannot be put side by side (each against the first), one sentence each; [] if they can."""
    first, base = names[0], runs[0]
    out = []
    for name, run in zip(names[1:], runs[1:]):
        for what, key in (("model", "model"), ("--num-hidden-layers", "num_hidden_layers")):
            a = base.get(key) if key == "model" else (base.get("settings") or {}).get(key)
            b = run.get(key) if key == "model" else (run.get("settings") or {}).get(key)
            if a != b:
                out.append(f"{what}: {first} has {a!r}, {name} has {b!r}")
        pa, pb = list(base.get("prompts") or []), list(run.get("prompts") or [])
        if len(pa) != len(pb):
            out.append(f"prompts: {first} has {len(pa)}, {name} has {len(pb)}")
        else:
            diff = next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), None)
            if diff is not None:
                out.append(f"prompt {diff}: {first} has {_short(pa[diff])!r}, {name} has {_short(pb[diff])!r}")
    return out


def _side(run: dict[str, Any]) -> str:
    t = (run.get("sides") or {}).get("target") or {}
    return " ".join(str(x) for x in (t.get("device"), t.get("engine"), t.get("engine_version"), t.get("dtype")) if x)


def table_rows(names: list[str], runs: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of the side-by-side table: a header of run names, then one row per key metric."""
    rows = [["", *names], ["target", *[_side(r) for r in runs]],
            ["verdict", *["PASS" if v.get("passed") else "FAIL" for v in verdicts]]]
    for label, path in TREND_METRICS:
        rows.append([label, *[_fmt(metric_value(r.get("summary") or {}, path)) for r in runs]])
    return rows


def series(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One series per key metric for the trend plot; a metric a run lacks is None there (drawn as a gap)."""
    out = []
    for label, path in TREND_METRICS:
        metric = lookup(path, OVERALL)
        values = [metric_value(r.get("summary") or {}, path) for r in runs]
        if all(v is None for v in values):
            continue
        out.append({"label": label, "path": path, "values": values,
                    "log": metric is not None and metric.better == LOWER and "mismatch" not in path})
    return out


def render_trend(console, names: list[str], runs: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    rows = table_rows(names, runs, verdicts)  # run names, models and sides are the user's text: never markup
    table = Table(title=f"{len(runs)} runs of {escape(str(runs[0].get('model')))}, oldest first", title_justify="left")
    table.add_column("metric")
    for name in rows[0][1:]:
        table.add_column(escape(name), justify="right")
    for row in rows[1:]:
        table.add_row(*map(escape, row))
    console.print(table)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}"
