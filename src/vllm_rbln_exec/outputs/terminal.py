"""The terminal report (rich) of a run's saved form, and the progress display.

Renders ``RunResult.to_json()``, so a live run and ``compare RUN`` print the
same sections. Reads results, never computes metrics or runs anything. The shape follows the
original tool: run header, per-prompt blocks (with ``--inspect-logits``), and a
summary table over all prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..compare.catalogue import label
from ..compare.metrics import PEARSON_PASS
from ..compare.yardstick import ratio_table
from ..setup.options import DisplayOptions
from .profile_tables import render_run_profile


def make_console(no_color: bool = False, stderr: bool = False) -> Console:
    import os
    import sys

    stream = sys.stderr if stderr else sys.stdout
    # Logs and CI capture are not terminals; rich would cut tables at 80 columns.
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    return Console(no_color=no_color, highlight=False, stderr=stderr, soft_wrap=False, width=width)


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


def render_header(console: Console, run: dict[str, Any]) -> None:
    s = run.get("settings") or {}
    comparisons = run.get("comparisons") or []
    vocab = comparisons[0].get("vocab_size") if comparisons else "?"
    logprobs = f"full vocabulary ({vocab})" if s.get("logprobs", -1) == -1 else f"top {s.get('logprobs')}"
    console.rule("[bold]vllm-rbln-exec parity run")
    render_ab(console, run)
    console.print(f"model        {escape(str(run.get('model')))}  ({escape(str(run.get('model_path')))})")
    console.print(
        f"parallelism  tp={s.get('tp', 1)} pp={s.get('pp', 1)} dp={s.get('dp', 1)} ep={'on' if s.get('ep') else 'off'}"
        f" (target)   layers={s.get('num_hidden_layers') or 'all'}   max-model-len={s.get('max_model_len')}"
    )
    console.print(f"max tokens   {s.get('max_tokens')}   logprobs {logprobs}   prompts {len(run.get('prompts') or [])}"
                  f"   batch {s.get('batch')}")
    render_sides(console, run)
    for note in run.get("notes") or []:
        console.print(f"[yellow]note:[/] {escape(note)}")


def render_ab(console: Console, run: dict[str, Any]) -> None:
    """``--ab``: the preset, its question and what differs between the two sides, first of all."""
    resolved = run.get("resolved") or {}
    ab = resolved.get("ab")
    if not isinstance(ab, dict):
        return
    differences = resolved.get("differences") or []
    shown = "; ".join(f"{what}: {_brief(a)} vs {_brief(b)}" for what, a, b in differences) or "nothing"
    console.print(f"[bold]A/B          {escape(str(ab.get('preset')))}[/]: {escape(str(ab.get('question')))}")
    console.print(f"[bold]A differs B[/]  {escape(shown)}  (A: reference, B: target)")
    render_spec_decode(console, run)


def render_spec_decode(console: Console, run: dict[str, Any]) -> None:
    """The acceptance rate of each side that decoded speculatively."""
    for name in ("reference", "target"):
        spec = ((run.get("sides") or {}).get(name) or {}).get("effective", {}).get("spec_decode")
        if isinstance(spec, dict) and "draft_tokens" in spec:
            rate = spec.get("acceptance_rate")
            console.print(f"spec decode  {name}: acceptance {fmt(rate, 3)} ({spec.get('accepted_tokens')} of "
                          f"{spec.get('draft_tokens')} draft tokens accepted, {spec.get('drafts')} drafts)")


def render_sides(console: Console, run: dict[str, Any]) -> None:
    """Both sides, what differs between them, and the engine settings each reported."""
    table = Table(show_edge=False, box=None, pad_edge=False)
    for col in ("side", "device", "platform", "engine", "dtype", "time", "source"):
        table.add_column(col)
    sides = run.get("sides") or {}
    for name in ("reference", "target"):
        r = sides.get(name) or {}
        cells = (str(r.get("device", "?")), str(r.get("platform", "?")),
                 f"{r.get('engine', '?')} {r.get('engine_version', '')}".strip(), str(r.get("dtype", "?")))
        table.add_row(name, *map(escape, cells), f"{float(r.get('elapsed_s') or 0.0):.1f} s",
                      escape(str(r.get("source", "?"))))
    console.print(table)
    differences = (run.get("resolved") or {}).get("differences") or []
    if differences:
        shown = "; ".join(f"{what}: {_brief(a)} vs {_brief(b)}" for what, a, b in differences)
        console.print(f"differs      {escape(shown)}  (reference vs target)")
    for name in ("reference", "target"):
        r = sides.get(name) or {}
        if r.get("engine_args"):
            console.print(f"{name:<12} engine args {escape(_brief(r['engine_args'], 100))}")
        effective = {k: v for k, v in (r.get("effective") or {}).items() if k != "engine_args" and v is not None}
        if effective:
            console.print(f"[dim]{name:<12} in force: {escape(_brief(effective, 110))}[/]")


def _brief(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def render_prompt(console: Console, c: dict[str, Any], snippet: bool, snippet_elems: int) -> None:
    console.rule(f"Prompt {c['index']}: {escape(_short(c['prompt']))!s}", align="left")
    same = "equal" if c.get("texts_equal") else "[red]different[/]"
    console.print(
        f"generated    target {len(c.get('target_text') or '')} chars / {c.get('target_tokens')} tokens, "
        f"reference {len(c.get('reference_text') or '')} chars / {c.get('reference_tokens')} tokens: {same}"
    )
    if c.get("first_divergence") is not None:
        console.print(f"divergence   tokens first differ at position {c['first_divergence']}; "
                      f"compared positions 0..{c['positions_compared'] - 1}")
    else:
        console.print(f"divergence   none; compared all {c.get('positions_compared')} positions")
    console.print(f"outliers     {c.get('outliers')} entries with |Δ| >= {c.get('eps')}")
    overlap = c.get("finite_overlap")
    console.print(f"vocab        {c.get('vocab_size')}   finite overlap {fmt(overlap * 100 if overlap is not None else None, 2)}%")
    pearson = c.get("pearson")
    line = Text(f"max|Δ| {fmt(c.get('max_abs_diff'))}   mean|Δ| {fmt(c.get('mean_abs_diff'))}   pearson {fmt(pearson, 6)} ")
    line.append_text(_mark(pearson is not None and pearson >= PEARSON_PASS))
    console.print(line)
    console.print(f"top-{c.get('topk')}        overlap {fmt(c.get('topk_overlap'), 3)}   same order "
                  f"{fmt(c.get('topk_order_match'), 3)}   top-1 agreement {fmt(c.get('top1_match'), 3)}")
    _render_prompt_distribution(console, c)
    for note in c.get("notes") or []:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if snippet and c.get("snippet"):
        _render_snippet(console, c, snippet_elems)
    if c.get("first_position_topk"):
        _render_first_topk(console, c["first_position_topk"])


def _render_prompt_distribution(console: Console, c: dict[str, Any]) -> None:
    d = c.get("distribution") or {}
    if d.get("positions"):
        console.print(
            f"KL(ref‖tgt)  mean {fmt(d.get('kl_mean'))} ± {fmt(d.get('kl_sem'))}   p99 {fmt(d.get('kl_p99'))}"
            f"   max {fmt(d.get('kl_max'))}   top-1 rate {fmt(d.get('top1_rate'), 3)} ± {fmt(d.get('top1_se'), 3)}"
            f"   Δp rms {fmt(d.get('dp_rms'))}   ppl ratio {fmt(d.get('ppl_ratio'), 5)}"
        )
    if not c.get("aligned"):
        return
    div = c.get("argmax_divergence")
    if div is None:
        console.print("argmax       the target's argmax is the reference token at every position")
        return
    style = "yellow" if div["kind"] == "near-tie" else "red"
    console.print(
        f"argmax       [{style}]first differs at position {div['position']} ({div['kind']}: reference "
        f"margin {fmt(div['margin'], 3)} nats)[/]: reference token {div['reference_token']}, "
        f"target argmax {div['target_token']}"
    )


def _render_snippet(console: Console, c: dict[str, Any], snippet_elems: int) -> None:
    for side in ("target", "reference"):
        vals = c["snippet"][side]
        if len(vals) >= 2 * snippet_elems and c.get("vocab_size", 0) > 2 * snippet_elems:
            head = ", ".join(fmt(v, 3) for v in vals[:snippet_elems])
            tail = ", ".join(fmt(v, 3) for v in vals[-snippet_elems:])
            console.print(f"{side:<12} pos 0 [{head}, …, {tail}]")
        else:
            console.print(f"{side:<12} pos 0 [{', '.join(fmt(v, 3) for v in vals)}]")


def _render_first_topk(console: Console, tk: dict[str, Any]) -> None:
    table = Table(title=f"top-{len(tk['reference_ids'])} at position 0", title_justify="left")
    for col in ("rank", "target idx", "target val", "reference idx", "reference val"):
        table.add_column(col, justify="right")
    rows = zip(tk["target_ids"], tk["target_vals"], tk["reference_ids"], tk["reference_vals"])
    for rank, (ti, tv, ri, rv) in enumerate(rows, 1):
        table.add_row(str(rank), str(ti), fmt(tv), str(ri), fmt(rv), style=None if ti == ri else "yellow")
    console.print(table)


def render_summary(console: Console, run: dict[str, Any]) -> None:
    table = Table(title="summary over all prompts", title_justify="left")
    cols = ("prompt", "positions", "tokens equal", "1st diverge", "max|Δ|", "mean|Δ|", "pearson",
            "outliers", "top-1", "top-k overlap", "KL mean", "KL max")
    for col in cols:
        table.add_column(col, justify="right")
    for c in run.get("comparisons") or []:
        pearson, d = c.get("pearson"), c.get("distribution") or {}
        table.add_row(
            str(c.get("index")), str(c.get("positions_compared")), "yes" if c.get("tokens_equal") else "[red]no[/]",
            fmt(c.get("first_divergence")), fmt(c.get("max_abs_diff")), fmt(c.get("mean_abs_diff")),
            Text(fmt(pearson, 6), style="green" if pearson is not None and pearson >= PEARSON_PASS else "red"),
            str(c.get("outliers")), fmt(c.get("top1_match"), 3), fmt(c.get("topk_overlap"), 3),
            fmt(d.get("kl_mean")), fmt(d.get("kl_max")),
        )
    s = run.get("summary") or {}
    d = s.get("distribution") or {}
    table.add_row(
        "all", str(s.get("positions_compared")), f"{s.get('tokens_equal')}/{s.get('prompts')}",
        fmt(s.get("earliest_divergence")), fmt(s.get("max_abs_diff")), fmt(s.get("mean_abs_diff")),
        fmt(s.get("min_pearson"), 6), str(s.get("outliers")), fmt(s.get("top1_match"), 3),
        fmt(s.get("topk_overlap"), 3), fmt(d.get("kl_mean")), fmt(d.get("kl_max")), style="bold",
    )
    console.print(table)
    render_spec_decode(console, run)


class TokenText:
    """Token ids to text with the model's ``tokenizer.json`` (tokenizers only; no torch)."""

    def __init__(self, model_path: str):
        self.tokenizer = None
        try:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
        except Exception:  # no tokenizer.json or no tokenizers package: show ids
            self.tokenizer = None

    def __call__(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(f"#{i}" for i in ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def render_distribution(console: Console, run: dict[str, Any], tokens: TokenText | None = None) -> None:
    summary = run.get("summary") or {}
    d = summary.get("distribution") or {}
    if not d.get("positions"):
        return
    table = Table(title=f"distribution over {d['positions']} positions "
                        f"({'teacher-forced' if (run.get('settings') or {}).get('align') == 'forced' else 'free-running'})",
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("KL(ref‖tgt) mean ± s.e.", f"{fmt(d.get('kl_mean'))} ± {fmt(d.get('kl_sem'))}"),
        ("KL median / p90 / p99 / p99.9", " / ".join(fmt(d.get(k)) for k in ("kl_median", "kl_p90", "kl_p99", "kl_p999"))),
        ("KL max", fmt(d.get("kl_max"))),
        ("same top-1 ± s.e.", f"{fmt(d.get('top1_rate'), 4)} ± {fmt(d.get('top1_se'), 4)}"),
        ("Δp(ref token) mean / rms", f"{fmt(d.get('dp_mean'))} / {fmt(d.get('dp_rms'))}"),
        ("Δp p1 / p99 / |Δp| p99", " / ".join(fmt(d.get(k)) for k in ("dp_p01", "dp_p99", "dp_abs_p99"))),
        (f"top-{d.get('topk')} Jaccard / rank agreement", f"{fmt(d.get('jaccard_mean'), 4)} / {fmt(d.get('rank_agreement_mean'), 4)}"),
        ("log-ppl reference / target", f"{fmt(d.get('logppl_reference'))} / {fmt(d.get('logppl_target'))}"),
        ("ppl ratio target/reference", fmt(d.get("ppl_ratio"), 6)),
    ]
    if d.get("kl_nonfinite"):
        rows.append(("positions with infinite KL", str(d["kl_nonfinite"])))
    rows.append(("prompts whose argmax left the reference",
                 f"{summary.get('argmax_divergences')} ({summary.get('disagreements')} not near-ties)"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    buckets = Table(title="KL by the reference's top-1 probability", title_justify="left")
    for col in ("p(top-1)", "positions", "KL mean", "KL max", "same top-1"):
        buckets.add_column(col, justify="right")
    for b in d.get("kl_buckets", []):
        buckets.add_row(escape(str(b["range"])), str(b["count"]), fmt(b.get("kl_mean")), fmt(b.get("kl_max")),
                        fmt(b.get("top1_rate"), 3))
    console.print(buckets)
    render_worst(console, run, tokens)


def render_worst(console: Console, run: dict[str, Any], tokens: TokenText | None = None) -> None:
    worst = [(c, w) for c in run.get("comparisons") or [] for w in c.get("worst_positions") or []]
    worst.sort(key=lambda cw: -(cw[1]["kl"] if cw[1]["kl"] is not None and math.isfinite(cw[1]["kl"]) else math.inf))
    if not worst:
        return
    tokens = tokens or TokenText(str(run.get("model_path") or ""))
    table = Table(title="worst positions by KL", title_justify="left")
    for col in ("prompt", "pos", "KL", "p(top-1)", "context → reference | target", "reference top", "target top"):
        table.add_column(col, justify="right" if col in ("prompt", "pos", "KL", "p(top-1)") else "left")
    for c, w in worst[:5]:
        pos = w["position"]
        ref_ids = _reference_tokens(run, c["index"])
        context = tokens(ref_ids[max(0, pos - 8):pos])
        cell = f"…{_short(context, 40)} → {tokens([w['reference_token']])!r} | {tokens([w['target_argmax']])!r}"
        table.add_row(
            str(c["index"]), str(pos), fmt(w["kl"]), fmt(w["reference_top1_prob"], 3), escape(cell),
            escape(", ".join(f"{tokens([i])!r} {fmt(v, 2)}" for i, v in w["reference_topk"][:3])),
            escape(", ".join(f"{tokens([i])!r} {fmt(v, 2)}" for i, v in w["target_topk"][:3])),
        )
    console.print(table)


def _reference_tokens(run: dict[str, Any], index: int) -> list[int]:
    tokens = run.get("reference_tokens")
    return list(tokens[index]) if tokens and index < len(tokens) else []


def render_run(console: Console, run: dict[str, Any], display: DisplayOptions | None = None) -> None:
    """Every section of a run's report, from its saved form: the same for a live run and ``compare RUN``."""
    display = display or DisplayOptions()
    render_header(console, run)
    if display.inspect_logits:
        for c in run.get("comparisons") or []:
            render_prompt(console, c, display.snippet, display.snippet_elems)
    render_summary(console, run)
    render_distribution(console, run)
    render_yardstick(console, run)
    render_run_profile(console, run)
    console.print(f"run folder   {escape(str(run.get('run_dir')))}")


class ProgressView:
    """Shows worker progress: a live status line, and a permanent line per milestone."""

    MILESTONES = {"engine_ready", "cache_hit", "convert"}

    def __init__(self, console: Console):
        self.console = console
        self.status = console.status("starting", spinner="dots")
        self.t_start: dict[str, float] = {}

    def __enter__(self) -> ProgressView:
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


def render_cache_entries(console: Console, entries: list[dict[str, Any]]) -> None:
    """The `cache ls` table: one row per cached reference."""
    if not entries:
        console.print("no cached references")
        return
    table = Table(title=f"{len(entries)} cached reference(s)", title_justify="left")
    for name in ("key", "model", "engine", "platform", "dtype", "layers", "tokens", "logprobs", "store", "prompts",
                 "MiB"):
        table.add_column(name, justify="right" if name in ("layers", "tokens", "prompts", "MiB") else "left")
    for e in sorted(entries, key=lambda e: (str(e.get("fields", {}).get("model")), e["key"])):
        f = e.get("fields", {})
        prompts = f.get("prompts")
        table.add_row(
            e["key"][:12], str(f.get("model", "?")), f"{f.get('engine', '?')} {f.get('engine_version', '')}".strip(),
            str(f.get("platform", "?")), str(f.get("dtype", "?")), str(f.get("num_hidden_layers") or "all"),
            str(f.get("max_tokens", "?")), "full" if f.get("logprobs") == -1 else str(f.get("logprobs", "?")),
            str(f.get("store", "fp32")), str(len(prompts)) if isinstance(prompts, list) else "?",
            f"{e.get('bytes', 0) / 2**20:.1f}",
        )
    console.print(table)


def render_yardstick(console: Console, run: dict[str, Any]) -> None:
    """The target's headline metrics beside the yardstick's (honest at the target's precision), and the ratio."""
    yard = run.get("yardstick")
    if not isinstance(yard, dict):
        return
    side = yard.get("side") or {}
    title = (f"yardstick {side.get('engine', '?')} {side.get('dtype', '?')} on {side.get('device', '?')} "
             f"({side.get('source', '?')}): {yard.get('why', '')}")
    table = Table(title=escape(title), title_justify="left")
    for name in ("metric", "target", "yardstick", "ratio"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    ratios = ratio_table(run)
    for path, row in ratios["overall"].items():
        table.add_row(label(path), fmt(row["target"]), fmt(row["yardstick"]), fmt(row["ratio"], 3))
    for i, prompt in enumerate(ratios["prompts"]):
        row = prompt["distribution.kl_mean"]
        table.add_row(f"prompt {i} KL mean", fmt(row["target"]), fmt(row["yardstick"]), fmt(row["ratio"], 3))
    console.print(table)


def render_noise(console: Console, noise) -> None:
    """The run-to-run spread of the headline metrics (``--repeat``)."""
    if noise is None:
        return
    table = Table(title=f"noise floor ({escape(str(noise.mode))}, {noise.runs} runs)", title_justify="left")
    for name in ("metric", "values", "noise"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    shown = ("max_abs_diff", "mean_abs_diff", "min_pearson", "top1_match", "distribution.kl_mean",
             "distribution.kl_max", "distribution.top1_rate", "distribution.ppl_ratio")
    for path in shown:
        spread = noise.overall.get(path)
        if spread is None:
            continue
        values = ", ".join(fmt(v, 6) for v in spread.values[:6]) + (" …" if len(spread.values) > 6 else "")
        table.add_row(path.removeprefix("distribution."), values, fmt(spread.noise, 6))
    console.print(table)


def render_verdict(console: Console, verdict, files: dict[str, str] | None = None) -> None:
    """PASS/FAIL with every violated tolerance, then where the reports went."""
    checked = len(verdict.checked)
    if verdict.passed:
        console.print(Text(f"PARITY HOLDS: {checked} tolerance(s) checked, none violated", style="bold green"))
    else:
        console.print(Text(f"PARITY FAILS: {len(verdict.violations)} violation(s) of {checked} tolerance(s)",
                           style="bold red"))
        for v in verdict.violations:
            console.print(Text(f"  ✗ {v.message}  [{v.source}]", style="red"))
    for w in verdict.warnings:
        console.print(Text(f"  ! {w}", style="yellow"))
    for line in getattr(verdict, "findings", None) or []:
        console.print(Text(f"  · {line}"))
    for name, path in (files or {}).items():
        console.print(f"{name:<9} {path}", markup=False, highlight=False)
