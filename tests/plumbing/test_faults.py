"""Fault injection: what the harness does when its own data is damaged, its input is bad or it is killed.

Each test does one thing to a real run (the real CLI and worker processes, the
fake engine) and checks the outcome: the exit code, the message, nothing left
running, and that nothing damaged is ever compared. The table in
docs/robustness.md lists these faults and what the harness does for each.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from tests.helpers import FAKE_CLI, fake_args, fake_env, processes_mentioning

from vllm_rbln_exec.capture.cache import ReferenceCache

pytestmark = pytest.mark.plumbing


def _flat(text: str) -> str:
    return " ".join(text.split())


def _flip_array_byte(tar_bytes: bytes) -> bytes:
    """Flip one bit in the middle of prompt 0's logprob array inside a capture tar (not in any header)."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        member = max((m for m in tar.getmembers() if m.name.startswith("p0000.")), key=lambda m: m.size)
        where = member.offset_data + member.size // 2
    damaged = bytearray(tar_bytes)
    damaged[where] ^= 0x10
    return bytes(damaged)


def _only_entry(cache_dir: Path) -> str:
    with ReferenceCache(cache_dir / "references") as cache:
        keys = [e["key"] for e in cache.entries()]
    assert len(keys) == 1, keys
    return keys[0]


def _damage_cache_entry(cache_dir: Path, how: str) -> None:
    key = _only_entry(cache_dir)
    with ReferenceCache(cache_dir / "references") as cache:
        packed = cache.entries_dir / f"{key}.vre"
        blob = packed.read_bytes()
        blob = _flip_array_byte(blob) if how == "bit" else blob[: len(blob) // 2]
        packed.write_bytes(blob)  # what a bad sector or a cut copy leaves behind


# -- damaged data is never used ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["bit", "truncated"])
def test_a_damaged_cache_entry_is_dropped_and_recomputed(fake_cli, tmp_path, how):
    assert fake_cli("--use-cache", "--no-inspect-logits").returncode == 0
    _damage_cache_entry(tmp_path / "cache", how)
    res = fake_cli("--use-cache", "--no-inspect-logits")
    assert res.returncode == 0, res.stdout + res.stderr
    report = res.report
    assert report["cache"]["hit"] is False
    reason = report["cache"]["miss_reason"]
    assert "dropped" in reason and ("digest mismatch" in reason if how == "bit" else reason)
    assert any("dropped" in note for note in report["notes"])  # said once, in the report and on screen
    assert "dropped" in _flat(res.stdout)
    assert report["sides"]["reference"]["source"] == "worker"  # computed again, not read from the damage
    assert report["summary"]["max_abs_diff"] == 0.0
    again = fake_cli("--use-cache", "--no-inspect-logits")  # the recomputed entry was stored whole
    assert again.returncode == 0 and again.report["cache"]["hit"] is True


def test_a_damaged_cache_entry_under_require_cache_is_an_error(fake_cli, tmp_path):
    assert fake_cli("--use-cache", "--no-inspect-logits").returncode == 0
    _damage_cache_entry(tmp_path / "cache", "bit")
    res = fake_cli("--require-cache", "--no-inspect-logits")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "digest mismatch" in _flat(res.stderr) and "--require-cache" in res.stderr
    assert not (res.run_dir / "target").exists()  # no engine started, nothing recomputed


@pytest.mark.parametrize("how", ["bit", "truncated", "empty"])
def test_a_damaged_reference_file_exits_2_before_any_engine(fake_cli, tmp_path, how):
    ref_file = tmp_path / "golden.vre"
    assert fake_cli("--save-reference", str(ref_file), "--no-inspect-logits").returncode == 0
    blob = ref_file.read_bytes()
    ref_file.write_bytes({"bit": _flip_array_byte(blob), "truncated": blob[: len(blob) * 2 // 3],
                          "empty": b""}[how])
    started = time.monotonic()
    res = fake_cli("--reference", str(ref_file))
    assert res.returncode == 2, res.stdout + res.stderr
    flat = _flat(res.stderr)
    assert f"reference file {ref_file}" in flat and "Traceback" not in flat
    if how == "bit":
        assert "prompt 0 logprobs: digest mismatch" in flat
    assert not res.run_dir.exists() or not (res.run_dir / "target").exists()
    assert time.monotonic() - started < 30


def test_a_damaged_file_in_a_model_folder_the_harness_made_is_made_again(fake_cli, tmp_path):
    first = fake_cli("--num-hidden-layers", "2", "--no-inspect-logits")
    assert first.returncode == 0, first.stderr
    truncated = Path(first.report["model_path"])
    assert (truncated / ".vre-manifest.json").is_file()
    with open(truncated / "tokenizer.json", "r+b") as f:  # damaged in place: same size, new mtime
        f.seek(10)
        f.write(b"#")
    res = fake_cli("--num-hidden-layers", "2", "--no-inspect-logits")
    assert res.returncode == 0, res.stdout + res.stderr
    assert any("tokenizer.json: digest mismatch" in n and "made again" in n for n in res.report["notes"])
    assert (truncated / "tokenizer.json").read_bytes() != b""
    assert fake_cli("--num-hidden-layers", "2", "--no-inspect-logits").report["notes"] == []  # whole again


def test_a_half_written_model_folder_is_made_again(fake_cli, tmp_path):
    first = fake_cli("--num-hidden-layers", "2", "--no-inspect-logits")
    truncated = Path(first.report["model_path"])
    (truncated / ".vre-manifest.json").unlink()  # what a copy cut short before its last step leaves
    res = fake_cli("--num-hidden-layers", "2", "--no-inspect-logits")
    assert res.returncode == 0, res.stderr
    assert any("no manifest" in n for n in res.report["notes"])


# -- bad input is refused before any engine starts -------------------------------------------------------------
@pytest.mark.parametrize("prompts, message", [
    ([""], "prompt 0 is empty"),
    (["fine", ""], "prompt 1 is empty"),
    (["x" * 300], "prompt 0 ('xxxxxx"),
])
def test_bad_prompts_exit_2_fast_with_no_engine(fake_cli, prompts, message):
    args = [a for p in prompts for a in ("--prompts", p)]
    started = time.monotonic()
    res = fake_cli(*args, "--max-model-len", "256")
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (res.run_dir / "reference").exists() and not (res.run_dir / "target").exists()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe not utf-8 \x80", "not UTF-8"),
    (b"\n\n   \n", "holds no prompts"),
])
def test_bad_prompt_files_exit_2(fake_cli, tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    res = fake_cli("--prompts", f"@{path}")
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr


# -- killed, interrupted, out of room --------------------------------------------------------------------------
def _as_from_a_terminal() -> None:
    # Ctrl-C reaches a command started from a terminal with SIGINT at its default. pytest itself may run as a
    # background job of a non-interactive shell (`make test` runs two tiers at once; dash then ignores SIGINT),
    # and an ignored SIGINT is inherited: Python would never raise KeyboardInterrupt in the CLI.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(tmp_path: Path, fake_model: Path, run_dir: Path, *extra: str, **switches: str) -> subprocess.Popen:
    env = {**fake_env(**switches), "PYTHONUNBUFFERED": "1"}
    out = open(tmp_path / f"{run_dir.name}.out", "w")
    err = open(tmp_path / f"{run_dir.name}.err", "w")
    return subprocess.Popen([sys.executable, "-m", FAKE_CLI, "--cache-dir", str(tmp_path / "cache"),
                             "--run-dir", str(run_dir), *fake_args(fake_model), *extra],
                            cwd=tmp_path, env=env, stdout=out, stderr=err, preexec_fn=_as_from_a_terminal)


def _wait_generating(run_dir: Path, side: str, timeout: float = 60) -> None:
    events = run_dir / side / "events.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if events.is_file() and '"generate"' in events.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"the {side} worker never started generating")


def _gone(run_dir: Path, within: float) -> list[str]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = processes_mentioning(run_dir)
        if not left:
            return []
        time.sleep(0.2)
    return processes_mentioning(run_dir)


def test_a_sigkilled_run_leaves_no_worker_behind(tmp_path, fake_model):
    # SIGKILL cannot be caught: the workers notice their parent is gone and end their own process group
    run_dir = tmp_path / "killed"
    proc = _start(tmp_path, fake_model, run_dir, sides="target", delay="0.5", child="1")
    try:
        _wait_generating(run_dir, "target")
        assert any("fake-engine-child" in line for line in processes_mentioning(run_dir))
        proc.kill()
        proc.wait(timeout=10)
        assert _gone(run_dir, within=10) == []
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "parity.json").exists()  # an unfinished run folder is never taken for a finished one


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("side", ["reference", "target"])
def test_interrupted_at_each_side_exits_cleanly_and_caches_nothing_half_made(tmp_path, fake_model, fake_cli,
                                                                             sig, code, side):
    run_dir = tmp_path / f"stopped-{side}"
    proc = _start(tmp_path, fake_model, run_dir, "--use-cache", sides=side, delay="0.5")
    try:
        _wait_generating(run_dir, side)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / f"{run_dir.name}.err").read_text()
    assert proc.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert _gone(run_dir, within=5) == []
    assert not (run_dir / "parity.json").exists()
    res = fake_cli("--use-cache", "--no-inspect-logits")  # the cache holds a whole reference or none
    assert res.returncode == 0, res.stderr
    assert res.report["cache"]["hit"] is (side == "target")


def test_two_runs_at_once_on_one_cache(tmp_path, fake_model, fake_cli):
    procs = [_start(tmp_path, fake_model, tmp_path / f"twin{i}", "--use-cache", "--num-hidden-layers", "2",
                    delay="0.05") for i in range(2)]
    for proc in procs:
        proc.wait(timeout=120)
    errors = [(tmp_path / f"twin{i}.err").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], errors
    with ReferenceCache(tmp_path / "cache" / "references") as cache:
        entries = cache.entries()
        assert len(entries) == 1 and entries[0]["key"] in cache
    res = fake_cli("--use-cache", "--num-hidden-layers", "2", "--no-inspect-logits")
    assert res.returncode == 0 and res.report["cache"]["hit"] is True


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs: the run folder fills it (needs root and mount, as on the CI machine)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_full_disk_under_the_run_folder_exits_3_and_caches_nothing(fake_cli, small_disk, tmp_path):
    run_dir = small_disk / "run"
    res = fake_cli("--run-dir", str(run_dir), "--max-tokens", "64", "--store", "fp32", "--use-cache")
    assert res.returncode == 3, res.stdout + res.stderr
    flat = _flat(res.stderr)
    assert ("No space left on device" in flat or f"the disk under {run_dir}" in flat), flat
    assert "Traceback" not in res.stdout
    assert _gone(run_dir, within=5) == []
    with ReferenceCache(tmp_path / "cache" / "references") as cache:
        assert cache.entries() == []
