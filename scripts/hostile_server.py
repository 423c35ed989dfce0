#!/usr/bin/env python
"""One CLI run against the hostile loopback server of the tests: its exit code, wall time and peak memory.

    PYTHONPATH=.:src python scripts/hostile_server.py BEHAVIOUR PATH [--bad V] [--bad-from N] [--llama-cpp] -- ARGS...

BEHAVIOUR is ``drip``, ``huge``, ``nested``, ``markup`` (on PATH only) or ``none``; ``--bad`` puts V (5.0, nan,
inf) in place of each row's top logprob from completion request N on; ``--llama-cpp`` answers as
llama-cpp-python's server does. ARGS go to the CLI, which runs the fake engine as the reference on a 4-layer
fake model (made once under /tmp) with the server as ``--target-url``. The figures of docs/robustness.md's
"A server side" table come from it.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.fakes.hostile import HostileServer
from tests.fakes.model import make_fake_model
from tests.fakes.server import FakeServer
from tests.helpers import FAKE_CLI, fake_env

MODEL = Path(tempfile.gettempdir()) / "vre-hostile-model" / "fake-4l"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("behaviour")
    parser.add_argument("path")
    parser.add_argument("--bad", type=float)
    parser.add_argument("--bad-from", type=int, default=0)
    parser.add_argument("--llama-cpp", action="store_true")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = parser.parse_args(argv[:cut])
    a.args = argv[cut + 1:]
    if not MODEL.exists():
        make_fake_model(MODEL, num_hidden_layers=4)
    fake = FakeServer(vocab=257, bad_value=a.bad, bad_from=a.bad_from, llama_cpp=a.llama_cpp)
    server = HostileServer(fake, behaviour=None if a.behaviour == "none" else a.behaviour, path=a.path,
                           lifetime_s=600)
    with server as url, tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", FAKE_CLI, "--model", str(MODEL), "--reference-engine", "fake",
                               "--max-tokens", "6", "--num-prompts", "2", "--yardstick", "none", "--no-color",
                               "--cache-dir", f"{tmp}/cache", "--run-dir", f"{tmp}/run", "--target-url", url,
                               *a.args], env=fake_env(), capture_output=True, text=True)
        wall = time.monotonic() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error", "usage error"))]
    print(f"exit {proc.returncode}, {wall:.1f} s wall, {peak} MB peak RSS, {server.sent} hostile bytes sent")
    print("\n".join(errors) or proc.stdout[-400:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
