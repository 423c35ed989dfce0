"""The capture record and its on-disk format.

A capture is what one side (reference or target) produced for a list of
prompts: generated token ids and text, and per generated position either the
full-vocabulary logprob row or the top-N (ids, logprobs). It is a folder:

    capture.json          metadata, settings, per-prompt records (schema versioned)
    p0000.logprobs.npy    float32 [positions, vocab] (full) or [positions, N] (top-N)
    p0000.ids.npy         int32 [positions, N], top-N mode only

Arrays are plain ``.npy`` files, loaded with ``allow_pickle=False`` and memory
mapped, so a large capture is never read whole. Every array file carries a
SHA-256 digest in ``capture.json`` and the metadata carries one of itself, both
written at ``finish`` and checked by ``load_capture(verify_arrays=True)``: a
damaged byte in the middle of an array is refused, never compared. This module owns the format; it
must not import torch or vLLM (the main process reads captures too).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import HarnessError
from ..core.jsonio import strict_json, write_json_atomic
from ..core.paths import kind_of, open_regular
from .q16 import Q16_RANGE, dequantize_q16, quantize_q16
from .schema import SchemaError, check_capture_json

# 2: q16 records carry the range their levels span (version 1 did not, and its
# builds used two different ranges, so its q16 files cannot be decoded safely).
# 3: every array file has a digest, and the metadata one of itself.
SCHEMA_VERSION = 3
DIGEST = "sha256"  # 1.1 GB/s on this machine's CPU (SHA-NI); blake2b 0.5, md5 0.7 GB/s (measured)
_HASH_CHUNK = 1 << 22
_HASH_THREADS = max(1, min(4, os.cpu_count() or 1))
CAPTURE_JSON = "capture.json"
CAPTURE_JSON_MAX_BYTES = 64 << 20  # a 4-prompt capture's is about 10 KiB; a 2,000-window corpus's about 5 MiB
FULL = "full"
TOPN = "topn"
# Token ids and texts only, no arrays: what ``capture: "plain"`` (plain greedy
# generation, the benchmark's baseline) records. Never compared.
TOKENS = "tokens"
STORE_FP32 = "fp32"
STORE_Q16 = "q16"
STORES = (STORE_Q16, STORE_FP32)

class CaptureError(HarnessError):
    """A capture folder or file is missing, truncated, damaged or of another schema (exit 3 unless a caller
    knows better: a bad reference file is the user's input, exit 2)."""


def _q16_span(record: PromptRecord) -> float:
    span = record.q16_range
    if not isinstance(span, (int, float)) or isinstance(span, bool) or not 0 < span < 1e4:
        raise CaptureError(f"{record.logprobs_file}: q16 levels without a valid range ({span!r})")
    return float(span)


@dataclass
class SideInfo:
    """Who produced a capture and on what."""

    side: str
    device: str
    engine: str
    engine_version: str = ""
    torch_version: str = ""
    platform: str = ""
    dtype: str = ""
    model: str = ""
    model_fingerprint: str = ""
    tokenizer_fingerprint: str = ""
    hostname: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptRecord:
    index: int
    prompt: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs_file: str | None  # None in a TOKENS capture
    ids_file: str | None = None
    floor_file: str | None = None  # set when the logprobs are stored as q16 levels
    q16_range: float | None = None  # nats below each row's top that the q16 levels span
    digests: dict[str, str] = field(default_factory=dict)  # array file name -> "sha256:<hex>"

    def files(self) -> list[tuple[str, str]]:
        """(what, file name) of each array this record stores."""
        named = (("logprobs", self.logprobs_file), ("ids", self.ids_file), ("floors", self.floor_file))
        return [(what, name) for what, name in named if name]


@dataclass
class Capture:
    info: SideInfo
    settings: dict[str, Any]
    mode: str
    vocab_size: int
    prompts: list[PromptRecord]
    schema_version: int = SCHEMA_VERSION
    root: Path | None = None

    # -- arrays ------------------------------------------------------------
    def logprobs(self, i: int) -> np.ndarray:
        """Per-position logprobs of prompt ``i`` ([T, V] full, [T, N] top-N), float32."""
        record = self.prompts[i]
        if record.logprobs_file is None:
            raise CaptureError(f"capture mode {self.mode!r} holds tokens only, no logprobs")
        data = _load_array(self._path(record.logprobs_file))
        if record.floor_file is None:
            return data
        return dequantize_q16(data, _load_array(self._path(record.floor_file)), _q16_span(record))

    def top_ids(self, i: int) -> np.ndarray | None:
        name = self.prompts[i].ids_file
        return None if name is None else _load_array(self._path(name))

    def _path(self, name: str) -> Path:
        if self.root is None:
            raise CaptureError("capture has no folder; it was never saved or loaded")
        path = self.root / name
        try:
            mode = os.lstat(path).st_mode
        except OSError as exc:
            raise CaptureError(f"cannot read {name}: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(mode):  # the name is plain (schema), but the entry itself may be a link or a FIFO
            raise CaptureError(f"{name} is {kind_of(mode)}, not an array file")
        return path

    # -- (de)serialisation --------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("root")
        data = strict_json(data)  # what the file will hold, so the digest reads back the same
        data["digest"] = metadata_digest(data)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path | None = None) -> Capture:
        if not isinstance(data, dict):
            raise CaptureError(f"{CAPTURE_JSON} holds a JSON {type(data).__name__}, not an object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            hint = {1: " (written by a pre-release build whose q16 layout it does not record: capture it again)",
                    2: " (written before captures carried digests of their arrays, so damage in it could not be "
                       "found: capture it again, or save the reference file again with this version)"}.get(version, "")
            raise CaptureError(
                f"capture schema version {version!r} is not the supported {SCHEMA_VERSION}{hint}"
            )
        if data.get("digest") != metadata_digest(data):
            raise CaptureError(f"{CAPTURE_JSON}: metadata digest mismatch (the file was changed or damaged)")
        try:
            check_capture_json(data, (FULL, TOPN, TOKENS))
        except SchemaError as exc:
            raise CaptureError(f"{CAPTURE_JSON} is malformed: {exc}") from None
        try:
            return cls(
                info=SideInfo(**data["info"]),
                settings=dict(data["settings"]),
                mode=data["mode"],
                vocab_size=int(data["vocab_size"]),
                prompts=[PromptRecord(**p) for p in data["prompts"]],
                schema_version=version,
                root=root,
            )
        except (KeyError, TypeError) as exc:
            raise CaptureError(f"capture metadata is malformed: {exc}") from exc


class CaptureWriter:
    """Writes one capture folder, prompt by prompt, metadata last.

    Arrays are either handed over (``add`` with arrays) or preallocated as
    memory-mapped ``.npy`` files (``allocate``) that an engine fills in place.
    ``capture.json`` is written atomically by :meth:`finish` only, so a folder
    without it is an unfinished capture and is never read as a complete one.
    """

    def __init__(self, root: Path, info: SideInfo, settings: dict[str, Any], mode: str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.info = info
        self.settings = settings
        self.mode = mode
        self.vocab_size = 0
        self.records: dict[int, PromptRecord] = {}

    @staticmethod
    def names(index: int) -> tuple[str, str]:
        return f"p{index:04d}.logprobs.npy", f"p{index:04d}.ids.npy"

    def allocate(self, index: int, positions: int, width: int, with_ids: bool) -> tuple[Path, Path | None]:
        lp_name, ids_name = self.names(index)
        _preallocated(self.root / lp_name, np.float32, (positions, width))
        ids_path = None
        if with_ids:
            ids_path = self.root / ids_name
            _preallocated(ids_path, np.int32, (positions, width))
        return self.root / lp_name, ids_path

    def add_time(self, key: str, seconds: float) -> None:
        self.info.timings[key] = self.info.timings.get(key, 0.0) + float(seconds)

    def add(
        self,
        index: int,
        prompt: str,
        prompt_token_ids: list[int],
        token_ids: list[int],
        text: str,
        logprobs: np.ndarray | None = None,
        ids: np.ndarray | None = None,
    ) -> PromptRecord:
        """Record prompt ``index``; without arrays, its allocated files are kept
        (cut to the number of generated tokens)."""
        if self.mode == TOKENS:
            if logprobs is not None or ids is not None:
                raise CaptureError("a tokens-only capture takes no arrays")
            record = PromptRecord(index=index, prompt=prompt, prompt_token_ids=[int(t) for t in prompt_token_ids],
                                  token_ids=[int(t) for t in token_ids], text=text, logprobs_file=None)
            self.records[index] = record
            return record
        lp_name, ids_name = self.names(index)
        n = len(token_ids)
        has_ids = ids is not None or (logprobs is None and (self.root / ids_name).exists())
        if logprobs is None:
            logprobs = np.load(self.root / lp_name, mmap_mode="r")
            ids = np.load(self.root / ids_name, mmap_mode="r") if has_ids else None
            if logprobs.shape[0] != n:  # fewer tokens than allocated (max-model-len reached)
                logprobs, ids = np.array(logprobs[:n]), None if ids is None else np.array(ids[:n])
                np.save(self.root / lp_name, logprobs)
                if ids is not None:
                    np.save(self.root / ids_name, ids)
        else:
            np.save(self.root / lp_name, np.ascontiguousarray(logprobs, dtype=np.float32))
            if ids is not None:
                np.save(self.root / ids_name, np.ascontiguousarray(ids, dtype=np.int32))
        if self.mode == FULL and logprobs.ndim == 2:
            self.vocab_size = max(self.vocab_size, int(logprobs.shape[1]))
        record = PromptRecord(
            index=index,
            prompt=prompt,
            prompt_token_ids=[int(t) for t in prompt_token_ids],
            token_ids=[int(t) for t in token_ids],
            text=text,
            logprobs_file=lp_name,
            ids_file=ids_name if has_ids else None,
        )
        self.records[index] = record
        return record

    def finish(self, vocab_size: int | None = None, store: str = STORE_FP32) -> Capture:
        missing = sorted(set(range(len(self.records))) - set(self.records))
        if missing:
            raise CaptureError(f"prompts {missing} were never recorded")
        if store not in STORES:
            raise CaptureError(f"unknown store {store!r}")
        if store == STORE_Q16 and self.mode == FULL:
            t0 = time.perf_counter()
            for record in self.records.values():
                self._compact(record)
            # apart from generation: the benchmark reports the two separately
            self.add_time("store_s", time.perf_counter() - t0)
        self.settings["store"] = {FULL: store, TOPN: STORE_FP32}.get(self.mode)
        t0 = time.perf_counter()
        found = digests_of(self.root, [name for r in self.records.values() for _, name in r.files()])
        for record in self.records.values():
            record.digests = {name: found[name] for _, name in record.files()}
        self.add_time("digest_s", time.perf_counter() - t0)
        capture = Capture(
            info=self.info,
            settings=self.settings,
            mode=self.mode,
            vocab_size=int(vocab_size if vocab_size is not None else self.vocab_size),
            prompts=[self.records[i] for i in sorted(self.records)],
            root=self.root,
        )
        write_json_atomic(self.root / CAPTURE_JSON, capture.to_json())
        return capture


    def _compact(self, record: PromptRecord) -> None:
        src = self.root / record.logprobs_file
        rows = np.load(src, mmap_mode="r")
        levels, floor = quantize_q16(rows, Q16_RANGE)
        # Level 0 stands for -inf, so NaN and +inf would come back as -inf: a device
        # that produced NaN would read as a masked token. Such a prompt stays fp32.
        if levels.size and levels.min() == 0 and (np.isnan(rows).any() or np.isposinf(rows).any()):
            return
        stem = record.logprobs_file.removesuffix(".npy")
        record.logprobs_file, record.floor_file = f"{stem}.q16.npy", f"{stem}.floor.npy"
        record.q16_range = Q16_RANGE
        np.save(self.root / record.logprobs_file, levels)
        np.save(self.root / record.floor_file, floor)
        src.unlink()


def load_capture(root: Path, verify_arrays: bool = False) -> Capture:
    """Load a capture folder; with ``verify_arrays`` every array is checked against its digest, opened and
    checked for shape (CaptureError names the prompt and the array that failed)."""
    root = Path(root)
    meta = root / CAPTURE_JSON
    if not os.path.lexists(meta):
        raise CaptureError(f"{root} holds no {CAPTURE_JSON}: not a finished capture")
    try:
        with open_regular(meta, follow=False, max_bytes=CAPTURE_JSON_MAX_BYTES) as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise CaptureError(f"{meta} is unreadable: {exc}") from None
    except RecursionError:
        raise CaptureError(f"{meta} is nested too deeply to be a capture's metadata") from None
    capture = Capture.from_json(data, root=root)
    if verify_arrays:
        for i, record in enumerate(capture.prompts):  # each a regular file, before any is opened
            for what, name in record.files():
                try:
                    capture._path(name)
                except CaptureError as exc:
                    raise CaptureError(f"prompt {i} {what}: {exc.message}") from None
        found = digests_of(root, [name for r in capture.prompts for _, name in r.files()])
        for i, record in enumerate(capture.prompts):
            if (record.logprobs_file is None) != (capture.mode == TOKENS):
                raise CaptureError(f"prompt {i}: logprobs file {record.logprobs_file!r} in a {capture.mode} capture")
            if capture.mode == TOKENS:
                continue
            _check_digests(record, i, found)
            lp = _load_array(capture._path(record.logprobs_file))
            if record.floor_file is not None:
                floor = _load_array(capture._path(record.floor_file))
                if lp.dtype != np.uint16 or floor.shape != (lp.shape[0],):
                    raise CaptureError(f"{record.logprobs_file}: q16 levels or floors are malformed")
                _q16_span(record)
            if lp.ndim != 2 or lp.shape[0] != len(record.token_ids):
                raise CaptureError(
                    f"{record.logprobs_file}: shape {lp.shape} does not match "
                    f"{len(record.token_ids)} generated tokens"
                )
            if capture.mode == FULL and lp.shape[1] != capture.vocab_size:
                raise CaptureError(f"{record.logprobs_file}: vocab {lp.shape[1]} != {capture.vocab_size}")
            ids = capture.top_ids(i)
            if capture.mode == TOPN and (ids is None or ids.shape != lp.shape):
                raise CaptureError(f"prompt {i}: top-N ids missing or shaped unlike the logprobs")
    return capture


def _preallocated(path: Path, dtype, shape: tuple[int, int]) -> None:
    """An .npy file of ``shape`` whose blocks are reserved on disk now. A sparse file (what ``open_memmap``
    alone makes) is only backed when rows are written, and a row written through a memory map onto a full
    disk kills the writer with SIGBUS (seen on a full tmpfs); reserved, a full disk is an OSError here."""
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            os.posix_fallocate(f.fileno(), 0, size)


def file_digest(path: Path, stop: threading.Event | None = None) -> str:
    """The digest of a regular file (a link, FIFO or device is an OSError); ``stop`` set ends it between
    chunks (InterruptedError), so a thread hashing a large file lets the process end within a chunk."""
    h = hashlib.new(DIGEST)
    with open_regular(path, follow=False) as f:
        while chunk := f.read(_HASH_CHUNK):
            if stop is not None and stop.is_set():
                raise InterruptedError(f"hashing {path} was stopped")
            h.update(chunk)
    return f"{DIGEST}:{h.hexdigest()}"


def metadata_digest(data: dict[str, Any]) -> str:
    """Digest of capture.json's content without its own ``digest`` field (canonical JSON)."""
    body = {k: v for k, v in data.items() if k != "digest"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{DIGEST}:{hashlib.new(DIGEST, blob.encode()).hexdigest()}"


def digests_of(root: Path, names: list[str]) -> dict[str, str | OSError]:
    """The digest of each file, hashed on a few threads (hashlib releases the GIL on large buffers:
    1.3 GB/s on one thread here, about twice that on two); an unreadable file maps to its OSError.

    The main thread waits on the results, which a signal interrupts (SIGTERM raises ``Terminated`` in the
    CLI); the ``stop`` flag then ends every hashing thread at its next 4 MiB chunk, so the pool's shutdown
    (and the interpreter's exit, which joins such threads) waits milliseconds, not the rest of the file."""
    stop = threading.Event()

    def one(name: str) -> str | OSError:
        try:
            return file_digest(Path(root) / name, stop)
        except OSError as exc:
            return exc

    if len(names) < 2:
        return {name: one(name) for name in names}
    pool = ThreadPoolExecutor(max_workers=_HASH_THREADS)
    try:
        return dict(zip(names, pool.map(one, names)))
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _check_digests(record: PromptRecord, i: int, found: dict[str, str | OSError]) -> None:
    for what, name in record.files():
        expected = record.digests.get(name)
        if expected is None:
            raise CaptureError(f"prompt {i} {what}: no digest recorded for {name}")
        digest = found.get(name)
        if isinstance(digest, OSError):
            raise CaptureError(f"prompt {i} {what}: cannot read {name}: {digest}") from digest
        if digest != expected:
            raise CaptureError(f"prompt {i} {what}: digest mismatch ({name} was changed or damaged)")


def _load_array(path: Path) -> np.ndarray:
    try:  # np.load opens the path itself: Capture._path checked that it is a regular file
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CaptureError(f"cannot read {path}: {exc}") from exc
