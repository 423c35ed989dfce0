"""The self-contained HTML report of a run (``--html``), the plot files (``--plots``) and the trend page.

This module owns the page: verdict and tolerances, both sides and their
effective settings, the key metrics, every plot of ``plotdata.run_plots`` as
inline SVG (or the sentence saying why it is not drawn), and the top-K at the
worst positions with the text around them. It renders a run's saved form
(``RunResult.to_json()``), so ``compare RUN --html`` and a live run write the
same page. No script, stylesheet, font or image is fetched: the file opens
offline. It must not compute metrics or judge; matplotlib loads only through
``plots`` when a page or a file is written.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..compare.catalogue import OVERALL, key_metrics, metric_value
from ..core.jsonio import write_text_atomic
from .plotdata import Plot, layer_errors, run_plots, summary_value
from .trend import series as trend_series
from .trend import table_rows

CSS = """
:root { color-scheme: light dark; --bg: #ffffff; --fg: #1f2328; --muted: #656d76; --line: #d0d7de;
  --card: #f6f8fa; --pass: #1a7f37; --fail: #cf222e; --warn: #9a6700; --bar: #4c8bf5; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #0d1117; --fg: #e6edf3; --muted: #9198a1; --line: #30363d; --card: #161b22;
    --pass: #3fb950; --fail: #f85149; --warn: #d29922; --bar: #6ea2f7; } }
* { box-sizing: border-box; }
body { margin: 0 auto; padding: 1rem 1.25rem 3rem; max-width: 1100px; background: var(--bg); color: var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
h1 { font-size: 1.45rem; margin: .3rem 0; } h2 { font-size: 1.15rem; margin: 1.8rem 0 .5rem;
  border-bottom: 1px solid var(--line); padding-bottom: .2rem; } h3 { font-size: 1rem; margin: 1.2rem 0 .3rem; }
.verdict { font-weight: 700; font-size: 1.1rem; padding: .5rem .8rem; border-radius: 6px; border: 2px solid; }
.pass { color: var(--pass); } .fail { color: var(--fail); } .warn { color: var(--warn); }
.muted, figcaption, .missing { color: var(--muted); font-size: .9rem; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: .4rem 0; font-size: .9rem; }
th, td { border: 1px solid var(--line); padding: .25rem .5rem; text-align: right; vertical-align: top; }
th:first-child, td:first-child, td:has(.text) { text-align: left; }
thead th { background: var(--card); }
code, .tok { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .85rem; }
.tok { white-space: pre-wrap; word-break: break-all; background: var(--card); border-radius: 3px; padding: 0 .2rem; }
figure { margin: .6rem 0 1.4rem; } figure svg { width: 100%; height: auto; display: block; color: var(--fg); }
.bar { display: inline-block; height: .7rem; background: var(--bar); border-radius: 2px; vertical-align: middle; }
details { margin: .3rem 0; } summary { cursor: pointer; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.{digits - 1}e}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    """A table of already-escaped cells."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body)
            + f"\n<p class=\"muted\">vllm-rbln-exec {_e(__version__)} · written "
            f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}</p>\n</body></html>\n")


# -- one run ------------------------------------------------------------------------------------
def _verdict_section(run: dict[str, Any], verdict: dict[str, Any]) -> list[str]:
    checked = verdict.get("checked") or []
    if verdict.get("passed"):
        head = f'<p class="verdict pass">✔ Parity holds: {len(checked)} tolerance(s) checked, none violated</p>'
    else:
        n = len(verdict.get("violations") or [])
        head = f'<p class="verdict fail">✘ Parity fails: {n} violation(s) of {len(checked)} tolerance(s)</p>'
    out = [f"<h1>Parity of {_e(run.get('model'))} on {_e(run.get('target'))}</h1>", head]
    items = [f'<li class="fail">{_e(v.get("message"))} <span class="muted">[{_e(v.get("source"))}]</span></li>'
             for v in verdict.get("violations") or []]
    items += [f'<li class="warn">{_e(w)}</li>' for w in verdict.get("warnings") or []]
    items += [f"<li>{_e(n)}</li>" for n in [*(verdict.get("notes") or []), *(run.get("notes") or [])]]
    if items:
        out.append("<ul>" + "".join(items) + "</ul>")
    rows = [[f"<code>{_e(c.get('gate'))}</code>", _e(c.get("source")), _e(c.get("violations", 0))] for c in checked]
    rows += [[f"<code>{_e(s.get('gate'))}</code>", _e(s.get("reason")), "not checked"]
             for s in verdict.get("skipped") or []]
    out += ["<h2>Tolerances</h2>", _table(["tolerance", "from", "violations"], rows) if rows
            else '<p class="missing">no tolerance was checked</p>']
    return out


def _sides_section(run: dict[str, Any]) -> list[str]:
    sides = run.get("sides") or {}
    rows = []
    for name in ("reference", "target"):
        s = sides.get(name) or {}
        rows.append([name, _e(s.get("device", "?")), _e(s.get("platform", "?")),
                     _e(f"{s.get('engine', '?')} {s.get('engine_version', '')}".strip()), _e(s.get("dtype", "?")),
                     _e(s.get("source", "?")), f"{float(s.get('elapsed_s') or 0):.1f} s"])
    out = ["<h2>Sides</h2>", _table(["side", "device", "platform", "engine", "dtype", "source", "time"], rows)]
    diffs = (run.get("resolved") or {}).get("differences") or []
    if diffs:
        out.append(_table(["differs", "reference", "target"],
                          [[_e(w), f"<code>{_e(json.dumps(a, default=str))}</code>",
                            f"<code>{_e(json.dumps(b, default=str))}</code>"] for w, a, b in diffs]))
    for name in ("reference", "target"):
        s = sides.get(name) or {}
        settings = {"engine args (given)": s.get("engine_args") or {}, "in force (reported by the engine)":
                    {k: v for k, v in (s.get("effective") or {}).items() if k != "engine_args"}}
        text = json.dumps(settings, indent=1, sort_keys=True, default=str)
        out.append(f"<details><summary>{name}: effective settings</summary>"
                   f'<pre class="tok">{_e(text)}</pre></details>')
    settings = run.get("settings") or {}
    out.append(f'<p class="muted">align {_e(settings.get("align", "?"))} · max tokens '
               f'{_e(settings.get("max_tokens", "?"))} · store {_e(settings.get("store", "?"))} · top-K '
               f'{_e(settings.get("topk", "?"))} · layers {_e(settings.get("num_hidden_layers") or "all")}</p>')
    return out


def _summary_section(run: dict[str, Any], verdict: dict[str, Any], noise: Any) -> list[str]:
    from .plotdata import noise_value, yardstick_distribution

    summary = run.get("summary") or {}
    failed = {v.get("path") for v in verdict.get("violations") or [] if v.get("scope") == OVERALL}
    yard = {"summary": {"distribution": yardstick_distribution(run)}} if run.get("yardstick") else None
    head = ["metric", "value", "noise floor"] + (["yardstick"] if yard else [])
    rows = []
    for label, path in key_metrics(OVERALL):
        mark = ' <span class="fail">✘</span>' if path in failed else ""
        row = [_e(label), _num(summary_value(summary, path)) + mark, _num(noise_value(noise, path))]
        rows.append(row + ([_num(metric_value(yard["summary"], path))] if yard else []))
    out = ["<h2>Summary</h2>", _table(head, rows)]
    prompt_rows = []
    for i, c in enumerate(run.get("comparisons") or []):
        d, div = c.get("distribution") or {}, c.get("argmax_divergence")
        prompt_rows.append([_e(c.get("index", i)), f'<span class="text">{_e(_cut(c.get("prompt", ""), 60))}</span>',
                            _e(c.get("positions_compared")), _num(d.get("kl_mean")), _num(d.get("kl_max")),
                            _num(d.get("top1_rate")), _num(c.get("max_abs_diff")),
                            _e(f"{div.get('kind')} @ {div.get('position')}") if div else "–"])
    out.append(_table(["#", "prompt", "positions", "KL mean", "KL max", "same top-1", "max |Δ|", "argmax leaves"],
                      prompt_rows))
    return out


def _cut(text: Any, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _plot_section(plot: Plot) -> str:
    from .plots import draw, svg_text

    notes = "".join(f"<br>{_e(n)}" for n in plot.notes)
    if plot.data is None:
        return (f'<figure id="{plot.name}" class="no-plot"><h3>{_e(plot.title)}</h3>'
                f'<p class="missing">Not drawn: {_e(plot.missing)}{notes}</p></figure>')
    svg = svg_text(draw(plot, "inline"), plot.name)
    return (f'<figure id="{plot.name}" class="plot"><h3>{_e(plot.title)}</h3>{svg}'
            f"<figcaption>{notes.removeprefix('<br>')}</figcaption></figure>")


def _worst_section(run: dict[str, Any]) -> list[str]:
    from .terminal import TokenText

    worst = [(c, w) for c in run.get("comparisons") or [] for w in c.get("worst_positions") or []]
    worst.sort(key=lambda cw: -(cw[1].get("kl") if cw[1].get("kl") is not None else float("inf")))
    if not worst:
        return ["<h2>Worst positions</h2>", '<p class="missing">the report lists no worst positions</p>']
    tokens = TokenText(str(run.get("model_path") or ""))
    out = ["<h2>Top-K at the worst positions</h2>"]
    if tokens.tokenizer is None:
        out.append('<p class="muted">the model\'s tokenizer is not on this machine: tokens are shown as ids</p>')
    all_tokens = run.get("reference_tokens") or []
    for c, w in worst[:5]:
        pos, index = w.get("position", 0), c.get("index", 0)
        ids = list(all_tokens[index]) if index < len(all_tokens) else []
        context = tokens(ids[max(0, pos - 12):pos]) if ids else ""
        out.append(f"<h3>prompt {_e(index)}, position {_e(pos)}: KL {_num(w.get('kl'))}, reference p(top-1) "
                   f"{_num(w.get('reference_top1_prob'), 3)}</h3>"
                   f'<p>…<span class="tok">{_e(context)}</span> → reference <span class="tok">'
                   f"{_e(tokens([w.get('reference_token', 0)]))}</span> | target argmax <span class=\"tok\">"
                   f"{_e(tokens([w.get('target_argmax', 0)]))}</span></p>")
        rows = []
        for rank, (r, t) in enumerate(zip(w.get("reference_topk") or [], w.get("target_topk") or []), 1):
            rows.append([str(rank), _token_cell(tokens, r), _token_cell(tokens, t)])
        out.append(_table(["rank", "reference: token, p", "target: token, p"], rows))
    return out


def _token_cell(tokens, pair: list) -> str:
    import math

    token_id, logprob = pair[0], pair[1]
    p = math.exp(logprob) if isinstance(logprob, (int, float)) else 0.0
    return (f'<span class="tok">{_e(tokens([token_id]))}</span> {p:.3f} '
            f'<span class="bar" style="width:{max(1, round(80 * p))}px"></span>')


def run_page(run: dict[str, Any], verdict: dict[str, Any], noise: Any = None) -> str:
    """The whole page of one run, from its saved form, its verdict (JSON form) and its noise floor."""
    body = [*_verdict_section(run, verdict), *_sides_section(run), *_summary_section(run, verdict, noise),
            "<h2>Plots</h2>"]
    body += [_plot_section(plot) for plot in run_plots(run, noise)]
    body += _worst_section(run)
    body.append(f'<p class="muted">run folder <code>{_e(run.get("run_dir"))}</code></p>')
    return _page(f"parity: {run.get('model')} on {run.get('target')}", body)


def write_html(path: str | Path, run: dict[str, Any], verdict: Any, noise: Any = None) -> Path:
    verdict_json = verdict.to_json() if hasattr(verdict, "to_json") else dict(verdict or {})
    return write_text_atomic(Path(path), run_page(run, verdict_json, noise))


def write_plots(folder: str | Path, run: dict[str, Any], noise: Any = None) -> list[Path]:
    """Every drawable plot of a run as PNG and SVG files (white background); a README.txt says what is missing."""
    from .plots import draw, write_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written, missing = [], []
    for plot in run_plots(run, noise):
        if plot.data is None:
            missing.append(f"{plot.name}: not drawn: {plot.missing}")
            continue
        written += write_files(draw(plot, "file"), folder, plot.name)
        missing += [f"{plot.name}: {n}" for n in plot.notes]
    if missing:
        written.append(write_text_atomic(folder / "README.txt", "\n".join(missing) + "\n"))
    return written


def write_layer_plot(localization: dict[str, Any], path: Path) -> Path | None:
    """The error-by-layer plot of a localisation as one PNG (what ``localize`` leaves beside the run);
    None when the report lists no layers."""
    from .plots import draw, write_files

    plot = layer_errors({"localization": localization})
    if plot.data is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_files(draw(plot, "file"), path.parent, path.stem, formats=("png",))[0]


# -- several runs -------------------------------------------------------------------------------
def trend_page(names: list[str], runs: list[dict[str, Any]], verdicts: list[dict[str, Any]],
               notes: list[str] | None = None) -> str:
    from .plots import svg_text, trend_figure

    rows = table_rows(names, runs, verdicts)
    body = [f"<h1>Parity of {_e(runs[0].get('model'))}: {len(runs)} runs, oldest first</h1>"]
    body += [f'<p class="warn">{_e(n)}</p>' for n in notes or []]
    cells = [[_e(c) if j else f"<b>{_e(c)}</b>" for j, c in enumerate(row)] for row in rows[1:]]
    for row in cells:
        if row[0] == "<b>verdict</b>":
            row[1:] = [f'<span class="{c.lower()}">{c}</span>' for c in row[1:]]
    body += [_table(["metric", *[_e(n) for n in names]], cells), "<h2>Trend</h2>",
             f'<figure id="trend" class="plot">{svg_text(trend_figure(trend_series(runs), names), "trend")}'
             "<figcaption>one panel per key metric; the runs in the order given</figcaption></figure>"]
    return _page(f"parity trend: {runs[0].get('model')}", body)


def write_trend(path: str | Path, names: list[str], runs: list[dict[str, Any]], verdicts: list[dict[str, Any]],
                notes: list[str] | None = None) -> Path:
    return write_text_atomic(Path(path), trend_page(names, runs, verdicts, notes))


def write_trend_plots(folder: str | Path, names: list[str], runs: list[dict[str, Any]]) -> list[Path]:
    from .plots import trend_figure, write_files

    Path(folder).mkdir(parents=True, exist_ok=True)
    return write_files(trend_figure(trend_series(runs), names, "file"), Path(folder), "trend")
