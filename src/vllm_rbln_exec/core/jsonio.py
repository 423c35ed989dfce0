"""Writing JSON the harness can read back anywhere: strict values, atomic files.

Owns the conversion of run data to plain JSON (no NaN or inf, which strict
parsers reject: they become null) and the one atomic writer every report,
capture and worker file goes through. Pure standard library; it must not import
numpy, torch or any other module of the harness.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any


def strict_json(value: Any) -> Any:
    """Plain JSON types only: non-finite floats -> None, numpy scalars -> Python, tuples -> lists.

    Anything else is written as its text, so an unexpected type in a record can
    never lose a report that took minutes of engine time to make.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar (numpy is not needed to detect it)
        return strict_json(value.item())
    return str(value)


_UMASK = os.umask(0o022)  # read once, at import, before any thread could create a file in between
os.umask(_UMASK)


class UnsafeOutput(OSError):
    """A writer was pointed at something it must not replace (see ``unsafe_output``)."""


def unsafe_output(path: str | Path) -> str | None:
    """Why a writer must not replace ``path``, or None (absent, or a regular file).

    Read with ``lstat``, never by opening: opening a FIFO for writing blocks until a reader comes. Every
    writer renames a temporary file over its target, which would turn a device node, a FIFO or a symbolic
    link into a regular file (as root, ``--json /dev/full`` replaced the device). A link is refused rather
    than written through: the file it names may be anybody's, so the caller names it instead."""
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there to replace; whether it can be made is
        return None  # the caller's question (setup.checks.unwritable_place)
    except OSError as exc:
        return f"cannot be looked at ({exc.strerror})"
    if stat.S_ISREG(info.st_mode):
        return None
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link, which a report never replaces or writes through (name the file itself)"
    if stat.S_ISDIR(info.st_mode):
        return "is a folder; give a file name"
    return f"is a {_file_kind(info.st_mode)}, not a regular file, and is never replaced"


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def refuse_unsafe_output(path: str | Path) -> None:
    reason = unsafe_output(path)
    if reason is not None:
        raise UnsafeOutput(f"{path} {reason}")


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file: readers see the old file or the new one, and a
    failed write (a full disk) leaves neither a partial file nor the temporary one. The temporary file is
    created exclusively (``mkstemp``), so nothing placed at a guessable name is followed."""
    path = Path(path)
    refuse_unsafe_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; a plain open() would have given this
        refuse_unsafe_output(path)  # again: something may have been put there while the report was written
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """``write_bytes_atomic`` of the UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def move_tree(src: Path, dest: Path) -> Path:
    """Move the folder ``src`` to ``dest`` (which must not exist). A rename where it can; across file systems a
    copy into a temporary folder beside ``dest``, renamed at the end, so a failed copy (a full disk) leaves no
    half-copied folder, and no 0-byte ``capture.json``, at ``dest``; ``src`` is removed only after success."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dest)
        return dest
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(src, ignore_errors=True)
    return dest


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n")
