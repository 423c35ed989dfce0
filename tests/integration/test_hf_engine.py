"""The transformers engine in a real worker, on the seeded tiny Llama, and against vLLM CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import capture_job

from vllm_rbln_exec.capture.store import load_capture
from vllm_rbln_exec.setup.tiny import make_tiny_model
from vllm_rbln_exec.worker.spawn import run_worker

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "Hello, my name is", "In 1492 a ship sailed across the ocean blue and"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def capture(tiny: Path, folder: Path, engine: str = "transformers", env_extra: dict | None = None, **over):
    env = dict(os.environ)
    env.update(env_extra or {})
    result = run_worker(capture_job(tiny, folder, engine, PROMPTS, max_tokens=MAX_TOKENS, batch=2, env=env, **over))
    assert result["platform"] == "cpu"
    return load_capture(Path(result["capture"]), verify_arrays=True)


@pytest.fixture(scope="module")
def hf_full(tiny, tmp_path_factory):
    return capture(tiny, tmp_path_factory.mktemp("hf") / "w")


def test_full_vocabulary_capture(hf_full):
    cap = hf_full
    assert cap.info.engine == "transformers" and cap.info.platform == "cpu"
    assert cap.info.engine_version and cap.info.torch_version
    assert cap.vocab_size == 128256
    assert cap.settings["tokenizer_vocab_size"] == 128256
    assert cap.info.timings["generate_s"] > 0
    assert [p.prompt for p in cap.prompts] == PROMPTS
    for i, record in enumerate(cap.prompts):
        assert record.prompt_token_ids[0] == 128254  # bos added, as vLLM tokenizes
        rows = np.asarray(cap.logprobs(i), dtype=np.float64)
        assert rows.shape == (MAX_TOKENS, 128256)
        assert len(record.token_ids) == MAX_TOKENS
        lse = np.log(np.exp(rows).sum(axis=1))
        assert np.abs(lse).max() < 1e-4  # rows are log-probabilities
        assert rows.argmax(axis=1).tolist() == record.token_ids  # greedy
        assert isinstance(record.text, str) and record.text


def test_forced_tokens_and_top_n(tiny, hf_full, tmp_path):
    rng = np.random.default_rng(1)
    force = [rng.integers(0, 128000, MAX_TOKENS).tolist() for _ in PROMPTS]
    force[1] = hf_full.prompts[1].token_ids  # forcing the greedy tokens reproduces the free run
    cap = capture(tiny, tmp_path / "w", logprobs=5, force=force)
    assert cap.mode == "topn"
    for i, record in enumerate(cap.prompts):
        assert record.token_ids == force[i]
        values = np.asarray(cap.logprobs(i))
        ids = np.asarray(cap.top_ids(i))
        assert values.shape == ids.shape == (MAX_TOKENS, 5) and ids.dtype == np.int32
        assert (np.diff(values, axis=1) <= 0).all()
        full = np.asarray(hf_full.logprobs(i))
        # the first row comes from the prompt alone, so it is the free run's row
        np.testing.assert_allclose(values[0], full[0][ids[0]], atol=1e-5)
    full = np.asarray(hf_full.logprobs(1))
    ids = np.asarray(cap.top_ids(1))
    np.testing.assert_allclose(np.asarray(cap.logprobs(1)), np.take_along_axis(full, ids, axis=1), atol=1e-5)
    assert ids[:, 0].tolist() == hf_full.prompts[1].token_ids
    # random forced tokens really change the context: later rows differ from the free run
    assert not np.array_equal(np.asarray(cap.top_ids(0))[1:, 0], np.asarray(hf_full.logprobs(0))[1:].argmax(1))


def test_matches_vllm_cpu(tiny, hf_full, tmp_path):
    """One vLLM CPU engine start (about a minute on two cores)."""
    vllm = capture(tiny, tmp_path / "vllm", engine="vllm",
                   env_extra={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "VLLM_PLUGINS": "cpu"})
    assert vllm.vocab_size == hf_full.vocab_size == 128256
    worst = 0.0
    for i, (a, b) in enumerate(zip(hf_full.prompts, vllm.prompts)):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.token_ids == b.token_ids
        delta = np.abs(np.asarray(hf_full.logprobs(i)) - np.asarray(vllm.logprobs(i))).max()
        worst = max(worst, float(delta))
    print(f"max |logprob(transformers) - logprob(vLLM CPU)| = {worst:.3g}")
    assert worst < 1e-3
