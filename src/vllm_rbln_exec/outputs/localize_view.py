"""The localisation report for people: a compact per-layer table in the terminal.

Reads the ``localization`` record (``pipeline.localize``) and renders it; it
computes nothing and runs nothing. Its plot is drawn where every plot is
(``outputs.plotdata.layer_errors``, ``outputs.plots``).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _e(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2e}"


def headline(report: dict[str, Any]) -> str:
    """One sentence: where the difference is created, or that no layer departs."""
    verdict, layer = report.get("verdict"), report.get("layer")
    module = report.get("module")
    where = f"{layer}" + (f" ({module})" if isinstance(module, str) else "")
    shows = " and ".join(report.get("shows_at") or []) or "-"
    if verdict == "created":
        return f"the difference is created at {where}: its input matched, its output departs (shows at {shows})"
    if verdict == "drift":
        return (f"the difference drifts: it first exceeds the threshold at {where}, with no single layer making it "
                f"jump (shows at {shows})")
    return "no layer departs: every layer's error is within the honest error of its precision"


def render_localization(console: Console, report: dict[str, Any]) -> None:
    console.rule("localisation")
    console.print(headline(report), markup=False, highlight=False)
    sides = report.get("sides") or {}
    line = ", ".join(f"{k}: {v.get('engine')} {v.get('dtype')} on {v.get('device')}" for k, v in sides.items())
    console.print(f"sides  {line}", markup=False, highlight=False)
    console.print(f"chosen {report.get('chosen')}: " + "; ".join(
        f"prompt {p['index']} positions {[q['position'] for q in p['positions']]}" for p in report.get("prompts") or []),
        markup=False, highlight=False)
    rule = report.get("rule") or {}
    console.print(f"rule   K={rule.get('k')} G={rule.get('g')} floor={rule.get('floor')}: {rule.get('text')}",
                  markup=False, highlight=False)
    table = Table(show_edge=False, pad_edge=False, title="error by layer (max over positions)")
    for col in ("entry", "rel L2", "cosine", "yardstick", "ratio", "status"):
        table.add_column(col, justify="left" if col in ("entry", "status") else "right")
    status = _statuses(report)
    for row in report.get("layers") or []:
        table.add_row(row["name"], _e(row["rel_l2"]), f"{row['cosine']:.6f}", _e(row.get("yardstick_rel_l2")),
                      "-" if row.get("ratio") is None else f"{row['ratio']:.3g}", status.get(row["name"], ""))
    console.print(table)
    if report.get("plot"):
        console.print(f"plot   {report['plot']}", markup=False, highlight=False)
    for note in report.get("notes") or []:
        console.print(f"note   {note}", markup=False, highlight=False)


def _statuses(report: dict[str, Any]) -> dict[str, str]:
    """Per entry, what the positions said (``created@0,3`` ...), departing entries only."""
    seen: dict[str, dict[str, list[int]]] = {}
    for p in report.get("prompts") or []:
        for pos in p["positions"]:
            for e in pos["entries"]:
                if e["status"] != "ok":
                    seen.setdefault(e["name"], {}).setdefault(e["status"], []).append(pos["position"])
    return {name: " ".join(f"{st}@{','.join(str(x) for x in sorted(set(ps)))}" for st, ps in by.items())
            for name, by in seen.items()}
