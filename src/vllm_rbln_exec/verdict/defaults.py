"""Built-in tolerances: the tier of each dtype pair, the structural checks, and the default gates.

This module owns what parity means when nobody wrote a tolerance: one tier of
expressions per precision (with the reasoning behind every number), the
structural failures that are never rounding, and choosing the tier of a run
from its dtypes (a pair is judged by its coarser side; spellings and ``auto``
come from :mod:`~vllm_rbln_exec.core.dtypes`). It must not judge reports, read
spec files (``spec`` layers its tables over these), or import torch or vLLM.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..core.dtypes import PRECISION_ORDER, canonical_dtype
from .gates import SOURCE_DEFAULT, ArgmaxGate, Gate, MetricGate, parse_gate

# Each tier: the expressions and why. The numbers assume the error of a logit z is
# about u*|z| per rounding (u: unit roundoff), that logits are ~10-20 in size, that
# errors compound mildly over the layers, and that KL(p||q) ~ 0.5 * Var_p(dz) for
# small logit errors dz. The half-precision limits keep 10x or more headroom over that estimate (with a
# yardstick the relative tolerances below do the fine work, these stay as a backstop); the float32 limits
# are measured, since float32 rounding is far below any kernel fault.
DEFAULT_TOLERANCES: dict[str, list[tuple[str, str]]] = {
    # Measured on SmolLM2-135M, 4 built-in prompts x 32 tokens, q16 store, built-in tolerances
    # (python scripts/planted_faults.py; docs/yardstick.md has the table and the commands):
    #   honest fp32: vLLM CPU vs transformers CPU  KL mean 8.9e-10, p99 1.7e-8, max 2.2e-8 (q16's own
    #     rounding: 3.0e-11 mean with --store fp32); GPU, tiny-llama3 (docs/gpu-vllm-h200.md): true fp32
    #     vLLM CUDA 3.8e-11 / max 5.9e-10, transformers CUDA 5.8e-10 / max 1.2e-8
    #   smallest planted faults: 0.5 % on one MLP down_proj  KL mean 2.0e-6, p99 1.9e-5, max 3.3e-5;
    #     1 % on one attention o_proj  7.5e-6, p99 5.5e-5, max 7.8e-5
    # Each limit sits between the two on a log scale, with the margins written next to it. A side that runs
    # "float32" in TF32 (vLLM CUDA's Triton attention as shipped: KL 4.5e-6..6.7e-6) is as far off as a 1 %
    # kernel fault and is flagged: a gate that passed it could not see such faults (docs/yardstick.md;
    # the verdict's precision warning names the TF32 setting, and the cuda-fp32 profile is true fp32).
    "float32": [
        ("kl_mean>1e-7", "110x above honest fp32 through q16 (8.9e-10), 20x below a 0.5 % scale fault in one "
         "layer (2.0e-6); also above the q16 store's per-position ceiling (~3e-8)"),
        ("kl_p99>1e-6", "60x above honest (1.7e-8, the q16 store's rounding), 19x below the smallest fault's "
         "p99 (1.9e-5)"),
        ("kl_max>1e-5", "450x above honest (2.2e-8); one position 3x below the smallest fault's max (3.3e-5): "
         "a backstop for a single broken position, the mean and p99 catch spread faults"),
        ("top1<0.97", "fp32 only flips an argmax whose top-2 margin is below ~1e-3 nats, which is rare; "
         "0.97 tolerates a couple of such flips in a short CI run"),
        ("prompt:kl_mean>5e-7", "one prompt far off while the average hides it (5x the run limit: a short "
         "prompt averages few positions)"),
    ],
    "float16": [
        ("kl_mean>2e-3", "fp16 keeps 11 significant bits (u = 2^-11 = 4.9e-4): a logit of 15 rounds by ~7e-3, "
         "compounding to ~0.01-0.03 nats, so KL ~ 0.5*(0.02)^2 = 2e-4; 2e-3 is 10x that"),
        ("kl_p99>2e-2", "10x the mean limit for flat reference rows"),
        ("top1<0.95", "argmax flips where the reference's top-2 margin is below ~0.03 nats, a few percent of "
         "positions at most"),
        ("prompt:kl_mean>1e-2", "one prompt far off while the average hides it (5x the run limit: a short "
         "prompt averages few positions)"),
    ],
    "bfloat16": [
        ("kl_mean>1e-2", "bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%): a logprob near -4 nats "
         "rounds by ~0.008, or ~0.03 when it is a logit of ~15 minus logsumexp; compounded, logits move "
         "~0.03-0.1 nats, so KL ~ 5e-4..5e-3; 1e-2 sits above that"),
        ("kl_p99>1e-1", "10x the mean limit for flat reference rows"),
        ("top1<0.9", "argmax flips where the reference's top-2 margin is below ~0.1 nats, which on small or "
         "truncated models can be several percent of positions"),
        ("prompt:kl_mean>5e-2", "one prompt far off while the average hides it (5x the run limit)"),
    ],
}
# With a yardstick (an honest side at the target's precision, against the same reference): the same
# metrics relative to it, limit = K * max(yardstick, floor). Rounding errors and a fault's error add up in KL
# (KL ~ 0.5*Var(dz), variances add), so a target at K = 2 is one whose own error equals the yardstick's
# on top of honest rounding: the smallest fault a precision can show. Measured honest spread (SmolLM2, 4 x 32,
# transformers CPU bf16 target against the vLLM CPU bf16 yardstick): KL mean 0.94x overall, 0.66-1.27x per
# prompt; KL p99 1.15x, per prompt up to 1.68x; Δp RMS 0.94x, per prompt up to 1.43x; flips 5 vs 3;
# tiny-llama3: 1.19x; vLLM CUDA bf16 (H200) against vLLM CPU bf16 on tiny-llama3: 0.98x.
YARDSTICK_TOLERANCES = [
    ("kl_mean>2*yardstick", "the fault's own KL exceeds honest rounding's; 1.6x above the worst honest prompt "
     "ratio (1.27) and 2.1x above the honest overall one (0.94)"),
    ("kl_p99>3*yardstick", "tails are noisier (honest up to 1.68x per prompt): 1.8x headroom over that"),
    ("dp_rms>2*yardstick", "Δp moves linearly with a logit error while KL moves quadratically: 2x in Δp RMS is "
     "4x in KL, a backstop beside the KL mean (honest up to 1.43x per prompt)"),
    ("mismatches>3*yardstick", "argmax flips, counted as at least 1 on the yardstick: 4 or more flips where "
     "rounding makes none, or 3x the yardstick's (honest: 5 against 3)"),
    ("prompt:kl_mean>3*yardstick", "one prompt far off while the average hides it (honest up to 1.27x per "
     "prompt; few positions per prompt, so 3x)"),
]
# Every tier: structural failures that are never rounding.
STRUCTURAL_TOLERANCES = [
    ("positions_compared<1", "nothing was compared: an empty comparison must not pass"),
    ("kl_nonfinite>0", "NaN logprobs, or the target gives -inf to a token the reference supports "
     "(full-vocabulary captures only: top-N captures are infinite wherever the top-N sets differ)"),
]


def default_tier(ref_dtype: str | None, tgt_dtype: str | None, ref_device: str | None = "cpu",
                 tgt_device: str | None = None) -> str:
    ref = canonical_dtype(ref_dtype, ref_device)
    tgt = canonical_dtype(tgt_dtype, tgt_device)
    return max(ref, tgt, key=PRECISION_ORDER.index)


def default_gates(ref_dtype: str | None, tgt_dtype: str | None, *, ref_device: str | None = "cpu",
                  tgt_device: str | None = None, near_ties_fail: bool = False, yardstick: bool = False) -> list[Gate]:
    """The built-in gates for a dtype pair (judged by its coarser side), plus the argmax rule; with a
    yardstick, the tolerances relative to it too (the absolute ones stay as a backstop)."""
    ref = canonical_dtype(ref_dtype, ref_device)
    tgt = canonical_dtype(tgt_dtype, tgt_device)
    tier = max(ref, tgt, key=PRECISION_ORDER.index)
    source = f"{SOURCE_DEFAULT} ({ref}:{tgt})"
    gates: list[Gate] = [parse_gate(expr, source) for expr, _ in DEFAULT_TOLERANCES[tier]]
    if yardstick:
        gates += [parse_gate(expr, f"{source}, yardstick") for expr, _ in YARDSTICK_TOLERANCES]
    for expr, _ in STRUCTURAL_TOLERANCES:
        gate = parse_gate(expr, source)
        if gate.path == "distribution.kl_nonfinite":
            gate = MetricGate(**{**asdict(gate), "requires_full_vocab": True})
        gates.append(gate)
    gates.append(ArgmaxGate(near_ties_fail=near_ties_fail, source=source))
    return gates


def run_dtypes(run_json: dict[str, Any]) -> tuple[str, str]:
    """(reference, target) canonical dtypes of a report, from its sides or else its settings."""
    sides = run_json.get("sides") or {}
    settings = run_json.get("settings") or {}
    out = []
    for side, default_device in (("reference", "cpu"), ("target", run_json.get("target"))):
        record = sides.get(side) or {}
        dtype = record.get("dtype") or settings.get(f"{side}_dtype")
        out.append(canonical_dtype(dtype, record.get("device") or default_device))
    return out[0], out[1]
