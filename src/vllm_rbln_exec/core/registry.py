"""Name -> lazily imported object lookups with did-you-mean errors.

Engines are registered as ``"module:Class"`` strings and imported only when a
worker asks for one, so the main process never pays for (or needs) torch.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from typing import Any

from .errors import UsageError


def suggest(kind: str, name: str, known: Iterable[str]) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}"


class LazyRegistry:
    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self.entries = dict(entries)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def check(self, name: str, option: str | None = None) -> str:
        if name not in self.entries:
            raise UsageError(suggest(self.kind, name, self.entries), option=option)
        return name

    def load(self, name: str) -> Any:
        self.check(name)
        module_name, _, attr = self.entries[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)
