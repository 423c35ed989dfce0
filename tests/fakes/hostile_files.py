"""Hostile inputs made by hand: signed capture metadata with any content, tar files with any member,
an old-format (diskcache) cache database with any row, and pickles that leave a marker file when loaded.

Shared by tests/unit/test_hostile_files.py and tests/plumbing/test_hostile_files_cli.py. Standard library
and numpy only; nothing here imports diskcache (the old database is written with sqlite3, as diskcache
lays it out), so the tests do not depend on it.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import sqlite3
import tarfile
from pathlib import Path
from typing import Any

from vllm_rbln_exec.capture.store import CAPTURE_JSON, metadata_digest

DISKCACHE_SCHEMA = (
    "CREATE TABLE Settings (key TEXT NOT NULL UNIQUE, value)",
    "CREATE TABLE Cache (rowid INTEGER PRIMARY KEY, key BLOB, raw INTEGER, store_time REAL, expire_time REAL, "
    "access_time REAL, access_count INTEGER DEFAULT 0, tag BLOB, size INTEGER DEFAULT 0, mode INTEGER DEFAULT 0, "
    "filename TEXT, value BLOB)",
    "CREATE UNIQUE INDEX Cache_key_raw ON Cache(key, raw)",
)
MODE_RAW, MODE_BINARY, MODE_TEXT, MODE_PICKLE = 1, 2, 3, 4


class MarkerPayload:
    """Unpickling this creates ``path`` (``open(path, "w")``): a stand-in for any code a pickle can run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickled_marker(path: Path) -> bytes:
    return pickle.dumps(MarkerPayload(path))


def sign_capture_json(root: Path, data: Any) -> None:
    """Write ``data`` as ``root/capture.json``; a dict gets a matching metadata digest, so the check under
    test is the one that fires (a forger recomputes the digest too)."""
    if isinstance(data, dict):
        data = {**data, "digest": metadata_digest(data)}
    (root / CAPTURE_JSON).write_text(json.dumps(data) if not isinstance(data, str) else data)


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], compress: str | None = None) -> bytes:
    """A tar of the given headers (and data), plain or gzip-compressed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    blob = buf.getvalue()
    return gzip.compress(blob, compresslevel=1) if compress == "gzip" else blob


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


def folder_as_tar(root: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> bytes:
    """The files of a capture folder as a tar (as pack_capture writes it), then the ``extra`` members."""
    members = [(member(p.name), p.read_bytes()) for p in sorted(root.iterdir()) if p.is_file()]
    return tar_bytes(members + list(extra))


def gzip_bomb(expanded: int, name: str = "p0000.logprobs.npy") -> bytes:
    """A gzip-compressed tar whose one member declares ``expanded`` bytes of zeros (written by streaming)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz:
        info = member(name)
        info.size = expanded
        gz.write(info.tobuf(format=tarfile.GNU_FORMAT))
        chunk = bytes(1 << 20)
        left = expanded
        while left > 0:
            gz.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        gz.write(bytes(-expanded % 512 + 1024))
    return out.getvalue()


def legacy_cache(root: Path, rows: list[tuple[Any, int, int, str | None, Any]]) -> Path:
    """A cache folder in the old diskcache layout: ``cache.db`` with rows (key, raw, mode, filename, value)."""
    root.mkdir(parents=True, exist_ok=True)
    db = root / "cache.db"
    conn = sqlite3.connect(db)
    for statement in DISKCACHE_SCHEMA:
        conn.execute(statement)
    conn.executemany("INSERT INTO Cache (key, raw, store_time, mode, filename, value) VALUES (?, ?, 0, ?, ?, ?)",
                     rows)
    conn.commit()
    conn.close()
    return db


def legacy_rows_of(key: str, packed: bytes, fields: dict[str, Any],
                   root: Path | None = None) -> list[tuple[Any, int, int, str | None, Any]]:
    """The two rows the old code wrote for one entry: its JSON record, and the packed capture inline or (with
    ``root``, as diskcache stores a large value) in a value file ``root/XX/YY/NAME.val``."""
    meta = json.dumps({"key": key, "bytes": len(packed), "fields": fields})
    ref: tuple[Any, int, int, str | None, Any] = ("ref:" + key, 1, MODE_RAW, None, packed)
    if root is not None:
        name = f"{key[:2]}/{key[2:4]}/{key[4:32]}.val"
        (root / name).parent.mkdir(parents=True)
        (root / name).write_bytes(packed)
        ref = ("ref:" + key, 1, MODE_BINARY, name, None)
    return [ref, ("meta:" + key, 1, MODE_RAW, None, meta)]


def hostile_legacy_rows(marker: Path) -> list[tuple[Any, int, int, str | None, Any]]:
    """Rows that would run the marker payload if anything unpickled them: a pickled value under a reference's
    key and under a record's key, a pickled key, and a value file outside the folder."""
    payload = pickled_marker(marker)
    key = "e" * 64
    return [("ref:" + key, 1, MODE_PICKLE, None, payload), ("meta:" + key, 1, MODE_PICKLE, None, payload),
            (payload, 0, MODE_RAW, None, b"x"),
            ("ref:" + "f" * 64, 1, MODE_BINARY, "../../../../etc/passwd", None),
            ("meta:" + "f" * 64, 1, MODE_RAW, None, json.dumps({"key": "f" * 64, "fields": {}}))]
