"""Profiles in the terminal: top operators and kernels per side, and the side-by-side speed table.

Renders what ``profiling.traces`` read from saved traces and what a run's saved
form says about each side's timings. It must not read trace files itself beyond
``summarize_folder`` nor import torch or vLLM.
"""

from __future__ import annotations

from typing import Any

from ..profiling.traces import (
    DEFAULT_TOP,
    SIDES,
    ProfileError,
    ProfileSummary,
    SpeedRow,
    speed_rows_from_run,
    speed_rows_from_summaries,
    summarize_folder,
)


# -- tables --------------------------------------------------------------------------------------
def _ms(us: float) -> str:
    return f"{us / 1000:.3f}"


def _busy(us: float, span_us: float) -> str:
    # kernels on several streams can overlap, so this is an upper bound on the busy share
    return f"{min(100.0, 100 * us / span_us):.1f}%" if span_us > 0 else "-"


def _cut(name: str, n: int = 72) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def render_op_tables(console, summary: ProfileSummary, top: int = DEFAULT_TOP) -> None:
    from rich.markup import escape
    from rich.table import Table

    st = summary.stats
    console.print(f"[bold]{escape(summary.label)}[/]  {escape(str(summary.folder))}", markup=True, highlight=False)
    console.print("  traces: " + ", ".join(p.name for p in summary.files), markup=False, highlight=False)
    host_total = st.host_self_us
    # headings as lines, not table titles: rich wraps a title to its table's width
    console.print(f"{summary.label}: top {min(top, len(st.host))} of {len(st.host)} CPU ops by self time "
                  f"(self CPU total {_ms(host_total)} ms over a {_ms(st.span_us)} ms trace)",
                  markup=False, highlight=False)
    table = Table()
    for col, justify in (("op", "left"), ("calls", "right"), ("self ms", "right"), ("self %", "right"),
                         ("total ms", "right"), ("avg self µs", "right")):
        table.add_column(col, justify=justify)
    for s in st.top("host", top):
        table.add_row(_cut(s.name), str(s.calls), _ms(s.self_us),
                      f"{100 * s.self_us / host_total:.1f}" if host_total else "-", _ms(s.total_us),
                      f"{s.self_us / s.calls:.1f}")
    console.print(table)
    if st.device:
        device_total = st.device_us
        console.print(f"{summary.label}: top {min(top, len(st.device))} of {len(st.device)} device kernels "
                      f"by time (device total {_ms(device_total)} ms, busy {_busy(device_total, st.span_us)} "
                      "of the trace)", markup=False, highlight=False)
        table = Table()
        for col, justify in (("kernel", "left"), ("calls", "right"), ("device ms", "right"), ("%", "right"),
                             ("avg µs", "right")):
            table.add_column(col, justify=justify)
        for s in st.top("device", top):
            table.add_row(_cut(s.name), str(s.calls), _ms(s.self_us),
                          f"{100 * s.self_us / device_total:.1f}" if device_total else "-",
                          f"{s.self_us / s.calls:.1f}")
        console.print(table)


def render_speed_table(console, rows: list[SpeedRow]) -> None:
    from rich.table import Table

    if not rows:
        return
    console.print("speed of the measured generation (wall time and generated tokens over all prompts)",
                  markup=False, highlight=False)
    base_row = next((r for r in rows if r.label.startswith("reference")), rows[0])
    base = base_row.wall_s
    table = Table()
    for col in ("side", "profiled", "wall s", "tokens", "tokens/s", "ms/token",
                "× reference" if base_row.label.startswith("reference") else "× first"):
        table.add_column(col, justify="left" if col in ("side", "profiled") else "right")

    def f(v: float | None, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    for r in rows:
        ratio = r.wall_s / base if r.wall_s and base else None
        profiled = "yes" if r.profiled else "no"
        if r.source in ("cache", "file"):
            profiled += f" ({r.source}: timed when captured)"
        table.add_row(_cut(r.label, 48), profiled, f(r.wall_s), f(r.tokens, 0), f(r.tokens_per_s, 1),
                      f(r.ms_per_token, 2), f(ratio, 2))
    console.print(table)
    if len({r.profiled for r in rows}) > 1:
        console.print("[yellow]note:[/] one side ran under the profiler and the other did not; "
                      "the profiler's overhead is in the profiled side's time", markup=True)


def render_profile_summary(console, summaries: list[ProfileSummary], top: int = DEFAULT_TOP) -> None:
    """The ``profile-summary`` command: op tables from saved traces, then the speeds the workers noted."""
    console.rule("[bold]profile")
    for summary in summaries:
        render_op_tables(console, summary, top)
    render_speed_table(console, speed_rows_from_summaries(summaries))


def render_run_profile(console, run: dict[str, Any], top: int = DEFAULT_TOP) -> None:
    """The profile section of a run's report; nothing when no side was profiled.

    A trace that cannot be read is reported and skipped: the parity result stands."""
    from rich.markup import escape

    sides = run.get("sides") or {}
    profiled = [(side, sides[side]["profile"]) for side in SIDES if (sides.get(side) or {}).get("profile")]
    if not profiled:
        return
    console.rule("[bold]profile of the measured generation")
    for side, info in profiled:
        try:
            summary = summarize_folder(info["dir"])
        except ProfileError as exc:
            console.print(f"[yellow]note:[/] {side}: {escape(str(exc.message))}", markup=True, highlight=False)
            continue
        render_op_tables(console, summary, top)
    render_speed_table(console, speed_rows_from_run(run))
    console.print("open a trace in https://ui.perfetto.dev or chrome://tracing; "
                  "tables again: vllm-rbln-exec profile-summary DIR", highlight=False)
