"""Hostile reference files and cache folders against the real CLI (fake engine): issue 26, items 1, 2 and 9.

Each case checks the exit code, that the message is one sentence with no traceback, that nothing was
executed (a pickle whose loading creates a marker file), that nothing was read outside or left behind
(``$TMPDIR`` is the test's own and must end empty; no run folder is made for a run refused at the start)
and, as a hang guard only, that it ends within seconds. docs/robustness.md lists them ("Hostile input").
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from tests.fakes.hostile_files import deep_json, gzip_bomb, hostile_legacy_rows, legacy_cache, legacy_rows_of, member
from tests.helpers import FAKE_CLI, fake_args, fake_env, run_cli

from vllm_rbln_exec.capture.cache import cache_key
from vllm_rbln_exec.capture.store import CAPTURE_JSON, metadata_digest

pytestmark = pytest.mark.plumbing


@pytest.fixture(scope="module")
def golden(tmp_path_factory, fake_model) -> tuple[Path, dict]:
    """A reference file of the fake run (made once) and its key fields."""
    root = tmp_path_factory.mktemp("golden")
    path = root / "golden.vre"
    proc = run_cli(["--cache-dir", str(root / "cache"), "--run-dir", str(root / "run"), *fake_args(fake_model),
                    "--save-reference", str(path), "--no-inspect-logits"], cwd=root, env=fake_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(path) as tar:
        meta = json.load(tar.extractfile(CAPTURE_JSON))
    return path, meta["settings"]["key_fields"]


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch) -> Path:
    """$TMPDIR of the CLI under test: a fresh folder that must be empty again after each run."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def _one_sentence(stderr: str) -> str:
    flat = " ".join(stderr.split())
    assert "Traceback" not in stderr and flat.count("error:") == 1, stderr
    return flat


def _edited(golden: Path, dest: Path, edit) -> Path:
    """``golden`` with its capture.json replaced by ``edit(data)`` (a dict is signed, as a forger would)."""
    out = io.BytesIO()
    with tarfile.open(golden) as src, tarfile.open(fileobj=out, mode="w") as tar:
        for info in src.getmembers():
            data = src.extractfile(info).read()
            if info.name == CAPTURE_JSON:
                new = edit(json.loads(data))
                if isinstance(new, dict):
                    new["digest"] = metadata_digest(new)
                data = (new if isinstance(new, str) else json.dumps(new)).encode()
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest.write_bytes(out.getvalue())
    return dest


def _logprobs_file(name):
    def edit(data):
        data["prompts"][0]["logprobs_file"] = name
        return data
    return edit


HOSTILE_REFERENCES = {
    "dev-zero": (_logprobs_file("/dev/zero"), "prompts[0].logprobs_file '/dev/zero' is not a plain file name"),
    "escape": (_logprobs_file("../../etc/passwd"), "'../../etc/passwd' is not a plain file name"),
    "a-list": (lambda data: [data], "holds a JSON list, not an object"),
    "string-vocab": (lambda data: {**data, "vocab_size": "lots"}, "vocab_size 'lots' is no count"),
    "deep": (lambda data: deep_json(200_000), "nested too deeply"),
}


@pytest.mark.parametrize("case", list(HOSTILE_REFERENCES))
def test_a_hostile_reference_file_exits_2_and_leaves_nothing(fake_cli, golden, tmp_path, tmpdir_env, case):
    edit, words = HOSTILE_REFERENCES[case]
    ref = _edited(golden[0], tmp_path / "hostile.vre", edit)
    started = time.monotonic()
    res = fake_cli("--reference", str(ref))
    assert res.returncode == 2, res.stdout + res.stderr
    assert words in _one_sentence(res.stderr)
    assert time.monotonic() - started < 30  # /dev/zero was hashed for ever before: a hang guard
    assert list(tmpdir_env.iterdir()) == [] and not res.run_dir.exists()


@pytest.mark.parametrize("kind", ["folder", "fifo", "gzip-bomb", "symlink-member"])
def test_a_reference_that_is_no_capture_file_is_named_for_what_it_is(fake_cli, tmp_path, tmpdir_env, kind):
    path = tmp_path / "ref"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "gzip-bomb":
        path.write_bytes(gzip_bomb(256 << 20))
    else:
        info = member("p0000.logprobs.npy", tarfile.SYMTYPE, "/dev/zero")
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            tar.addfile(info)
        path.write_bytes(out.getvalue())
    words = {"folder": f"reference file {path} is a folder, not a file",
             "fifo": f"reference file {path} is a FIFO (named pipe), not a file",
             "gzip-bomb": "more than a gzip-compressed file of this size may expand to",
             "symlink-member": "'p0000.logprobs.npy' in capture file is not a plain file (a symbolic link)"}[kind]
    started = time.monotonic()
    res = fake_cli("--reference", str(path))
    assert res.returncode == 2, res.stdout + res.stderr
    assert words in _one_sentence(res.stderr)
    assert time.monotonic() - started < 30  # a hang guard (the FIFO blocked the open before)
    assert list(tmpdir_env.iterdir()) == [] and not res.run_dir.exists()


def _sparse_reference(path: Path, size: int) -> None:
    """A plain tar whose first member holds ``size`` zero bytes, as a hole (no disk used), then capture.json."""
    big = member("p0000.logprobs.npy")
    big.size = size
    meta = member(CAPTURE_JSON)
    meta.size = 2
    with open(path, "wb") as f:
        f.write(big.tobuf(format=tarfile.GNU_FORMAT))
        f.seek(512 + size + (-size % 512))
        f.write(meta.tobuf(format=tarfile.GNU_FORMAT) + b"{}".ljust(512, b"\0") + bytes(1024))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_reading_a_large_reference_file_and_removes_the_scratch(tmp_path, fake_model, tmpdir_env,
                                                                              sig, code):
    ref = tmp_path / "large.vre"
    _sparse_reference(ref, 8 << 30)  # 8 GiB: about ten seconds of unpacking here
    proc = subprocess.Popen([sys.executable, "-m", FAKE_CLI, "--cache-dir", str(tmp_path / "cache"), "--run-dir",
                             str(tmp_path / "run"), *fake_args(fake_model), "--reference", str(ref)],
                            cwd=tmp_path, env={**os.environ, **fake_env()}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                                                 signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 1 << 20 for p in tmpdir_env.rglob("*.npy") if p.is_file()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert took < 10, took  # the limit is 2 s; this bound is a hang guard on a loaded machine
    assert list(tmpdir_env.iterdir()) == []


# -- the cache folder -------------------------------------------------------------------------------------------
CACHE_COMMANDS = {"ls": ["ls"], "show": ["show", "KEY"], "export": ["export", "KEY", "out.vre"],
                  "import": ["import", "REF"], "clear": ["clear", "--yes"]}


def _cache_cmd(tmp_path: Path, name: str, key: str, ref: Path) -> subprocess.CompletedProcess:
    args = [a.replace("KEY", key[:12]).replace("REF", str(ref)) for a in CACHE_COMMANDS[name]]
    return run_cli(["cache", *args, "--cache-dir", str(tmp_path / "cache")], cwd=tmp_path, env=fake_env(),
                   timeout=60)


def _hostile_legacy_cache(tmp_path: Path, golden) -> tuple[Path, str]:
    path, fields = golden
    key = cache_key(fields)
    marker = tmp_path / "payload-ran"
    legacy_cache(tmp_path / "cache" / "references",
                 legacy_rows_of(key, path.read_bytes(), fields) + hostile_legacy_rows(marker))
    return marker, key


@pytest.mark.parametrize("name", list(CACHE_COMMANDS))
def test_no_cache_command_unpickles_an_old_cache(tmp_path, golden, name):
    marker, key = _hostile_legacy_cache(tmp_path, golden)
    res = _cache_cmd(tmp_path, name, key, golden[0])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "never unpickled" in " ".join(res.stderr.split())
    assert not marker.exists()


def test_a_run_with_use_cache_converts_an_old_cache_without_unpickling(fake_cli, tmp_path, golden):
    marker, key = _hostile_legacy_cache(tmp_path, golden)
    res = fake_cli("--use-cache", "--no-inspect-logits")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.report["cache"]["hit"] is True and res.report["cache"]["key"] == key  # the converted entry
    assert any("never unpickled" in note for note in res.report["notes"])
    assert not marker.exists()


def test_a_corpus_run_with_use_cache_never_unpickles(tmp_path, golden, fake_model):
    marker, _ = _hostile_legacy_cache(tmp_path, golden)
    proc, run_dir = _corpus(tmp_path, fake_model, "--use-cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any("never unpickled" in note for note in json.loads((run_dir / "corpus.json").read_text())["notes"])
    assert not marker.exists()


def _corpus(tmp_path: Path, model: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 40)
    run_dir = tmp_path / "crun"
    proc = run_cli(["corpus", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(run_dir), "--model",
                    str(model), "--reference-engine", "fake", "--target", f"{model},engine=fake,label=t",
                    "--corpus", str(corpus), "--window", "48", "--stride", "16", "--max-windows", "2", *args],
                   cwd=tmp_path, env=fake_env(), timeout=120)
    return proc, run_dir


def _corrupt_cache(tmp_path: Path, how: str) -> None:
    root = tmp_path / "cache" / "references"
    if how == "garbage":
        root.mkdir(parents=True)
        (root / "cache.db").write_bytes(os.urandom(8192))
    else:
        db = legacy_cache(root, [("ref:" + "a" * 64, 1, 1, None, bytes(200_000))])
        db.write_bytes(db.read_bytes()[:6000])


@pytest.mark.parametrize("how", ["garbage", "truncated"])
@pytest.mark.parametrize("name", list(CACHE_COMMANDS))
def test_a_corrupt_cache_database_is_exit_3_on_every_cache_command(tmp_path, golden, name, how):
    _corrupt_cache(tmp_path, how)
    res = _cache_cmd(tmp_path, name, "a" * 64, golden[0])
    assert res.returncode == 3, res.stdout + res.stderr
    assert "holds an old cache.db that cannot be read" in _one_sentence(res.stderr)


@pytest.mark.parametrize("flag", ["--use-cache", "--require-cache", "corpus"])
def test_a_corrupt_cache_database_ends_a_run_before_its_folder_exists(fake_cli, tmp_path, fake_model, flag):
    _corrupt_cache(tmp_path, "garbage")
    if flag == "corpus":
        proc, run_dir = _corpus(tmp_path, fake_model, "--use-cache")
        returncode, stderr = proc.returncode, proc.stderr
    else:
        res = fake_cli(flag)
        returncode, stderr, run_dir = res.returncode, res.stderr, res.run_dir
    assert returncode == 3, stderr
    assert "holds an old cache.db that cannot be read" in _one_sentence(stderr)
    assert not run_dir.exists()
