"""Dtype names: the spellings users and checkpoints use, and their precision order.

This module owns mapping any dtype spelling (``bf16``, ``torch.float16``,
``auto`` per device) to one of float32 / bfloat16 / float16. Engines read it to
load a model, the verdict to pick its default tolerance tier, so it lives below
both; it must not import torch, numpy or anything above ``core``.
"""

from __future__ import annotations

import difflib

from .errors import UsageError

DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32", "torch.float32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16", "torch.float16": "float16",
}  # fmt: skip
# Looser tiers come later: a pair is judged by its coarser side.
PRECISION_ORDER = ("float32", "float16", "bfloat16")


def canonical_dtype(name: str | None, device: str | None = None) -> str:
    """float32 / bfloat16 / float16 for any spelling; ``auto`` (or none) depends on the device.

    ``auto`` on ``cpu`` is float32 (vLLM's CPU backend and transformers on CPU keep
    float32 there). Elsewhere ``auto`` takes the checkpoint's dtype, and vLLM turns
    float32 checkpoints into half precision on accelerators, so it is judged as
    bfloat16, the looser of the two half-precision tiers.
    """
    raw = (name or "auto").strip().lower()
    if raw == "auto":
        return "float32" if (device or "").split(":")[0] == "cpu" else "bfloat16"
    if raw in DTYPE_ALIASES:
        return DTYPE_ALIASES[raw]
    close = difflib.get_close_matches(raw, list(DTYPE_ALIASES), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"unknown dtype {name!r}.{hint} Known: auto, float32, bfloat16, float16 "
                     "(and fp32, bf16, fp16, half)", option="--target-dtype")
