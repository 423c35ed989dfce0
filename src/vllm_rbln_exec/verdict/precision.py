"""Whether a side that asked for float32 really computed in float32, from the settings its engine reported.

Reads each side's ``effective`` record in a run's saved form (what the engine
reported deciding its numbers: torch's and cuBLAS's fp32 matmul settings, the
attention backend, Triton's fp32 dot precision in vLLM's engine core) and says,
as a warning on the verdict, where float32 was asked for and TF32 ran. Measured
on an H200 (docs/gpu-fp32.md): vLLM 0.24's TRITON_ATTN backend runs its fp32
dots in TF32 unless ``TRITON_F32_DEFAULT=ieee``, putting KL against an fp32
reference at ~5e-6 instead of ~1e-11. This module judges nothing and computes
no metric.
"""

from __future__ import annotations

from typing import Any

from ..core.dtypes import canonical_dtype

TRITON_BACKENDS = ("TRITON_ATTN",)
FIX = ("for true float32 use the shipped device profile cuda-fp32 (TRITON_F32_DEFAULT=ieee), or pass "
       "--{role}-args '{{\"attention_config\": {{\"backend\": \"FLEX_ATTENTION\"}}}}' (docs/gpu-fp32.md)")


def precision_warnings(run_json: dict[str, Any]) -> list[str]:
    out = []
    for role, side in sorted((run_json.get("sides") or {}).items()):
        if not isinstance(side, dict) or canonical_dtype(side.get("dtype"), side.get("platform")) != "float32":
            continue
        reasons = reduced_precision(side.get("effective") or {})
        if reasons:
            out.append(f"the {role} asked for float32 but ran in part at lower precision: {'; '.join(reasons)}. "
                       + FIX.format(role=role))
    return out


def reduced_precision(effective: dict[str, Any]) -> list[str]:
    """What in an engine's reported settings computes float32 work below float32 (empty: nothing known)."""
    core = effective.get("engine_core")
    layers = [effective, core if isinstance(core, dict) else {}]  # a text when no logits processor ran
    reasons = []
    if any(layer.get("float32_matmul_precision") in ("high", "medium") for layer in layers):
        reasons.append("torch's float32 matmul precision is 'high' (TF32 or bfloat16 passes)")
    if any(layer.get("cuda_matmul_allow_tf32") is True for layer in layers):
        reasons.append("cuBLAS may use TF32 for float32 matmuls")
    backends = {str(b) for layer in layers for b in (layer.get("attention_backends") or [layer.get("attention_backend")])
                if b}
    triton_dot = next((str(layer["triton_fp32_dot"]) for layer in layers if layer.get("triton_fp32_dot")), "")
    if triton_dot.startswith("tf32") and backends & set(TRITON_BACKENDS):
        reasons.append(f"attention backend {', '.join(sorted(backends & set(TRITON_BACKENDS)))} runs its "
                       f"float32 dots in TF32 ({triton_dot})")
    return reasons
