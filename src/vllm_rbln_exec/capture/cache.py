"""The reference cache: captures keyed by everything that changes them, stored as plain files.

Entries live under ``cache/references/entries``: ``KEY.vre``, the capture packed as one plain tar (the
reference-file form, unpacked within ``archive``'s limits), and ``KEY.json``, a small JSON record that
describes it for listing. Nothing in the cache is ever unpickled: values are bytes and JSON only, every
name is a 64-digit hex key, and each file is opened only if it is a regular file (no link, FIFO or device),
so a cache folder restored from a CI artifact or shared between machines cannot run code or make the
harness read outside it. Writers write a temporary file and rename it, so concurrent runs each leave a
whole entry and readers see one whole entry or none. An entry that fails to unpack or verify is deleted
and reported as a miss: a damaged cache costs a recomputation, never a wrong comparison. Caches made by
earlier versions (a diskcache database) are converted on first use by ``legacy_cache``, which never
unpickles. It owns the cache only; the capture format is ``store``'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ..core.errors import HarnessError
from ..core.jsonio import refuse_unsafe_output
from ..core.paths import open_regular
from .archive import pack_capture, unpack_capture
from .store import Capture, CaptureError

KEY_VERSION = 1
ENTRIES = "entries"
KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
META_MAX_BYTES = 64 << 20  # the key fields list every prompt: a 10,000-prompt entry's is a few MiB


class CacheError(HarnessError):
    """The cache folder cannot be used (an unreadable old database, a file where a folder must be): exit 3."""


def cache_key(fields: dict[str, Any]) -> str:
    """A stable hash of the key fields (canonical JSON, sorted keys)."""
    blob = json.dumps({"key_version": KEY_VERSION, **fields}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class ReferenceCache:
    def __init__(self, root: Path):
        from .legacy_cache import migrate_legacy

        self.root = Path(root)
        self.entries_dir = self.root / ENTRIES
        try:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"the reference cache {self.root} cannot be made: {exc.strerror or exc}") from None
        if self.entries_dir.is_symlink() or not self.entries_dir.is_dir():
            raise CacheError(f"the reference cache {self.root}: {ENTRIES} is not a folder; move it away")
        self.notes: list[str] = migrate_legacy(self.root, self._write_entry)

    def close(self) -> None:
        pass  # nothing stays open between calls

    def __enter__(self) -> ReferenceCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _file(self, key: str, suffix: str) -> Path:
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            raise KeyError(f"{key!r} is not a cache key (64 hexadecimal digits)")
        return self.entries_dir / f"{key}{suffix}"

    def get(self, key: str, dest: Path) -> tuple[Capture | None, str | None]:
        """(capture unpacked into ``dest``, None) on a hit; (None, why) on a miss."""
        path = self._file(key, ".vre")
        if not os.path.lexists(path):
            return None, "not cached"
        try:
            try:
                handle = open_regular(path, follow=False)
            except OSError as exc:
                raise CaptureError(str(exc)) from None
            with handle:
                return unpack_capture(handle, dest), None
        except CaptureError as exc:
            self.delete(key)
            return None, f"cached entry was unreadable and was dropped ({exc.message})"

    def put(self, key: str, capture_dir: Path, fields: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".pack-", suffix=".tar", dir=self.entries_dir)
        os.close(fd)
        try:
            pack_capture(capture_dir, Path(tmp))
            self._write_entry(key, Path(tmp), {"key": key, "bytes": os.path.getsize(tmp), "fields": fields})
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _write_entry(self, key: str, packed: Path, meta: dict[str, Any]) -> None:
        """Rename ``packed`` (a file in this cache's folder) into place, then write its record."""
        os.replace(packed, self._file(key, ".vre"))
        fd, tmp = tempfile.mkstemp(prefix=".meta-", suffix=".json", dir=self.entries_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(meta, f, default=str)
            os.replace(tmp, self._file(key, ".json"))
        finally:
            Path(tmp).unlink(missing_ok=True)

    def delete(self, key: str) -> bool:
        found = False
        for suffix in (".json", ".vre"):  # the record first: a listed entry always has its capture
            try:
                self._file(key, suffix).unlink()
                found = True
            except FileNotFoundError:
                pass
        return found

    def entries(self) -> list[dict[str, Any]]:
        """The records of every entry (one that is not a JSON record of its own key is left out)."""
        out = []
        for name in sorted(os.listdir(self.entries_dir)):
            key, dot, suffix = name.partition(".")
            if suffix != "json" or not KEY_PATTERN.fullmatch(key):
                continue
            meta = self._meta(key)
            if meta is not None:
                out.append(meta)
        return out

    def _meta(self, key: str) -> dict[str, Any] | None:
        try:
            with open_regular(self._file(key, ".json"), follow=False, max_bytes=META_MAX_BYTES) as f:
                meta = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(meta, dict) or meta.get("key") != key or not isinstance(meta.get("fields"), dict):
            return None
        return meta

    def __contains__(self, key: str) -> bool:
        return os.path.lexists(self._file(key, ".vre"))

    # -- management (the `cache` subcommands) --------------------------------------
    def resolve(self, prefix: str) -> str:
        """The full key starting with ``prefix`` (as ``git`` resolves short hashes)."""
        keys = [e["key"] for e in self.entries() if str(e.get("key", "")).startswith(prefix)]
        if len(keys) == 1:
            return keys[0]
        if not keys:
            raise KeyError(f"no cached reference has a key starting with {prefix!r}")
        raise KeyError(f"{prefix!r} is ambiguous: {len(keys)} keys start with it")

    def export(self, key: str, dest: Path) -> int:
        """Write the entry as a portable reference file (the packed capture); returns its size."""
        try:
            handle = open_regular(self._file(key, ".vre"), follow=False)
        except FileNotFoundError:
            raise KeyError(f"no cached reference {key}") from None
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        try:
            with handle, open(tmp, "wb") as out:
                while chunk := handle.read(1 << 20):
                    out.write(chunk)
            refuse_unsafe_output(dest)  # never replace a link, FIFO or device (cli.cache checked it up front too)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
        return dest.stat().st_size

    def import_file(self, path: Path) -> str:
        """Store a reference file under the key its own metadata gives; returns the key.

        The file is unpacked and verified first, so a damaged or foreign file is
        refused here rather than turning into a silent cache miss later.
        """
        path = Path(path)
        with tempfile.TemporaryDirectory(dir=self.entries_dir, prefix=".import-") as tmp:
            capture = unpack_capture(path, Path(tmp) / "capture")
            fields = capture.settings.get("key_fields")
            if not isinstance(fields, dict) or not fields:
                raise CaptureError(f"{path} carries no cache key fields (not a reference capture)")
            key = cache_key(fields)
            self.put(key, Path(capture.root), fields)
        return key

    def clear(self) -> int:
        """Delete every reference; returns how many there were."""
        keys = [e["key"] for e in self.entries()]
        for key in keys:
            self.delete(key)
        return len(keys)
