"""The ``corpus`` command: perplexity and KL of quantized or converted checkpoints against the reference, over a text.

Parses the options into ``setup.corpus_options.CorpusOptions``, makes one library call
(``pipeline.corpus.run_corpus``) and prints or writes what ``outputs.corpus_view`` makes of the result.
"""

from __future__ import annotations

import typer

from ..core.errors import HarnessError, UsageError
from .common import report_error


def corpus_cmd(
    targets: list[str] = typer.Option([], "--target", help="A side to measure; repeatable. A model folder (a quantized or converted checkpoint), comma-separated key=value items (model, label, device, engine, dtype; a bare item is the model), or a JSON object (also 'args': engine arguments). E.g. exports/w4a16, 'exports/w8a8,label=W8A8', dtype=bfloat16, 'engine=transformers,model=exports/w8a16'. A checkpoint runs at the dtype it was saved in unless dtype= says otherwise."),
    model: str = typer.Option("smollm2-135m", "--model", help="The full-precision reference model: alias, hub id with local weights, or folder."),
    corpus: str = typer.Option("builtin", "--corpus", help="The text: 'builtin' (English prose written for this project, shipped with it: the same tokens on every machine, no download) or a UTF-8 text FILE."),
    window: int = typer.Option(256, "--window", help="Tokens per window, the tokenizer's BOS included where it adds one."),
    stride: int = typer.Option(128, "--stride", help="Tokens between window starts; each window scores its last min(stride, window-1) tokens, so every scored token sees at least window-stride tokens of context."),
    max_windows: int | None = typer.Option(64, "--max-windows", help="Score at most the first N windows of the corpus."),
    reference_engine: str = typer.Option("vllm", "--reference-engine", help="vllm|transformers"),
    reference_dtype: str | None = typer.Option(None, "--reference-dtype", help="auto|float32|bfloat16|float16 (default: the device profile's)."),
    reference_device: str | None = typer.Option(None, "--reference-device", help="Device profile of the reference (default cpu)."),
    reference_args: str | None = typer.Option(None, "--reference-args", help="Engine arguments of the reference as a JSON object (or @FILE)."),
    yardstick: str = typer.Option("auto", "--yardstick", help="auto (the reference's checkpoint at the targets' precision when a target is coarser than the reference: what honest rounding alone costs), none, or ENGINE[:DTYPE] / DTYPE."),
    num_hidden_layers: int | None = typer.Option(None, "--num-hidden-layers", help="Keep only the first N decoder layers of every checkpoint."),
    store: str = typer.Option("q16", "--store", help="q16 (2 bytes per logprob) or fp32 rows."),
    use_cache: bool = typer.Option(False, "--use-cache", help="Read/write the reference's (and the yardstick's) rows in the reference cache."),
    run_dir: str | None = typer.Option(None, "--run-dir", help="Folder for this run (default: runs/<time>-corpus-<model>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --run-dir: finished sides and finished windows are kept; the other options must be those it was started with."),
    html_out: str | None = typer.Option(None, "--html", help="Write the table and both charts as a self-contained HTML page."),
    plots_dir: str | None = typer.Option(None, "--plots", help="Write the charts as PNG and SVG files into DIR."),
    json_out: str | None = typer.Option(None, "--json", help="Write the result (corpus.json) to FILE as well."),
    markdown_out: str | None = typer.Option(None, "--markdown", help="Write the table as Markdown."),
    cache_dir: str = typer.Option("cache", "--cache-dir", help="Folder for converted models and the reference cache."),
    devices_file: str | None = typer.Option(None, "--devices", help="TOML file adding or overriding device profiles."),
    timeout: float = typer.Option(1800.0, "--timeout", help="Seconds a worker may take before it is stopped."),
    kv_cache_gib: int | None = typer.Option(None, "--kv-cache-gib", help="KV cache of CPU workers in whole GiB."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    no_color: bool = typer.Option(False, "--no-color"),
) -> None:
    """What a format costs: perplexity and KL against the full-precision reference over a text corpus.

    Every side scores the same windows of the corpus through the prompt's forward pass (full-vocabulary rows
    of every scored token); per target: perplexity and its ratio to the reference's, KL mean ± s.e., median
    and p99, same top-1, Δp RMS, and its size (bits per weight, MiB). docs/corpus.md has an example.

    Exit codes: 0 done, 2 bad usage, 3 the harness could not run; 130 / 143 interrupted (continue with
    --resume --run-dir DIR)."""
    from ..setup.corpus_options import build_corpus_options

    try:
        options = build_corpus_options(
            targets, model=model, corpus=corpus, window=window, stride=stride, max_windows=max_windows,
            reference_engine=reference_engine, reference_dtype=reference_dtype, reference_device=reference_device,
            reference_args=reference_args, yardstick=yardstick, num_hidden_layers=num_hidden_layers, store=store,
            use_cache=use_cache, run_dir=run_dir, runs_dir="runs", resume=resume, html=html_out, plots=plots_dir,
            json=json_out, cache_dir=cache_dir, devices_file=devices_file, timeout=timeout, kv_cache_gib=kv_cache_gib,
            trust_remote_code=trust_remote_code, topk=5, no_color=no_color)
    except HarnessError as exc:
        raise typer.Exit(report_error(exc, no_color))
    raise typer.Exit(execute_corpus(options, markdown_out))


def execute_corpus(options, markdown_out: str | None = None) -> int:
    from ..core.jsonio import write_json_atomic, write_text_atomic
    from ..outputs.corpus_view import markdown_table, render_corpus, write_corpus_html, write_corpus_plots
    from ..outputs.terminal import ProgressView, make_console
    from ..pipeline.corpus import run_corpus

    console = make_console(no_color=options.no_color)
    err_console = make_console(no_color=options.no_color, stderr=True)
    where: dict[str, str] = {}
    try:
        with ProgressView(err_console) as view:
            def progress(side: str, message: str, data: dict) -> None:
                if data.get("stage") == "run_dir":
                    where["run_dir"] = str(data.get("path"))
                view(side, message, data)

            result = run_corpus(options, progress)
        files = {}
        if options.json:
            files["json"] = str(write_json_atomic(options.json, result))
        if markdown_out:
            files["markdown"] = str(write_text_atomic(markdown_out, markdown_table(result)))
        if options.html:
            files["html"] = str(write_corpus_html(options.html, result))
        if options.plots:
            files["plots"] = ", ".join(str(p) for p in write_corpus_plots(options.plots, result))
    except HarnessError as exc:
        return report_error(exc, options.no_color)
    except OSError as exc:
        return report_error(UsageError(f"cannot write an output: {exc}"), options.no_color)
    except KeyboardInterrupt as exc:
        from ..worker.spawn import Terminated

        hint = f"; continue with --resume --run-dir {where['run_dir']}" if "run_dir" in where else ""
        err_console.print(f"[bold red]interrupted:[/] workers were stopped{hint}", highlight=False)
        return 143 if isinstance(exc, Terminated) else 130
    render_corpus(console, result)
    for name, path in files.items():
        console.print(f"{name:<9} {path}", markup=False, highlight=False)
    return 0
