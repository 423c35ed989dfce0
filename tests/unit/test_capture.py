"""The capture folder format: writer, loader, single-file (tar) form."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from vllm_rbln_exec.capture.archive import pack_capture, unpack_capture
from vllm_rbln_exec.capture.store import (
    CAPTURE_JSON,
    FULL,
    SCHEMA_VERSION,
    TOPN,
    CaptureError,
    CaptureWriter,
    SideInfo,
    file_digest,
    load_capture,
    metadata_digest,
)


def assert_same_capture(loaded, expected_arrays, original):
    assert loaded.mode == original.mode
    assert loaded.vocab_size == original.vocab_size
    assert loaded.settings == original.settings
    assert loaded.info == original.info
    assert loaded.prompts == original.prompts
    for i, (lp, ids) in expected_arrays.items():
        np.testing.assert_array_equal(loaded.logprobs(i), lp)
        assert loaded.logprobs(i).dtype == np.float32
        if ids is None:
            assert loaded.top_ids(i) is None
        else:
            np.testing.assert_array_equal(loaded.top_ids(i), ids)
            assert loaded.top_ids(i).dtype == np.int32


@pytest.mark.parametrize("mode", [FULL, TOPN])
def test_writer_round_trip(tmp_path, make_capture, mode):
    root = tmp_path / "cap"
    capture, expected = make_capture(root, mode=mode, vocab=8)
    assert (root / CAPTURE_JSON).is_file()
    assert not list(root.glob(".*.tmp"))  # the atomic write left nothing behind

    loaded = load_capture(root, verify_arrays=True)
    assert loaded.schema_version == SCHEMA_VERSION
    assert loaded.root == root
    assert loaded.vocab_size == 8
    assert [p.index for p in loaded.prompts] == [0, 1]
    assert loaded.prompts[0].token_ids == [4, 5, 6]
    assert loaded.prompts[1].prompt_token_ids == [7]
    assert loaded.prompts[1].text == " d e"
    assert loaded.info.timings["generate"] == 1.5 and set(loaded.info.timings) == {"generate", "digest_s"}
    # the allocated prompt was cut to the 2 tokens generated
    assert loaded.logprobs(1).shape == (2, 8 if mode == FULL else 2)
    assert (loaded.prompts[1].ids_file is None) == (mode == FULL)
    assert_same_capture(loaded, expected, capture)


def test_finish_refuses_a_gap_in_prompt_indices(tmp_path):
    writer = CaptureWriter(tmp_path / "c", SideInfo(side="target", device="cpu", engine="x"), {}, FULL)
    writer.add(1, "p", [1], [2], "t", logprobs=np.zeros((1, 3)))
    with pytest.raises(CaptureError, match=r"\[0\]"):
        writer.finish()
    assert not (tmp_path / "c" / CAPTURE_JSON).exists()


def test_unfinished_folder_raises(tmp_path):
    writer = CaptureWriter(tmp_path / "c", SideInfo(side="target", device="cpu", engine="x"), {}, FULL)
    writer.add(0, "p", [1], [2], "t", logprobs=np.zeros((1, 3)))
    # finish() never called: the arrays exist, capture.json does not
    assert (tmp_path / "c" / "p0000.logprobs.npy").is_file()
    with pytest.raises(CaptureError, match="not a finished capture"):
        load_capture(tmp_path / "c")
    with pytest.raises(CaptureError):
        load_capture(tmp_path / "does-not-exist")


def _edit_meta(root, edit=None, sign: bool = True) -> None:
    """Rewrite a capture's metadata through ``edit(data)``, as an older or foreign file would read.

    ``sign``: the digests are made to match the edited content (and the arrays as they are now), so the
    check under test is the one that fires; ``sign=False`` leaves them, as damage would."""
    meta = root / CAPTURE_JSON
    data = json.loads(meta.read_text())
    if edit is not None:
        edit(data)
    if sign:
        for record in data.get("prompts") or []:
            if isinstance(record, dict) and isinstance(record.get("digests"), dict):
                record["digests"] = {name: file_digest(root / name) for name in record["digests"]
                                     if (root / name).exists()}
        data["digest"] = metadata_digest(data)
    meta.write_text(json.dumps(data))


def test_wrong_schema_version_raises(small_capture):
    capture, _ = small_capture
    _edit_meta(capture.root, lambda data: data.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(CaptureError, match="schema version"):
        load_capture(capture.root)
    _edit_meta(capture.root, lambda data: data.pop("schema_version"))
    with pytest.raises(CaptureError, match="schema version"):
        load_capture(capture.root)


def test_malformed_metadata_raises(small_capture):
    capture, _ = small_capture
    meta = capture.root / CAPTURE_JSON
    meta.write_text("{not json")
    with pytest.raises(CaptureError, match="unreadable"):
        load_capture(capture.root)
    data = capture.to_json()
    del data["prompts"]
    meta.write_text(json.dumps(data))
    _edit_meta(capture.root)
    with pytest.raises(CaptureError, match="malformed"):
        load_capture(capture.root)


def test_verify_arrays_catches_a_short_array(small_capture):
    capture, _ = small_capture
    np.save(capture.root / capture.prompts[0].logprobs_file, np.zeros((1, 8), dtype=np.float32))
    _edit_meta(capture.root)
    load_capture(capture.root)  # metadata alone still loads
    with pytest.raises(CaptureError, match="does not match"):
        load_capture(capture.root, verify_arrays=True)


def test_verify_arrays_catches_a_wrong_vocab(small_capture):
    capture, _ = small_capture
    np.save(capture.root / capture.prompts[0].logprobs_file, np.zeros((3, 7), dtype=np.float32))
    _edit_meta(capture.root)
    with pytest.raises(CaptureError, match="vocab"):
        load_capture(capture.root, verify_arrays=True)


def test_pickled_array_is_refused(small_capture):
    capture, _ = small_capture
    np.save(capture.root / capture.prompts[0].logprobs_file, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _edit_meta(capture.root)
    with pytest.raises(CaptureError, match="cannot read"):
        load_capture(capture.root, verify_arrays=True)


@pytest.mark.parametrize("mode", [FULL, TOPN])
def test_pack_unpack_round_trip_via_file(tmp_path, make_capture, mode):
    capture, expected = make_capture(tmp_path / "src", mode=mode)
    packed = tmp_path / "capture.tar"
    pack_capture(capture.root, packed)
    with tarfile.open(packed) as tar:
        names = sorted(tar.getnames())
    assert CAPTURE_JSON in names and all("/" not in n for n in names)

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")  # unpack replaces the folder
    loaded = unpack_capture(packed, dest)
    assert not (dest / "stale.txt").exists()
    assert loaded.root == dest
    assert_same_capture(loaded, expected, capture)


def test_pack_unpack_round_trip_via_stream(tmp_path, small_capture):
    capture, expected = small_capture
    buf = io.BytesIO()
    pack_capture(capture.root, buf)
    buf.seek(0)
    loaded = unpack_capture(buf, tmp_path / "out")
    assert_same_capture(loaded, expected, capture)


def test_pack_refuses_an_unfinished_capture(tmp_path):
    writer = CaptureWriter(tmp_path / "c", SideInfo(side="target", device="cpu", engine="x"), {}, FULL)
    writer.add(0, "p", [1], [2], "t", logprobs=np.zeros((1, 3)))
    with pytest.raises(CaptureError):
        pack_capture(tmp_path / "c", tmp_path / "c.tar")


def test_corrupt_tar_raises(tmp_path, small_capture):
    capture, _ = small_capture
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(CaptureError, match="unreadable"):
        unpack_capture(garbage, tmp_path / "out1")
    with pytest.raises(CaptureError):
        unpack_capture(io.BytesIO(b"garbage"), tmp_path / "out2")

    # a truncated archive of a real capture
    packed = tmp_path / "good.tar"
    pack_capture(capture.root, packed)
    data = packed.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(CaptureError):
        unpack_capture(truncated, tmp_path / "out3")


def test_tar_with_a_path_entry_is_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    payload = b"{}"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escape.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(CaptureError, match="unexpected entry"):
        unpack_capture(evil, tmp_path / "out")
    assert not (tmp_path / "escape.json").exists()


# -- q16 compact storage ---------------------------------------------------------


def _log_softmax_rows(rng, rows: int, vocab: int, scale: float) -> np.ndarray:
    logits = rng.normal(scale=scale, size=(rows, vocab))
    return (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("scale", [0.5, 4.0, 30.0])
def test_q16_error_is_bounded_within_the_range_and_clipped_below(scale):
    from vllm_rbln_exec.capture.q16 import Q16_MAX_ERROR, Q16_RANGE, dequantize_q16, quantize_q16

    rows = _log_softmax_rows(np.random.default_rng(1), 6, 5000, scale)
    levels, floor = quantize_q16(rows)
    assert levels.dtype == np.uint16 and levels.shape == rows.shape and floor.shape == (6,)
    back = dequantize_q16(levels, floor)
    top = rows.max(axis=1, keepdims=True)
    within = rows >= top - Q16_RANGE
    err = np.abs(back.astype(np.float64) - rows)
    # stated bound: half a step, plus float32 rounding of the stored floor
    assert err[within].max() <= Q16_MAX_ERROR + 4e-6
    # the argmax survives exactly (the top lands on the top level)
    assert np.array_equal(back.argmax(axis=1), rows.argmax(axis=1))
    # entries far below the top are clipped to the floor
    below = ~within
    if below.any():
        assert np.allclose(back[below], np.broadcast_to(floor[:, None], rows.shape)[below], atol=Q16_MAX_ERROR)
        # the probability they carry is bounded by e^-16 each
        assert np.exp(rows[below].astype(np.float64)).max() < np.exp(-Q16_RANGE) * 1.0001


def test_q16_keeps_minus_infinity_and_identical_rows_identical():
    from vllm_rbln_exec.capture.q16 import dequantize_q16, quantize_q16

    rows = _log_softmax_rows(np.random.default_rng(2), 3, 64, 2.0)
    rows[1, 5] = -np.inf
    rows[2, :] = -np.inf  # a fully masked row stays fully masked
    a, fa = quantize_q16(rows)
    b, fb = quantize_q16(rows.copy())
    assert np.array_equal(a, b) and np.array_equal(fa, fb)
    back = dequantize_q16(a, fa)
    assert back[1, 5] == -np.inf and np.all(np.isneginf(back[2]))
    assert np.isfinite(back[0]).all()


def test_q16_store_round_trips_through_the_writer_and_a_packed_file(tmp_path):
    from vllm_rbln_exec.capture.q16 import Q16_MAX_ERROR, Q16_RANGE

    rng = np.random.default_rng(3)
    info = SideInfo(side="reference", device="cpu", engine="fake", platform="cpu", dtype="float32", model="tiny")
    writer = CaptureWriter(tmp_path / "cap", info, {"max_tokens": 4, "logprobs": -1}, FULL)
    rows = _log_softmax_rows(rng, 4, 300, 3.0)
    writer.add(0, "p", [1], [int(r.argmax()) for r in rows], "t", logprobs=rows)
    capture = writer.finish(store="q16")
    assert capture.settings["store"] == "q16"
    files = sorted(p.name for p in (tmp_path / "cap").iterdir())
    assert not any(name.endswith(".logprobs.npy") for name in files)  # the fp32 file is gone
    loaded = load_capture(tmp_path / "cap", verify_arrays=True)
    assert loaded.logprobs(0).dtype == np.float32
    within = rows >= rows.max(axis=1, keepdims=True) - Q16_RANGE
    assert np.abs(loaded.logprobs(0) - rows)[within].max() <= Q16_MAX_ERROR + 4e-6
    pack_capture(tmp_path / "cap", tmp_path / "ref.tar")
    again = unpack_capture(tmp_path / "ref.tar", tmp_path / "out")
    assert np.array_equal(again.logprobs(0), loaded.logprobs(0))


def test_unknown_store_is_refused(tmp_path):
    info = SideInfo(side="reference", device="cpu", engine="fake", platform="cpu", dtype="float32", model="tiny")
    writer = CaptureWriter(tmp_path / "cap", info, {}, FULL)
    writer.add(0, "p", [1], [0], "t", logprobs=np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(CaptureError, match="unknown store"):
        writer.finish(store="int4")


def test_q16_keeps_the_probability_of_a_large_vocabulary_row():
    # Clipping the tail to the floor adds up to V * e^-RANGE of probability; over a
    # 128k vocabulary with a long tail that must stay far below what KL can show.
    from vllm_rbln_exec.capture.q16 import Q16_MAX_ERROR, dequantize_q16, quantize_q16

    rows = _log_softmax_rows(np.random.default_rng(4), 4, 128256, 6.0)
    spread = rows.max(axis=1) - rows.min(axis=1)
    assert (spread > 40).all()  # the rows really have a tail below the floor
    back = dequantize_q16(*quantize_q16(rows)).astype(np.float64)
    total = np.logaddexp.reduce(back, axis=1)
    # in-range rounding moves the log-mass by at most the step bound; the tail by ~1e-9
    assert np.abs(total).max() < Q16_MAX_ERROR
    p, q = np.exp(rows.astype(np.float64)), np.exp(back - total[:, None])
    kl = (p * (rows - np.log(q))).sum(axis=1)
    assert kl.max() < 1e-7


def _q16_capture(tmp_path, rows):
    info = SideInfo(side="reference", device="cpu", engine="fake", platform="cpu", dtype="float32", model="tiny")
    writer = CaptureWriter(tmp_path / "cap", info, {}, FULL)
    writer.add(0, "p", [1], [int(r.argmax()) for r in rows], "t", logprobs=rows)
    return writer.finish(store="q16")


def test_q16_records_its_range_and_is_decoded_with_it(tmp_path):
    # A file states the span of its levels, so a later build with another range
    # still decodes it correctly: decoding a 16-nat file as 32 nats would double
    # every distance from the floor.
    from vllm_rbln_exec.capture.q16 import Q16_RANGE, dequantize_q16, quantize_q16

    rows = _log_softmax_rows(np.random.default_rng(5), 3, 200, 2.0)
    capture = _q16_capture(tmp_path, rows)
    assert capture.prompts[0].q16_range == Q16_RANGE
    record = capture.prompts[0]
    levels, floor = quantize_q16(rows, span=16.0)
    np.save(tmp_path / "cap" / record.logprobs_file, levels)
    np.save(tmp_path / "cap" / record.floor_file, floor)
    _edit_meta(tmp_path / "cap", lambda data: data["prompts"][0].update(q16_range=16.0))
    loaded = load_capture(tmp_path / "cap", verify_arrays=True)
    np.testing.assert_array_equal(loaded.logprobs(0), dequantize_q16(levels, floor, 16.0))
    assert np.abs(loaded.logprobs(0) - rows).max() <= 16.0 / 65534 / 2 + 4e-6


@pytest.mark.parametrize("span", [None, 0, -1.0, "32", True])
def test_q16_levels_without_a_valid_range_are_refused(tmp_path, span):
    capture = _q16_capture(tmp_path, _log_softmax_rows(np.random.default_rng(6), 2, 50, 2.0))
    _edit_meta(capture.root, lambda data: data["prompts"][0].update(q16_range=span))
    with pytest.raises(CaptureError, match="without a valid range"):
        load_capture(capture.root, verify_arrays=True)
    with pytest.raises(CaptureError, match="without a valid range"):
        load_capture(capture.root).logprobs(0)


def test_a_damaged_byte_in_the_middle_of_an_array_is_refused(small_capture):
    capture, _ = small_capture
    path = capture.root / capture.prompts[1].logprobs_file
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2 + 3] ^= 0x40  # one bit of array data, not the header
    path.write_bytes(bytes(blob))
    load_capture(capture.root)  # metadata alone still loads (the arrays are not read)
    with pytest.raises(CaptureError, match=r"prompt 1 logprobs: digest mismatch"):
        load_capture(capture.root, verify_arrays=True)


def test_a_truncated_or_missing_array_is_refused(small_capture):
    capture, _ = small_capture
    path = capture.root / capture.prompts[0].logprobs_file
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CaptureError, match=r"prompt 0 logprobs: digest mismatch"):
        load_capture(capture.root, verify_arrays=True)
    path.unlink()
    with pytest.raises(CaptureError, match=r"prompt 0 logprobs: cannot read"):
        load_capture(capture.root, verify_arrays=True)


def test_edited_metadata_is_refused(small_capture):
    capture, _ = small_capture
    _edit_meta(capture.root, lambda data: data["prompts"][0].update(token_ids=[4, 5, 7]), sign=False)
    with pytest.raises(CaptureError, match="metadata digest mismatch"):
        load_capture(capture.root)


def test_a_version_2_capture_without_digests_is_refused_with_advice(small_capture):
    capture, _ = small_capture
    _edit_meta(capture.root, lambda data: data.update(schema_version=2))
    with pytest.raises(CaptureError, match="digests.*capture it again"):
        load_capture(capture.root)


def test_a_version_1_capture_is_refused_with_advice(small_capture):
    capture, _ = small_capture
    _edit_meta(capture.root, lambda data: data.update(schema_version=1))
    with pytest.raises(CaptureError, match="capture it again"):
        load_capture(capture.root)


def test_q16_store_keeps_a_prompt_with_nan_or_plus_inf_exactly(tmp_path):
    # NaN is what a broken kernel produces; q16 has no level for it, so that prompt stays fp32.
    info = SideInfo(side="target", device="cpu", engine="fake", platform="cpu", dtype="float32", model="tiny")
    writer = CaptureWriter(tmp_path / "cap", info, {}, FULL)
    rows = _log_softmax_rows(np.random.default_rng(7), 3, 40, 2.0)
    broken = rows.copy()
    broken[1, 3], broken[2, :] = np.inf, np.nan
    writer.add(0, "ok", [1], [0, 0, 0], "t", logprobs=rows)
    writer.add(1, "broken", [1], [0, 0, 0], "t", logprobs=broken)
    writer.finish(store="q16")
    loaded = load_capture(tmp_path / "cap", verify_arrays=True)
    assert loaded.prompts[0].floor_file is not None  # a finite prompt is still compacted
    assert loaded.prompts[1].floor_file is None and loaded.prompts[1].q16_range is None
    np.testing.assert_array_equal(loaded.logprobs(1), broken)  # NaN and +inf where they were
