"""The outputs of a ``corpus`` run: the terminal table, a Markdown table, the HTML page and the charts' values.

Everything is made from the run's saved form (``pipeline.corpus``'s ``corpus.json``): one row per side
(reference, yardstick, targets), with its size (bits per weight of the decoder's linear layers and of the
whole model, MiB of weights as its engine holds them), perplexity and its ratio to the reference's, KL mean
± standard error, median and p99, same top-1 and Δp RMS; and two charts (``plots`` draws them): KL and
perplexity against bits per weight, and against memory, one point per side, the reference and the
yardstick marked. It must not compute metrics, run anything or import matplotlib (``plots`` does).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..core.jsonio import write_text_atomic
from .html import _e, _num, _page, _plot_section, _table
from .plotdata import Plot

HEAD = ("side", "what", "bpw linear", "bpw all", "MiB", "perplexity",
        "PPL ratio", "KL mean", "± s.e.", "KL median", "KL p99", "same top-1", "Δp RMS")
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def describe(side: dict[str, Any]) -> str:
    """What a side is: engine and device, then its quantization (weights, activations), else its dtype."""
    dtype = SHORT_DTYPES.get(str(side.get("dtype")), str(side.get("dtype")))
    q = side.get("quantization")
    what = f"W {q.get('weights')}, A {q.get('activations') or dtype}" if isinstance(q, dict) else dtype
    return f"{side.get('engine')}/{side.get('device')}: {what}"


def _f(value: Any, spec: str) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return "–"
    return format(value, spec)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """The corpus table as text cells, one row per side in run order (reference first)."""
    rows = []
    for side in result.get("sides") or []:
        s, size = side.get("summary") or {}, side.get("size") or {}
        if side.get("role") == "reference":
            tail = [_f(_reference_ppl(result), ".4g"), "1", "0", "–", "–", "–", "–", "–"]
        else:
            tail = [_f(s.get("ppl"), ".4g"), _f(s.get("ppl_ratio"), ".4f"), _f(s.get("kl_mean"), ".3e"),
                    _f(s.get("kl_sem"), ".1e"), _f(s.get("kl_median"), ".2e"), _f(s.get("kl_p99"), ".2e"),
                    _f(s.get("top1_rate"), ".4f"), _f(s.get("dp_rms"), ".2e")]
        rows.append([side["label"], describe(side), _f(size.get("linear_bits_per_weight"), ".3g"),
                     _f(size.get("bits_per_weight"), ".3g"), _f((size.get("bytes") or 0) / 2**20, ".1f"), *tail])
    for side in result.get("skipped") or []:  # not run here: why is in the notes and corpus.json
        rows.append([side["label"], describe(side), "–", "–", "–", "skipped", *["–"] * (len(HEAD) - 6)])
    return rows


def _reference_ppl(result: dict[str, Any]) -> float | None:
    for side in result.get("sides") or []:
        value = (side.get("summary") or {}).get("ppl_reference")
        if isinstance(value, (int, float)):
            return float(value)
    return None


def heading(result: dict[str, Any]) -> str:
    c = result.get("corpus") or {}
    return (f"{result.get('model')} over the {c.get('source')} corpus: {c.get('windows')} windows of "
            f"{c.get('window')} tokens, stride {c.get('stride')}, {c.get('scored_tokens')} tokens scored "
            f"({c.get('scored_per_window')} per window)")


def render_corpus(console: Console, result: dict[str, Any]) -> None:
    table = Table(title=escape(heading(result)), title_justify="left")
    for name in HEAD:
        table.add_column(name, justify="left" if name in HEAD[:2] else "right")
    for row in table_rows(result):
        table.add_row(*[escape(c) for c in row])
    console.print(table)
    yard = result.get("yardstick") or {}
    console.print(f"yardstick: {escape(str(yard.get('why')))}", highlight=False)
    for note in result.get("notes") or []:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print(f"run folder {escape(str(result.get('run_dir')))} ({result.get('elapsed_s')} s)", highlight=False)


def markdown_table(result: dict[str, Any]) -> str:
    lines = [f"| {' | '.join(HEAD)} |", "|" + "---|" * len(HEAD)]
    lines += [f"| {' | '.join(c.replace('|', '/') for c in row)} |" for row in table_rows(result)]
    return "\n".join(lines) + "\n"


# -- the charts' values -------------------------------------------------------------------------
def corpus_plots(result: dict[str, Any]) -> list[Plot]:
    """KL and perplexity against bits per weight, and against memory (one point per side)."""
    points = []
    for side in result.get("sides") or []:
        s, size = side.get("summary") or {}, side.get("size") or {}
        ref = side.get("role") == "reference"
        points.append({"label": side["label"], "role": side.get("role"), "what": describe(side),
                       "bpw": size.get("linear_bits_per_weight"), "mib": (size.get("bytes") or 0) / 2**20,
                       "kl_mean": None if ref else s.get("kl_mean"), "kl_sem": None if ref else s.get("kl_sem"),
                       "ppl": _reference_ppl(result) if ref else s.get("ppl")})
    out = []
    for name, x, title in (("corpus-bits", "bpw", "KL and perplexity against bits per weight"),
                           ("corpus-memory", "mib", "KL and perplexity against the weights' memory")):
        usable = [p for p in points if isinstance(p[x], (int, float))]
        plot = Plot(name, title)
        if len(usable) < 2:
            plot.missing = "fewer than two sides with a known size"
        else:
            plot.data = {"points": usable, "x": x, "heading": heading(result),
                         "xlabel": ("bits per weight of the decoder's linear layers" if x == "bpw"
                                    else "weights in memory (MiB, at the dtype each side runs in)")}
            plot.notes = ["the reference is the dotted vertical line (KL 0 cannot sit on a log axis); the "
                          "yardstick, honest arithmetic at the targets' precision, the dashed line"]
        out.append(plot)
    return out


def corpus_page(result: dict[str, Any]) -> str:
    body = [f"<h1>What a format costs: {_e(result.get('model'))}</h1>", f"<p>{_e(heading(result))}</p>",
            _table([_e(h) for h in HEAD], [[_e(c) for c in row] for row in table_rows(result)]),
            f"<p class=\"muted\">yardstick: {_e((result.get('yardstick') or {}).get('why'))}</p>"]
    body += [f'<p class="warn">{_e(n)}</p>' for n in result.get("notes") or []]
    body += [_plot_section(plot) for plot in corpus_plots(result)]
    rows = [[_e(s["label"]), _e(s.get("checkpoint")), _e(s.get("engine_version")), _e(s.get("source")),
             _num(s.get("elapsed_s"), 1), _e((s.get("effective") or {}).get("attention_backend"))]
            for s in result.get("sides") or []]
    body += ["<h2>Sides</h2>", _table(["side", "checkpoint", "engine version", "rows from", "seconds",
                                       "attention backend"], rows),
             f'<p class="muted">run folder <code>{_e(result.get("run_dir"))}</code></p>']
    return _page(f"corpus: {result.get('model')}", body)


def write_corpus_html(path: str | Path, result: dict[str, Any]) -> Path:
    return write_text_atomic(Path(path), corpus_page(result))


def write_corpus_plots(folder: str | Path, result: dict[str, Any]) -> list[Path]:
    from .plots import draw, write_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for plot in corpus_plots(result):
        if plot.data is not None:
            written += write_files(draw(plot, "file"), folder, plot.name)
    return written
