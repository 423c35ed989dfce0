"""A server side's rows (``remote.rows``), the tail-bucket KL of top-N rows (``compare.partial``) and the
server options (``setup.server``): pure logic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import log_softmax

from vllm_rbln_exec.compare.partial import TAIL_RESOLUTION, kl_tail_bucket
from vllm_rbln_exec.core.errors import UsageError
from vllm_rbln_exec.remote.rows import (
    CappedRows,
    RowError,
    full_row,
    prompt_logprob_entries,
    read_array,
    rows_of,
    top_logprob_entries,
    topn_row,
)
from vllm_rbln_exec.setup.options import build_options
from vllm_rbln_exec.setup.server import normalize_url, read_api_key


# -- reading responses ---------------------------------------------------------------------------------
def test_read_array_keeps_only_what_is_asked_and_the_rest_of_the_response():
    positions = [None] + [{str(i): {"logprob": -float(i), "rank": i, "decoded_token": "é😀"} for i in range(3)}] * 3
    body = json.dumps({"choices": [{"text": "Grüße 😀", "prompt_logprobs": positions, "prompt_token_ids": [1, 2]}]},
                      ensure_ascii=False).encode()
    skeleton, entries = read_array(body, "prompt_logprobs", prompt_logprob_entries, keep=lambda j: j >= 2)
    choice = skeleton["choices"][0]
    assert choice["text"] == "Grüße 😀" and choice["prompt_logprobs"] is None and choice["prompt_token_ids"] == [1, 2]
    assert entries[:2] == [None, None] and len(entries) == 4
    ids, vals, ranks = entries[3]
    assert ids.tolist() == [0, 1, 2] and vals.tolist() == [0.0, -1.0, -2.0] and ranks.tolist() == [0, 1, 2]


def test_read_array_without_the_key_and_malformed_responses():
    skeleton, entries = read_array(b'{"choices": [{"prompt_logprobs": null}]}', "prompt_logprobs",
                                   prompt_logprob_entries)
    assert entries is None and skeleton["choices"][0]["prompt_logprobs"] is None
    assert read_array(b'{"a": 1}', "top_logprobs", top_logprob_entries)[1] is None
    assert read_array(b'{"top_logprobs": [ ]}', "top_logprobs", top_logprob_entries)[1] == []
    with pytest.raises(RowError, match="malformed"):
        read_array(b'{"top_logprobs": [{"token_id:1": -1.0} {"token_id:2": -2.0}]}', "top_logprobs",
                   top_logprob_entries)
    with pytest.raises(RowError, match="more than once"):
        read_array(b'{"choices": [{"top_logprobs": []}, {"top_logprobs": []}]}', "top_logprobs",
                   top_logprob_entries)
    with pytest.raises(RowError, match="by their text"):
        top_logprob_entries({" the": -0.1})


# -- rows ------------------------------------------------------------------------------------------------
def test_full_row_unclamps_and_refuses_missing_entries():
    ids = np.array([2, 0, 1, 3])
    row = full_row(ids, np.array([-0.5, -1.0, -9999.0, -2.0]), 4)
    assert row[1] == -np.inf and row.tolist()[0] == -1.0 and row.dtype == np.float32
    with pytest.raises(CappedRows, match="returned 3 logprobs for a position, the full vocabulary is 4") as err:
        full_row(ids[:3], np.zeros(3), 4)
    assert (err.value.returned, err.value.asked) == (3, 4)
    with pytest.raises(RowError, match="outside the reference's vocabulary"):
        full_row(np.array([0, 7]), np.zeros(2), 4)


def test_topn_row_ranks_and_appends_the_rows_own_token():
    ids, vals, ranks = np.array([9, 4, 7, 1]), np.array([-6.0, -0.2, -1.5, -3.0]), np.array([30, 1, 2, 3])
    v, i = topn_row(ids, vals, ranks, token=9, n=3, vocab=40)  # the fed token ranks 30th: kept, exactly
    assert i.tolist() == [4, 7, 1, 9] and v.tolist() == np.float32([-0.2, -1.5, -3.0, -6.0]).tolist()
    v, i = topn_row(ids[1:], vals[1:], None, token=7, n=3, vocab=40)  # no ranks: by value; token inside: repeated
    assert i.tolist() == [4, 7, 1, 7]


def test_topn_row_catches_short_and_padded_rows():
    with pytest.raises(CappedRows, match="returned 2 logprobs for a position where 3 were asked"):
        topn_row(np.array([4, 7]), np.array([-0.2, -1.5]), None, token=4, n=3, vocab=40)
    with pytest.raises(CappedRows, match="padded with -inf"):
        topn_row(np.array([4, 7, 1]), np.array([-0.2, -1.5, -9999.0]), None, token=4, n=3, vocab=40)
    with pytest.raises(RowError, match="leave out its own token"):
        topn_row(np.array([4, 7, 1]), np.array([-0.2, -1.5, -3.0]), None, token=5, n=3, vocab=40)


def test_rows_of_shapes():
    entries = [(np.arange(4), np.log(np.full(4, 0.25)), None)] * 2
    rows, ids = rows_of(entries, [1, 2], -1, 4)
    assert rows.shape == (2, 4) and ids is None
    vals, ids = rows_of(entries, [1, 2], 2, 4)
    assert vals.shape == ids.shape == (2, 3) and ids[:, 2].tolist() == [1, 2]
    with pytest.raises(RowError, match="no logprobs for a position"):
        rows_of([None], [1], -1, 4)


# -- the tail bucket -------------------------------------------------------------------------------------
def _rows(seed: int, n: int = 6, vocab: int = 50) -> np.ndarray:
    return log_softmax(np.random.default_rng(seed).normal(size=(n, vocab)) * 2.0, axis=1)


def _true_kl(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    return (np.exp(p_log) * (p_log - q_log)).sum(axis=1)


def _top_n(rows: np.ndarray, n: int) -> np.ndarray:
    out = np.full_like(rows, -np.inf)
    keep = np.argsort(-rows, axis=1)[:, :n]
    np.put_along_axis(out, keep, np.take_along_axis(rows, keep, axis=1), axis=1)
    return out


def test_tail_bucket_kl_is_a_lower_bound_that_tightens_with_n_and_is_exact_at_the_full_vocabulary():
    ref, tgt = _rows(1), _rows(2)
    true = _true_kl(ref, tgt)
    previous = np.zeros(len(ref))
    for n in (1, 5, 20, 45):
        bound = kl_tail_bucket(ref, _top_n(tgt, n))[0]
        assert (bound <= true + 1e-12).all() and (bound >= previous - 1e-12).all()
        previous = bound
    np.testing.assert_allclose(kl_tail_bucket(ref, tgt)[0], true, rtol=1e-9, atol=1e-12)
    both = kl_tail_bucket(_top_n(ref, 10), _top_n(tgt, 10))[0]  # top-N on both sides: the common entries
    assert (both <= true + 1e-12).all()


def test_tail_bucket_does_not_renormalise_and_ignores_rounding_sized_tails():
    ref = _rows(3)
    kl, ref_shift, tgt_shift, ref_fix, tgt_fix = kl_tail_bucket(ref, _top_n(ref, 7))
    assert kl.tolist() == [0.0] * len(ref) and not ref_fix.any() and not tgt_fix.any()
    assert (ref_shift == 0).all() and (tgt_shift == 0).all()
    peaked = log_softmax(np.array([[40.0] + [0.0] * 9]), axis=1)  # top-1 holds all but 4e-17 of the mass
    noisy = peaked + np.float32(3e-8)  # a float32 rounding that leaves the known mass just above 1
    assert kl_tail_bucket(peaked, _top_n(noisy, 1))[0][0] < 1e-7
    assert TAIL_RESOLUTION < 1e-5


# -- options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given, base", [
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
    ("http://127.0.0.1:8000/v1/completions", "http://127.0.0.1:8000/v1"),
    ("https://host.example/serving", "https://host.example/serving/v1"),
    ("http://localhost:8000", "http://localhost:8000/v1"),
])
def test_urls_become_the_apis_base(given, base):
    assert normalize_url(given, "--target-url") == base


@pytest.mark.parametrize("bad, match", [
    ("127.0.0.1:8000/v1", "not an http"), ("ftp://host/v1", "not an http"), ("http://u:p@host/v1", "credentials"),
    ("http://host:99999/v1", "(?i)port"), ("http://host/v1?key=1", "query"),
])
def test_bad_urls_are_usage_errors(bad, match):
    with pytest.raises(UsageError, match=match):
        build_options(target_url=bad)


def test_api_key_from_env_or_file_never_in_the_options(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-abc")
    key_file = tmp_path / "key"
    key_file.write_text("sk-def\n")
    assert read_api_key("MY_KEY", None) == "sk-abc" and read_api_key(None, str(key_file)) == "sk-def"
    options = build_options(target_url="http://h:1/v1", api_key_env="MY_KEY")
    assert "sk-abc" not in json.dumps(options.to_json(), default=str)
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(UsageError, match="not set or empty"):
        build_options(target_url="http://h:1/v1", api_key_env="MY_KEY")
    with pytest.raises(UsageError, match="one way"):
        build_options(target_url="http://h:1/v1", api_key_env="X", api_key_file=str(key_file))


@pytest.mark.parametrize("flat, match", [
    ({"target_url": "http://h:1/v1", "target": "cpu"}, "--target cpu names a device profile"),
    ({"target_url": "http://h:1/v1", "target_args": '{"enforce_eager": true}'}, "--target-args cannot"),
    ({"target_url": "http://h:1/v1", "tp": 2}, "--tp cannot"),
    ({"target_url": "http://h:1/v1", "profile": True}, "cannot profile"),
    ({"target_url": "http://h:1/v1", "localize": True}, "--localize needs"),
    ({"reference_url": "http://h:1/v1", "use_cache": True}, "--use-cache cannot"),
    ({"reference_url": "http://h:1/v1", "yardstick": "vllm:bfloat16"}, "--yardstick"),
    ({"served_model": "m"}, "is for a server side"),
    ({"target_url": "http://h:1/v1", "server_scoring": "prompt"}, "--server-scoring must be"),
    ({"target_url": "http://h:1/v1", "server_logprobs": 0}, "--server-logprobs must be"),
])
def test_options_a_server_side_cannot_take(flat, match):
    with pytest.raises(UsageError, match=match):
        build_options(**flat)


def test_server_options_are_recorded():
    options = build_options(target_url="http://h:1/v1/", served_model="m", server_logprobs=20)
    assert options.target.url == "http://h:1/v1" and options.reference.url is None
    assert (options.server.served_model, options.server.logprobs, options.server.retries) == ("m", 20, 3)
