"""Localisation with vLLM on CUDA as the target (hooks installed in vLLM's engine-core process through
``apply_model``, eager for the pass): honest true float32 names no layer; a planted fault at bfloat16 is
named against the yardstick (the CPU reference rerun at bfloat16).

The reference is transformers on the CPU, so the GPU machine needs no vLLM CPU build; the model is the
seeded tiny Llama-3-vocabulary model (2 layers), made there from its seed. Skipped without a GPU or vLLM.
"""

from __future__ import annotations

import importlib.util

import pytest
from tests.helpers import SHARED_MODELS
from tests.model_edits import plant_fault

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (none installed)")]

BASE = ["--reference-engine", "transformers", "--max-tokens", "8", "--num-prompts", "2", "--no-inspect-logits",
        "--no-color", "--target-args", '{"gpu_memory_utilization": 0.3}', "--localize"]
ENV = {"NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb", "VLLM_USE_FLASHINFER_SAMPLER": "0"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vllm_rbln_exec.setup.models import resolve_model
    from vllm_rbln_exec.setup.tiny import make_tiny_model

    resolved = resolve_model("tiny-llama3", SHARED_MODELS)
    if resolved.tiny is not None:
        make_tiny_model(resolved.path, **resolved.tiny)
    fault = plant_fault(resolved.path, tmp_path_factory.mktemp("gpu-fault") / "tiny-fault",
                        "model.layers.1.self_attn.o_proj.weight", scale=2.0)
    return resolved.path, fault


def test_vllm_cuda_float32_localisation_names_no_layer(cli, tiny):
    r = cli("--model", str(tiny[0]), "--target", "cuda-fp32", *BASE, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    loc = r.report["localization"]
    assert loc["sides"]["target"]["platform"] == "cuda" and loc["sides"]["target"]["pass"]["enforce_eager"] is True
    assert loc["verdict"] == "none", loc["layers"]


def test_vllm_cuda_bfloat16_fault_is_named_against_the_yardstick(cli, tiny):
    r = cli("--model", str(tiny[0]), "--target-model", str(tiny[1]), "--target", "cuda", *BASE, env=ENV)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    loc = r.report["localization"]
    assert loc["yardstick"]["dtype"] == "bfloat16" and loc["yardstick"]["engine"] == "transformers"
    assert loc["verdict"] == "created" and loc["layer"] == "layers.1", loc["layers"]
    assert "the difference is created at layers.1" in r.stdout
