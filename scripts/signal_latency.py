#!/usr/bin/env python
"""How fast a signal ends work on a large reference file (docs/robustness.md, "Hostile input").

Two measurements, from the repository root (``PYTHONPATH=src python scripts/signal_latency.py``):

1. ``store.digests_of`` hashing two sparse 64 GiB files on its thread pool, interrupted by SIGALRM
   after 0.5 s: when the call returns, and how many threads are left.
2. The real CLI (fake engine) unpacking ``--reference`` with an 8 GiB member (a sparse tar, no disk used
   for the file itself): SIGTERM, then SIGINT, once 256 MiB are unpacked into ``$TMPDIR``; the exit code,
   the time from the signal to the exit, and what is left in ``$TMPDIR``.

It writes at most a few hundred MiB under /tmp and removes them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fakes.model import make_fake_model  # noqa: E402
from tests.helpers import fake_args, fake_env  # noqa: E402
from tests.plumbing.test_hostile_files import _sparse_reference  # noqa: E402

from vllm_rbln_exec.capture.store import digests_of  # noqa: E402


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop()


def hashing(tmp: Path) -> None:
    for i in range(2):
        with open(tmp / f"b{i}", "wb") as f:
            f.truncate(64 << 30)
    signal.signal(signal.SIGALRM, _raise_stop)
    t0 = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        digests_of(tmp, ["b0", "b1"])
    except _Stop:
        pass
    print(f"hashing 2 x 64 GiB: signal at 0.50 s, returned at {time.monotonic() - t0:.2f} s, "
          f"threads left {threading.active_count() - 1}")


def unpacking(tmp: Path) -> None:
    model = make_fake_model(tmp / "model", num_hidden_layers=2)
    ref = tmp / "large.vre"
    _sparse_reference(ref, 8 << 30)
    scratch = tmp / "tmpdir"
    scratch.mkdir()
    for sig in (signal.SIGTERM, signal.SIGINT):
        env = {**os.environ, **fake_env(), "TMPDIR": str(scratch)}
        proc = subprocess.Popen([sys.executable, "-m", "vllm_rbln_exec", "--cache-dir", str(tmp / "cache"),
                                 "--run-dir", str(tmp / "run"), *fake_args(model), "--reference", str(ref)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        while not any(p.stat().st_size > 256 << 20 for p in scratch.rglob("*.npy") if p.is_file()):
            time.sleep(0.02)
        written = max(p.stat().st_size for p in scratch.rglob("*.npy") if p.is_file())
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait()
        print(f"{signal.Signals(sig).name} with {written >> 20} MiB unpacked: exit {proc.returncode} "
              f"{time.monotonic() - t0:.2f} s after the signal; left in $TMPDIR: {sorted(os.listdir(scratch))}")


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="vre-signal-latency-"))
    try:
        hashing(tmp)
        unpacking(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
