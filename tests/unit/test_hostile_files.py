"""Hostile capture folders, reference files and cache folders, refused by the pure validators.

Each case is what a forger (or bad luck) could put in a file that travels between machines: the
metadata digest is recomputed, so the check under test is the one that fires. Every case asserts the
refusal (one CaptureError or HarnessError naming the problem), that nothing was executed (a pickle whose
loading would create a marker file) and that nothing was read outside or left behind.
docs/robustness.md lists these cases ("Hostile input").
"""

from __future__ import annotations

import json
import os
import signal
import tarfile
import threading
import time

import pytest
from tests.fakes.hostile_files import (
    folder_as_tar,
    gzip_bomb,
    hostile_legacy_rows,
    legacy_cache,
    legacy_rows_of,
    member,
    pickled_marker,
    sign_capture_json,
    tar_bytes,
)

from vllm_rbln_exec.capture import archive
from vllm_rbln_exec.capture.archive import pack_capture, unpack_capture
from vllm_rbln_exec.capture.cache import ReferenceCache, cache_key
from vllm_rbln_exec.capture.store import CAPTURE_JSON, CaptureError, digests_of, file_digest, load_capture
from vllm_rbln_exec.core.errors import HarnessError
from vllm_rbln_exec.core.paths import not_a_file, open_regular


def _meta(capture) -> dict:
    return json.loads((capture.root / CAPTURE_JSON).read_text())


# -- capture.json: names and types --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/dev/zero", "../../etc/passwd", "/etc/passwd", "..", ".hidden", "a/b.npy", "",
                                  "x" * 300, 7])
def test_an_array_name_outside_the_capture_is_refused_before_anything_opens(small_capture, name):
    capture, _ = small_capture
    data = _meta(capture)
    data["prompts"][0]["logprobs_file"] = name
    sign_capture_json(capture.root, data)
    with pytest.raises(CaptureError, match="logprobs_file .* is not a plain file name inside the capture"):
        load_capture(capture.root, verify_arrays=True)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_an_array_that_is_a_link_or_a_fifo_is_refused_without_opening_it(small_capture, kind):
    capture, _ = small_capture
    name = capture.prompts[0].logprobs_file
    (capture.root / name).unlink()
    if kind == "symlink":
        os.symlink("/dev/zero", capture.root / name)
    else:
        os.mkfifo(capture.root / name)  # opening it for reading would block for ever
    started = time.monotonic()
    with pytest.raises(CaptureError, match=f"prompt 0 logprobs: {name} is a (symbolic link|FIFO)"):
        load_capture(capture.root, verify_arrays=True)
    assert time.monotonic() - started < 10  # a hang guard, not a speed test


@pytest.mark.parametrize("edit, words", [
    (lambda d: [d], "holds a JSON list, not an object"),
    (lambda d: {**d, "vocab_size": "many"}, "vocab_size 'many' is no count"),
    (lambda d: {**d, "prompts": "p"}, "prompts is not a list"),
    (lambda d: {**d, "prompts": [d["prompts"][1], d["prompts"][0]]}, r"prompts\[0\].index is not 0"),
    (lambda d: {**d, "info": []}, "info is not an object"),
    (lambda d: {**d, "mode": ["full"]}, "mode .* is none of"),
    (lambda d: {**d, "settings": {"key_fields": {"max_tokens": "32"}}}, "key_fields.max_tokens '32' is out of range"),
    (lambda d: {**d, "settings": {"key_fields": {"prompts": [1]}}}, "key_fields.prompts is not a list of strings"),
])
def test_wrong_types_in_capture_json_are_one_sentence(small_capture, edit, words):
    capture, _ = small_capture
    sign_capture_json(capture.root, edit(_meta(capture)))
    with pytest.raises(CaptureError, match=words) as caught:
        load_capture(capture.root, verify_arrays=True)
    assert "\n" not in caught.value.message


def test_capture_json_nested_200k_deep_is_refused(small_capture):
    capture, _ = small_capture
    (capture.root / CAPTURE_JSON).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CaptureError, match="nested too deeply"):
        load_capture(capture.root)


# -- reference files: members and what unpacking may cost -----------------------------------------------------
@pytest.mark.parametrize("extra, words", [
    (member("../escape.npy"), "unexpected entry '../escape.npy'"),
    (member("/etc/cron.d/x"), "unexpected entry '/etc/cron.d/x'"),
    (member("zero", tarfile.SYMTYPE, "/dev/zero"), "'zero' .* is not a plain file \\(a symbolic link\\)"),
    (member("hard", tarfile.LNKTYPE, "capture.json"), "'hard' .* \\(a hard link\\)"),
    (member("pipe", tarfile.FIFOTYPE), "'pipe' .* \\(a FIFO\\)"),
    (member("dev", tarfile.CHRTYPE), "'dev' .* \\(a character device\\)"),
    (member("sparse", tarfile.GNUTYPE_SPARSE), "'sparse' .* \\(a sparse file\\)"),
    (member("capture.json"), "unexpected entry 'capture.json'"),  # a second one would replace the first
])
def test_hostile_members_are_refused_and_nothing_is_left(tmp_path, small_capture, extra, words):
    capture, _ = small_capture
    ref = tmp_path / "ref.vre"
    ref.write_bytes(folder_as_tar(capture.root, [(extra, b"" if extra.type == tarfile.REGTYPE else None)]))
    with pytest.raises(CaptureError, match=words):
        unpack_capture(ref, tmp_path / "scratch" / "capture")
    assert not (tmp_path / "scratch" / "capture").exists()
    assert not (tmp_path / "escape.npy").exists()


def test_a_gzip_bomb_is_refused_at_its_first_header(tmp_path):
    ref = tmp_path / "bomb.vre.gz"
    ref.write_bytes(gzip_bomb(256 << 20))  # 256 MiB of zeros: about 1 MiB compressed
    assert ref.stat().st_size < 2 << 20
    started = time.monotonic()
    with pytest.raises(CaptureError, match="more than a gzip-compressed file of this size may expand to"):
        unpack_capture(ref, tmp_path / "out")
    assert time.monotonic() - started < 10  # refused at the header: nothing expanded (a hang guard)
    assert not (tmp_path / "out").exists()


def test_a_compressed_reference_file_within_the_limits_is_read(tmp_path, small_capture):
    capture, _ = small_capture
    plain = tmp_path / "ref.vre"
    pack_capture(capture.root, plain)
    import gzip

    (tmp_path / "ref.vre.gz").write_bytes(gzip.compress(plain.read_bytes()))
    assert unpack_capture(tmp_path / "ref.vre.gz", tmp_path / "out").prompts == capture.prompts


def test_a_member_declaring_more_than_the_file_holds_is_refused(tmp_path):
    info = member("p0000.logprobs.npy")
    info.size = 20 << 30  # 20 GiB declared in a file of a few KiB
    (tmp_path / "ref.vre").write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + bytes(4096))
    with pytest.raises(CaptureError, match="declares 21474836480 bytes, past the end of the file"):
        unpack_capture(tmp_path / "ref.vre", tmp_path / "out")


def test_member_count_and_free_space_are_limited(tmp_path, small_capture, monkeypatch):
    capture, _ = small_capture
    ref = tmp_path / "ref.vre"
    pack_capture(capture.root, ref)
    monkeypatch.setattr(archive, "MAX_MEMBERS", 2)
    with pytest.raises(CaptureError, match="more than 2 members"):
        unpack_capture(ref, tmp_path / "out")
    monkeypatch.setattr(archive, "MAX_MEMBERS", 100)
    monkeypatch.setattr(archive.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 100})())
    with pytest.raises(CaptureError, match="unpacking needs .* GiB free"):
        unpack_capture(ref, tmp_path / "out")


@pytest.mark.parametrize("kind", ["folder", "fifo", "device", "missing"])
def test_a_reference_path_is_named_for_what_it_is(tmp_path, kind):
    path = {"folder": tmp_path, "fifo": tmp_path / "pipe", "device": "/dev/zero", "missing": tmp_path / "nope"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    words = {"folder": "is a folder", "fifo": "is a FIFO", "device": "is a character device",
             "missing": "does not exist"}[kind]
    assert words in not_a_file(path)
    if kind != "missing":
        with pytest.raises(OSError, match=words):
            open_regular(path)  # does not block on the FIFO
        with pytest.raises(CaptureError, match=words):
            unpack_capture(path, tmp_path / "out")


# -- hashing ends when asked ----------------------------------------------------------------------------------
def test_hashing_stops_between_chunks(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB read as zeros, a minute of hashing
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedError):
        file_digest(big, stop)


def test_a_signal_ends_threaded_hashing_within_seconds(tmp_path):
    names = []
    for i in range(2):  # two files: the thread pool is used
        with open(tmp_path / f"big{i}", "wb") as f:
            f.truncate(64 << 30)
        names.append(f"big{i}")

    class Stopped(Exception):
        pass

    def on_alarm(signum, frame):
        raise Stopped()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    threads_before = threading.active_count()
    started = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Stopped):
            digests_of(tmp_path, names)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # without the stop flag the pool's shutdown waited for both 64 GiB files (about two minutes here)
    assert time.monotonic() - started < 10
    assert threading.active_count() == threads_before


# -- the cache never unpickles --------------------------------------------------------------------------------
def test_the_payload_used_below_does_run_when_unpickled(tmp_path):
    import pickle

    marker = tmp_path / "ran"
    pickle.loads(pickled_marker(marker))
    assert marker.exists()  # so its absence below means it never ran


@pytest.mark.parametrize("stored", ["inline", "value-file"])
def test_an_old_cache_is_converted_and_its_pickles_are_never_loaded(tmp_path, small_capture, stored):
    capture, _ = small_capture
    fields = {"model": "m", "prompts": ["first prompt", "second prompt"]}
    key = cache_key(fields)
    packed = tmp_path / "packed.vre"
    pack_capture(capture.root, packed)
    marker = tmp_path / "ran"
    root = tmp_path / "cache" / "references"
    root.mkdir(parents=True)
    rows = legacy_rows_of(key, packed.read_bytes(), fields, root if stored == "value-file" else None)
    legacy_cache(root, rows + hostile_legacy_rows(marker))
    with ReferenceCache(root) as cache:
        assert len(cache.notes) == 1 and "converted" in cache.notes[0] and "never unpickled" in cache.notes[0]
        assert [e["key"] for e in cache.entries()] == [key]
        loaded, why = cache.get(key, tmp_path / "out")
        assert why is None and loaded.prompts == capture.prompts
    assert not marker.exists()
    assert not (root / "cache.db").exists() and len(list(root.glob("legacy-diskcache-*/cache.db"))) == 1
    with ReferenceCache(root) as cache:  # converted once
        assert cache.notes == [] and len(cache.entries()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"garbage bytes, not a database" * 100, "truncated"])
def test_a_corrupt_old_cache_database_is_one_sentence(tmp_path, small_capture, content):
    root = tmp_path / "references"
    if content == "truncated":
        db = legacy_cache(root, [("meta:" + "a" * 64, 1, 1, None, "{}")] * 1 + [
            ("ref:" + "b" * 64, 1, 1, None, bytes(100_000))])
        db.write_bytes(db.read_bytes()[:5000])
    else:
        root.mkdir(parents=True)
        (root / "cache.db").write_bytes(content)
    with pytest.raises(HarnessError, match="holds an old cache.db that cannot be read .*; move it away") as caught:
        ReferenceCache(root)
    assert caught.value.exit_code == 3 and "\n" not in caught.value.message


@pytest.mark.parametrize("kind", ["symlink", "fifo", "deep"])
def test_hostile_files_in_the_cache_folder_are_misses(tmp_path, kind):
    key = "a" * 64
    with ReferenceCache(tmp_path / "refs") as cache:
        vre, meta = cache.entries_dir / f"{key}.vre", cache.entries_dir / f"{key}.json"
        if kind == "symlink":
            os.symlink("/dev/zero", vre)
            os.symlink("/etc/passwd", meta)
        elif kind == "fifo":
            os.mkfifo(vre)
            os.mkfifo(meta)
        else:
            vre.write_bytes(tar_bytes([(member(CAPTURE_JSON), b"[" * 200_000)]))
            meta.write_text("[" * 200_000)
        assert cache.entries() == []
        capture, why = cache.get(key, tmp_path / "out")
        assert capture is None and "dropped" in why
        assert not os.path.lexists(vre) and not os.path.lexists(meta)
        with pytest.raises(KeyError, match="is not a cache key"):
            cache.get("../../etc/passwd", tmp_path / "out")
