"""Float32 asked, TF32 run: the verdict warns from the settings each engine reported (docs/gpu-fp32.md).

The fixtures are the saved reports of the H200 run in docs/gpu-vllm-h200/: vLLM CUDA
float32 as shipped (TRITON_ATTN with Triton's TF32 default), with TRITON_F32_DEFAULT=ieee,
with FLEX_ATTENTION, bfloat16, and transformers float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_rbln_exec.verdict.judge import judge
from vllm_rbln_exec.verdict.precision import precision_warnings, reduced_precision

RUNS = Path(__file__).resolve().parents[2] / "docs" / "gpu-vllm-h200"


def saved(name: str) -> dict:
    return json.loads((RUNS / f"{name}.json").read_text())["run"]


def test_vllm_float32_with_triton_tf32_attention_is_flagged():
    run = saved("b-vllm-fp32")
    warnings = precision_warnings(run)
    assert len(warnings) == 1
    assert warnings[0].startswith("the target asked for float32 but ran in part at lower precision")
    assert "TRITON_ATTN runs its float32 dots in TF32" in warnings[0]
    assert "cuda-fp32 (TRITON_F32_DEFAULT=ieee)" in warnings[0] and "--target-args" in warnings[0]
    assert judge(run, []).warnings == warnings  # on every verdict, live or re-judged


@pytest.mark.parametrize("name", ["c1-vllm-fp32-ieee", "c2-vllm-fp32-flex", "d-hf-fp32", "a-vllm-bf16",
                                  "f-hf-fp32-gpu-vs-vllm-fp32-ieee"])
def test_true_float32_and_lower_precision_by_request_are_not_flagged(name):
    assert precision_warnings(saved(name)) == []


def test_the_other_ways_to_lose_float32():
    assert reduced_precision({"float32_matmul_precision": "high"}) == [
        "torch's float32 matmul precision is 'high' (TF32 or bfloat16 passes)"]
    assert reduced_precision({"engine_core": {"cuda_matmul_allow_tf32": True}}) == [
        "cuBLAS may use TF32 for float32 matmuls"]
    assert reduced_precision({"attention_backend": "FLASH_ATTN", "triton_fp32_dot": "tf32"}) == []
    assert reduced_precision({}) == []  # an engine that reports nothing: nothing known, nothing said
