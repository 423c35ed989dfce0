"""Files from outside, opened safely: what a path is (in words) and opening only regular files.

Owns the one check that a path names a regular file before anything reads it (a FIFO would block the
open, ``/dev/zero`` would never end, a link could lead anywhere) and the words for what it is instead.
Pure standard library; it must not import any other module of the harness.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def kind_of(mode: int) -> str:
    """``st_mode`` in words ("a folder", "a FIFO (named pipe)", ...; "a regular file")."""
    for test, words in _KINDS:
        if test(mode):
            return words
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def not_a_file(path: Path | str, follow: bool = True) -> str | None:
    """None when ``path`` is a regular file; else what it is, as the end of a sentence
    ("does not exist", "is a folder, not a file", "is a FIFO (named pipe), not a file")."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(st.st_mode):
        return None
    return f"is {kind_of(st.st_mode)}, not a file"


def open_regular(path: Path | str, follow: bool = True, max_bytes: int | None = None):
    """``path`` opened for binary reading, only if it is a regular file (checked on the open descriptor,
    so nothing can swap it in between); a FIFO is opened without blocking and refused. With ``follow``
    False a symbolic link is refused too. Raises OSError (FileNotFoundError, IsADirectoryError, or a plain
    OSError whose text says what the path is)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not follow and exc.errno == getattr(os, "ELOOP", -1):
            raise OSError(exc.errno, f"{path} is a symbolic link, not a file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is {kind_of(st.st_mode)}, not a file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise OSError(f"{path} holds {st.st_size} bytes, more than the {max_bytes} allowed")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
