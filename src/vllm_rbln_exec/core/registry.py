"""Name -> lazily imported object lookups with did-you-mean errors.

Engines are registered as ``"module:Class"`` strings and imported only when a
worker asks for one, so the main process never pays for (or needs) torch.

A registry may also take entries from an environment variable (``env_var``),
read at every lookup, so the main process and a worker started with the same
environment see the same names: ``NAME=module:Attr`` pairs separated by commas,
semicolons or whitespace. Such an entry adds a name; it may not replace a
built-in one (a stray variable must never swap the reference engine silently).
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from collections.abc import Iterable
from typing import Any

from .errors import UsageError

_ENTRY_RE = re.compile(r"^[A-Za-z_][\w.-]*=[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def suggest(kind: str, name: str, known: Iterable[str]) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}"


def parse_entries(text: str, origin: str, builtin: Iterable[str] = ()) -> dict[str, str]:
    """``"a=pkg.mod:Cls, b=other:Obj"`` -> {"a": "pkg.mod:Cls", "b": "other:Obj"}; UsageError when malformed."""
    builtin = set(builtin)
    out: dict[str, str] = {}
    for item in re.split(r"[,;\s]+", text.strip()):
        if not item:
            continue
        if not _ENTRY_RE.match(item):
            raise UsageError(f"{origin}: {item!r} is not NAME=module:Attr")
        name, _, target = item.partition("=")
        if name in builtin:
            raise UsageError(f"{origin}: {name!r} is built in and cannot be replaced")
        out[name] = target
    return out


class LazyRegistry:
    def __init__(self, kind: str, entries: dict[str, str], env_var: str | None = None):
        self.kind = kind
        self.entries = dict(entries)  # the built-in ones
        self.env_var = env_var

    def extra_entries(self) -> dict[str, str]:
        """Entries added through ``env_var`` (read now, not at import)."""
        if not self.env_var:
            return {}
        return parse_entries(os.environ.get(self.env_var, ""), f"${self.env_var}", self.entries)

    def all_entries(self) -> dict[str, str]:
        return {**self.entries, **self.extra_entries()}

    def names(self) -> list[str]:
        return sorted(self.all_entries())

    def check(self, name: str, option: str | None = None) -> str:
        entries = self.all_entries()
        if name not in entries:
            raise UsageError(suggest(self.kind, name, entries), option=option)
        return name

    def load(self, name: str) -> Any:
        entries = self.all_entries()
        if name not in entries:
            raise UsageError(suggest(self.kind, name, entries))
        module_name, _, attr = entries[name].partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
