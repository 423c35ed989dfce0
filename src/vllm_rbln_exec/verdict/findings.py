"""Findings: the sentences a verdict opens with, beside pass or fail.

Read from a run's saved form, and saying only what the harness knows: whether
the error is already there at position 0 (the prompt's forward pass) or appears
only after it, from ``kl_prefill`` and ``kl_decode``, read against the
yardstick's own split where the run has one (so a target at honest rounding is
not sent looking for a kernel); that a server target scored teacher-forced ran
one prefill pass and no decode steps; how far the target is from the reference
compared with honest arithmetic at its precision; and which of the target's
precisions are assumptions (a server's ``auto`` dtype) or declarations (a
declared quantisation). This module judges nothing (no pass or fail comes from
it), computes no metric and must not import torch or vLLM.
"""

from __future__ import annotations

from typing import Any

from ..compare.catalogue import floor, metric_value
from ..compare.yardstick import confident_flips, ratio, yardstick_record
from ..core.dtypes import canonical_dtype
from ..core.errors import UsageError
from .counts import confident_flip_test

# Below this share of the decode KL, position 0 is taken as clean. Measured on SmolLM2 (4 x 32): position 0
# is the more sensitive one, honest bf16 puts 3.6-3.8x the decode KL there and honest fp32 6.7x; weight
# faults put 0.6-5x there (docs/yardstick.md). A KV-cache or decode-kernel fault leaves position 0 at the
# honest level while the later positions grow, so position 0 under a tenth of the rest is decode's.
DECODE_ONLY_SHARE = 0.1
# Ratios to the yardstick at or below this read as rounding: the built-in kl_mean>3*yardstick fails above it
# (verdict.defaults; honest engines at one precision measured up to 2.00x, transformers against vLLM in bf16 on
# Gemma-3-270M), so a sentence never calls a passing target's KL a bug or a failing one's rounding.
ROUNDING_RATIO = 3.0
KL_PATH = "distribution.kl_mean"


def findings(run_json: dict[str, Any]) -> list[str]:
    out = [phase_sentence(run_json), yardstick_sentence(run_json), flips_sentence(run_json),
           precision_sentence(run_json)]
    return [s for s in out if s]


def prefill_only(run_json: dict[str, Any]) -> bool:
    """A server target scored teacher-forced: every row of it came from one prefill pass, no decode step ran."""
    settings = run_json.get("settings") or {}
    return bool(settings.get("target_url")) and settings.get("align", "forced") == "forced"


def phase_sentence(run_json: dict[str, Any]) -> str | None:
    summary = run_json.get("summary") or {}
    first, rest = metric_value(summary, "kl_prefill"), metric_value(summary, "kl_decode")
    if first is None and rest is None:
        return None
    one_pass = prefill_only(run_json)
    later = "later positions of the same prefill pass" if one_pass else "decode steps"
    numbers = f"KL {_fmt(first)} at position 0 (the prompt's forward pass), {_fmt(rest)} after it ({later})"
    if one_pass:
        numbers += "; the target is a server scored in one prefill pass: it ran no decode steps"
    if max(first or 0.0, rest or 0.0) <= 10 * floor("kl_prefill"):
        return f"Prefill or decode: {numbers}: both within 10x the q16 store's floor, nothing to place."
    yard = yardstick_record(run_json)
    if yard is not None:
        return _phase_against_yardstick(numbers, first, rest, yard, one_pass)
    if rest is not None and (first or 0.0) < DECODE_ONLY_SHARE * rest:
        return f"Prefill or decode: the error appears only after position 0 ({numbers}): " + _later_hint(one_pass)
    return f"Prefill or decode: the error is already there at position 0 ({numbers}): " + _prefill_hint()


def _phase_against_yardstick(numbers: str, first: float | None, rest: float | None, yard: dict[str, Any],
                             one_pass: bool) -> str:
    """Which phase carries KL beyond what the yardstick (honest rounding) puts there."""
    y_first, y_rest = metric_value(yard, "kl_prefill"), metric_value(yard, "kl_decode")
    r_first, r_rest = ratio(first, y_first, "kl_prefill"), ratio(rest, y_rest, "kl_decode")
    beyond_first = r_first is not None and r_first > ROUNDING_RATIO
    beyond_rest = r_rest is not None and r_rest > ROUNDING_RATIO
    against = (f"the yardstick's {_fmt(y_first)} and {_fmt(y_rest)}: "
               f"{_ratio_text(r_first)} and {_ratio_text(r_rest)} of honest rounding")
    if not beyond_first and not beyond_rest:
        return (f"Prefill or decode: {numbers}; {against}: both phases are where honest rounding at this "
                "precision puts them, nothing to place.")
    if beyond_first:
        return (f"Prefill or decode: the excess over honest rounding is already there at position 0 ({numbers}; "
                f"{against}): " + _prefill_hint())
    return (f"Prefill or decode: the excess over honest rounding appears only after position 0 ({numbers}; "
            f"{against}): " + _later_hint(one_pass))


def _prefill_hint() -> str:
    return ("look at what the prompt's forward pass runs (prefill attention, and what both phases share: weights, "
            "norms, matmuls).")


def _later_hint(one_pass: bool) -> str:
    if one_pass:
        return ("with no decode step run, look at what changes with the position inside one prefill pass "
                "(attention over longer contexts, rotary embeddings at later positions, sliding windows).")
    return "look at the decode kernels and the KV cache (cache writes, paged attention)."


def yardstick_sentence(run_json: dict[str, Any]) -> str | None:
    yard = yardstick_record(run_json)
    if yard is None:
        missing = (run_json.get("resolved") or {}).get("yardstick_missing")
        parts = [f"Yardstick: missing ({missing}), so no ratio: the verdict rests on the fixed tolerances alone, "
                 "and a tolerance relative to the yardstick is skipped." if missing else None,
                 _no_yardstick_sentence(run_json)]
        return " ".join(p for p in parts if p) or None
    t, y = metric_value(run_json.get("summary") or {}, KL_PATH), metric_value(yard, KL_PATH)
    r = ratio(t, y, KL_PATH)
    side = (run_json.get("yardstick") or {}).get("side") or {}
    what = f"{side.get('engine', '?')} {side.get('dtype', '?')} on {side.get('device', '?')}"
    if r is None:
        return f"Yardstick ({what}): no KL to compare."
    reading = ("within what honest rounding at this precision gives" if r <= ROUNDING_RATIO
               else "beyond what honest rounding at this precision gives")
    quant = (run_json.get("settings") or {}).get("target_quantization")
    if quant:
        reading = f"what the declared quantisation ({quant}) costs over honest rounding at the dtype, as a ratio"
    return (f"Yardstick ({what}): the target's KL mean {_fmt(t)} is {r:.2g}x the yardstick's {_fmt(y)} "
            f"(floor {floor(KL_PATH):g}): {reading}.")


def _no_yardstick_sentence(run_json: dict[str, Any]) -> str | None:
    """A half-precision target judged without a yardstick: by fixed limits measured on other models."""
    target = (run_json.get("sides") or {}).get("target")
    if not isinstance(target, dict):
        return None
    try:
        dtype = canonical_dtype(target.get("dtype"), target.get("device"))
    except UsageError:  # a dtype this version does not know (a hand-edited report): nothing to say
        return None
    if dtype == "float32" or (run_json.get("settings") or {}).get("target_quantization"):
        return None
    return (f"No yardstick: this {dtype} target is judged by the dtype's fixed limits, measured on SmolLM2-135M "
            "and tiny-llama3; honest rounding on a model more sensitive to it goes beyond them (Gemma-3-270M in "
            "bfloat16: KL mean 2.1e-2 > 1e-2), so a failure here may be rounding: a yardstick tells the two apart "
            "(--yardstick auto, docs/yardstick.md).")


def flips_sentence(run_json: dict[str, Any]) -> str | None:
    """Confident argmax flips read against the yardstick's, where the yardstick has some (else any one fails)."""
    flips = confident_flips(run_json)
    if flips is None or flips["yardstick"] <= 0:
        return None
    _, sentence = confident_flip_test(flips["target"], flips["yardstick"], flips["target_positions"],
                                      flips["yardstick_positions"])
    return (f"Confident argmax flips: the yardstick flips confident argmaxes too, so the target's are judged "
            f"against its: {sentence}.")


def precision_sentence(run_json: dict[str, Any]) -> str | None:
    """What the target's precision rests on, where the harness does not know it: a server's ``auto`` dtype is an
    assumption; a declared quantisation is the user's word."""
    settings = run_json.get("settings") or {}
    target = (run_json.get("sides") or {}).get("target") or {}
    parts = []
    quant = settings.get("target_quantization")
    if quant:
        parts.append(f"the target is declared to quantise ({quant}): its yardstick and tolerances are chosen for "
                     "that declaration, which the harness does not verify")
    dtype = str(target.get("dtype") or settings.get("target_dtype") or "auto").lower()
    if settings.get("target_url") and dtype == "auto":
        parts.append("the server's dtype was not given (--target-dtype auto) and is taken as bfloat16, an "
                     "assumption the tolerances and the yardstick follow (a server does not report it); pass "
                     "--target-dtype to state it")
    if not parts:
        return None
    return "Precision: " + "; ".join(parts) + "."


def _ratio_text(r: float | None) -> str:
    return "no ratio" if r is None else f"{r:.2g}x"


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.3g}"
