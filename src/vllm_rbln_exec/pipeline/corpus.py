"""A ``corpus`` run as plain steps: what each format costs against the full-precision reference over a text.

``run_corpus(options)`` is the library call behind ``vllm-rbln-exec corpus``: prepare the models (the
reference, and each target's own checkpoint, truncated alike), cut the corpus into windows
(``setup.corpus``), resolve the sides (``corpus_sides``), capture the reference (from the cache with
``--use-cache``, like any reference), the yardstick and every target, each in its own worker over the same
token ids, compare each with the reference (``compare.corpus``), measure what each side's weights cost
(``setup.sizes``) and write ``corpus.json`` into the run folder.

Resuming: the run folder keeps the plan it was started with (``corpus-plan.json``); ``--resume`` with the
same options and ``--run-dir`` keeps every side whose capture is finished and, inside an unfinished one,
every window its worker had written (the worker reads its journal, ``capture.journal``). It never renders
and never imports torch or vLLM.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..capture.cache import ReferenceCache, cache_key
from ..capture.store import CAPTURE_JSON, Capture, CaptureError, load_capture
from ..compare.corpus import compare_corpus
from ..core.errors import UsageError
from ..core.jsonio import strict_json, write_json_atomic
from ..setup.corpus import CorpusPlan, plan_corpus
from ..setup.corpus_options import CorpusOptions
from ..setup.models import read_config, text_config, tokenizer_fingerprint, weights_fingerprint
from ..setup.options import OutputOptions
from ..setup.sizes import weight_size
from ..worker.spawn import run_worker
from .context import Progress, RunContext
from .corpus_sides import CorpusSide, check_asked, corpus_job, corpus_key, resolve_corpus_sides
from .models import check_same_vocabulary, prepare_model
from .reference import check_cache
from .run import make_run_dir

PLAN_FILE = "corpus-plan.json"
RESULT_FILE = "corpus.json"
SCHEMA_VERSION = 1


def run_corpus(options: CorpusOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run every side over the corpus and return the saved form (also written to RUN_DIR/corpus.json)."""
    t_start = time.monotonic()
    ctx = RunContext.create(options.cache_dir, options.devices_file, options.timeout, progress)
    check_asked(ctx, options)
    if options.use_cache:
        check_cache(ctx)  # an unusable cache ends the run before a model or a run folder is made
    _, reference_path = prepare_model(ctx, options.model, options.num_hidden_layers)
    target_paths: dict[str, Path] = {}
    for target in options.targets:
        if target.side.checkpoint:
            _, path = prepare_model(ctx, target.side.checkpoint, options.num_hidden_layers)
            check_same_vocabulary(reference_path, path)
            target_paths[target.label] = path
    positions = text_config(read_config(reference_path)).get("max_position_embeddings")
    plan = plan_corpus(options.corpus, reference_path, options.window, options.stride, options.max_windows,
                       int(positions) if isinstance(positions, int) else None)
    fingerprints = {p: weights_fingerprint(p) for p in {reference_path, *target_paths.values()}}
    tokenizer = tokenizer_fingerprint(reference_path)
    sides = resolve_corpus_sides(ctx, options, plan, reference_path, target_paths, fingerprints)
    run_dir = ctx.run_dir = corpus_run_dir(options, plan)
    ctx.progress("corpus", f"run folder {run_dir}", {"stage": "run_dir", "path": str(run_dir)})
    captured: dict[str, tuple[Capture, dict[str, Any]]] = {}
    for entry in sides.all():
        cached = entry.label in ("reference", "yardstick") and options.use_cache
        captured[entry.label] = capture_side(ctx, options, plan, entry, tokenizer, run_dir, cached)
    reference = captured["reference"][0]
    rows = [side_record(entry, captured[entry.label], reference_path, None) for entry in (sides.reference,)]
    for entry in sides.all()[1:]:
        ctx.progress(entry.label, "comparing with the reference", {"stage": "compare"})
        summary = compare_corpus(reference, captured[entry.label][0], options.topk)
        rows.append(side_record(entry, captured[entry.label], reference_path, summary))
    result = {
        "schema_version": SCHEMA_VERSION, "kind": "corpus", "model": options.model, "run_dir": str(run_dir),
        "corpus": plan.to_json(), "options": options.plan_json(), "sides": rows,
        "yardstick": {"why": sides.yardstick_why, "label": sides.yardstick.label if sides.yardstick else None},
        "notes": ctx.notes + corpus_notes(plan, rows), "elapsed_s": round(time.monotonic() - t_start, 1),
    }  # fmt: skip
    write_json_atomic(run_dir / RESULT_FILE, result)
    return result


def corpus_run_dir(options: CorpusOptions, plan: CorpusPlan) -> Path:
    """A new run folder with the plan written into it, or (``--resume``) the given one if its plan matches."""
    plan_data = strict_json({"options": options.plan_json(), "corpus": plan.to_json()})  # as read back
    if options.resume:
        path = Path(options.run_dir).resolve()
        try:
            saved = json.loads((path / PLAN_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--resume: {path} holds no readable {PLAN_FILE} (not a corpus run folder?): {exc}",
                             option="--resume") from exc
        differing = sorted(k for k in {**saved.get("options", {}), **plan_data["options"]}
                           if saved.get("options", {}).get(k) != plan_data["options"].get(k))
        if saved.get("corpus", {}).get("digest") != plan.digest():
            differing.append("the corpus windows")
        if differing:
            raise UsageError(f"--resume: {path} was started with other settings ({', '.join(differing)}); give the "
                             "same options as that run", option="--resume")
        return path
    path = make_run_dir_named(options)
    write_json_atomic(path / PLAN_FILE, plan_data)
    return path


def make_run_dir_named(options: CorpusOptions) -> Path:
    return make_run_dir(OutputOptions(None, None, None, options.run_dir, options.runs_dir),
                        f"corpus-{Path(options.model).name}")


def capture_side(ctx: RunContext, options: CorpusOptions, plan: CorpusPlan, entry: CorpusSide, tokenizer: str,
                 run_dir: Path, cached: bool) -> tuple[Capture, dict[str, Any]]:
    """(capture, how it was obtained): kept from an interrupted run, from the cache, or from a worker."""
    folder = run_dir / entry.folder / "capture"
    if (folder / CAPTURE_JSON).exists():
        try:
            capture = load_capture(folder, verify_arrays=True)
            ctx.progress(entry.label, "kept from the interrupted run", {"stage": "cache_hit"})
            return capture, {"source": "resumed", "elapsed_s": 0.0}
        except CaptureError as exc:
            ctx.note(f"{entry.label}: the capture kept in {folder} was unreadable and is made again ({exc})")
            _discard(folder)
    key_fields = corpus_key(options, plan, entry, tokenizer) if entry.label in ("reference", "yardstick") else None
    key = cache_key(key_fields) if key_fields else None
    if cached:
        t0 = time.monotonic()
        with ReferenceCache(ctx.cache_root / "references") as cache:
            capture, why = cache.get(key, folder)
        if capture is not None:
            ctx.progress(entry.label, "loaded from cache", {"stage": "cache_hit"})
            return capture, {"source": "cache", "elapsed_s": time.monotonic() - t0, "cache_key": key}
        if why and why != "not cached":
            ctx.note(why)
    result = run_worker(corpus_job(ctx, options, plan, entry, tokenizer, run_dir, key_fields), ctx.on_event())
    capture = load_capture(Path(result["capture"]), verify_arrays=True)
    how = {"source": "worker", "elapsed_s": result["elapsed_s"], "resumed_windows": result.get("resumed_windows", 0),
           "peak_rss_mib": result.get("peak_rss_mib")}
    if cached:
        with ReferenceCache(ctx.cache_root / "references") as cache:
            cache.put(key, folder, key_fields)
        how["cache_key"] = key
    return capture, how


def side_record(entry: CorpusSide, captured: tuple[Capture, dict[str, Any]], reference_path: Path,
                summary: dict[str, Any] | None) -> dict[str, Any]:
    capture, how = captured
    side = entry.side
    effective = capture.settings.get("effective") or {}
    run_dtype = effective.get("model_dtype") or effective.get("torch_dtype") or side.dtype
    size = weight_size(Path(side.checkpoint), run_dtype, reference_path)
    return {
        "label": entry.label, "role": side.role, "device": side.device, "platform": capture.info.platform,
        "engine": side.engine, "engine_version": capture.info.engine_version, "dtype": side.dtype,
        "checkpoint": side.checkpoint, "model": side.model_name, "engine_args": side.effective_engine_args(),
        "quantization": quantization_of(Path(side.checkpoint)), "size": size, **how,
        "timings": dict(capture.info.timings), "effective": effective, "summary": summary,
    }  # fmt: skip


def quantization_of(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's quantization in brief (method, format, weight and activation bits), None if it has none."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    groups = [g for g in (q.get("config_groups") or {}).values() if isinstance(g, dict)]
    first = groups[0] if groups else {}
    weights, acts = first.get("weights") or {}, first.get("input_activations") or {}
    return {"method": q.get("quant_method"), "format": q.get("format"), "weights": _bits(weights),
            "activations": _bits(acts) if acts else None, "ignore": q.get("ignore")}


STRATEGIES = {"channel": "ch", "token": "tok", "tensor": "tensor", "block": "block", "tensor_group": "tg"}


def _bits(args: dict[str, Any]) -> str:
    """``int4/g64``, ``int8/ch``, ``float8/tok dyn``: type and bits, how scales are shared (per group of 64,
    per channel, per token), and ``dyn`` where they are computed at run time."""
    strategy = str(args.get("strategy") or "")
    how = f"g{args['group_size']}" if args.get("group_size") else STRATEGIES.get(strategy, strategy)
    return f"{args.get('type', 'int')}{args.get('num_bits', '?')}/{how}{' dyn' if args.get('dynamic') else ''}"


def corpus_notes(plan: CorpusPlan, rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    if len(plan.windows) < plan.available_windows:
        notes.append(f"{len(plan.windows)} of the corpus's {plan.available_windows} windows were scored "
                     "(--max-windows)")
    resumed = [r["label"] for r in rows if r.get("source") == "resumed" or r.get("resumed_windows")]
    if resumed:
        notes.append(f"continued from an interrupted run: {', '.join(resumed)}")
    seen: dict[str, str] = {}
    for row in rows[1:]:
        summary = row.get("summary") or {}
        key = json.dumps([summary.get("per_window"), summary.get("ppl")])
        if key in seen:  # e.g. W4A8 on vLLM 0.32's CPU kernel, which leaves the activations unquantized
            notes.append(f"{row['label']} scored exactly as {seen[key]} (every window's KL and perplexity equal): "
                         "the same arithmetic ran for both, whatever their checkpoints say")
        else:
            seen[key] = row["label"]
    return notes


def _discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
