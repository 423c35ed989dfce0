"""The capture's asynchronous row writer (engines/vllm_logits._AsyncWriter), on the CPU with a stand-in event.

On CUDA the writer copies rows into pinned buffers and waits for a CUDA event in
its thread; here the event is a stand-in and the buffers are ordinary, so the
logic (every row lands in its place, a drain waits for all of them, a failure is
reported, buffers are reused) is tested without a GPU. Needs torch and vLLM's
modules (the logits processor imports them), hence the integration tier.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.integration


class Event:
    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.mark.parametrize("threads", [1, 3])
def test_rows_land_in_their_places_and_drain_waits(tmp_path, threads):
    import torch

    from vllm_rbln_exec.engines.vllm_logits import _AsyncWriter, _RowFile

    files = []
    for i in range(3):
        np.lib.format.open_memmap(tmp_path / f"p{i}.npy", mode="w+", dtype=np.float32, shape=(20, 7)).flush()
        files.append(_RowFile(str(tmp_path / f"p{i}.npy")))
    writer = _AsyncWriter(pin=False, event=Event, threads=threads, pool_min=0)
    expected = np.zeros((3, 20, 7), dtype=np.float32)
    rng = np.random.default_rng(0)
    for t in range(20):  # 20 steps of a batch of 3, more than the ring holds at once
        batch = rng.standard_normal((3, 7)).astype(np.float32)
        expected[:, t] = batch
        writer.submit([torch.from_numpy(batch.copy())], [(files[j], t, 0, j) for j in range(3)])
    writer.drain()
    for f in files:
        f.close()
    for j in range(3):
        np.testing.assert_array_equal(np.load(tmp_path / f"p{j}.npy"), expected[j])
    # buffers are reused: at most RING queued, one being written and one being filled ever existed
    assert sum(len(pool) for pool in writer.free.values()) <= _AsyncWriter.RING + 2


@pytest.mark.parametrize("threads", [1, 3])
def test_a_failed_write_is_reported_not_lost(tmp_path, threads):
    import torch

    from vllm_rbln_exec.engines.vllm_logits import _AsyncWriter, _RowFile

    np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=(2, 4)).flush()
    rows = _RowFile(str(tmp_path / "p.npy"))
    writer = _AsyncWriter(pin=False, event=Event, threads=threads, pool_min=0)
    # a row of the wrong width, beside a good one (with threads, the two are written by different threads)
    writer.submit([torch.zeros((2, 5))], [(rows, 0, 0, 0), (rows, 1, 0, 1)])
    with pytest.raises(RuntimeError, match="row writer failed"):
        writer.drain()
    rows.close()


def test_writer_threads_come_from_the_environment(monkeypatch):
    from vllm_rbln_exec.engines.vllm_logits import THREADS_ENV, _writer_threads

    monkeypatch.setenv(THREADS_ENV, "2")
    assert _writer_threads() == 2
    monkeypatch.setenv(THREADS_ENV, "two")
    with pytest.raises(ValueError, match=THREADS_ENV):  # a typo is said, not taken for a default
        _writer_threads()
    monkeypatch.delenv(THREADS_ENV)
    assert 1 <= _writer_threads() <= 4
