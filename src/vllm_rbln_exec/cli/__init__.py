"""The command line: parse options into frozen records (``setup.options``) and make one library call.

The run's options live here; the other commands live beside it (``saved``: compare and localize,
``info``: devices, models and profile-summary, ``cache``, ``corpus``), each a plain function registered below.

Thin on purpose: no engine, metric or rendering logic lives here, and nothing
heavy is imported (torch and vLLM load only in worker processes). Errors
become a message and an exit code, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from ..core.errors import HarnessError, UsageError, describe_os_error
from . import cache, corpus, info, saved
from .common import EXIT_CODES_HELP, explicit_options, render_localization_of, report_error

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Compare next-token logprobs of a target device against a CPU reference.\n\n" + EXIT_CODES_HELP,
)


@app.callback(invoke_without_command=True)
def run(
    ctx: typer.Context,
    model: str = typer.Option("smollm2-135m", "--model", help="Alias (see `models`), hub id with local weights, or a model folder."),
    target: str = typer.Option("auto", "--target", help="auto|cpu|rbln|cuda|NAME (see `devices`)."),
    max_model_len: int = typer.Option(2048, "--max-model-len", help="Engine context length; an alias may set its own default (gemma3-270m: 1024, see `models`)."),
    num_hidden_layers: int | None = typer.Option(None, "--num-hidden-layers", help="Keep only the first N decoder layers, on both sides."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    tp: int = typer.Option(1, "--tp", help="Tensor parallel size (target)."),
    pp: int = typer.Option(1, "--pp", help="Pipeline parallel size (target)."),
    dp: int = typer.Option(1, "--dp", help="Data parallel size (target)."),
    ep: bool = typer.Option(False, "--ep", help="Expert parallelism (target)."),
    batch: int = typer.Option(4, "--batch", help="Prompts run through an engine at once (a server side: requests in flight)."),
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
    timeout: float = typer.Option(1800.0, "--timeout", help="Seconds a worker may take before it is stopped (a server side: the total deadline of one request, connect, headers and body)."),
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
    save_yardsticks: str | None = typer.Option(None, "--save-yardsticks", help="With --save-reference: the precisions whose yardstick travels with FILE (FILE-stem.yardstick-ENGINE-DTYPE.vre), made here on the reference's device: bfloat16,float16 (default), one of them, or none."),
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
    target_url: str | None = typer.Option(None, "--target-url", help="The target is a running OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang, TGI, llama.cpp): fed the reference's tokens and scored through the prompt's logprobs (--server-scoring), or generating with logprobs under --align free. Full-vocabulary rows where the server allows them (vLLM: --max-logprobs -1), else its top N, compared with the rest of the mass as one bucket (KL a lower bound). No local engine, torch or vLLM needed for it (docs/server.md)."),
    reference_url: str | None = typer.Option(None, "--reference-url", help="The reference is a running OpenAI-compatible server: it generates greedily with logprobs per token, and the target is fed its tokens."),
    served_model: str | None = typer.Option(None, "--served-model", help="The model to ask a server for (default: the only one its /v1/models lists)."),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="Name of the environment variable holding the servers' API key (sent as a Bearer token; never printed or stored)."),
    api_key_file: str | None = typer.Option(None, "--api-key-file", help="File whose first line is the servers' API key (never printed or stored)."),
    server_logprobs: int | None = typer.Option(None, "--server-logprobs", help="Logprobs per position to ask a server for: -1 the full vocabulary, N its top N (default: --logprobs). A server that refuses -1 and names its limit gives its top N, with a note."),
    server_retries: int = typer.Option(3, "--server-retries", help="Retries of a server request on HTTP 429/5xx or a dropped connection, with exponential backoff (Retry-After honoured)."),
    target_quantization: str | None = typer.Option(None, "--target-quantization", help="Declare that the target quantises weights or activations beyond its dtype (a label: w8a8, fp8, w4a16, q4_1-a8, ...): the dtype's built-in tolerances and the yardstick's ratios (honest rounding at the dtype) do not describe it, so the built-in gates are the structural ones and a gross backstop (KL mean above 1 nat); give your own with --fail-on or a spec (docs/gating.md). Recorded in the report."),
    server_scoring: str = typer.Option("auto", "--server-scoring", help="How a teacher-forced server target is scored: prompt_logprobs (vLLM's extra parameter), echo (echo with logprobs), auto (prompt_logprobs, else echo)."),
) -> None:
    """Run the parity check (the default command)."""
    if ctx.invoked_subcommand is not None:
        # Options of the run placed before a subcommand would be parsed and then
        # silently dropped: `--fail-on X compare RUN` must not pass unjudged.
        misplaced = [name for name in explicit_options(ctx) if name != "no_color"]
        if misplaced:
            flags = {param.name: param.opts[0] for param in ctx.command.params if param.opts}
            names = ", ".join(flags.get(name, name) for name in misplaced)
            raise typer.Exit(report_error(UsageError(
                f"{names} belong(s) to the parity run and would be ignored before "
                f"'{ctx.invoked_subcommand}'; give the subcommand's own options after its name"), no_color))
        return
    from ..setup.options import build_options

    flat = {name: value for name, value in ctx.params.items()}
    try:
        options = build_options(explicit=frozenset(explicit_options(ctx)), **flat)
    except HarnessError as exc:
        raise typer.Exit(report_error(exc, no_color))
    raise typer.Exit(execute(options))


def execute(options) -> int:
    """Run, judge and print; the exit code of the run."""
    from ..outputs.terminal import ProgressView, make_console, render_noise, render_run, render_verdict
    from ..pipeline.check import check_parity

    no_color = options.display.no_color
    console = make_console(no_color=no_color)
    err_console = make_console(no_color=no_color, stderr=True)
    try:
        with ProgressView(err_console) as view:
            outcome = check_parity(options, view)
    except HarnessError as exc:
        return report_error(exc, no_color)
    except OSError as exc:  # a full disk (or quota, or a read-only folder) under the run folder: the harness could not run
        return report_error(HarnessError(f"the run could not write its files: {describe_os_error(exc)}"), no_color)
    except KeyboardInterrupt as exc:
        from ..worker.spawn import Terminated

        err_console.print("[bold red]interrupted:[/] workers were stopped")
        return 143 if isinstance(exc, Terminated) else 130
    render_run(console, outcome.run, options.display)
    render_noise(console, outcome.noise)
    render_verdict(console, outcome.verdict, outcome.files)
    render_localization_of(console, outcome.run)
    return outcome.exit_code



app.command("compare")(saved.compare_cmd)
app.command("localize")(saved.localize_cmd)
app.command("corpus")(corpus.corpus_cmd)
app.command("devices")(info.devices_cmd)
app.command("models")(info.models_cmd)
app.add_typer(cache.cache_app, name="cache")
app.command("profile-summary")(info.profile_summary_cmd)


def main() -> None:
    from ..worker.spawn import Terminated, workers_end_on_sigterm

    try:
        with workers_end_on_sigterm():
            app(prog_name="vllm-rbln-exec")
    except Terminated:
        sys.exit(143)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
