"""One parity run as plain steps: prepare the models, resolve the sides, capture each side, compare.

``run_parity(options)`` is the library call behind the CLI, the pytest plugin
and the benchmark. Each step is a function of its own module in this folder;
this module only orders them and assembles the ``RunResult``. It never renders,
never judges (``check`` does) and never imports torch or vLLM (workers do).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from ..capture.cache import cache_key
from ..compare.captures import compare_captures
from ..compare.metrics import PromptComparison, summarize
from ..core.errors import UsageError
from ..setup.ab import get_preset
from ..setup.models import read_config, text_config
from ..setup.options import OutputOptions, RunOptions
from ..setup.prompts import check_prompt_lengths
from ..setup.sides import side_differences
from ..verdict.presets import AB_TOLERANCES, FLOAT32, HALF
from .captures import Captured, SidePlan, forced, plan_side, run_both, side_job, unprofiled
from .context import Progress, RunContext
from .models import PreparedModels, prepare_models
from .reference import (
    ReferenceFile,
    check_cache,
    key_fields,
    read_reference_file,
    reference_from_cache,
    reference_from_file,
    save_reference_file,
    store_in_cache,
)
from .result import RunResult, side_result
from .served import capture_plan, check_prompt_tokens, probe_servers, with_server
from .sides import ResolvedSides, resolve_devices, resolve_sides
from .yardstick import YardstickRun, capture_yardstick, save_yardsticks, yardstick_blocker


def run_parity(options: RunOptions, progress: Progress | None = None) -> RunResult:
    ctx = RunContext.create(options.cache_dir, options.devices_file, options.capture.timeout, progress)
    if options.server.api_key_env:  # the key reaches the header that needs it, never a worker or vLLM
        ctx.secret_env = frozenset({options.server.api_key_env})
    asked, ref_file = options, None
    try:
        if options.reference_source.file:
            options, ref_file = read_reference_file(options)
            ctx.note(_file_note(ref_file, options))
        if options.reference_source.use_cache:
            check_cache(ctx)
        devices = resolve_devices(ctx, options)
        servers = probe_servers(ctx, options)  # an unreachable server ends the run now, before any model work
        models = prepare_models(ctx, options.model, options.target.checkpoint, options.capture.num_hidden_layers)
        c = options.capture
        check_prompt_lengths(c.prompts, models.reference_path, c.max_model_len, c.max_tokens)
        sides = resolve_sides(ctx, options, devices, models, servers)
        blocker = yardstick_blocker(ctx, options, sides.yardstick)  # decided before any engine starts
        run_dir = ctx.run_dir = make_run_dir(options.outputs, options.model)
        vocab = int(text_config(read_config(models.reference_path)).get("vocab_size") or 0)
        ref_plan, tgt_plan = (with_server(plan_side(ctx, options, s, models, options.capture.prompts),
                                          servers.get(s.role), vocab)
                              for s in (sides.reference, sides.target))
        fields = key_fields(options, ref_plan, models.weights, models.tokenizer)
        ref_plan = replace(ref_plan, request=replace(ref_plan.request,
                                                     settings={**ref_plan.request.settings, "key_fields": fields}))
        reference, target, source, cache_info = capture_sides(ctx, options, ref_plan, tgt_plan, ref_file, fields,
                                                              run_dir)
        comparisons = compare(options, reference.capture, target.capture)
        yardstick, missing = capture_yardstick(ctx, options, sides.yardstick, sides.decisions.get("yardstick", ""),
                                               models, reference, run_dir, compare, blocker)
        if options.reference_source.save and devices.reference is not None:
            save_yardsticks(ctx, options, devices.reference, sides.reference, sides.target, models, reference,
                            run_dir, compare, yardstick.side if yardstick else None)
        repeats, reference_self = measure_repeats(ctx, options, reference, source, ref_plan, tgt_plan, run_dir)
        result = assemble(ctx, asked, options, models, sides, (reference, target, source), comparisons, cache_info,
                          repeats, reference_self)
        result.yardstick = yardstick_record(yardstick)
        if missing:
            result.resolved["yardstick_missing"] = missing
        return result
    finally:
        if ref_file is not None:
            shutil.rmtree(ref_file.scratch, ignore_errors=True)


def capture_sides(ctx: RunContext, options: RunOptions, ref_plan: SidePlan, tgt_plan: SidePlan,
                  ref_file: ReferenceFile | None, fields: dict[str, Any],
                  run_dir: Path) -> tuple[Captured, Captured, str, dict[str, Any]]:
    """(reference, target, where the reference came from, cache info)."""
    use_cache = options.reference_source.use_cache
    key = cache_key(fields)
    cache_info: dict[str, Any] = {"enabled": use_cache, "key": key, "hit": False}
    reference, source, t0 = None, "worker", time.monotonic()
    if ref_file is not None:
        reference, source = Captured(reference_from_file(ref_file, fields, run_dir), 0.0, {}), "file"
        if ref_plan.request.profile:
            ctx.note("the reference comes from a file: only the target was profiled")
    elif use_cache and ref_plan.request.profile:
        # a cache hit would start no reference worker, so there would be nothing to profile
        ctx.note("the reference is profiled: the cache was not read (the new capture is stored)")
    elif use_cache:
        capture, cache_info = reference_from_cache(ctx, options, key, fields, run_dir)
        if capture is not None:
            reference, source = Captured(capture, 0.0, {}), "cache"
    target = None
    if reference is None:
        ref_job = side_job(ctx, run_dir, "reference", ref_plan)
        workers = ref_plan.server is None and tgt_plan.server is None
        if options.capture.align == "free" and workers:  # the target needs none of the reference's tokens
            reference, target = run_both(ctx, ref_job, side_job(ctx, run_dir, "target", tgt_plan))
        else:
            reference = capture_plan(ctx, options, run_dir, "reference", ref_plan)
        if use_cache:
            store_in_cache(ctx, key, reference.capture, fields)
    else:
        reference.elapsed_s = time.monotonic() - t0
    if options.reference_source.save:
        save_reference_file(reference.capture, Path(options.reference_source.save))
        ctx.note(f"reference saved to {options.reference_source.save}")
    if target is None:
        request = tgt_plan.request
        if options.capture.align == "forced":
            request = forced(request, reference.capture)
        target = capture_plan(ctx, options, run_dir, "target", tgt_plan, request, reference.capture)
    if ref_plan.server is not None or tgt_plan.server is not None:
        check_prompt_tokens(ctx, reference.capture, target.capture)
    return reference, target, source, cache_info


def compare(options: RunOptions, reference, target, aligned: bool | None = None) -> list[PromptComparison]:
    c = options.compare
    aligned = options.capture.align == "forced" if aligned is None else aligned
    return compare_captures(reference, target, aligned=aligned, eps=c.eps, topk=c.topk,
                            snippet_elems=c.snippet_elems, tie_margin=c.tie_margin)


def measure_repeats(ctx: RunContext, options: RunOptions, reference: Captured, source: str, ref_plan: SidePlan,
                    tgt_plan: SidePlan, run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """``--repeat N``: N-1 more target captures against the same reference, and a second
    reference capture compared with the first when the reference was computed here.

    Each repeat is a fresh worker (its own engine start), so the spread also
    covers what differs between engine instances (kernel selection, autotuning).
    """
    if options.repeat < 2:
        return [], None
    prompts = list(options.capture.prompts)

    def as_report(label: str, comps: list[PromptComparison]) -> dict[str, Any]:
        return {"run_dir": str(run_dir / label), "prompts": prompts, "summary": summarize(comps).to_json(),
                "comparisons": [c.to_json() for c in comps]}

    target_request = unprofiled(tgt_plan.request)  # repeats measure noise; they are never profiled
    if options.capture.align == "forced":
        target_request = forced(target_request, reference.capture)
    repeats = []
    for n in range(2, options.repeat + 1):
        label = f"target-r{n}"
        ctx.progress("target", f"repeat {n}/{options.repeat}", {"stage": "repeat"})
        again = capture_plan(ctx, options, run_dir, label, tgt_plan, target_request, reference.capture, "target")
        repeats.append(as_report(label, compare(options, reference.capture, again.capture)))
    if source != "worker":
        ctx.note(f"the reference came from the {source}: its own run-to-run spread was not measured "
                 "(only the target's)")
        return repeats, None
    ctx.progress("reference", "second capture for the noise floor", {"stage": "repeat"})
    again = capture_plan(ctx, options, run_dir, "reference-r2", ref_plan, unprofiled(ref_plan.request),
                         progress_label="reference")
    return repeats, as_report("reference-r2", compare(options, reference.capture, again.capture, aligned=False))


def assemble(ctx: RunContext, asked: RunOptions, options: RunOptions, models: PreparedModels,
             sides: ResolvedSides, captured: tuple[Captured, Captured, str], comparisons: list[PromptComparison],
             cache_info: dict[str, Any], repeats: list[dict[str, Any]],
             reference_self: dict[str, Any] | None) -> RunResult:
    reference, target, source = captured
    ref_side, tgt_side = sides.reference, sides.target
    return RunResult(
        run_dir=str(ctx.run_dir), model=options.model, model_path=str(models.reference_path),
        target=tgt_side.device, settings=effective_logprobs(flat_settings(options, sides), reference, target),
        prompts=list(options.capture.prompts),
        sides={
            "reference": side_result(reference.capture, reference.elapsed_s,
                                     "server" if ref_side.url and source == "worker" else source,
                                     ref_side.engine_args, ref_side.torch_device,
                                     reference.result.get("profile") if source == "worker" else None),
            "target": side_result(target.capture, target.elapsed_s, "server" if tgt_side.url else "worker",
                                  tgt_side.engine_args, tgt_side.torch_device, target.result.get("profile")),
        },
        comparisons=comparisons, summary=summarize(comparisons), notes=ctx.notes, cache=cache_info,
        reference_tokens=[r.token_ids for r in reference.capture.prompts], repeats=repeats,
        reference_self=reference_self, options=asked.to_json(),
        resolved=resolved_record(options, asked, sides),
    )


def effective_logprobs(settings: dict[str, Any], *captured: Captured) -> dict[str, Any]:
    """The flat settings with ``logprobs`` as compared: a server that gives only its top N (``remote.probe``)
    makes the run a top-N comparison, whatever was asked (the verdict skips full-vocabulary gates then)."""
    widths = [c.capture.settings.get("logprobs", -1) for c in captured if c.capture.mode == "topn"]
    if widths:
        settings["logprobs"] = min(int(w) for w in widths)
    return settings


def yardstick_record(yard: YardstickRun | None) -> dict[str, Any] | None:
    """The report's ``yardstick`` block (ratios are added from it by ``RunResult.to_json``)."""
    if yard is None:
        return None
    side = yard.side
    return {
        "why": yard.why,
        "side": asdict(side_result(yard.captured.capture, yard.captured.elapsed_s, yard.source, side.engine_args,
                                   side.torch_device)),
        "cache": yard.cache,
        "summary": summarize(yard.comparisons).to_json(),
        "comparisons": [c.to_json() for c in yard.comparisons],
    }


def resolved_record(options: RunOptions, asked: RunOptions, sides: ResolvedSides) -> dict[str, Any]:
    """What the run decided beyond what was asked: shown in the report next to the options."""
    adopted = {name: _count(getattr(options.capture, name)) for name in ("prompts", "max_tokens", "logprobs", "store")
               if getattr(options.capture, name) != getattr(asked.capture, name)}
    return {
        "ab": ab_record(options.ab),
        "decisions": dict(sides.decisions),
        "adopted_from_reference_file": adopted,
        "sides": {s.role: {"device": s.device, "platform": s.platform, "engine": s.engine, "dtype": s.dtype,
                           "torch_device": s.torch_device, "checkpoint": s.checkpoint, "block_size": s.block_size,
                           "parallel": asdict(s.parallel),
                           "engine_args": s.effective_engine_args()}
                  for s in sides.all()},
        "differences": [[what, _plain(a), _plain(b)] for what, a, b in side_differences(sides.reference, sides.target)],
        "yardstick": sides.decisions.get("yardstick"),
    }


def ab_record(name: str | None) -> dict[str, Any] | None:
    """The A/B preset of the run (``--ab``): its name, question and tolerances per precision tier with why (the
    verdict applies the run's tier; a user's tolerance on the same metric replaces the preset's)."""
    if name is None:
        return None
    tolerances = AB_TOLERANCES[name]
    tiers = {tier: [list(t) for t in tolerances.of(tier)] for tier in (FLOAT32, HALF)}
    return {"preset": name, "question": get_preset(name).question, "tolerances": tiers,
            "ignore": [list(t) for t in tolerances.ignore]}


def flat_settings(options: RunOptions, sides: ResolvedSides) -> dict[str, Any]:
    """The settings in force under schema 1's flat names (gates, reports and old readers use them)."""
    c, ref, tgt = options.capture, sides.reference, sides.target
    return {
        "model": options.model, "target": tgt.device, "reference_device": ref.device,
        "max_model_len": c.max_model_len, "num_hidden_layers": c.num_hidden_layers,
        "tp": tgt.parallel.tp, "pp": tgt.parallel.pp, "dp": tgt.parallel.dp, "ep": tgt.parallel.ep,
        "batch": c.batch, "max_tokens": c.max_tokens, "max_batched": c.max_batched, "logprobs": c.logprobs,
        "max_logprobs_cap": c.max_logprobs_cap, "topk": options.compare.topk, "eps": options.compare.eps,
        "tie_margin": options.compare.tie_margin, "align": c.align, "capture": c.capture, "store": c.store,
        "reference_engine": ref.engine, "target_engine": tgt.engine, "reference_dtype": ref.dtype,
        "target_dtype": tgt.dtype, "target_model": options.target.checkpoint, "block": tgt.block_size,
        "reference_args": dict(ref.engine_args), "target_args": dict(tgt.engine_args), "repeat": options.repeat,
        "use_cache": options.reference_source.use_cache, "require_cache": options.reference_source.require_cache,
        "reference_file": options.reference_source.file, "save_reference": options.reference_source.save,
        "fail_on": list(options.gates.fail_on), "spec": options.gates.spec,
        "no_default_gates": not options.gates.use_defaults, "near_ties_fail": options.gates.near_ties_fail,
        "yardstick": options.yardstick,
        "ab": options.ab, "target_url": tgt.url, "reference_url": ref.url,
        "target_quantization": options.gates.target_quantization,
    }  # fmt: skip


def make_run_dir(outputs: OutputOptions, model: str) -> Path:
    if outputs.run_dir:
        path = Path(outputs.run_dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name)[:60]
        path = Path(outputs.runs_dir) / f"{stamp}-{safe}-{os.getpid()}"
    if path.exists() and any(path.iterdir()):
        raise UsageError(f"run folder {path} exists and is not empty", option="--run-dir")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _file_note(ref: ReferenceFile, options: RunOptions) -> str:
    info = ref.capture.info
    return (f"reference from {ref.path}: {len(ref.capture.prompts)} prompts, max tokens "
            f"{options.capture.max_tokens}, captured by {info.engine} {info.engine_version} on {info.platform} "
            f"({info.dtype})")


def _count(value: Any) -> Any:
    return f"{len(value)} prompts" if isinstance(value, (list, tuple)) else value


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    return value
