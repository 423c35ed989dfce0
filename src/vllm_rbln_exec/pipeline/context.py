"""What the steps of one run share: where things go, how progress is shown, and the notes for the user.

A ``RunContext`` is made once per run and handed to each step; it holds no
results (the steps return those). It must not run anything itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..profiling.request import profile_stamp
from ..setup.devices import DeviceProfile, load_profiles

Progress = Callable[[str, str, dict[str, Any]], None]


def _noop(side: str, message: str, data: dict[str, Any]) -> None:
    pass


@dataclass
class RunContext:
    cache_root: Path  # converted models, compile caches, the reference cache
    profiles: dict[str, DeviceProfile]
    timeout: float
    progress: Progress = _noop
    notes: list[str] = field(default_factory=list)
    stamp: str = field(default_factory=profile_stamp)  # one stamp for every side's trace folder
    run_dir: Path | None = None
    secret_env: frozenset[str] = frozenset()  # variables no worker gets (a server's API key: --api-key-env)

    @classmethod
    def create(cls, cache_dir: str, devices_file: str | None, timeout: float,
               progress: Progress | None = None) -> RunContext:
        return cls(cache_root=Path(cache_dir).resolve(), profiles=load_profiles(devices_file), timeout=timeout,
                   progress=progress or _noop)

    @property
    def models_dir(self) -> Path:
        return self.cache_root / "models"

    def base_env(self) -> dict[str, str]:
        """This process's environment without ``secret_env``: what a worker's environment is built from."""
        return {k: v for k, v in os.environ.items() if k not in self.secret_env}

    def note(self, text: str) -> None:
        self.notes.append(text)

    def on_event(self, label: str | None = None):
        """A worker-event callback that reports under ``label`` (default: the worker's own side)."""
        return lambda handle, event: self.progress(label or handle.job.side, event.get("message", ""), event)
