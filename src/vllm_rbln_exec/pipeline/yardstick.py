"""Pipeline step: the yardstick capture, from a reference file's companion, the cache or a worker.

A yardstick is a third side (``setup.sides.yardstick_options``): an honest
engine at the target's precision, fed the reference's tokens like the target.
It is keyed like a reference (the cache key of its side, plus a hash of the
tokens it was forced on), so a second run finds it in the cache; with
``--save-reference FILE`` it is written next to FILE (``FILE-stem.yardstick-
ENGINE-DTYPE.vre``), for the run's own precision and for each of
``--save-yardsticks`` (bfloat16 and float16 by default), and with
``--reference FILE`` that companion is used when it matches. Whether a worker
could compute it here is decided before any engine starts
(``yardstick_blocker``); a yardstick that cannot be had leaves the run without
a ratio, with the reason, and never costs the target's comparison. This module
orders those steps and compares the yardstick with the reference; it never
judges and never renders.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..capture.archive import unpack_capture
from ..capture.cache import ReferenceCache, cache_key
from ..capture.store import Capture, CaptureError
from ..compare.metrics import PromptComparison
from ..core.errors import WorkerError
from ..core.jsonio import move_tree
from ..setup.devices import DeviceProfile
from ..setup.options import RunOptions
from ..setup.sides import Side, YardstickSpec, resolve_side, yardstick_options
from ..setup.vllm_build import cpu_worker_blocker, installed_vllm_build
from .captures import Captured, forced, plan_side, run_side, side_job
from .context import RunContext
from .models import PreparedModels
from .reference import FILE_CHECKED, key_fields, save_reference_file


@dataclass
class YardstickRun:
    side: Side
    captured: Captured
    source: str  # worker, cache or file
    comparisons: list[PromptComparison]
    cache: dict[str, Any]
    why: str  # the decision, one line


def companion_file(reference_file: str | Path, side: Side) -> Path:
    """Where a reference file's yardstick of ``side``'s engine and dtype lives."""
    path = Path(reference_file)
    return path.with_name(f"{path.stem}.yardstick-{side.engine}-{side.dtype}{path.suffix or '.vre'}")


def forced_tokens_hash(reference: Capture) -> str:
    tokens = [list(map(int, r.token_ids)) for r in reference.prompts]
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


def yardstick_blocker(ctx: RunContext, options: RunOptions, side: Side | None) -> str | None:
    """Before any engine starts: why no worker can compute ``side`` here (None: one can, or there is no side).

    Said to the user now, with where the yardstick will come from instead (the reference file's companion)
    or that the run will have no ratio."""
    if side is None:
        return None
    blocker = cpu_worker_blocker(side.engine, side.platform, installed_vllm_build)
    if blocker is None:
        return None
    what = f"the {side.engine} {side.dtype} yardstick on {side.device}"
    companion = companion_file(options.reference_source.file, side) if options.reference_source.file else None
    if companion is not None and companion.is_file():
        ctx.note(f"{what} cannot be computed here ({blocker}): it comes from {companion.name}")
    else:
        where = (f"no {companion.name} travelled with the reference file" if companion is not None
                 else "no reference file carries one")
        ctx.note(f"{what} cannot be computed here ({blocker}) and {where}: the run is compared and judged "
                 "without a yardstick ratio")
    return blocker


def capture_yardstick(ctx: RunContext, options: RunOptions, side: Side | None, why: str, models: PreparedModels,
                      reference: Captured, run_dir: Path, compare, blocker: str | None = None,
                      label: str = "yardstick") -> tuple[YardstickRun | None, str | None]:
    """The yardstick of the run compared with the reference (``compare`` as the target is), or None and why
    there is none (None, None: the run asked for none). ``blocker``: why no worker can compute it here
    (``yardstick_blocker``); a worker that fails anyway is reported the same way, never as the run's failure."""
    if side is None:
        return None, None
    plan = plan_side(ctx, options, side, models, options.capture.prompts)
    fields = {**key_fields(options, plan, models.weights, models.tokenizer), "role": "yardstick",
              "forced_on": forced_tokens_hash(reference.capture)}
    request = replace(forced(plan.request, reference.capture), settings={**plan.request.settings,
                                                                         "key_fields": fields})
    key = cache_key(fields)
    cache_info: dict[str, Any] = {"enabled": options.reference_source.use_cache, "key": key, "hit": False}
    dest = run_dir / label / "capture"
    t0 = time.monotonic()
    capture, source = None, "worker"
    if options.reference_source.file:
        instead = "it is computed here" if blocker is None else "and none can be computed here"
        capture = _from_companion(ctx, companion_file(options.reference_source.file, side), fields, dest, instead)
        source = "file" if capture is not None else source
    if capture is None and options.reference_source.use_cache:
        with ReferenceCache(ctx.cache_root / "references") as cache:
            capture, miss = cache.get(key, dest)
        cache_info.update(hit=capture is not None, **({} if capture is not None else {"miss_reason": miss}))
        source = "cache" if capture is not None else source
    if capture is None and blocker is not None:
        return None, f"{side.engine} {side.dtype} on {side.device} cannot be computed here: {blocker}"
    if capture is None:
        ctx.progress("yardstick", why, {"stage": "start"})
        try:
            captured = run_side(ctx, side_job(ctx, run_dir, label, plan, request))
        except (WorkerError, CaptureError) as exc:  # the target's finished comparison is kept
            ctx.note(f"the {label} could not be captured ({exc.message}): "
                     + ("the run is judged without its ratio" if label == "yardstick" else "not saved"))
            return None, f"its worker failed: {exc.message}"
        if options.reference_source.use_cache:
            with ReferenceCache(ctx.cache_root / "references") as cache:
                cache.put(key, Path(captured.capture.root), fields)
    else:
        captured = Captured(capture, time.monotonic() - t0, {})
    if options.reference_source.save:
        path = companion_file(options.reference_source.save, side)
        save_reference_file(captured.capture, path)
        ctx.note(f"yardstick saved to {path}")
    comparisons = compare(options, reference.capture, captured.capture)
    return YardstickRun(side, captured, source, comparisons, cache_info, why), None


def save_yardsticks(ctx: RunContext, options: RunOptions, profile: DeviceProfile, reference_side: Side,
                    target_side: Side, models: PreparedModels, reference: Captured, run_dir: Path,
                    compare, done: Side | None) -> None:
    """``--save-reference`` with ``--save-yardsticks``: a companion file per precision a device team will run
    against the saved reference (the run's own yardstick, ``done``, is already written)."""
    for dtype in options.reference_source.yardsticks:
        asked, _ = yardstick_options(YardstickSpec("named", None, dtype), reference_side, target_side)
        if asked is None:
            continue
        side = resolve_side(asked, profile, options.capture, str(models.reference_path), options.model)
        if done is not None and (done.engine, done.dtype) == (side.engine, side.dtype):
            continue
        blocker = cpu_worker_blocker(side.engine, side.platform, installed_vllm_build)
        if blocker is not None:
            ctx.note(f"no {dtype} yardstick saved with the reference: {blocker}")
            continue
        capture_yardstick(ctx, options, side, f"saved with the reference ({dtype})", models, reference, run_dir,
                          compare, label=f"yardstick-{dtype}")


def _from_companion(ctx: RunContext, path: Path, fields: dict[str, Any], dest: Path,
                    instead: str = "it is computed here") -> Capture | None:
    """The companion yardstick of a reference file, if there is one and it matches this run's key fields."""
    if not path.is_file():
        ctx.note(f"no yardstick next to the reference file ({path.name}): {instead}")
        return None
    scratch = Path(tempfile.mkdtemp(prefix="vre-yard-"))
    try:
        capture = unpack_capture(path, scratch / "capture")
    except CaptureError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        ctx.note(f"yardstick file {path} cannot be used ({exc.message}): {instead}")
        return None
    except BaseException:  # Ctrl-C or SIGTERM while unpacking a large file: no scratch left behind
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    mine = capture.settings.get("key_fields") or {}
    # what the reference file itself is checked on, and what makes it this yardstick (not engine versions:
    # the file is made on one machine and used on another, as the reference file is)
    differing = [k for k in (*FILE_CHECKED, "engine", "dtype", "role", "forced_on") if mine.get(k) != fields.get(k)]
    if differing:
        shutil.rmtree(scratch, ignore_errors=True)
        ctx.note(f"yardstick file {path} does not match this run ({', '.join(differing)}): {instead}")
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    move_tree(capture.root, dest)
    shutil.rmtree(scratch, ignore_errors=True)
    from ..capture.store import load_capture

    return load_capture(dest)
