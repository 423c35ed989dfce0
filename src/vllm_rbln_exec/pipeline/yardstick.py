"""Pipeline step: the yardstick capture, from a reference file's companion, the cache or a worker.

A yardstick is a third side (``setup.sides.yardstick_options``): an honest
engine at the target's precision, fed the reference's tokens like the target.
It is keyed like a reference (the cache key of its side, plus a hash of the
tokens it was forced on), so a second run finds it in the cache; with
``--save-reference FILE`` it is written next to FILE (``FILE-stem.yardstick-
ENGINE-DTYPE.vre``) and with ``--reference FILE`` that companion is used when
it matches. This module orders those steps and compares the yardstick with the
reference; it never judges and never renders.
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

from ..capture.cache import ReferenceCache, cache_key
from ..capture.store import Capture, CaptureError, unpack_capture
from ..compare.metrics import PromptComparison
from ..core.jsonio import move_tree
from ..setup.options import RunOptions
from ..setup.sides import Side
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


def capture_yardstick(ctx: RunContext, options: RunOptions, side: Side | None, why: str, models: PreparedModels,
                      reference: Captured, run_dir: Path, compare) -> YardstickRun | None:
    """The yardstick of the run compared with the reference (``compare`` as the target is); None without one."""
    if side is None:
        return None
    plan = plan_side(ctx, options, side, models, options.capture.prompts)
    fields = {**key_fields(options, plan, models.weights, models.tokenizer), "role": "yardstick",
              "forced_on": forced_tokens_hash(reference.capture)}
    request = replace(forced(plan.request, reference.capture), settings={**plan.request.settings,
                                                                         "key_fields": fields})
    key = cache_key(fields)
    cache_info: dict[str, Any] = {"enabled": options.reference_source.use_cache, "key": key, "hit": False}
    dest = run_dir / "yardstick" / "capture"
    t0 = time.monotonic()
    capture, source = None, "worker"
    if options.reference_source.file:
        capture = _from_companion(ctx, companion_file(options.reference_source.file, side), fields, dest)
        source = "file" if capture is not None else source
    if capture is None and options.reference_source.use_cache:
        with ReferenceCache(ctx.cache_root / "references") as cache:
            capture, miss = cache.get(key, dest)
        cache_info.update(hit=capture is not None, **({} if capture is not None else {"miss_reason": miss}))
        source = "cache" if capture is not None else source
    if capture is None:
        ctx.progress("yardstick", why, {"stage": "start"})
        captured = run_side(ctx, side_job(ctx, run_dir, "yardstick", plan, request))
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
    return YardstickRun(side, captured, source, comparisons, cache_info, why)


def _from_companion(ctx: RunContext, path: Path, fields: dict[str, Any], dest: Path) -> Capture | None:
    """The companion yardstick of a reference file, if there is one and it matches this run's key fields."""
    if not path.is_file():
        ctx.note(f"no yardstick next to the reference file ({path.name}): it is computed here")
        return None
    scratch = Path(tempfile.mkdtemp(prefix="vre-yard-"))
    try:
        capture = unpack_capture(path, scratch / "capture")
    except CaptureError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        ctx.note(f"yardstick file {path} cannot be used ({exc}): it is computed here")
        return None
    mine = capture.settings.get("key_fields") or {}
    # what the reference file itself is checked on, and what makes it this yardstick (not engine versions:
    # the file is made on one machine and used on another, as the reference file is)
    differing = [k for k in (*FILE_CHECKED, "engine", "dtype", "role", "forced_on") if mine.get(k) != fields.get(k)]
    if differing:
        shutil.rmtree(scratch, ignore_errors=True)
        ctx.note(f"yardstick file {path} does not match this run ({', '.join(differing)}): it is computed here")
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    move_tree(capture.root, dest)
    shutil.rmtree(scratch, ignore_errors=True)
    from ..capture.store import load_capture

    return load_capture(dest)
