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
# small logit errors dz. Every limit keeps 10x or more headroom over that estimate:
# the defaults must catch broken kernels (KL 1e-2..1 nats), not numerics.
DEFAULT_TOLERANCES: dict[str, list[tuple[str, str]]] = {
    "float32": [
        ("kl_mean>1e-4", "fp32 on other hardware differs by summation order, ~1e-5..1e-4 relative, so logits "
         "move by <=1e-3 and KL ~ 0.5*(1e-3)^2 = 5e-7; even TF32 matmuls (11-bit inputs) stay ~1e-5. "
         "1e-4 leaves that headroom and still fails any real kernel bug (>=1e-2)"),
        ("kl_p99>1e-3", "tails come from flat reference rows where many tokens share the error; 10x the mean"),
        ("kl_max>1e-2", "a single position 100x the mean limit is no longer rounding"),
        ("top1<0.97", "fp32 only flips an argmax whose top-2 margin is below ~1e-3 nats, which is rare; "
         "0.97 tolerates a couple of such flips in a short CI run"),
        ("prompt:kl_mean>5e-4", "one prompt far off while the average hides it (5x the run limit: a short "
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
# metrics relative to it. A target K times further from the reference than honest rounding at its own
# precision is computing something else. K and the reasoning: see YARDSTICK_K.
YARDSTICK_K = 3.0
YARDSTICK_TOLERANCES = [
    (f"kl_mean>{YARDSTICK_K:g}*yardstick", "honest bf16 engines land within 1.4x of each other's KL (measured, "
     "docs/yardstick.md); a fault at the yardstick's own size is the smallest a precision can show"),
    (f"kl_p99>{YARDSTICK_K:g}*yardstick", "the tail, relative to the yardstick's tail"),
    (f"dp_rms>{YARDSTICK_K:g}*yardstick", "the probability of the fed token moved K times more than rounding moves it"),
    (f"mismatches>{YARDSTICK_K:g}*yardstick", "argmax flips: K times the yardstick's (counted as 1 when it has none)"),
    (f"prompt:kl_mean>{YARDSTICK_K:g}*yardstick", "one prompt far off while the average hides it"),
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
