"""Shared fixtures of the unit tests (fast, no engines, no network, no subprocesses).

Two rules hold for every unit test and are enforced here, at run time: it starts
no process (subprocess, fork, spawn, system raise), and it imports no engine
(torch, vLLM, transformers: a test after which one of them is newly loaded fails).
test_unit_tier.py checks the same from the source. Tests that need either belong
in tests/plumbing (real subprocesses, fake engine) or tests/integration.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vllm_rbln_exec.capture.store import FULL, TOPN, CaptureWriter, SideInfo

ENGINE_MODULES = ("torch", "vllm", "transformers")


def _no_process(*args, **kwargs):
    raise AssertionError("a unit test starts no process: move it to tests/plumbing or tests/integration")


@pytest.fixture(scope="session", autouse=True)
def matplotlib_font_list(tmp_path_factory):
    """matplotlib's font list, built without a process and without touching the user's cache.

    On its first import matplotlib builds a font list and caches it in ``~/.cache/matplotlib``; to build it,
    it runs ``fc-list`` where fontconfig is installed (``make browser`` installs it with Chromium). On a machine
    where matplotlib had never run, that tripped the no-process rule below (issue 25). The unit tier gives
    matplotlib a folder of its own and a font list made without fontconfig (what matplotlib does where
    ``fc-list`` is missing): its bundled fonts, on every machine, first run or not."""
    if "matplotlib.font_manager" in sys.modules:  # loaded before (its list exists): nothing is built
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("matplotlib")))
        with pytest.MonkeyPatch.context() as no_fc_list:
            no_fc_list.setattr(subprocess, "check_output", _no_fontconfig)
            import matplotlib.font_manager  # noqa: F401  (builds the list now, into MPLCONFIGDIR)
        yield


def _no_fontconfig(*args, **kwargs):
    raise FileNotFoundError("fc-list: not run in the unit tier")


@pytest.fixture(autouse=True)
def unit_rules(monkeypatch):
    """No process starts during a unit test, and no engine module is newly imported by it."""
    monkeypatch.setattr(subprocess.Popen, "__init__", _no_process)
    for name in ("system", "fork", "forkpty", "posix_spawn", "posix_spawnp", "spawnv", "spawnve", "execv",
                 "execve"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _no_process)
    before = {m for m in ENGINE_MODULES if m in sys.modules}
    yield
    loaded = sorted(m for m in ENGINE_MODULES if m in sys.modules and m not in before)
    assert not loaded, f"a unit test imports no engine, but {loaded} got imported"


def write_small_capture(root: Path, mode: str = FULL, vocab: int = 8, seed: int = 0):
    """A finished two-prompt capture: prompt 0 given as arrays, prompt 1 allocated and filled in place.

    Returns (capture, {index: (logprobs, ids or None)}) with the arrays that were written.
    """
    rng = np.random.default_rng(seed)
    info = SideInfo(side="reference", device="cpu", engine="fake", platform="cpu", dtype="float32", model="tiny")
    writer = CaptureWriter(root, info, {"max_tokens": 3, "logprobs": -1 if mode == FULL else 2}, mode)
    width = vocab if mode == FULL else 2
    expected = {}

    lp0 = rng.normal(size=(3, width)).astype(np.float32)
    ids0 = rng.integers(0, vocab, size=(3, width)).astype(np.int32) if mode == TOPN else None
    writer.add(0, "first prompt", [1, 2, 3], [4, 5, 6], " a b c", logprobs=lp0, ids=ids0)
    expected[0] = (lp0, ids0)

    # allocated for 4 positions, only 2 generated: the files are cut to 2 rows by add()
    lp_path, ids_path = writer.allocate(1, positions=4, width=width, with_ids=mode == TOPN)
    lp1 = rng.normal(size=(4, width)).astype(np.float32)
    mm = np.load(lp_path, mmap_mode="r+")
    mm[:] = lp1
    mm.flush()
    del mm
    ids1 = None
    if mode == TOPN:
        ids1 = rng.integers(0, vocab, size=(4, width)).astype(np.int32)
        mm = np.load(ids_path, mmap_mode="r+")
        mm[:] = ids1
        mm.flush()
        del mm
    writer.add_time("generate", 1.5)
    writer.add(1, "second prompt", [7], [8, 9], " d e")
    expected[1] = (lp1[:2], None if ids1 is None else ids1[:2])
    capture = writer.finish(vocab_size=None if mode == FULL else vocab)
    return capture, expected


@pytest.fixture
def make_capture():
    """``make_capture(root, mode=FULL, vocab=8, seed=0)`` -> (capture, expected arrays); see write_small_capture."""
    return write_small_capture


@pytest.fixture
def small_capture(tmp_path):
    """A finished full-vocabulary capture folder (vocab 8, two prompts)."""
    capture, expected = write_small_capture(tmp_path / "capture")
    return capture, expected
