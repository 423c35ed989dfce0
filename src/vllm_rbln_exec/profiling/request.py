"""Where a profiled side's traces go, and the typed request a worker's profiler reads.

Owns the trace folder layout (``profile/<side>_<model>_<time>/``) and
``ProfileRequest``. It must not start a profiler (``session``) nor read traces
(``traces``); it imports neither torch nor vLLM.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

META = "profile.json"  # what the worker knew about the profiled generation


@dataclass(frozen=True)
class ProfileRequest:
    """Profile this side's measured generation into ``dir`` (traces named ``prefix_*``)."""

    dir: str
    prefix: str
    memory: bool = False
    shapes: bool = False
    stack: bool = False


def safe_name(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(text)).name)[:limit] or "model"


def profile_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now()).strftime("%Y%m%d-%H%M%S")


def trace_folder(root: str | Path, side: str, model: str, stamp: str) -> Path:
    """``root/<side>_<model>_<stamp>``, absolute (workers run in their own folder),
    with the main process id appended when an earlier run of the same second took it."""
    base = Path(root).expanduser().resolve() / f"{side}_{safe_name(model)}_{stamp}"
    if base.exists() and any(base.iterdir()):
        return base.with_name(f"{base.name}-{os.getpid()}")
    return base


def profile_request(sides: tuple[str, ...], root: str, side: str, model: str, memory: bool, shapes: bool,
                    stack: bool, stamp: str) -> ProfileRequest | None:
    """The request for ``side``, or None when that side is not profiled."""
    if side not in sides:
        return None
    return ProfileRequest(dir=str(trace_folder(root, side, model, stamp)), prefix=side, memory=memory,
                          shapes=shapes, stack=stack)
