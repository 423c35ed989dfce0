"""The commands over saved runs: ``compare`` (re-judge one run, or a trend of several) and ``localize``.

No model runs here except ``localize``'s hidden-state capture, which the pipeline starts in workers.
"""

from __future__ import annotations

import typer
from rich.errors import MarkupError  # a few classes: the console itself loads inside the commands

from ..core.errors import HarnessError, UsageError
from .common import render_localization_of, report_error


def compare_cmd(
    saved: list[str] = typer.Argument(..., metavar="RUN_DIR_OR_JSON...", help="A run folder, its parity.json/report.json, or a --json report; several (oldest first): a trend."),
    fail_on: list[str] = typer.Option([], "--fail-on", help="Tolerance, as for a run. Repeatable."),
    spec: str | None = typer.Option(None, "--spec", help="TOML parity spec."),
    no_default_gates: bool = typer.Option(False, "--no-default-gates"),
    near_ties_fail: bool | None = typer.Option(None, "--near-ties-fail/--near-ties-pass"),
    json_out: str | None = typer.Option(None, "--json", help="One run only."),
    junit_out: str | None = typer.Option(None, "--junit", help="One run only."),
    markdown_out: str | None = typer.Option(None, "--markdown", help="One run only."),
    html_out: str | None = typer.Option(None, "--html", help="Write the run's HTML report with plots; of several runs, the table and the trend plot."),
    plots_dir: str | None = typer.Option(None, "--plots", help="Write the plots (several runs: the trend plot) as PNG and SVG files into DIR."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Put runs of different models, layer cuts or prompts side by side anyway."),
    inspect_logits: bool = typer.Option(True, "--inspect-logits/--no-inspect-logits", help="Per-prompt details, as in the run."),
    no_snippet: bool = typer.Option(False, "--no-snippet", help="Hide the head…tail snippet of the logprob vectors."),
    no_color: bool = typer.Option(False, "--no-color"),
) -> None:
    """Re-render and re-judge a saved run with other tolerances (no model runs); of several runs, a trend.

    Several runs (oldest first) print their key metrics side by side; --html and --plots draw them in order.
    Runs of different models, layer cuts or prompts are refused unless --allow-mismatch.

    Exit codes: 0 parity holds (of several runs: the last one's), 1 parity fails, 2 bad usage."""
    from ..outputs.terminal import make_console, render_noise, render_run, render_verdict
    from ..pipeline.check import rejudge, saved_report_files, write_reports
    from ..setup.checks import check_outputs
    from ..setup.options import DisplayOptions, GateOptions

    gates = GateOptions(fail_on=tuple(fail_on), spec=spec, use_defaults=not no_default_gates,
                        near_ties_fail=near_ties_fail)
    try:  # before any report is read: a bad output path costs nothing, and never the saved run itself
        check_outputs({"--json": json_out, "--junit": junit_out, "--markdown": markdown_out, "--html": html_out},
                      {"--plots": plots_dir}, {**saved_report_files(saved), "the --spec file": spec})
    except HarnessError as exc:
        raise typer.Exit(report_error(exc, no_color))
    if len(saved) > 1:
        raise typer.Exit(compare_trend(saved, gates, json_out or junit_out or markdown_out, html_out, plots_dir,
                                       allow_mismatch, no_color))
    try:
        outcome = rejudge(saved[0], gates)
        write_reports(outcome, json_out, junit_out, markdown_out, html_out=html_out, plots_dir=plots_dir)
        console = make_console(no_color=no_color)
        render_run(console, outcome.run, DisplayOptions(no_color=no_color, inspect_logits=inspect_logits,
                                                        snippet=not no_snippet))
        render_noise(console, outcome.noise)
        render_verdict(console, outcome.verdict, outcome.files)
        render_localization_of(console, outcome.run)
    except HarnessError as exc:
        raise typer.Exit(report_error(exc, no_color))
    except DAMAGED as exc:
        raise typer.Exit(report_error(damaged(saved[0], exc), no_color))
    raise typer.Exit(outcome.exit_code)


# outputs.saved checks every field the verdict and the reports are known to read; a field beyond those that a
# hand-edited report broke is still the input's fault: one sentence and exit 2, never a traceback
DAMAGED = (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError, MarkupError)


def damaged(name: str, exc: Exception) -> UsageError:
    return UsageError(f"{name} holds a value this harness cannot show ({type(exc).__name__}: {exc}); "
                      "is it a damaged report?")


def compare_trend(saved: list[str], gates, one_run_file: str | None, html_out: str | None, plots_dir: str | None,
                  allow_mismatch: bool, no_color: bool) -> int:
    """``compare`` of several runs: the side-by-side table, and the trend drawn when asked; the exit code."""
    from rich.markup import escape

    from ..outputs.terminal import make_console
    from ..outputs.trend import render_trend
    from ..pipeline.trend import load_trend

    try:
        if one_run_file:
            raise UsageError("--json, --junit and --markdown describe one run; give one run folder or report")
        trend = load_trend(saved, gates, allow_mismatch)
        files = {}
        if html_out or plots_dir:
            from ..outputs.html import write_trend, write_trend_plots

            if html_out:
                files["html"] = str(write_trend(html_out, trend.names, trend.runs, trend.verdicts, trend.notes))
            if plots_dir:
                files["plots"] = ", ".join(str(p) for p in write_trend_plots(plots_dir, trend.names, trend.runs))
    except HarnessError as exc:
        return report_error(exc, no_color)
    except OSError as exc:
        return report_error(UsageError(f"cannot write the trend: {exc}"), no_color)
    except DAMAGED as exc:
        return report_error(damaged(", ".join(saved), exc), no_color)
    console = make_console(no_color=no_color)
    for note in trend.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    try:
        render_trend(console, trend.names, trend.runs, trend.verdicts)
    except DAMAGED as exc:
        return report_error(damaged(", ".join(saved), exc), no_color)
    for name, path in files.items():
        console.print(f"{name:<9} {path}", markup=False, highlight=False)
    return trend.exit_code


def localize_cmd(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="A run folder (with its parity.json)."),
    modules: bool = typer.Option(False, "--modules", help="Also the attention and MLP outputs inside each layer."),
    yardstick: bool = typer.Option(True, "--yardstick/--no-yardstick", help="With a half-precision target and a float32 reference, rerun the reference at the target's precision as the honest error to compare with (default: on)."),
    prompts: int = typer.Option(2, "--max-prompts", help="Failing prompts to localise, at most."),
    positions: int = typer.Option(2, "--max-decode-positions", help="Failing decode positions per prompt, besides position 0 (the prefill)."),
    cache_dir: str = typer.Option("cache", "--cache-dir", help="Folder for the workers' compile caches."),
    no_color: bool = typer.Option(False, "--no-color"),
) -> None:
    """Localise a saved run's failure to the first layer whose output departs (reruns only the hidden-state capture).

    Writes `localization` into RUN_DIR/parity.json and RUN_DIR/localize/error_by_layer.png.
    Exit codes: 0 no layer departs, 1 a layer departs (created or drifting), 2 bad usage, 3 a worker failed."""
    from ..outputs.localize_view import render_localization
    from ..outputs.terminal import ProgressView, make_console
    from ..pipeline.localize import localize_folder

    console = make_console(no_color=no_color)
    try:
        if prompts < 1 or positions < 0:
            raise UsageError("--max-prompts must be at least 1 and --max-decode-positions at least 0")
        with ProgressView(make_console(no_color=no_color, stderr=True)) as view:
            report = localize_folder(run_dir, modules=modules, use_yardstick=yardstick, max_prompts=prompts,
                                     max_decode=positions, cache_dir=cache_dir, progress=view)
    except HarnessError as exc:
        raise typer.Exit(report_error(exc, no_color))
    render_localization(console, report)
    raise typer.Exit(0 if report["verdict"] == "none" else 1)
