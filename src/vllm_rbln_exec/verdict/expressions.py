"""Tolerance expressions: the text of ``--fail-on`` and of spec files' ``fail-on`` lists.

This module owns parsing one expression into a :class:`Tolerance` (scope,
metric, the dotted path it resolves to, operator, base value and noise
multiple). Metric names are resolved through
:mod:`~vllm_rbln_exec.compare.catalogue`. It must not check reports (``gates``,
``judge``), read spec files (``spec``), or import torch or vLLM.

Syntax (``METRIC OP VALUE`` means "fail when METRIC OP VALUE holds")::

    [SCOPE:]METRIC OP VALUE
    SCOPE  overall (the default: the run's summary) | prompt (each prompt separately)
    METRIC a short name (kl_mean, top1, pearson, ...), an alias, or a dotted path
           of the report (distribution.kl_p99)
    OP     >  >=  <  <=
    VALUE  NUMBER | [K*]REF | NUMBER+[K*]REF (with > or >=) | NUMBER-[K*]noise (with < or <=)
    REF    noise | yardstick

``noise`` is the run-to-run spread of the same metric in the same scope (see
``noise``); a noise term always widens the tolerance. A measured noise of 0
(deterministic hardware) makes ``kl_mean>3*noise`` mean "any nonzero value
fails". ``yardstick`` is the same metric of the run's yardstick (an honest side
at the target's precision, compared with the same reference), floored where
the catalogue gives the metric a floor: ``kl_mean>3*yardstick`` fails a target
three times further from the reference than honest rounding at its precision.
A yardstick term is an upper bound only (a lower bound relative to it, such as
``top1<...``, has no meaning the verdict could check).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..compare.catalogue import OVERALL, SCOPES, resolve_metric
from ..core.errors import UsageError

OPS = (">=", "<=", ">", "<")

_EXPR = re.compile(
    r"""^\s*(?:(?P<scope>[A-Za-z]+)\s*:\s*)?
        (?P<metric>[A-Za-z_][A-Za-z0-9_.]*)\s*
        (?P<op>>=|<=|>|<)\s*
        (?P<value>\S.*?)\s*$""",
    re.VERBOSE,
)
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NOISE_TERM = re.compile(rf"^(?:(?P<k>{_NUMBER})\s*\*\s*)?(?P<ref>noise|yardstick)$")
_BASE_AND_NOISE = re.compile(rf"^(?P<base>{_NUMBER})\s*(?P<sign>[+-])\s*(?P<term>.+)$")


@dataclass(frozen=True)
class Tolerance:
    """One parsed expression: fail where ``path`` ``op`` ``base + noise_k * noise`` holds."""

    text: str  # the expression, spaces removed
    scope: str
    metric: str  # the name as the user wrote it
    path: str  # the dotted path it resolved to in ``scope``
    op: str
    base: float
    noise_k: float | None = None  # None: a fixed tolerance (sign folded into noise_k)
    yardstick_k: float | None = None  # the tolerance is base + yardstick_k * max(yardstick, floor)


def parse_tolerance(expr: str) -> Tolerance:
    """Parse one tolerance expression; UsageError quoting it when malformed or unknown."""
    if not isinstance(expr, str) or not expr.strip():
        raise UsageError(f"empty tolerance expression {expr!r}", option="--fail-on")
    m = _EXPR.match(expr)
    if not m:
        raise UsageError(f"malformed tolerance {expr!r}: expected [prompt:]METRIC OP VALUE with OP one of "
                         "> >= < <= (e.g. kl_mean>1e-3, prompt:top1<0.95, kl_mean>3*noise)", option="--fail-on")
    scope = (m["scope"] or OVERALL).lower()
    if scope not in SCOPES:
        raise UsageError(f"unknown scope {m['scope']!r} in tolerance {expr!r}: use prompt: (each prompt) "
                         "or no prefix (the whole run)", option="--fail-on")
    op = m["op"]
    metric = m["metric"]
    path = resolve_metric(metric, scope, context=f" in tolerance {expr!r}")
    base, k, ref = _parse_value(m["value"], op, expr)
    text = re.sub(r"\s+", "", expr)
    if ref == "yardstick":
        if op not in (">", ">="):
            raise UsageError(f"tolerance {expr!r}: a yardstick term is an upper bound only (> or >=), e.g. "
                             f"{metric}>3*yardstick", option="--fail-on")
        return Tolerance(text=text, scope=scope, metric=metric, path=path, op=op, base=base, yardstick_k=k)
    return Tolerance(text=text, scope=scope, metric=metric, path=path, op=op, base=base, noise_k=k)


def _parse_value(raw: str, op: str, expr: str) -> tuple[float, float | None, str | None]:
    raw = raw.strip()
    upper = op in (">", ">=")
    if re.fullmatch(_NUMBER, raw) or raw.lower() in ("inf", "+inf", "-inf"):
        value = float(raw)
        if math.isnan(value):
            raise UsageError(f"tolerance {expr!r}: NaN is not a tolerance", option="--fail-on")
        return value, None, None
    term = _NOISE_TERM.match(raw)
    if term:
        if not upper:
            raise UsageError(f"tolerance {expr!r}: a lower bound relative to {term['ref']} needs a base value, "
                             f"e.g. {expr.split(op)[0].strip()}{op}0.99-3*noise", option="--fail-on")
        return 0.0, _noise_k(term, expr), term["ref"]
    both = _BASE_AND_NOISE.match(raw)
    if both and (term := _NOISE_TERM.match(both["term"].strip())):
        k = _noise_k(term, expr)
        if (both["sign"] == "+") != upper:
            raise UsageError(f"tolerance {expr!r}: the {term['ref']} term must widen the tolerance "
                             f"({'+' if upper else '-'} with {op})", option="--fail-on")
        return float(both["base"]), (k if upper else -k), term["ref"]
    raise UsageError(f"tolerance {expr!r}: value {raw!r} is not a number, K*noise, K*yardstick or "
                     "NUMBER±K*noise", option="--fail-on")


def _noise_k(term: re.Match, expr: str) -> float:
    k = float(term["k"]) if term["k"] else 1.0
    if not k >= 0 or math.isinf(k):
        raise UsageError(f"tolerance {expr!r}: the {term['ref']} multiple must be a finite number >= 0", option="--fail-on")
    return k
