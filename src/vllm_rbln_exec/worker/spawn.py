"""Starting, watching and ending worker processes (the parent's side).

Each worker is ``python -m vllm_rbln_exec.worker REQUEST.json`` in a process
group of its own (``start_new_session``), with exactly the environment its
device profile built. On timeout, Ctrl-C or exit the whole group is ended, so
no engine process outlives the run. Never imports torch or vLLM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.errors import WorkerError
from ..core.jsonio import write_json_atomic
from ..setup.request import WorkerTask

REQUEST = "request.json"
RESULT = "result.json"
EVENTS = "events.jsonl"
LOG = "worker.log"
MISSING_KERNEL = "missing_kernel"  # result kind: the engine called an operator its kernel library lacks
DISK_FULL_BYTES = 1 << 20  # less free than this under a failed worker's folder: say the disk is full
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class WorkerJob:
    """One worker to start: its typed task, the environment its device profile built, and its time limit."""

    task: WorkerTask
    env: dict[str, str]
    timeout: float = 1800.0

    @property
    def side(self) -> str:
        return self.task.label

    @property
    def folder(self) -> Path:
        return Path(self.task.folder).resolve()


@dataclass
class WorkerHandle:
    job: WorkerJob
    proc: subprocess.Popen
    started: float
    log_handle: Any
    events_seen: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled, ``timeout``): unwinds like Ctrl-C, so every worker is stopped."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def workers_end_on_sigterm():
    """While in the block, SIGTERM raises :class:`Terminated` instead of killing
    Python outright: the default action skips every ``except``/``finally`` and
    would leave the workers (and the engines on the device) running in their own
    sessions. Outside the main thread, where handlers cannot be set, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_worker(job: WorkerJob) -> WorkerHandle:
    folder = job.folder
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (RESULT, EVENTS):
        (folder / stale).unlink(missing_ok=True)
    write_json_atomic(folder / REQUEST, replace(job.task, folder=str(folder)).to_json())
    env = dict(job.env)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["VLLM_RBLN_EXEC_PARENT_PID"] = str(os.getpid())  # the worker ends itself if this process dies
    log_handle = open(folder / LOG, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_rbln_exec.worker", str(folder / REQUEST)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log_handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=str(folder),
    )
    return WorkerHandle(job=job, proc=proc, started=time.monotonic(), log_handle=log_handle)


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End the worker and everything it started (its whole process group)."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid  # the leader is gone; its group may still have members
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.1)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def read_new_events(handle: WorkerHandle) -> list[dict[str, Any]]:
    path = Path(handle.job.folder) / EVENTS
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    fresh = []
    for line in lines[handle.events_seen:]:
        try:
            fresh.append(json.loads(line))
        except ValueError:
            break  # a line still being written; read it next time
    handle.events_seen += len(fresh)
    handle.events.extend(fresh)
    return fresh


def finish_worker(handle: WorkerHandle) -> dict[str, Any]:
    """Collect the result of an exited worker, or raise WorkerError naming its side."""
    job = handle.job
    folder = Path(job.folder)
    rc = handle.proc.returncode
    kill_group(handle.proc, grace=1.0)  # engine children left behind by a clean exit
    handle.log_handle.close()
    result = None
    try:
        result = json.loads((folder / RESULT).read_text())
    except (OSError, ValueError):
        pass
    tail = log_tail(folder / LOG)
    if result is not None and result.get("ok") and rc == 0:
        result["elapsed_s"] = time.monotonic() - handle.started
        return result
    if result is not None and not result.get("ok"):
        # a missing kernel is said in one sentence; the traceback stays in the log
        shown = "" if result.get("kind") == MISSING_KERNEL else tail
        raise WorkerError(job.side, result.get("error", "failed"), shown, str(folder / LOG))
    how = f"was killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with code {rc}"
    raise WorkerError(job.side, f"crashed: the process {how} without a result{_disk_full(folder)}", tail,
                      str(folder / LOG))


def _disk_full(folder: Path) -> str:
    """A note when the worker's folder sits on a full disk: its result and log could not be written there."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"; the disk under {folder} is full ({free} bytes free)" if free < DISK_FULL_BYTES else ""


def wait_workers(
    handles: list[WorkerHandle],
    on_event: Callable[[WorkerHandle, dict[str, Any]], None] | None = None,
    poll: float = 0.25,
) -> list[dict[str, Any]]:
    """Wait for all workers; on the first failure, timeout or Ctrl-C end all of them."""
    results: dict[int, dict[str, Any]] = {}
    try:
        while len(results) < len(handles):
            for i, handle in enumerate(handles):
                if i in results:
                    continue
                for event in read_new_events(handle):
                    if on_event:
                        on_event(handle, event)
                if handle.proc.poll() is not None:
                    for event in read_new_events(handle):
                        if on_event:
                            on_event(handle, event)
                    results[i] = finish_worker(handle)
                elif time.monotonic() - handle.started > handle.job.timeout:
                    kill_group(handle.proc)
                    handle.log_handle.close()
                    raise WorkerError(
                        handle.job.side,
                        f"timed out after {handle.job.timeout:.0f} s (see --timeout) and was stopped",
                        log_tail(Path(handle.job.folder) / LOG),
                        str(Path(handle.job.folder) / LOG),
                    )
            time.sleep(poll)
    except BaseException:
        for handle in handles:
            if handle.proc.poll() is None or _group_alive(handle.proc.pid):
                kill_group(handle.proc, grace=2.0)
            if not handle.log_handle.closed:
                handle.log_handle.close()
        raise
    return [results[i] for i in range(len(handles))]


def run_worker(job: WorkerJob, on_event=None) -> dict[str, Any]:
    return wait_workers([start_worker(job)], on_event)[0]
