"""The command line: parse options into frozen records (``setup.options``) and make one library call.

Thin on purpose: no engine, metric or rendering logic lives here, and nothing
heavy is imported (torch and vLLM load only in worker processes). Errors
become a message and an exit code, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .core.errors import HarnessError, UsageError, WorkerError

EXIT_CODES_HELP = """Exit codes: 0 the run finished (parity holds), 1 parity fails, 2 bad usage,
3 the harness could not run (worker crash or timeout, missing model); 130 / 143 stopped by
Ctrl-C / SIGTERM, with every worker ended."""

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Compare next-token logprobs of a target device against a CPU reference.\n\n" + EXIT_CODES_HELP,
)


def _explicit(ctx: typer.Context) -> list[str]:
    """Names of the options the user gave on the command line (not defaults)."""
    # compared by name: typer may bring its own copy of click's ParameterSource
    return [name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")]


def report_error(exc: HarnessError, no_color: bool = False) -> int:
    from .outputs.terminal import make_console

    console = make_console(no_color=no_color, stderr=True)
    label = "usage error" if isinstance(exc, UsageError) else "error"
    console.print(f"[bold red]{label}:[/] {exc.message}", highlight=False, markup=True)
    if isinstance(exc, WorkerError):
        if exc.detail:
            console.rule(f"last lines of the {exc.side} worker's log")
            console.print(exc.detail, markup=False, highlight=False)
        if exc.log_path:
            console.print(f"full log: {exc.log_path}", markup=False)
    elif exc.detail:
        console.print(exc.detail, markup=False)
    return exc.exit_code


@app.callback(invoke_without_command=True)
def run(
    ctx: typer.Context,
    model: str = typer.Option("smollm2-135m", "--model", help="Alias (see `models`), hub id with local weights, or a model folder."),
    target: str = typer.Option("auto", "--target", help="auto|cpu|rbln|cuda|NAME (see `devices`)."),
    max_model_len: int = typer.Option(2048, "--max-model-len"),
    num_hidden_layers: int | None = typer.Option(None, "--num-hidden-layers", help="Keep only the first N decoder layers, on both sides."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    tp: int = typer.Option(1, "--tp", help="Tensor parallel size (target)."),
    pp: int = typer.Option(1, "--pp", help="Pipeline parallel size (target)."),
    dp: int = typer.Option(1, "--dp", help="Data parallel size (target)."),
    ep: bool = typer.Option(False, "--ep", help="Expert parallelism (target)."),
    batch: int = typer.Option(4, "--batch", help="Prompts run through an engine at once."),
    max_tokens: int = typer.Option(32, "--max-tokens", help="Greedy tokens generated per prompt (EOS ignored)."),
    max_batched: int | None = typer.Option(None, "--max-batched", help="max_num_batched_tokens of the engines."),
    prompts: list[str] = typer.Option([], "--prompts", help="A prompt; repeatable. @FILE (or a .txt/.json/.jsonl path) reads prompts from a file."),
    num_prompts: int = typer.Option(4, "--num-prompts", help="How many built-in prompts to use when none are given."),
    logprobs: int = typer.Option(-1, "--logprobs", help="-1: the full vocabulary; N: the top N."),
    max_logprobs_cap: int | None = typer.Option(None, "--max-logprobs-cap", help="max_logprobs passed to vLLM (default: what --logprobs needs)."),
    inspect_logits: bool = typer.Option(True, "--inspect-logits/--no-inspect-logits", help="Per-prompt details (snippets, top-K table)."),
    topk: int = typer.Option(5, "--topk", help="K of the top-K agreement and table."),
    block_size_cpu: int = typer.Option(128, "--block-size-cpu"),
    block_size_rbln: int = typer.Option(8192, "--block-size-rbln"),
    block: int | None = typer.Option(None, "--block", help="Block size of the target (overrides its device default)."),
    no_color: bool = typer.Option(False, "--no-color"),
    no_snippet: bool = typer.Option(False, "--no-snippet", help="Hide the head…tail snippet of the logprob vectors."),
    snippet_elems: int = typer.Option(5, "--snippet-elems", help="Elements shown at each end of a snippet."),
    use_cache: bool = typer.Option(False, "--use-cache", help="Read/write the reference capture in cache/."),
    require_cache: bool = typer.Option(False, "--require-cache", help="Fail with exit 3 instead of computing a reference that is not cached (CI)."),
    profile: bool = typer.Option(False, "--profile", help="Profile the measured generation of both sides with the torch profiler (traces in --profile-dir)."),
    profile_side: str | None = typer.Option(None, "--profile-side", help="reference|target: profile that side only."),
    profile_memory: bool = typer.Option(False, "--profile-memory", help="Record tensor allocations in the traces."),
    profile_shapes: bool = typer.Option(False, "--profile-shapes", help="Record input shapes in the traces."),
    profile_stack: bool = typer.Option(False, "--profile-stack", help="Record Python stacks in the traces."),
    profile_dir: str = typer.Option("profile", "--profile-dir", help="Traces go to DIR/<side>_<model>_<time>/."),
    eps: float = typer.Option(0.5, "--eps", help="|Δ| at or above which an entry is an outlier (nats)."),
    devices_file: str | None = typer.Option(None, "--devices", help="TOML file adding or overriding device profiles."),
    cache_dir: str = typer.Option("cache", "--cache-dir", help="Folder for converted models and the reference cache."),
    run_dir: str | None = typer.Option(None, "--run-dir", help="Folder for this run's captures and logs (default: runs/<time>-<model>)."),
    timeout: float = typer.Option(1800.0, "--timeout", help="Seconds a worker may take before it is stopped."),
    kv_cache_gib: int | None = typer.Option(None, "--kv-cache-gib", help="KV cache of CPU workers in whole GiB (VLLM_CPU_KVCACHE_SPACE)."),
    align: str = typer.Option("forced", "--align", help="forced: the target is fed the reference's tokens, so every position compares; free: each side follows its own argmax."),
    tie_margin: float = typer.Option(0.5, "--tie-margin", help="A divergence where the reference's top-2 margin is below this (nats) is a near-tie."),
    capture: str = typer.Option("fast", "--capture", help="fast: logits processor writes rows in place; api: vLLM's logprobs output."),
    store: str = typer.Option("q16", "--store", help="q16: 2 bytes per logprob (error <= 2.5e-4 nats within 32 nats of the top); fp32: lossless."),
    reference_engine: str = typer.Option("vllm", "--reference-engine", help="vllm|transformers"),
    target_engine: str = typer.Option("vllm", "--target-engine", help="vllm|transformers"),
    reference_dtype: str | None = typer.Option(None, "--reference-dtype", help="auto|float32|bfloat16|float16 (default: the profile's)."),
    target_dtype: str | None = typer.Option(None, "--target-dtype", help="auto|float32|bfloat16|float16 (default: the profile's)."),
    reference_device: str | None = typer.Option(None, "--reference-device", help="Device profile of the reference (default cpu), e.g. cuda or cuda:1 (a torch device index for the transformers engine)."),
    target_device: str | None = typer.Option(None, "--target-device", help="torch device of a transformers target (default: the profile's)."),
    reference_args: str | None = typer.Option(None, "--reference-args", help="Engine arguments of the reference as a JSON object (or @FILE): vLLM EngineArgs fields, or transformers from_pretrained keywords. Recorded in the report and the cache key."),
    target_args: str | None = typer.Option(None, "--target-args", help="Engine arguments of the target as a JSON object (or @FILE), e.g. '{\"enable_prefix_caching\": true}'."),
    target_model: str | None = typer.Option(None, "--target-model", help="Run the target on another checkpoint of the same model (quantized, converted)."),
    reference_file: str | None = typer.Option(None, "--reference", help="Compare against a saved reference file instead of running a reference worker."),
    save_reference: str | None = typer.Option(None, "--save-reference", help="Write the reference capture to FILE (portable)."),
    fail_on: list[str] = typer.Option([], "--fail-on", help="Tolerance: fail when it holds, e.g. 'kl_mean>1e-3', 'top1<0.99', 'prompt:kl_max>0.1', 'kl_mean>3*noise'. Repeatable."),
    spec: str | None = typer.Option(None, "--spec", help="TOML parity spec (tolerances per model and dtype pair); default: [tool.vllm-rbln-exec] of ./pyproject.toml."),
    no_default_gates: bool = typer.Option(False, "--no-default-gates", help="Drop the built-in tolerances of the dtype pair."),
    near_ties_fail: bool | None = typer.Option(None, "--near-ties-fail/--near-ties-pass", help="Whether an argmax disagreement at a near-tie fails the run (default: it does not)."),
    yardstick: str = typer.Option("auto", "--yardstick", help="A third side, honest at the target's precision, that the target's error is judged against (KL, p99, Δp RMS and argmax flips: target, yardstick, ratio): auto (one when the target's dtype is coarser than the reference's; costs one more engine start, cached with --use-cache), none, or ENGINE[:DTYPE] / DTYPE, e.g. vllm:bfloat16, transformers. Runs where the reference runs, on the reference's tokens. Tolerances may say K*yardstick."),
    repeat: int = typer.Option(1, "--repeat", help="Run the target N times (and an uncached reference twice) to measure the noise floor."),
    json_out: str | None = typer.Option(None, "--json", help="Write every metric, the verdict and the run's metadata as JSON."),
    junit_out: str | None = typer.Option(None, "--junit", help="Write a JUnit XML report (one test case per prompt)."),
    markdown_out: str | None = typer.Option(None, "--markdown", help="Write a Markdown summary for a pull request."),
    html_out: str | None = typer.Option(None, "--html", help="Write a self-contained HTML report with plots (opens offline in any browser)."),
    plots_dir: str | None = typer.Option(None, "--plots", help="Write the report's plots as PNG and SVG files into DIR."),
    localize: bool = typer.Option(False, "--localize", help="After the run, localise the failing positions (the worst ones when none failed) to the first layer whose output departs: hidden states of every side at those positions, judged layer by layer (docs/localize.md). Adds `localization` to parity.json and a plot."),
    ab: str | None = typer.Option(None, "--ab", help="A/B preset: both sides on the target's device, differing in one feature, with its prompts and tolerances (each overridable): prefix-caching, chunked-prefill, batch-invariance, eager, spec-decode, kv-cache-dtype, tp (docs/ab.md)."),
    localize_modules: bool = typer.Option(False, "--localize-modules", help="--localize, and also the attention and MLP outputs inside each layer."),
) -> None:
    """Run the parity check (the default command)."""
    if ctx.invoked_subcommand is not None:
        # Options of the run placed before a subcommand would be parsed and then
        # silently dropped: `--fail-on X compare RUN` must not pass unjudged.
        misplaced = [name for name in _explicit(ctx) if name != "no_color"]
        if misplaced:
            flags = {param.name: param.opts[0] for param in ctx.command.params if param.opts}
            names = ", ".join(flags.get(name, name) for name in misplaced)
            raise typer.Exit(report_error(UsageError(
                f"{names} belong(s) to the parity run and would be ignored before "
                f"'{ctx.invoked_subcommand}'; give the subcommand's own options after its name"), no_color))
        return
    from .setup.options import build_options

    flat = {name: value for name, value in ctx.params.items()}
    try:
        options = build_options(explicit=frozenset(_explicit(ctx)), **flat)
    except HarnessError as exc:
        raise typer.Exit(report_error(exc, no_color))
    raise typer.Exit(execute(options))


def execute(options) -> int:
    """Run, judge and print; the exit code of the run."""
    from .outputs.terminal import ProgressView, make_console, render_noise, render_run, render_verdict
    from .pipeline.check import check_parity

    no_color = options.display.no_color
    console = make_console(no_color=no_color)
    err_console = make_console(no_color=no_color, stderr=True)
    try:
        with ProgressView(err_console) as view:
            outcome = check_parity(options, view)
    except HarnessError as exc:
        return report_error(exc, no_color)
    except KeyboardInterrupt as exc:
        from .worker.spawn import Terminated

        err_console.print("[bold red]interrupted:[/] workers were stopped")
        return 143 if isinstance(exc, Terminated) else 130
    render_run(console, outcome.run, options.display)
    render_noise(console, outcome.noise)
    render_verdict(console, outcome.verdict, outcome.files)
    _render_localization(console, outcome.run)
    return outcome.exit_code


def _render_localization(console, run: dict) -> None:
    if isinstance(run.get("localization"), dict):
        from .outputs.localize_view import render_localization

        render_localization(console, run["localization"])


@app.command("compare")
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
    from .outputs.terminal import make_console, render_noise, render_run, render_verdict
    from .pipeline.check import rejudge, write_reports
    from .setup.options import DisplayOptions, GateOptions

    gates = GateOptions(fail_on=tuple(fail_on), spec=spec, use_defaults=not no_default_gates,
                        near_ties_fail=near_ties_fail)
    if len(saved) > 1:
        raise typer.Exit(compare_trend(saved, gates, json_out or junit_out or markdown_out, html_out, plots_dir,
                                       allow_mismatch, no_color))
    try:
        outcome = rejudge(saved[0], gates)
        write_reports(outcome, json_out, junit_out, markdown_out, html_out=html_out, plots_dir=plots_dir)
    except HarnessError as exc:
        raise typer.Exit(report_error(exc, no_color))
    console = make_console(no_color=no_color)
    render_run(console, outcome.run, DisplayOptions(no_color=no_color, inspect_logits=inspect_logits,
                                                    snippet=not no_snippet))
    render_noise(console, outcome.noise)
    render_verdict(console, outcome.verdict, outcome.files)
    _render_localization(console, outcome.run)
    raise typer.Exit(outcome.exit_code)


def compare_trend(saved: list[str], gates, one_run_file: str | None, html_out: str | None, plots_dir: str | None,
                  allow_mismatch: bool, no_color: bool) -> int:
    """``compare`` of several runs: the side-by-side table, and the trend drawn when asked; the exit code."""
    from .outputs.terminal import make_console
    from .outputs.trend import render_trend
    from .pipeline.trend import check_trend_outputs, load_trend

    try:
        if one_run_file:
            raise UsageError("--json, --junit and --markdown describe one run; give one run folder or report")
        check_trend_outputs(html_out, plots_dir)
        trend = load_trend(saved, gates, allow_mismatch)
        files = {}
        if html_out or plots_dir:
            from .outputs.html import write_trend, write_trend_plots

            if html_out:
                files["html"] = str(write_trend(html_out, trend.names, trend.runs, trend.verdicts, trend.notes))
            if plots_dir:
                files["plots"] = ", ".join(str(p) for p in write_trend_plots(plots_dir, trend.names, trend.runs))
    except HarnessError as exc:
        return report_error(exc, no_color)
    except OSError as exc:
        return report_error(UsageError(f"cannot write the trend: {exc}"), no_color)
    console = make_console(no_color=no_color)
    for note in trend.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    render_trend(console, trend.names, trend.runs, trend.verdicts)
    for name, path in files.items():
        console.print(f"{name:<9} {path}", markup=False, highlight=False)
    return trend.exit_code


@app.command("localize")
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
    from .outputs.localize_view import render_localization
    from .outputs.terminal import ProgressView, make_console
    from .pipeline.localize import localize_folder

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


@app.command("devices")
def devices_cmd(devices_file: str | None = typer.Option(None, "--devices")) -> None:
    """List the device profiles (shipped and from --devices FILE)."""
    from .outputs.terminal import make_console
    from .setup.devices import load_profiles

    try:
        profiles = load_profiles(devices_file)
    except HarnessError as exc:
        raise typer.Exit(report_error(exc))
    console = make_console()
    for p in profiles.values():
        console.print(f"[bold]{p.name}[/]  platform={p.platform}  parallel={','.join(p.parallel) or '-'}  {p.description}")
        console.print(f"    env: {p.env}  scrub: {p.scrub}  engine: {p.engine}", markup=False)


@app.command("models")
def models_cmd() -> None:
    """List the model aliases."""
    from .setup.models import MODEL_ALIASES

    for a in MODEL_ALIASES.values():
        extra = " (needs --ep)" if a.needs_ep else ""
        print(f"{a.name:<18} {a.hub_id}{extra}{'  ' + a.note if a.note else ''}")


cache_app = typer.Typer(help="Manage cached references (ls, show, clear, export, import).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
CACHE_DIR_OPTION = typer.Option("cache", "--cache-dir", help="The harness's cache folder.")


def _with_cache(cache_dir: str, action) -> None:
    """Open the reference cache, run ``action(cache)``, map failures to exit codes."""
    from .capture.cache import ReferenceCache
    from .capture.store import CaptureError

    root = Path(cache_dir) / "references"
    try:
        with ReferenceCache(root) as cache:
            action(cache)
    except KeyError as exc:
        raise typer.Exit(report_error(UsageError(str(exc.args[0]))))
    except (CaptureError, OSError) as exc:
        raise typer.Exit(report_error(UsageError(str(exc))))


@cache_app.command("ls")
def cache_ls(cache_dir: str = CACHE_DIR_OPTION) -> None:
    """List cached references."""
    from .outputs.terminal import make_console, render_cache_entries

    _with_cache(cache_dir, lambda cache: render_cache_entries(make_console(), cache.entries()))


@cache_app.command("show")
def cache_show(key: str = typer.Argument(..., help="A key or a unique prefix of one."),
               cache_dir: str = CACHE_DIR_OPTION) -> None:
    """Print the fields that make up one entry's key."""
    import json

    def show(cache) -> None:
        full = cache.resolve(key)
        entry = next(e for e in cache.entries() if e["key"] == full)
        print(json.dumps(entry, indent=2, sort_keys=True))

    _with_cache(cache_dir, show)


@cache_app.command("clear")
def cache_clear(keys: list[str] = typer.Argument(None, help="Keys (or prefixes) to delete; none: every entry."),
                yes: bool = typer.Option(False, "--yes", "-y", help="Really delete (required)."),
                cache_dir: str = CACHE_DIR_OPTION) -> None:
    """Delete cached references (all, or the given keys). Needs --yes."""

    def clear(cache) -> None:
        if not yes:
            what = f"{len(keys)} entries" if keys else f"all {len(cache.entries())} entries"
            raise typer.Exit(report_error(UsageError(f"this deletes {what} of {cache.root}; add --yes")))
        if keys:
            full = [cache.resolve(k) for k in keys]  # resolve all first: nothing is deleted on a typo
            for k in full:
                cache.delete(k)
            print(f"deleted {len(full)} reference(s)")
        else:
            print(f"deleted {cache.clear()} reference(s)")

    _with_cache(cache_dir, clear)


@cache_app.command("export")
def cache_export(key: str = typer.Argument(..., help="A key or a unique prefix of one."),
                 dest: str = typer.Argument(..., help="The reference file to write."),
                 cache_dir: str = CACHE_DIR_OPTION) -> None:
    """Write one entry as a portable reference file (use it with --reference or `cache import`)."""

    def export(cache) -> None:
        full = cache.resolve(key)
        size = cache.export(full, Path(dest))
        print(f"{full[:12]} -> {dest} ({size / 2**20:.1f} MiB)")

    _with_cache(cache_dir, export)


@cache_app.command("import")
def cache_import(files: list[str] = typer.Argument(..., help="Reference files (from --save-reference or export)."),
                 cache_dir: str = CACHE_DIR_OPTION) -> None:
    """Store reference files in the cache under the key their own metadata gives."""

    from .capture.store import CaptureError

    def do_import(cache) -> None:
        for f in files:
            if not Path(f).is_file():
                raise typer.Exit(report_error(UsageError(f"{f} does not exist")))
        for f in files:
            try:
                key = cache.import_file(Path(f))
            except CaptureError as exc:
                raise typer.Exit(report_error(UsageError(f"{f} is not a reference file: {exc}")))
            print(f"{f} -> {key[:12]}")

    _with_cache(cache_dir, do_import)


@app.command("profile-summary")
def profile_summary_cmd(
    directory: str = typer.Argument(..., metavar="DIR", help="A trace folder, the profile/ folder, or a run folder."),
    top: int = typer.Option(15, "--top", help="Rows per table."),
    no_color: bool = typer.Option(False, "--no-color"),
) -> None:
    """Top operators by self time and the speed of each side, from saved traces."""
    from .outputs.profile_tables import render_profile_summary
    from .outputs.terminal import make_console
    from .profiling.traces import load_summaries

    try:
        if top < 1:
            raise UsageError(f"--top must be a positive number, got {top}", option="--top")
        summaries = load_summaries(directory)
    except HarnessError as exc:
        raise typer.Exit(report_error(exc, no_color))
    render_profile_summary(make_console(no_color=no_color), summaries, top)


def main() -> None:
    from .worker.spawn import Terminated, workers_end_on_sigterm

    try:
        with workers_end_on_sigterm():
            app(prog_name="vllm-rbln-exec")
    except Terminated:
        sys.exit(143)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
