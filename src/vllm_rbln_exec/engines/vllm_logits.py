"""A vLLM V1 logits processor that records raw logprob rows and can force tokens.

Runs inside vLLM's engine-core process. A request opts in through
``SamplingParams.extra_args["vre"]``::

    {"file": path of a float32 .npy [max_tokens, V] (or top-N values),
     "ids_file": path of an int32 .npy [max_tokens, N] (top-N mode only),
     "topn": N or None,
     "force": [token ids] or None,
     "meta": path or None}

``meta`` (sent with one request) asks for a JSON record of the settings in
force in this process, written once when that request arrives (the model is
loaded by then): the attention backend each attention layer resolved, torch's
and Triton's float32 matmul precision, the CUDA graph mode the model runner
settled on. With multiprocessing (vLLM on CUDA) this process is not the worker
that built ``vllm.LLM``, so only it can tell.

At each step the row for generated position ``t = len(output_tokens)`` is
log-softmaxed (fp32, as vLLM's own raw logprobs) on the device and written straight
into its place in the preallocated file: no per-token Python objects and no
detokenising, so the capture costs little more than the sampling it rides on. On an
accelerator the rows leave through pinned buffers and a writer thread, so a step never
waits for its copy or its write (``_AsyncWriter``); on the CPU they are written at once. With ``force`` the
logits are then masked so greedy sampling picks ``force[t]``: the target is fed
the reference's tokens through its normal decode path.

Chunked prefill may call ``apply`` for a request before its prompt is done; the
row for position 0 is then written again by the final chunk, which wins.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.interface import MoveDirectionality

EXTRA_KEY = "vre"
SYNC_ENV = "VLLM_RBLN_EXEC_SYNC_CAPTURE"  # "1": write rows synchronously on an accelerator too (for comparison)
THREADS_ENV = "VLLM_RBLN_EXEC_WRITER_THREADS"  # threads writing one step's rows (default: _writer_threads())
POOL_MIN_ENV = "VLLM_RBLN_EXEC_WRITER_POOL_MIN_BYTES"  # a step this large or larger goes to the pool
# Measured on an H200 host (vLLM 0.24, tiny model, 128 tokens, docs/gpu-capture-speed.md): at 16.4 MB a
# step (batch 32 x 128256) four threads took a capture from 0.98 s to 0.68 s, since one thread fills
# fresh page cache at only 2.2-2.9 GB/s and four at 7.5-9.4 GB/s; at 4.1 MB a step (batch 8) one thread
# keeps up with the step (1.4 ms of writing) and the pool's extra GIL hand-offs cost more than they saved
# (0.31 s with one thread, 0.44 s with four).
POOL_MIN_BYTES = 8 << 20


def _is_writer_rank() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # not initialised (single process): we are the writer
        return True


class _RowFile:
    """A preallocated 2-D ``.npy`` whose row ``t`` is written with ``pwrite``.

    Measured on a 128256-entry vocabulary: 256 rows (131 MB) took 0.10 s through a
    memory map, which faults in every fresh 4 KiB page, and 0.04 s through pwrite.
    """

    __slots__ = ("file", "offset", "shape", "dtype", "row_bytes")

    def __init__(self, path: str):
        self.file = open(path, "r+b")  # open as long as its request runs (closed by update_state)
        version = np.lib.format.read_magic(self.file)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        self.shape, fortran, self.dtype = read_header[version](self.file)
        if fortran or len(self.shape) != 2:
            raise ValueError(f"{path}: expected a C-ordered 2-D array")
        self.offset = self.file.tell()
        self.row_bytes = self.shape[1] * self.dtype.itemsize

    def write(self, t: int, row: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(row, dtype=self.dtype)).cast("B")
        if len(data) != self.row_bytes:
            raise ValueError(f"row of {len(data)} bytes for rows of {self.row_bytes}")
        pos = self.offset + t * self.row_bytes
        while data:  # a regular file takes it all at once; loop in case it does not
            n = os.pwrite(self.file.fileno(), data, pos)
            data, pos = data[n:], pos + n

    def close(self) -> None:
        self.file.close()


class _AsyncWriter:
    """Rows computed on an accelerator leave it without stopping it: each step's rows are copied into a
    pinned host buffer (``non_blocking``), an event marks the copy, and a thread waits for the event and
    writes the rows to their files. The step goes on at once; a request's last row is waited for before
    its output can leave the engine (``drain``), so a finished request's file is always whole."""

    RING = 4  # buffers per shape in flight: the writer lags at most this many steps behind

    def __init__(self, pin: bool = True, event=None, threads: int | None = None,
                 pool_min: int | None = None) -> None:
        self.pin = pin
        # One step's rows are written by several threads: pwrite drops the GIL while it copies, and one
        # thread filled fresh page-cache pages at only 2.3 GB/s on an H200 host (128256-entry rows,
        # docs/gpu-capture-speed.md), which made the write, not the GPU, the capture's cost at batch 8.
        self.threads = max(1, threads if threads is not None else _writer_threads())
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vre-row-write") if self.threads > 1 else None
        self.pool_min = _env_int(POOL_MIN_ENV, POOL_MIN_BYTES) if pool_min is None else pool_min
        self.event = event or torch.cuda.Event  # a factory of objects with record() and synchronize()
        self.queue: queue.Queue = queue.Queue(maxsize=self.RING)
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="vre-row-writer", daemon=True)
        self.thread.start()

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype)
        with self.lock:
            pool = self.free.setdefault(key, [])
            if pool:
                return pool.pop()
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=self.pin)

    def submit(self, tensors: list[torch.Tensor], jobs: list[tuple[_RowFile, int, int, int]]) -> None:
        """``jobs``: (file, row t, which tensor, which row of it)."""
        if self.error is not None:
            raise RuntimeError("the capture's row writer failed") from self.error
        hosts = [self._buffer(x) for x in tensors]
        for host, x in zip(hosts, tensors):
            host.copy_(x, non_blocking=True)
        done = self.event()
        done.record()
        self.queue.put((done, hosts, jobs))  # blocks when RING steps are pending: bounded memory

    def drain(self) -> None:
        self.queue.join()
        if self.error is not None:
            raise RuntimeError("the capture's row writer failed") from self.error

    def _write(self, arrays: list[np.ndarray], jobs: list[tuple[_RowFile, int, int, int]]) -> None:
        def one(job: tuple[_RowFile, int, int, int]) -> None:
            file, t, k, j = job
            file.write(t, arrays[k][j])

        if self.pool is not None and len(jobs) > 1 and sum(job[0].row_bytes for job in jobs) >= self.pool_min:
            list(self.pool.map(one, jobs))  # waits for every row; the first failure is raised here
        else:
            for job in jobs:
                one(job)

    def _run(self) -> None:
        while True:
            done, hosts, jobs = self.queue.get()
            try:
                done.synchronize()
                self._write([h.numpy() for h in hosts], jobs)
            except BaseException as exc:  # noqa: BLE001 - reported by the next submit or drain
                self.error = exc
            finally:
                with self.lock:
                    for h in hosts:
                        self.free.setdefault((tuple(h.shape), h.dtype), []).append(h)
                self.queue.task_done()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return max(0, int(value))
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a whole number") from None


def _writer_threads() -> int:
    """From THREADS_ENV, else up to 4 (enough to reach the page cache's pace), never more than the cores."""
    return max(1, _env_int(THREADS_ENV, min(4, (os.cpu_count() or 1) - 1)))


class _Slot:
    __slots__ = ("spec", "output", "rows", "ids", "force", "last")

    def __init__(self, spec: dict[str, Any], output: list[int], last: int | None = None):
        self.spec = spec
        self.output = output
        self.rows = _RowFile(spec["file"]) if spec.get("file") else None
        self.ids = _RowFile(spec["ids_file"]) if spec.get("ids_file") else None
        self.force = spec.get("force")
        # the position of this request's last row: max tokens, or where max_model_len stops it
        self.last = (self.rows.shape[0] - 1 if self.rows is not None else -1) if last is None else last

    def close(self) -> None:
        for f in (self.rows, self.ids):
            if f is not None:
                f.close()


def _close(slot: _Slot | None) -> None:
    if slot is not None:
        slot.close()


def _name(value: Any) -> str:
    return str(getattr(value, "name", value))


def _attention_backends(vllm_config) -> list[str]:
    """Names of the backends the model's attention layers resolved (empty before the model is built)."""
    context = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None) or {}
    names = set()
    for layer in context.values():
        backend = getattr(layer, "attn_backend", None)
        get_name = getattr(backend, "get_name", None)
        if callable(get_name):
            names.add(str(get_name()))
    return sorted(names)


def engine_core_settings(vllm_config) -> dict[str, Any]:
    """The settings in force in this (the engine core's) process; each read on its own, errors recorded."""
    out: dict[str, Any] = {"pid": os.getpid()}
    readers: list[tuple[str, Any]] = [
        ("attention_backends", lambda: _attention_backends(vllm_config)),
        ("cudagraph_mode", lambda: _name(vllm_config.compilation_config.cudagraph_mode)),
        ("float32_matmul_precision", torch.get_float32_matmul_precision),
    ]
    if torch.cuda.is_available():
        readers += [
            ("cuda_matmul_fp32_precision", lambda: str(torch.backends.cuda.matmul.fp32_precision)),
            ("cuda_matmul_allow_tf32", lambda: bool(torch.backends.cuda.matmul.allow_tf32)),
            ("cudnn_allow_tf32", lambda: bool(torch.backends.cudnn.allow_tf32)),
        ]
        if "triton" in sys.modules:  # what tl.dot does with fp32 inputs when a kernel gives no precision
            readers.append(("triton_fp32_dot", lambda: sys.modules["triton"].knobs.language.fp32_default
                            or "tf32 (triton's default)"))
    for key, read in readers:
        try:
            out[key] = read()
        except Exception as exc:  # noqa: BLE001 - a record, not a check
            out[key] = f"unknown ({type(exc).__name__}: {exc})"
    return out


def _write_meta(path: str, vllm_config) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(engine_core_settings(vllm_config), f, default=str)
    os.replace(tmp, path)


class CaptureLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.slots: dict[int, _Slot] = {}
        self.writer = _is_writer_rank()
        self.vllm_config = vllm_config
        self.meta_written: set[str] = set()
        self.async_writer: _AsyncWriter | None = None
        self.max_model_len = getattr(getattr(vllm_config, "model_config", None), "max_model_len", None)
        self.pin = bool(is_pin_memory)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if extra is not None and not (extra.get("file") or extra.get("force") is not None or extra.get("meta")):
            raise ValueError(f"extra_args[{EXTRA_KEY!r}] needs a 'file', 'force' or 'meta'")

    def is_argmax_invariant(self) -> bool:
        return False  # it may force tokens, and must see greedy requests too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        if self.async_writer is not None and (batch_update.removed or batch_update.added):
            self.async_writer.drain()  # no file is closed while rows for it are in flight
        for index in batch_update.removed:
            _close(self.slots.pop(index, None))
        for index, params, prompt_ids, output_ids in batch_update.added:
            spec = (params.extra_args or {}).get(EXTRA_KEY) if params is not None else None
            _close(self.slots.pop(index, None))  # that request is gone: its index was given away
            if spec is not None:
                slot = _Slot(spec, output_ids)
                if self.max_model_len and prompt_ids is not None:
                    slot.last = min(slot.last, int(self.max_model_len) - len(prompt_ids) - 1)
                self.slots[index] = slot
                meta = spec.get("meta")
                if meta and self.writer and meta not in self.meta_written:
                    self.meta_written.add(meta)
                    try:
                        _write_meta(meta, self.vllm_config)
                    except Exception:  # noqa: BLE001 - a record must never stop the capture
                        pass
        for a, b, direction in batch_update.moved:
            slot_a = self.slots.pop(a, None)
            slot_b = self.slots.pop(b, None)
            if slot_a is not None:
                self.slots[b] = slot_a
            if slot_b is not None and direction == MoveDirectionality.SWAP:
                self.slots[a] = slot_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.slots:
            return logits
        rows = sorted(i for i in self.slots if i < logits.shape[0])
        if not rows:
            return logits
        slots = [self.slots[row] for row in rows]
        writes = self.writer and any(
            slot.rows is not None and len(slot.output) < slot.rows.shape[0] for slot in slots
        )
        if writes:
            self._record(logits, rows, slots)
        forced_rows, forced_tokens = [], []
        for row, slot in zip(rows, slots):
            t = len(slot.output)
            if slot.force is not None and t < len(slot.force):
                forced_rows.append(row)
                forced_tokens.append(int(slot.force[t]))
        if forced_rows:  # one masked fill and one scatter for the batch, not two small ops per row
            index = torch.tensor(forced_rows, device=logits.device)
            logits[index] = float("-inf")
            logits[index, torch.tensor(forced_tokens, device=logits.device)] = 0.0
        return logits

    def _record(self, logits: torch.Tensor, rows: list[int], slots: list[_Slot]) -> None:
        if rows[-1] == len(rows) - 1:
            # Every request of the batch captures (the usual case): a view, no copy.
            # index_select is a parallel op; on a busy small CPU its thread start-up
            # alone cost 13-25 ms a step, more than the rest of the capture.
            picked = logits[: len(rows)]
        else:
            picked = logits.index_select(0, torch.tensor(rows, device=logits.device))
        logprobs = torch.log_softmax(picked.to(torch.float32), dim=-1)
        tensors, jobs, final = _row_jobs(logprobs, slots)
        if not (logprobs.is_cuda and self.pin) or os.environ.get(SYNC_ENV):
            # at once: on the CPU the rows are in host memory already (or the synchronous path was asked for)
            arrays = [x.cpu().numpy() for x in tensors]
            for file, t, k, j in jobs:
                file.write(t, arrays[k][j])
            return
        if self.async_writer is None:
            self.async_writer = _AsyncWriter()
        self.async_writer.submit(tensors, jobs)
        if final:  # that request's output leaves the engine after this step: its file must be whole
            self.async_writer.drain()


def _row_jobs(logprobs: torch.Tensor, slots: list[_Slot]) -> tuple[list[torch.Tensor], list[tuple], bool]:
    """What to write this step: the tensors (the log-softmaxed batch, or its top-N values and ids), the
    jobs (file, row t, which tensor, which batch row), and whether a request's last row is among them."""
    tensors: list[torch.Tensor] = []
    index: dict[Any, int] = {}
    jobs = []
    final = False
    for j, slot in enumerate(slots):
        t = len(slot.output)
        if slot.rows is None or t >= slot.rows.shape[0]:
            continue
        n = slot.spec.get("topn")
        if n:
            if n not in index:
                vals, ids = torch.topk(logprobs, n, dim=-1)
                index[n] = len(tensors)
                tensors += [vals, ids.to(torch.int32)]
            jobs += [(slot.rows, t, index[n], j), (slot.ids, t, index[n] + 1, j)]
        else:
            if "dense" not in index:
                index["dense"] = len(tensors)
                tensors.append(logprobs)
            jobs.append((slot.rows, t, index["dense"], j))
        final = final or t >= slot.last
    return tensors, jobs, final
