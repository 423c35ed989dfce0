"""The reference cache: captures keyed by everything that changes them.

Entries live in a diskcache ``Cache`` under ``cache/references``. The value is
the capture packed as one plain tar (bytes or a file stream: diskcache stores
those raw, never pickled); a small JSON side entry describes it for listing.
An entry that fails to unpack or verify is deleted and reported as a miss, so
a damaged cache costs a recomputation, never a wrong comparison.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..core.jsonio import refuse_unsafe_output
from .store import Capture, CaptureError, pack_capture, unpack_capture

KEY_VERSION = 1
META_PREFIX = "meta:"
REF_PREFIX = "ref:"


def cache_key(fields: dict[str, Any]) -> str:
    """A stable hash of the key fields (canonical JSON, sorted keys)."""
    blob = json.dumps({"key_version": KEY_VERSION, **fields}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class ReferenceCache:
    def __init__(self, root: Path):
        import diskcache

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache = diskcache.Cache(str(self.root), size_limit=2**40, eviction_policy="none")

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> ReferenceCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, key: str, dest: Path) -> tuple[Capture | None, str | None]:
        """(capture unpacked into ``dest``, None) on a hit; (None, why) on a miss."""
        handle = self.cache.get(REF_PREFIX + key, default=None, read=True)
        if handle is None:
            return None, "not cached"
        if isinstance(handle, (bytes, bytearray, memoryview)):
            handle = io.BytesIO(handle)  # small values live inside diskcache's database
        try:
            if not hasattr(handle, "read"):
                raise CaptureError(f"stored value is a {type(handle).__name__}, not a capture file")
            with handle:
                return unpack_capture(handle, dest), None
        except CaptureError as exc:
            self.delete(key)
            return None, f"cached entry was unreadable and was dropped ({exc})"

    def put(self, key: str, capture_dir: Path, fields: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".pack-", suffix=".tar", dir=self.root)
        os.close(fd)
        try:
            pack_capture(capture_dir, Path(tmp))
            with open(tmp, "rb") as f:
                self.cache.set(REF_PREFIX + key, f, read=True)
            size = os.path.getsize(tmp)
        finally:
            os.unlink(tmp)
        meta = {"key": key, "bytes": size, "fields": fields}
        self.cache.set(META_PREFIX + key, json.dumps(meta, default=str))

    def delete(self, key: str) -> bool:
        a = self.cache.delete(REF_PREFIX + key)
        b = self.cache.delete(META_PREFIX + key)
        return bool(a or b)

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for k in self.cache.iterkeys():
            if isinstance(k, str) and k.startswith(META_PREFIX):
                try:
                    out.append(json.loads(self.cache.get(k)))
                except (TypeError, ValueError):
                    continue
        return out

    def __contains__(self, key: str) -> bool:
        return (REF_PREFIX + key) in self.cache

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
        handle = self.cache.get(REF_PREFIX + key, default=None, read=True)
        if handle is None:
            raise KeyError(f"no cached reference {key}")
        if isinstance(handle, (bytes, bytearray, memoryview)):
            handle = io.BytesIO(handle)
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
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".import-") as tmp:
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
