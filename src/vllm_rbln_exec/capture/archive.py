"""A capture as one file (a plain tar of its folder), and unpacking one from outside within stated limits.

Reference files and cache entries travel between machines, so unpacking treats them as hostile: only
regular members with plain names (no ``/``, no ``..``, no leading dot, no duplicates), no links, devices
or sparse members, at most ``MAX_MEMBERS`` of them; every member's declared end must lie inside the file
(a plain tar) or inside ``MAX_RATIO`` times the file's size, at least ``RATIO_FLOOR`` (a gzip, bzip2 or
xz-compressed tar): a 1 MiB gzip that would expand to 1 GiB is refused at its first header, before a
byte is written. The declared total must fit the free space of the destination, and every member is
copied in 1 MiB chunks in the calling thread, so a signal ends a large unpack between chunks. On any
failure (an interrupt included) the destination folder is removed. The capture is then loaded with
every array verified (``store.load_capture``). It owns the single-file form only; the format is ``store``'s.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import tarfile
import zlib
from pathlib import Path

from ..core.paths import open_regular
from .schema import MEMBER_NAME
from .store import CAPTURE_JSON, CAPTURE_JSON_MAX_BYTES, Capture, CaptureError, load_capture

MAX_MEMBERS = 30_001  # capture.json and three arrays (logprobs, ids or floors) for each of 10,000 prompts
MAX_RATIO = 100  # q16 captures gzip to about 1.3x, fp32 ones 1.1x, JSON-only (tokens) ones about 8x
RATIO_FLOOR = 64 << 20  # a small file may expand this far whatever its ratio
MAX_HEADER_READ = 1 << 20  # no single read of tar headers (long names, pax records) is larger
_CHUNK = 1 << 20
_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f), "gzip"), (b"BZh", bz2.BZ2File, "bzip2"),
               (b"\xfd7zXZ\x00", lzma.LZMAFile, "xz"))


def pack_capture(root: Path, dest: Path | io.BufferedIOBase) -> None:
    """Write the capture folder ``root`` as one tar file (no pickle, no compression)."""
    root = Path(root)
    names = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if CAPTURE_JSON not in names:
        raise CaptureError(f"{root} is not a finished capture")
    with (tarfile.open(dest, "w") if isinstance(dest, (str, Path)) else tarfile.open(fileobj=dest, mode="w")) as tar:
        for name in names:
            tar.add(root / name, arcname=name)


def unpack_capture(src: Path | io.BufferedIOBase, root: Path) -> Capture:
    """Unpack a single-file capture (a path, or a file opened by the caller) into ``root`` and load it,
    every array verified. CaptureError names what was refused; ``root`` is gone after any failure."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    try:
        if isinstance(src, (str, Path)):
            try:
                raw = open_regular(src)
            except OSError as exc:
                raise CaptureError(f"capture file is unreadable: {exc}") from None
            with raw:
                _unpack(raw, root)
        else:
            _unpack(src, root)
        return load_capture(root, verify_arrays=True)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _unpack(raw, root: Path) -> None:
    try:
        size = os.fstat(raw.fileno()).st_size
    except OSError:  # a stream in memory (io.UnsupportedOperation is an OSError)
        size = _stream_size(raw)
    head = raw.read(6)
    raw.seek(0)
    stream, kind = raw, None
    for magic, opener, name in _COMPRESSED:
        if head.startswith(magic):
            stream, kind = opener(raw), name
    limit = size if kind is None else max(RATIO_FLOOR, MAX_RATIO * size)
    bounded = _Bounded(stream, limit, kind)
    try:
        with tarfile.open(fileobj=bounded, mode="r:") as tar:
            members = _checked_members(tar, limit, kind)
            free = shutil.disk_usage(root).free
            total = sum(m.size for m in members)
            if total > free:
                raise CaptureError(f"unpacking needs {total / 2**30:.1f} GiB but {root.parent} has "
                                   f"{free / 2**30:.1f} GiB free")
            for member in members:
                _extract(tar, member, root)
    except (tarfile.TarError, OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as exc:
        raise CaptureError(f"capture file is unreadable: {exc}") from None


def _checked_members(tar: tarfile.TarFile, limit: int, kind: str | None) -> list[tarfile.TarInfo]:
    members, seen = [], set()
    for member in tar:  # one header at a time: a refusal comes before the rest is read
        name = member.name
        if len(members) >= MAX_MEMBERS:
            raise CaptureError(f"capture file has more than {MAX_MEMBERS} members")
        if not MEMBER_NAME.fullmatch(name) or name in seen:
            raise CaptureError(f"unexpected entry {name!r} in capture file")
        if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.sparse is not None:
            raise CaptureError(f"entry {name!r} in capture file is not a plain file ({_type_name(member)})")
        if member.offset_data + member.size > limit:
            raise CaptureError(_too_large(name, member.size, limit, kind))
        if name == CAPTURE_JSON and member.size > CAPTURE_JSON_MAX_BYTES:
            raise CaptureError(f"{CAPTURE_JSON} in capture file declares {member.size} bytes, more than "
                               f"{CAPTURE_JSON_MAX_BYTES}")
        seen.add(name)
        members.append(member)
    return members


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path) -> None:
    source = tar.extractfile(member)
    fd = os.open(root / member.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    written = 0
    with source, os.fdopen(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > member.size:
                raise CaptureError(f"entry {member.name!r} holds more than it declares")
            out.write(chunk)
    if written != member.size:
        raise CaptureError(f"entry {member.name!r} is cut short ({written} of {member.size} bytes)")


class _Bounded(io.RawIOBase):
    """A read-only view of ``stream`` that refuses to read or seek past ``limit`` (decompressed) bytes."""

    def __init__(self, stream, limit: int, kind: str | None):
        self.stream, self.limit, self.kind = stream, limit, kind

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.stream.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self.stream.tell() + offset if whence == 1 else None
        if target is None or target > self.limit:
            raise CaptureError(_too_large("a member", target, self.limit, self.kind))
        return self.stream.seek(target)

    def read(self, n: int = -1) -> bytes:
        at = self.stream.tell()
        if n is None or n < 0 or n > max(_CHUNK, MAX_HEADER_READ) or at + n > self.limit + 1024:
            want = "everything" if n is None or n < 0 else n
            raise CaptureError(f"capture file asks to read {want} bytes at {at}: "
                               f"{_too_large('a header', n, self.limit, self.kind)}")
        return self.stream.read(n)


def _too_large(what: str, size: int | None, limit: int, kind: str | None) -> str:
    if kind is None:
        return f"{what} declares {size} bytes, past the end of the file ({limit} bytes): cut short or forged"
    return (f"{what} declares {size} bytes, more than a {kind}-compressed file of this size may expand to "
            f"({limit} bytes: {MAX_RATIO}x its size, at least {RATIO_FLOOR >> 20} MiB)")


def _type_name(member: tarfile.TarInfo) -> str:
    if member.sparse is not None or member.type == tarfile.GNUTYPE_SPARSE:
        return "a sparse file"
    return {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.DIRTYPE: "a folder",
            tarfile.FIFOTYPE: "a FIFO", tarfile.CHRTYPE: "a character device",
            tarfile.BLKTYPE: "a block device"}.get(member.type, f"type {member.type!r}")


def _stream_size(stream) -> int:
    at = stream.tell()
    size = stream.seek(0, io.SEEK_END)
    stream.seek(at)
    return size
