"""Pipeline step: the typed request, environment and worker job of each side, and running them.

Turns a resolved ``Side`` plus the capture options into a ``CaptureRequest``
(what crosses into the worker), builds the worker's environment from the
side's device profile, and starts, waits for and loads captures. It owns no
comparison and no rendering.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..capture.store import Capture, load_capture
from ..profiling.request import profile_request
from ..remote.probe import ServerInfo
from ..setup.devices import DeviceProfile, vllm_known_env_vars
from ..setup.options import RunOptions
from ..setup.request import CaptureRequest, capture_task
from ..setup.sides import Side
from ..worker.spawn import WorkerJob, run_worker, start_worker, wait_workers
from .context import RunContext
from .models import PreparedModels


@dataclass(frozen=True)
class SidePlan:
    """Everything needed to capture one side: its request, its environment and what that environment records."""

    side: Side
    request: CaptureRequest
    env: dict[str, str]
    env_record: dict[str, Any]
    server: ServerInfo | None = None  # a server side (pipeline.served): captured over HTTP, not by a worker
    vocab: int = 0  # a server side's vocabulary (the reference model's), for its rows


def plan_side(ctx: RunContext, options: RunOptions, side: Side, models: PreparedModels,
              prompts: tuple[str, ...]) -> SidePlan:
    capture = options.capture
    if side.url:  # a server: no environment of ours, nothing to profile
        env, env_record = {}, {"server": side.url}
    else:
        env, env_record = side_env(ctx, side, ctx.profiles[side.device], capture.kv_cache_gib)
    p = options.profile
    request = CaptureRequest(
        side=side, prompts=tuple(prompts), max_tokens=capture.max_tokens, batch=capture.batch,
        max_model_len=capture.max_model_len, logprobs=capture.logprobs, capture=capture.capture,
        store=capture.store, max_batched=capture.max_batched, max_logprobs_cap=capture.max_logprobs_cap,
        trust_remote_code=capture.trust_remote_code,
        model_fingerprint="" if side.url else models.target_weights if side.role == "target" else models.weights,
        tokenizer_fingerprint=models.tokenizer, env_record=env_record,
        settings=side_settings(options, side),
        profile=None if side.url else profile_request(p.sides, p.dir, side.role, side.model_name, p.memory, p.shapes,
                                                      p.stack, ctx.stamp),
    )
    return SidePlan(side, request, env, env_record)


def side_settings(options: RunOptions, side: Side) -> dict[str, Any]:
    """The settings a capture records about itself (capture.json)."""
    c = options.capture
    return {
        "engine": side.engine, "dtype": side.dtype, "max_model_len": c.max_model_len, "max_tokens": c.max_tokens,
        "logprobs": c.logprobs, "batch": c.batch, "block_size": side.block_size, "tp": side.parallel.tp,
        "pp": side.parallel.pp, "dp": side.parallel.dp, "ep": side.parallel.ep, "capture": c.capture,
        "store": c.store, "num_hidden_layers": c.num_hidden_layers,
        "align": "free" if side.role == "reference" else c.align, "engine_args": dict(side.engine_args),
    }  # fmt: skip


def side_env(ctx: RunContext, side: Side, profile: DeviceProfile,
             kv_cache_gib: int | None) -> tuple[dict[str, str], dict[str, Any]]:
    extra = {}
    kv = kv_cache_gib or profile.engine_default("kv_cache_gib")
    if kv and profile.platform == "cpu":
        extra["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(kv)))  # vLLM parses it with int(): "1.0" fails
    return profile.build_env(ctx.base_env(), ctx.cache_root / "compile" / f"{side.role}-{profile.name}",
                             known_vars=vllm_known_env_vars(), extra=extra)


def side_job(ctx: RunContext, run_dir: Path, label: str, plan: SidePlan,
             request: CaptureRequest | None = None) -> WorkerJob:
    return WorkerJob(task=capture_task(label, run_dir / label, request or plan.request), env=plan.env,
                     timeout=ctx.timeout)


@dataclass
class Captured:
    capture: Capture
    elapsed_s: float
    result: dict[str, Any]  # the worker's result.json (profile folder, peak memory)


def run_side(ctx: RunContext, job: WorkerJob, progress_label: str | None = None) -> Captured:
    result = run_worker(job, ctx.on_event(progress_label))
    return Captured(load_capture(Path(result["capture"]), verify_arrays=True), result["elapsed_s"], result)


def run_both(ctx: RunContext, ref_job: WorkerJob, tgt_job: WorkerJob) -> tuple[Captured, Captured]:
    """Both sides at once (free-running mode: the target needs none of the reference's tokens)."""
    results = wait_workers([start_worker(ref_job), start_worker(tgt_job)], ctx.on_event())
    ref, tgt = (Captured(load_capture(Path(r["capture"]), verify_arrays=True), r["elapsed_s"], r) for r in results)
    return ref, tgt


def forced(request: CaptureRequest, reference: Capture) -> CaptureRequest:
    """The target's request with the reference's tokens to feed (teacher forcing)."""
    return replace(request, force=tuple(tuple(r.token_ids) for r in reference.prompts))


def unprofiled(request: CaptureRequest) -> CaptureRequest:
    return replace(request, profile=None)
