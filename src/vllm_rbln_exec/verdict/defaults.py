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
    # Measured with python scripts/planted_faults.py (built-in prompts, q16 store; docs/yardstick.md has the
    # tables): honest fp32, vLLM CPU vs transformers CPU: KL mean 8.9e-10 (SmolLM2, 4 x 32; per prompt
    # <= 1.8e-9) and 8.0e-10 (tiny-llama3, 4 x 16), p99 1.7e-8 / 1.4e-8, max 2.2e-8 / 2.6e-8: the q16 store's
    # own rounding (3.0e-11 with --store fp32), which no position exceeds, so a mean above ~3e-8 cannot come
    # from it. GPU (tiny-llama3, docs/gpu-vllm-h200.md): true fp32 vLLM CUDA 3.8e-11, transformers CUDA 5.8e-10.
    # Smallest planted faults: tiny-llama3 norm epsilon 1e-5 -> 1e-4: KL mean 7.4e-8, p99 3.6e-7; SmolLM2 0.5 %
    # on one MLP down_proj: 2.0e-6, p99 1.9e-5, max 3.3e-5. A side that runs "float32" in TF32 (vLLM CUDA's
    # Triton attention as shipped: KL 4.5e-6..6.7e-6) is as far off as a 1 % kernel fault and is flagged: a
    # gate that passed it could not see such faults (the verdict's precision warning names the TF32 setting;
    # the cuda-fp32 profile is true fp32).
    "float32": [
        ("kl_mean>3e-8", "34x above honest fp32 (8.9e-10) and above the q16 store's largest per-position KL "
         "(2.6e-8); 2.5x below the smallest planted fault (a norm epsilon off by 10x on tiny-llama3, 7.4e-8) "
         "and 65x below a 0.5 % scale in one layer of SmolLM2 (2.0e-6)"),
        ("kl_p99>1e-6", "60x above honest (1.7e-8, the q16 store's rounding), 19x below a 0.5 % layer scale's "
         "p99 (1.9e-5); the smallest faults' tails (3.6e-7) are left to the mean"),
        ("kl_max>1e-5", "380x above honest (2.6e-8); a backstop for a single broken position, the mean and p99 "
         "catch spread faults"),
        ("top1<0.97", "fp32 only flips an argmax whose top-2 margin is below ~1e-3 nats, which is rare; "
         "0.97 tolerates a couple of such flips in a short CI run"),
        ("prompt:kl_mean>1.5e-7", "one prompt far off while the average hides it (5x the run limit: a short "
         "prompt averages few positions; honest prompts <= 1.8e-9)"),
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
# (KL ~ 0.5*Var(dz), variances add). The yardstick runs on the reference's engine (vLLM), so the multiples
# must hold the spread between honest engines: each sits ~1.5x above the largest honest ratio measured
# (transformers CPU bf16 target against the vLLM CPU bf16 yardstick, python scripts/planted_faults.py,
# built-in prompts; docs/gating.md#with-a-yardstick-ratios-first-fixed-limits-as-a-backstop):
#   SmolLM2 (4 x 32): KL mean 1.04x (per prompt 0.73-1.31x), flips 3 vs 3; tiny-llama3 (4 x 16): KL mean
#   1.29-1.38x (per prompt 0.72-2.73x), p99 2.26-2.63x, Δp RMS 1.28-1.41x; Gemma-3-270M (4 x 16): KL mean
#   2.00x (per prompt 0.95-7.32x), p99 2.04x, Δp RMS 3.36x; vLLM CUDA bf16 (H200) against vLLM CPU bf16,
#   tiny-llama3: 0.98x.
# The gross faults stay far beyond: a zeroed head 8.1x (SmolLM2), 39x (Gemma), 294x (tiny-llama3); a wrong
# rope theta 51x; a 30 % gate scale 20x.
YARDSTICK_TOLERANCES = [
    ("kl_mean>3*yardstick", "1.5x above the largest honest ratio (transformers against vLLM in bf16 on "
     "Gemma-3-270M: 2.00); a zeroed head is 8.1x on SmolLM2"),
    ("kl_p99>5*yardstick", "with few positions the p99 is nearly the max, a noisy statistic (honest up to 2.63x, "
     "tiny-llama3): 1.9x headroom; a backstop beside the mean"),
    ("dp_rms>5*yardstick", "Δp moves linearly with a logit error while KL moves quadratically, and engines place "
     "their rounding differently (honest up to 3.36x on Gemma-3-270M): 1.5x headroom, a backstop beside the KL "
     "mean"),
    ("mismatches>2*yardstick", "argmax flips are small counts, judged by an exact one-sided test of the two "
     "counts over the same positions (verdict.counts): fails when the target's flip rate exceeds twice the "
     "yardstick's at p < 0.01 (0 against 0 needs 12 flips, 4 against 1 is p = 0.46); confident flips are the "
     "argmax rule's"),
    ("prompt:kl_mean>10*yardstick", "one prompt far off while the average hides it: 16-32 positions make a "
     "prompt's ratio noisy (honest up to 7.32x, one Gemma-3-270M prompt; 2.09x on tiny-llama3): 1.4x headroom; "
     "a zeroed head puts single prompts at 18-57x"),
]
# With a yardstick the ratios above judge a half-precision target, and the dtype's fixed limits shrink to a gross
# backstop: how far honest rounding goes depends on the model (SmolLM2 bf16: KL mean 1.2e-3; Gemma-3-270M bf16:
# 2.1e-2, p99 0.47, one prompt 8.0e-2, at ratio 1.00 against its yardstick), so a fixed limit tight enough to
# mean something on one model fails honest targets of another. The backstop stays for the case where the
# yardstick itself is far off (then every ratio is near 1 whatever the target does). Set from the worst honest
# case measured across models (docs/gating.md#with-a-yardstick-ratios-first-fixed-limits-as-a-backstop) with
# about 5x margin; the gross planted faults (a zeroed head, a wrong rope theta) are the ratios' to catch. No top-1
# rate: where distributions are flat (a small or random-weight model) honest rounding flips many near-ties, as
# many for the yardstick as for the target; flips are judged against the yardstick's by the count test, and a
# confident flip by the argmax rule (against the yardstick's confident flips where it has some).
# The worst honest cases are the zoo's MoE families (python scripts/zoo_table.py, docs/zoo.md; 4 x 16, Intel Xeon):
# bf16 rounding flips the router's top-k at near-ties, so vLLM CPU bf16 (the yardstick itself, ratio 1.00) on
# zoo-mixtral sits at KL mean 0.092, p99 2.10, one prompt 0.197, and the honest transformers bf16 targets at up to
# 0.149 (zoo-qwen3-moe), p99 2.48 and one prompt 0.402 (zoo-mixtral); Gemma-3-270M: 2.1e-2, 0.47, 8.0e-2.
BACKSTOP_TOLERANCES = [
    ("kl_mean>5e-1", "5.4x the worst honest same-engine KL mean (vLLM CPU bf16 on zoo-mixtral, 0.092) and 3.4x "
     "the worst honest one of any engine (transformers bf16 on zoo-qwen3-moe, 0.149)"),
    ("kl_p99>12", "5.7x the worst honest same-engine p99 (zoo-mixtral vLLM bf16, 2.10), 4.8x any engine's "
     "(zoo-mixtral transformers bf16, 2.48)"),
    ("prompt:kl_mean>2", "10x the worst honest same-engine prompt (zoo-mixtral vLLM bf16, 0.197), 5.0x any "
     "engine's (zoo-mixtral transformers bf16, 0.402)"),
]
# A target declared to quantise weights or activations (--target-quantization): neither the dtype's limits nor
# the dtype's yardstick (honest rounding, no quantisation) describe it, and a quantised model flips confident
# argmaxes by design. What it may cost is the team's call (--fail-on, a spec's models table); the built-in
# gates keep only what is gross whatever the scheme. Measured over the built-in corpus on SmolLM2
# (docs/corpus.md): W8A16 KL 2.5e-3, FP8 2.2e-2, W8A8 2.6e-2, W4A16 0.369.
QUANTIZED_TOLERANCES = [
    ("kl_mean>1", "2.7x the coarsest honest export measured (W4A16 round-to-nearest on SmolLM2: 0.369 nats)"),
    ("prompt:kl_mean>2", "one prompt far off while the average hides it (2x the run limit)"),
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
                  tgt_device: str | None = None, near_ties_fail: bool = False, yardstick: bool = False,
                  quantization: str | None = None) -> list[Gate]:
    """The built-in gates for a dtype pair (judged by its coarser side), plus the argmax rule. With a
    yardstick, the tolerances relative to it judge, and a half-precision tier's fixed limits give way to the
    gross backstop; float32's measured limits stay (a float32 run gets no automatic yardstick)."""
    ref = canonical_dtype(ref_dtype, ref_device)
    tgt = canonical_dtype(tgt_dtype, tgt_device)
    tier = max(ref, tgt, key=PRECISION_ORDER.index)
    if quantization:
        source = f"{SOURCE_DEFAULT} ({ref}:{tgt}, declared {quantization})"
        return [parse_gate(expr, source) for expr, _ in QUANTIZED_TOLERANCES] + _structural(source)
    source = f"{SOURCE_DEFAULT} ({ref}:{tgt})"
    gates: list[Gate] = [parse_gate(expr, source) for expr, _ in fixed_tolerances(tier, yardstick)]
    if yardstick:
        gates += [parse_gate(expr, f"{source}, yardstick") for expr, _ in YARDSTICK_TOLERANCES]
    gates += _structural(source)
    gates.append(ArgmaxGate(near_ties_fail=near_ties_fail, source=source))
    return gates


def _structural(source: str) -> list[Gate]:
    gates: list[Gate] = []
    for expr, _ in STRUCTURAL_TOLERANCES:
        gate = parse_gate(expr, source)
        if gate.path == "distribution.kl_nonfinite":
            gate = MetricGate(**{**asdict(gate), "requires_full_vocab": True})
        gates.append(gate)
    return gates


def fixed_tolerances(tier: str, yardstick: bool) -> list[tuple[str, str]]:
    """The fixed limits of a tier: the dtype's own without a yardstick (or in float32), the backstop with one."""
    if yardstick and tier != "float32":
        return BACKSTOP_TOLERANCES
    return DEFAULT_TOLERANCES[tier]


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
