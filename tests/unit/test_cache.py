"""The reference cache: key derivation and the file-backed store (bytes and JSON, never pickles)."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_rbln_exec.capture.cache import ReferenceCache, cache_key

BASE_FIELDS = {
    "model": "smollm2-135m",
    "weights": "a" * 24,
    "tokenizer": "b" * 24,
    "engine": "vllm",
    "engine_version": "0.32.0",
    "platform": "cpu",
    "dtype": "float32",
    "num_hidden_layers": None,
    "max_model_len": 2048,
    "block_size": 128,
    "max_tokens": 32,
    "logprobs": -1,
    "batch": 4,
    "prompts": ["The capital of France is", "def f():"],
}

CHANGES = {
    "model": "llama3-8b",
    "weights": "c" * 24,
    "tokenizer": "d" * 24,
    "engine": "transformers",
    "engine_version": "0.33.0",
    "platform": "rbln",
    "dtype": "bfloat16",
    "num_hidden_layers": 2,
    "max_model_len": 4096,
    "block_size": 256,
    "max_tokens": 16,
    "logprobs": 20,
    "batch": 8,
    "prompts": ["The capital of France is", "def g():"],
}


def test_key_is_a_sha256_hex_digest():
    key = cache_key(BASE_FIELDS)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(dict(BASE_FIELDS)) == key


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_key_changes_with_each_single_field(name):
    assert CHANGES[name] != BASE_FIELDS[name]
    changed = {**BASE_FIELDS, name: CHANGES[name]}
    assert cache_key(changed) != cache_key(BASE_FIELDS)


def test_key_distinguishes_prompt_order_and_count():
    base = cache_key(BASE_FIELDS)
    assert cache_key({**BASE_FIELDS, "prompts": list(reversed(BASE_FIELDS["prompts"]))}) != base
    assert cache_key({**BASE_FIELDS, "prompts": BASE_FIELDS["prompts"][:1]}) != base


def test_key_is_stable_under_dict_ordering():
    reordered = dict(reversed(list(BASE_FIELDS.items())))
    assert list(reordered) != list(BASE_FIELDS)
    assert cache_key(reordered) == cache_key(BASE_FIELDS)
    nested_a = {**BASE_FIELDS, "extra": {"x": 1, "y": 2}}
    nested_b = {**BASE_FIELDS, "extra": {"y": 2, "x": 1}}
    assert cache_key(nested_a) == cache_key(nested_b)


def test_put_get_round_trip(tmp_path, small_capture):
    capture, expected = small_capture
    key = cache_key(BASE_FIELDS)
    with ReferenceCache(tmp_path / "refs") as cache:
        assert key not in cache
        cache.put(key, capture.root, BASE_FIELDS)
        assert key in cache
        assert not list((tmp_path / "refs").glob(".pack-*"))  # the temporary tar was removed

        loaded, why = cache.get(key, tmp_path / "out")
        assert why is None
        assert loaded is not None
        assert loaded.root == tmp_path / "out"
        assert loaded.prompts == capture.prompts
        assert loaded.info == capture.info
        for i, (lp, _) in expected.items():
            np.testing.assert_array_equal(loaded.logprobs(i), lp)

        entries = cache.entries()
        assert len(entries) == 1
        assert entries[0]["key"] == key
        assert entries[0]["fields"]["model"] == "smollm2-135m"
        assert entries[0]["bytes"] > 0

    # persisted: a new handle on the same folder still has it
    with ReferenceCache(tmp_path / "refs") as cache:
        again, why = cache.get(key, tmp_path / "out2")
        assert why is None and again.prompts == capture.prompts


def test_miss(tmp_path):
    with ReferenceCache(tmp_path / "refs") as cache:
        capture, why = cache.get(cache_key(BASE_FIELDS), tmp_path / "out")
        assert capture is None
        assert why == "not cached"
        assert cache.entries() == []


# garbage where the packed capture should be: short (no tar header) and long (a header of nonsense)
GARBAGE = {
    "short": b"garbage",
    "long": b"garbage" * 10_000,
}


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
def test_corrupted_entry_is_dropped(tmp_path, small_capture, garbage):
    capture, _ = small_capture
    key = cache_key(BASE_FIELDS)
    other = cache_key({**BASE_FIELDS, "batch": 1})
    with ReferenceCache(tmp_path / "refs") as cache:
        cache.put(key, capture.root, BASE_FIELDS)
        cache.put(other, capture.root, BASE_FIELDS)
        (cache.entries_dir / f"{key}.vre").write_bytes(garbage)

        loaded, why = cache.get(key, tmp_path / "out")
        assert loaded is None
        assert why is not None and "dropped" in why
        assert key not in cache
        assert not (cache.entries_dir / f"{key}.json").exists()
        assert [e["key"] for e in cache.entries()] == [other]

        # the next lookup is a plain miss; the other entry is untouched
        assert cache.get(key, tmp_path / "out") == (None, "not cached")
        intact, why = cache.get(other, tmp_path / "out-other")
        assert why is None and intact is not None


def test_delete(tmp_path, small_capture):
    capture, _ = small_capture
    key = cache_key(BASE_FIELDS)
    with ReferenceCache(tmp_path / "refs") as cache:
        assert cache.delete(key) is False
        cache.put(key, capture.root, BASE_FIELDS)
        assert cache.delete(key) is True
        assert key not in cache and cache.entries() == []
