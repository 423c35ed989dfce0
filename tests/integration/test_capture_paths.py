"""The capture paths give the same numbers: transformers' fast rows against a plain full
forward pass, and vLLM's fast top-N rows against its logprobs API.

vLLM's full-vocabulary fast rows against its logprobs API (max |Δ| <= 1e-6) and ``capture:
plain`` giving the very tokens the fast path records are checked by
``test_bench.py`` on the same tiny model, whose quick benchmark runs those very
engines (a copy here cost three more engine starts, ~70 s).

On the seeded tiny Llama (128256-token vocabulary). Two vLLM CPU engine starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import capture_job

from vllm_rbln_exec.capture.store import TOKENS, CaptureError, load_capture
from vllm_rbln_exec.setup.tiny import make_tiny_model
from vllm_rbln_exec.worker.spawn import run_worker

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "Hello, my name is", "In 1492 a ship sailed across the ocean blue and"]
MAX_TOKENS = 10
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "VLLM_PLUGINS": "cpu",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def capture(tiny: Path, folder: Path, engine: str, mode: str, logprobs: int = -1):
    env = {**os.environ, **(VLLM_ENV if engine == "vllm" else {})}
    result = run_worker(capture_job(tiny, folder, engine, PROMPTS, max_tokens=MAX_TOKENS, batch=3, env=env,
                                    capture=mode, label=f"{engine}-{mode}", logprobs=logprobs))
    assert result["peak_rss_mib"] > 0
    return load_capture(Path(result["capture"]), verify_arrays=True)


def assert_tokens_only(cap, like) -> None:
    assert cap.mode == TOKENS
    assert [p.token_ids for p in cap.prompts] == [p.token_ids for p in like.prompts]
    assert [p.prompt_token_ids for p in cap.prompts] == [p.prompt_token_ids for p in like.prompts]
    with pytest.raises(CaptureError):
        cap.logprobs(0)


def test_transformers_fast_rows_are_a_full_forward_pass(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    fast = capture(tiny, tmp_path / "fast", "transformers", "fast")
    model = AutoModelForCausalLM.from_pretrained(str(tiny), attn_implementation="eager", local_files_only=True)
    model = model.to(torch.float32).eval()
    for i, record in enumerate(fast.prompts):
        # no KV cache: the whole sequence at once, rows read off the positions that predicted each token
        ids = record.prompt_token_ids + record.token_ids[:-1]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, len(record.prompt_token_ids) - 1 :]
        want = torch.log_softmax(logits.to(torch.float32), dim=-1).numpy()
        got = np.asarray(fast.logprobs(i))
        assert got.shape == want.shape == (MAX_TOKENS, 128256)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert want.argmax(axis=1).tolist() == record.token_ids

    assert_tokens_only(capture(tiny, tmp_path / "plain", "transformers", "plain"), fast)


def test_vllm_fast_top_n_equals_the_logprobs_api(tiny, tmp_path):
    """Top-N rows (values and int32 ids) through the logits processor, against vLLM's own top-N logprobs."""
    fast = capture(tiny, tmp_path / "fast", "vllm", "fast", logprobs=5)
    api = capture(tiny, tmp_path / "api", "vllm", "api", logprobs=5)
    for i, (a, b) in enumerate(zip(fast.prompts, api.prompts, strict=True)):
        assert a.token_ids == b.token_ids
        vals_fast, vals_api = np.asarray(fast.logprobs(i)), np.asarray(api.logprobs(i))
        assert vals_fast.shape == vals_api.shape == (MAX_TOKENS, 5)
        assert np.abs(vals_fast - vals_api).max() <= 1e-6
        np.testing.assert_array_equal(np.asarray(fast.top_ids(i))[:, 0], a.token_ids)  # greedy: top-1 is the token
        assert np.array_equal(np.asarray(fast.top_ids(i)), np.asarray(api.top_ids(i)))
