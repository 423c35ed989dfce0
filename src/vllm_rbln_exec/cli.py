"""The command line: parse options into a RunConfig and call the library.

Thin on purpose: no engine, metric or rendering logic lives here, and nothing
heavy is imported (torch and vLLM load only in worker processes). Errors
become a message and an exit code, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .errors import HarnessError, UsageError, WorkerError

EXIT_CODES_HELP = """Exit codes: 0 the run finished (parity holds), 1 parity fails, 2 bad usage,
3 the harness could not run (worker crash or timeout, missing model)."""

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Compare next-token logprobs of a target device against a CPU reference.\n\n" + EXIT_CODES_HELP,
)


def _prompts(values: list[str]) -> list[str]:
    from .config import read_prompts_file

    out: list[str] = []
    for value in values:
        if value.startswith("@"):
            out += read_prompts_file(value[1:])
        elif value.endswith((".txt", ".jsonl", ".json")) and Path(value).is_file():
            out += read_prompts_file(value)
        else:
            out.append(value)
    return out


def _explicit(ctx: typer.Context) -> list[str]:
    """Names of the options the user gave on the command line (not defaults)."""
    from click.core import ParameterSource

    return [name for name in ctx.params if ctx.get_parameter_source(name) not in
            (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)]


def report_error(exc: HarnessError, no_color: bool = False) -> int:
    from .report import make_console

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
    profile: bool = typer.Option(False, "--profile", help="Profile the measured generation with the torch profiler."),
    eps: float = typer.Option(0.5, "--eps", help="|Δ| at or above which an entry is an outlier (nats)."),
    devices_file: str | None = typer.Option(None, "--devices", help="TOML file adding or overriding device profiles."),
    cache_dir: str = typer.Option("cache", "--cache-dir", help="Folder for converted models and the reference cache."),
    run_dir: str | None = typer.Option(None, "--run-dir", help="Folder for this run's captures and logs (default: runs/<time>-<model>)."),
    timeout: float = typer.Option(1800.0, "--timeout", help="Seconds a worker may take before it is stopped."),
    kv_cache_gib: float | None = typer.Option(None, "--kv-cache-gib", help="KV cache of CPU workers in GiB (VLLM_CPU_KVCACHE_SPACE)."),
    align: str = typer.Option("forced", "--align", help="forced: the target is fed the reference's tokens, so every position compares; free: each side follows its own argmax."),
    tie_margin: float = typer.Option(0.5, "--tie-margin", help="A divergence where the reference's top-2 margin is below this (nats) is a near-tie."),
    capture: str = typer.Option("fast", "--capture", help="fast: logits processor writes rows in place; api: vLLM's logprobs output."),
    reference_engine: str = typer.Option("vllm", "--reference-engine", help="vllm|transformers"),
    target_engine: str = typer.Option("vllm", "--target-engine", help="vllm|transformers"),
    reference_dtype: str | None = typer.Option(None, "--reference-dtype", help="auto|float32|bfloat16|float16 (default: the profile's)."),
    target_dtype: str | None = typer.Option(None, "--target-dtype", help="auto|float32|bfloat16|float16 (default: the profile's)."),
    reference_device: str | None = typer.Option(None, "--reference-device", help="torch device of a transformers reference (default cpu)."),
    target_device: str | None = typer.Option(None, "--target-device", help="torch device of a transformers target (default: the profile's)."),
    target_model: str | None = typer.Option(None, "--target-model", help="Run the target on another checkpoint of the same model (quantized, converted)."),
    reference_file: str | None = typer.Option(None, "--reference", help="Compare against a saved reference file instead of running a reference worker."),
    save_reference: str | None = typer.Option(None, "--save-reference", help="Write the reference capture to FILE (portable)."),
) -> None:
    """Run the parity check (the default command)."""
    if ctx.invoked_subcommand is not None:
        return
    from .config import RunConfig

    try:
        cfg = RunConfig(
            model=model, target=target, max_model_len=max_model_len, num_hidden_layers=num_hidden_layers,
            trust_remote_code=trust_remote_code, tp=tp, pp=pp, dp=dp, ep=ep, batch=batch,
            max_tokens=max_tokens, max_batched=max_batched, prompts=_prompts(prompts),
            num_prompts=num_prompts, logprobs=logprobs, max_logprobs_cap=max_logprobs_cap,
            inspect_logits=inspect_logits, topk=topk, block_size_cpu=block_size_cpu,
            block_size_rbln=block_size_rbln, block=block, no_color=no_color, no_snippet=no_snippet,
            snippet_elems=snippet_elems, use_cache=use_cache, profile=profile, eps=eps,
            devices_file=devices_file, cache_dir=cache_dir, run_dir=run_dir, timeout=timeout,
            kv_cache_gib=kv_cache_gib, align=align, tie_margin=tie_margin, capture=capture,
            reference_engine=reference_engine, target_engine=target_engine, reference_dtype=reference_dtype,
            target_dtype=target_dtype, reference_device=reference_device, target_device=target_device,
            target_model=target_model, reference_file=reference_file, save_reference=save_reference,
            explicit=_explicit(ctx),
        ).validate()
    except HarnessError as exc:
        raise typer.Exit(report_error(exc, no_color))
    raise typer.Exit(execute(cfg))


def execute(cfg) -> int:
    from .report import ProgressView, make_console, render_result
    from .run import run_parity

    console = make_console(no_color=cfg.no_color)
    err_console = make_console(no_color=cfg.no_color, stderr=True)
    try:
        with ProgressView(err_console) as view:
            result = run_parity(cfg, view)
    except HarnessError as exc:
        return report_error(exc, cfg.no_color)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted:[/] workers were stopped")
        return 130
    render_result(console, result, inspect_logits=cfg.inspect_logits, snippet=not cfg.no_snippet,
                  snippet_elems=cfg.snippet_elems)
    return 0


@app.command("devices")
def devices_cmd(devices_file: str | None = typer.Option(None, "--devices")) -> None:
    """List the device profiles (shipped and from --devices FILE)."""
    from .devices import load_profiles
    from .report import make_console

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
    from .models import MODEL_ALIASES

    for a in MODEL_ALIASES.values():
        extra = " (needs --ep)" if a.needs_ep else ""
        print(f"{a.name:<18} {a.hub_id}{extra}{'  ' + a.note if a.note else ''}")


def main() -> None:
    try:
        app(prog_name="vllm-rbln-exec")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
