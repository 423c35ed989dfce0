"""Rendering a RunResult: the terminal report (rich) and progress display.

Reads results, never computes metrics or runs anything. The shape follows the
original tool: run header, per-prompt blocks (with ``--inspect-logits``), and a
summary table over all prompts.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .metrics import PromptComparison


def make_console(no_color: bool = False, stderr: bool = False) -> Console:
    return Console(no_color=no_color, highlight=False, stderr=stderr, soft_wrap=False)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value)


def _short(text: str, n: int = 60) -> str:
    one_line = text.replace("\n", "⏎")
    return one_line if len(one_line) <= n else one_line[: n - 1] + "…"


def _mark(ok: bool) -> Text:
    return Text("PASS", style="bold green") if ok else Text("FAIL", style="bold red")


def render_header(console: Console, result) -> None:
    s = result.settings
    vocab = result.comparisons[0].vocab_size if result.comparisons else "?"
    logprobs = f"full vocabulary ({vocab})" if s["logprobs"] == -1 else f"top {s['logprobs']}"
    console.rule("[bold]vllm-rbln-exec parity run")
    console.print(f"model        {escape(result.model)}  ({escape(result.model_path)})")
    console.print(
        f"parallelism  tp={s['tp']} pp={s['pp']} dp={s['dp']} ep={'on' if s['ep'] else 'off'} (target)"
        f"   layers={s['num_hidden_layers'] or 'all'}   max-model-len={s['max_model_len']}"
    )
    console.print(f"max tokens   {s['max_tokens']}   logprobs {logprobs}   prompts {len(result.prompts)}"
                  f"   batch {s['batch']}")
    table = Table(show_edge=False, box=None, pad_edge=False)
    for col in ("side", "device", "platform", "engine", "dtype", "time", "source"):
        table.add_column(col)
    for side in ("reference", "target"):
        r = result.sides[side]
        table.add_row(
            side,
            r.device,
            r.platform,
            f"{r.engine} {r.engine_version}",
            r.dtype,
            f"{r.elapsed_s:.1f} s",
            "cache" if r.from_cache else "worker",
        )
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")


def render_prompt(console: Console, c: PromptComparison, snippet: bool, snippet_elems: int) -> None:
    console.rule(f"Prompt {c.index}: {escape(_short(c.prompt))!s}", align="left")
    same = "equal" if c.texts_equal else "[red]different[/]"
    console.print(
        f"generated    target {len(c.target_text)} chars / {c.target_tokens} tokens, "
        f"reference {len(c.reference_text)} chars / {c.reference_tokens} tokens: {same}"
    )
    if c.first_divergence is not None:
        console.print(f"divergence   tokens first differ at position {c.first_divergence}; "
                      f"compared positions 0..{c.positions_compared - 1}")
    else:
        console.print(f"divergence   none; compared all {c.positions_compared} positions")
    console.print(f"outliers     {c.outliers} entries with |Δ| >= {c.eps}")
    console.print(f"vocab        {c.vocab_size}   finite overlap {fmt(c.finite_overlap * 100 if not math.isnan(c.finite_overlap) else c.finite_overlap, 2)}%")
    line = Text(f"max|Δ| {fmt(c.max_abs_diff)}   mean|Δ| {fmt(c.mean_abs_diff)}   pearson {fmt(c.pearson, 6)} ")
    line.append_text(_mark(c.pearson_ok))
    console.print(line)
    console.print(f"top-{c.topk}        overlap {fmt(c.topk_overlap, 3)}   same order {fmt(c.topk_order_match, 3)}"
                  f"   top-1 agreement {fmt(c.top1_match, 3)}")
    for note in c.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if snippet and c.snippet:
        for side in ("target", "reference"):
            vals = c.snippet[side]
            if len(vals) >= 2 * snippet_elems and c.vocab_size > 2 * snippet_elems:
                head = ", ".join(fmt(v, 3) for v in vals[:snippet_elems])
                tail = ", ".join(fmt(v, 3) for v in vals[-snippet_elems:])
                console.print(f"{side:<12} pos 0 [{head}, …, {tail}]")
            else:
                console.print(f"{side:<12} pos 0 [{', '.join(fmt(v, 3) for v in vals)}]")
    if c.first_position_topk is not None:
        tk = c.first_position_topk
        table = Table(title=f"top-{len(tk.reference_ids)} at position 0", title_justify="left")
        for col in ("rank", "target idx", "target val", "reference idx", "reference val"):
            table.add_column(col, justify="right")
        for rank, (ti, tv, ri, rv) in enumerate(
            zip(tk.target_ids, tk.target_vals, tk.reference_ids, tk.reference_vals), 1
        ):
            style = None if ti == ri else "yellow"
            table.add_row(str(rank), str(ti), fmt(tv), str(ri), fmt(rv), style=style)
        console.print(table)


def render_summary(console: Console, result) -> None:
    table = Table(title="summary over all prompts", title_justify="left")
    cols = ("prompt", "positions", "tokens equal", "1st diverge", "max|Δ|", "mean|Δ|", "pearson",
            "outliers", "top-1", "top-k overlap")
    for col in cols:
        table.add_column(col, justify="right")
    for c in result.comparisons:
        table.add_row(
            str(c.index),
            str(c.positions_compared),
            "yes" if c.tokens_equal else "[red]no[/]",
            fmt(c.first_divergence),
            fmt(c.max_abs_diff),
            fmt(c.mean_abs_diff),
            Text(fmt(c.pearson, 6), style="green" if c.pearson_ok else "red"),
            str(c.outliers),
            fmt(c.top1_match, 3),
            fmt(c.topk_overlap, 3),
        )
    s = result.summary
    table.add_row(
        "all",
        str(s.positions_compared),
        f"{s.tokens_equal}/{s.prompts}",
        fmt(s.earliest_divergence),
        fmt(s.max_abs_diff),
        fmt(s.mean_abs_diff),
        fmt(s.min_pearson, 6),
        str(s.outliers),
        fmt(s.top1_match, 3),
        fmt(s.topk_overlap, 3),
        style="bold",
    )
    console.print(table)


def render_result(console: Console, result, inspect_logits: bool = True, snippet: bool = True,
                  snippet_elems: int = 5) -> None:
    render_header(console, result)
    if inspect_logits:
        for c in result.comparisons:
            render_prompt(console, c, snippet, snippet_elems)
    render_summary(console, result)
    console.print(f"run folder   {escape(result.run_dir)}")


class ProgressView:
    """Shows worker progress: a live status line, and a permanent line per milestone."""

    MILESTONES = {"engine_ready", "cache_hit", "convert"}

    def __init__(self, console: Console):
        self.console = console
        self.status = console.status("starting", spinner="dots")
        self.t_start: dict[str, float] = {}

    def __enter__(self) -> "ProgressView":
        self.status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.status.__exit__(*exc)

    def __call__(self, side: str, message: str, data: dict[str, Any]) -> None:
        if not message:
            return
        stage = data.get("stage", "")
        if stage in self.MILESTONES or side == "model":
            self.console.print(f"[dim]{side:>10}[/] {escape(message)}")
        self.status.update(f"[bold]{side}[/] {escape(message)}")
