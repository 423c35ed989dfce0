"""Converting a reference cache made by earlier versions (a diskcache database) without unpickling.

Earlier versions kept the cache in diskcache, whose values may be pickles: a crafted entry would run
code on ``cache ls``. This module reads such a database with ``sqlite3`` alone, read-only, and converts
only the rows the old code wrote as plain data: a text key ``ref:KEY`` whose value is bytes (inline or in
one of diskcache's ``XX/YY/NAME.val`` files, opened only if a regular file inside the folder) and a text
key ``meta:KEY`` whose value is a JSON record of that key. Every other row (a pickled key or value above
all) is never decoded; it is counted and left, with the database, in ``legacy-diskcache/`` for the user
to delete. A database that cannot be read is refused with advice (exit 3), never half used. It owns the
conversion only; the cache itself is ``cache``'s.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..core.errors import HarnessError
from ..core.paths import open_regular

DB = "cache.db"
LEGACY = "legacy-diskcache"
MODE_RAW, MODE_BINARY, MODE_TEXT = 1, 2, 3  # diskcache's modes; 4 (pickle) is never read
_KEY = re.compile(r"(ref|meta):([0-9a-f]{64})")
_VAL_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val")
_SUBDIR = re.compile(r"[0-9a-f]{2}")
META_MAX_BYTES = 64 << 20

WriteEntry = Callable[[str, Path, dict[str, Any]], None]


def migrate_legacy(root: Path, write_entry: WriteEntry) -> list[str]:
    """Convert ``root/cache.db`` into entries (through ``write_entry``) once; the notes to show (none when
    there was nothing to convert). Raises HarnessError (exit 3) where the database cannot be read."""
    if not os.path.lexists(root / DB):
        return []
    with open(root / ".convert.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs starting at once convert it once
        if not os.path.lexists(root / DB):
            return []
        rows = _read_rows(root)
        converted, left = _convert(root, rows, write_entry)
        return [_retire(root, converted, left)]


def _read_rows(root: Path) -> list[tuple[Any, ...]]:
    db = root / DB
    mode = os.lstat(db).st_mode
    if not stat.S_ISREG(mode):
        raise _unreadable(root, "it is not a regular file")
    try:
        conn = sqlite3.connect(f"file:{quote(str(db.resolve()))}?mode=ro", uri=True)
        try:
            conn.execute("PRAGMA trusted_schema = OFF")  # no function with side effects from its schema
            conn.execute("PRAGMA query_only = ON")
            return conn.execute("SELECT key, raw, mode, filename, value FROM Cache").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _unreadable(root, str(exc)) from None


def _convert(root: Path, rows: list[tuple[Any, ...]], write_entry: WriteEntry) -> tuple[int, int]:
    """(entries converted, rows left unread)."""
    refs, metas, left = {}, {}, 0
    for key, raw, mode, filename, value in rows:
        match = _KEY.fullmatch(key) if raw == 1 and isinstance(key, str) else None
        if match is None:
            left += 1  # a pickled key, or one the old code never wrote
            continue
        (refs if match[1] == "ref" else metas)[match[2]] = (mode, filename, value)
    converted = 0
    for key in sorted(set(refs) & set(metas)):
        meta = _meta(root, key, *metas[key])
        fd, tmp = tempfile.mkstemp(prefix=".convert-", dir=root / "entries")
        try:
            with os.fdopen(fd, "wb") as out:
                ok = meta is not None and _copy_value(root, *refs[key], out)
            if ok:
                write_entry(key, Path(tmp), meta)
                converted += 1
        finally:
            Path(tmp).unlink(missing_ok=True)
    return converted, left + len(refs) + len(metas) - 2 * converted


def _meta(root: Path, key: str, mode: Any, filename: Any, value: Any) -> dict[str, Any] | None:
    try:
        if mode == MODE_RAW and isinstance(value, str):
            text = value
        elif mode == MODE_TEXT:
            path = _val_path(root, filename)
            if path is None:
                return None
            with open_regular(path, follow=False, max_bytes=META_MAX_BYTES) as f:
                text = f.read().decode("utf-8")
        else:
            return None  # a pickle (mode 4) or bytes the old code never wrote here
        meta = json.loads(text)
    except (OSError, ValueError, RecursionError):
        return None
    ok = isinstance(meta, dict) and meta.get("key") == key and isinstance(meta.get("fields"), dict)
    return meta if ok else None


def _copy_value(root: Path, mode: Any, filename: Any, value: Any, out) -> bool:
    if mode == MODE_RAW and isinstance(value, bytes):
        out.write(value)
        return True
    path = _val_path(root, filename) if mode == MODE_BINARY else None
    if path is None:
        return False
    try:
        with open_regular(path, follow=False) as f:
            shutil.copyfileobj(f, out, 1 << 20)
    except OSError:
        return False
    return True


def _val_path(root: Path, filename: Any) -> Path | None:
    """The value file inside ``root`` (diskcache's ``XX/YY/NAME.val``, no link on the way); else None."""
    if not isinstance(filename, str) or not _VAL_FILE.fullmatch(filename):
        return None
    first, second, _ = filename.split("/")
    for folder in (root / first, root / first / second):
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                return None
        except OSError:
            return None
    return root / filename


def _retire(root: Path, converted: int, left: int) -> str:
    """Move the old database and value folders out of the way; the note that says what happened."""
    old = [root / name for name in os.listdir(root)
           if name.startswith(DB) or (_SUBDIR.fullmatch(name) and (root / name).is_dir())]
    said = f"the reference cache {root} was converted from the old diskcache format ({converted} entries)"
    if left == 0:
        for path in old:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        return said
    dest = Path(tempfile.mkdtemp(prefix=f"{LEGACY}-", dir=root))
    for path in old:
        os.replace(path, dest / path.name)
    return (f"{said}; {left} other record(s), pickled or of unknown form, were not read (never unpickled) "
            f"and were moved to {dest}: delete that folder")


def _unreadable(root: Path, why: str) -> HarnessError:
    return HarnessError(f"the reference cache {root} holds an old {DB} that cannot be read ({why}); move it "
                        f"away or delete {root} to start an empty cache")
