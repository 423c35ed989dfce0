"""Parity verdicts: tolerance expressions, the argmax near-tie rule, built-in defaults, judging.

This module owns what "parity holds" means for CI: it parses tolerances such as
``kl_mean>1e-3`` or ``prompt:top1<0.95``, knows every metric a report carries
(and their short names), judges the plain dict of ``RunResult.to_json()``
(so a saved ``report.json`` can be re-judged without any model) and returns a
:class:`Verdict`. It reads reports only: it must not compute metrics (that is
``metrics``/``distribution``), read spec files (``spec``), write reports
(``outputs``), or import torch or vLLM.

Tolerance syntax (``METRIC OP VALUE`` means "fail when METRIC OP VALUE holds")::

    [SCOPE:]METRIC OP VALUE
    SCOPE  overall (the default: the run's summary) | prompt (each prompt separately)
    METRIC a short name (kl_mean, top1, pearson, ...), an alias, or a dotted path
           of the report (distribution.kl_p99)
    OP     >  >=  <  <=
    VALUE  NUMBER | [K*]noise | NUMBER+[K*]noise (with > or >=) | NUMBER-[K*]noise (with < or <=)

``noise`` is the run-to-run spread of the same metric in the same scope (see
``noise``); a noise term always widens the tolerance. A measured noise of 0
(deterministic hardware) makes ``kl_mean>3*noise`` mean "any nonzero value
fails". Without a measured noise floor such a tolerance is skipped with a
warning, never silently passed as checked.

A value that is null in the report (NaN: nothing to compute it from) cannot
hold any comparison, so it is not a violation; the verdict lists it in
``notes``. Non-finite KL is caught explicitly by the default ``kl_nonfinite>0``.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.errors import EXIT_OK, EXIT_PARITY_FAILED, UsageError
from ..core.jsonio import strict_json

VERDICT_SCHEMA_VERSION = 1
OVERALL = "overall"
PROMPT = "prompt"
SCOPES = (OVERALL, PROMPT)
OPS = (">=", "<=", ">", "<")
SOURCE_CLI = "cli"
SOURCE_DEFAULT = "default"

# -- the metrics a report carries ------------------------------------------------
# Explicit lists rather than reflection on the dataclasses: a new field should be
# a deliberate decision about whether it is gateable (a unit test compares these
# lists with what metrics.py emits, so a new field cannot be forgotten silently).
SUMMARY_FIELDS = (
    "prompts", "positions_compared", "max_abs_diff", "mean_abs_diff", "min_pearson", "outliers",
    "texts_equal", "tokens_equal", "top1_match", "topk_overlap", "earliest_divergence",
    "argmax_divergences", "disagreements",
)  # fmt: skip
PROMPT_FIELDS = (
    "reference_tokens", "target_tokens", "texts_equal", "tokens_equal", "first_divergence",
    "positions_compared", "finite_overlap", "finite_entries", "max_abs_diff", "mean_abs_diff", "pearson",
    "outliers", "topk_overlap", "topk_order_match", "top1_match",
)  # fmt: skip
DISTRIBUTION_FIELDS = (
    "positions", "kl_mean", "kl_sem", "kl_median", "kl_p90", "kl_p99", "kl_p999", "kl_max", "kl_nonfinite",
    "top1_rate", "top1_se", "top1_mismatches", "mismatches_near_tie", "dp_mean", "dp_rms", "dp_p01", "dp_p99",
    "dp_abs_p99", "jaccard_mean", "rank_agreement_mean", "logppl_reference", "logppl_target", "ppl_ratio",
    "renormalized_reference", "renormalized_target",
)  # fmt: skip
# Settings or identifiers, not measurements: never gateable.
NOT_METRICS = frozenset({
    "index", "vocab_size", "eps", "topk", "worst_position", "tie_margin", "kl_buckets", "aligned",
})  # fmt: skip

# Computed here from fields of the same record (both scopes).
CONFIDENT_BUCKET = "[0.95,1]"
DERIVED = {
    "confident_mismatches": "top-1 mismatches where the reference was not at a near-tie",
    "kl_confident_mean": f"KL mean over positions whose reference top-1 probability is in {CONFIDENT_BUCKET}",
    "kl_confident_max": f"KL max over positions whose reference top-1 probability is in {CONFIDENT_BUCKET}",
}

# Short names users type -> dotted path, per scope where the two scopes differ.
ALIASES: dict[str, dict[str, str]] = {
    "top1": {OVERALL: "distribution.top1_rate", PROMPT: "distribution.top1_rate"},
    "same_top1": {OVERALL: "distribution.top1_rate", PROMPT: "distribution.top1_rate"},
    "kl": {OVERALL: "distribution.kl_mean", PROMPT: "distribution.kl_mean"},
    "pearson": {OVERALL: "min_pearson", PROMPT: "pearson"},
    "min_pearson": {OVERALL: "min_pearson", PROMPT: "pearson"},
    "max_abs": {OVERALL: "max_abs_diff", PROMPT: "max_abs_diff"},
    "mean_abs": {OVERALL: "mean_abs_diff", PROMPT: "mean_abs_diff"},
    "ppl": {OVERALL: "distribution.ppl_ratio", PROMPT: "distribution.ppl_ratio"},
    "mismatches": {OVERALL: "distribution.top1_mismatches", PROMPT: "distribution.top1_mismatches"},
    "near_tie_mismatches": {OVERALL: "distribution.mismatches_near_tie", PROMPT: "distribution.mismatches_near_tie"},
    "jaccard": {OVERALL: "distribution.jaccard_mean", PROMPT: "distribution.jaccard_mean"},
    "rank_agreement": {OVERALL: "distribution.rank_agreement_mean", PROMPT: "distribution.rank_agreement_mean"},
    "positions": {OVERALL: "positions_compared", PROMPT: "positions_compared"},
    "first_divergence": {OVERALL: "earliest_divergence", PROMPT: "first_divergence"},
    "earliest_divergence": {OVERALL: "earliest_divergence", PROMPT: "first_divergence"},
}

# Where a null value means "never happened" rather than "could not be computed".
NULL_MEANS_NEVER = frozenset({"first_divergence", "earliest_divergence"})


def metric_paths(scope: str) -> list[str]:
    """Every gateable dotted path of one scope (report fields and derived metrics)."""
    own = SUMMARY_FIELDS if scope == OVERALL else PROMPT_FIELDS
    return [*own, *(f"distribution.{f}" for f in DISTRIBUTION_FIELDS), *DERIVED]


def short_names() -> list[str]:
    """Names a user can write without a dotted path (either scope)."""
    names = set(SUMMARY_FIELDS) | set(PROMPT_FIELDS) | set(DISTRIBUTION_FIELDS) | set(DERIVED) | set(ALIASES)
    return sorted(names)


def resolve_metric(name: str, scope: str = OVERALL, context: str = "") -> str:
    """The dotted path a metric name means in ``scope``; UsageError naming close names otherwise."""
    name = name.strip()
    paths = metric_paths(scope)
    if name in ALIASES:
        return ALIASES[name][scope]
    if name in paths:
        return name
    if f"distribution.{name}" in paths:
        return f"distribution.{name}"
    other = PROMPT if scope == OVERALL else OVERALL
    if name in metric_paths(other) or f"distribution.{name}" in metric_paths(other):
        if other == PROMPT:
            fix = f"it exists per prompt only: write prompt:{name}"
        else:
            fix = "it exists for the whole run only: drop the prompt: prefix"
        raise UsageError(f"metric {name!r}{context}: {fix}", option="--fail-on")
    candidates = short_names() + metric_paths(OVERALL) + metric_paths(PROMPT)
    bare = name.split(".")[-1]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6) or difflib.get_close_matches(
        bare, candidates, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"unknown metric {name!r}{context}.{hint} Known: {', '.join(short_names())} "
                     "(or a dotted path such as distribution.kl_p99)", option="--fail-on")


def metric_value(record: dict[str, Any], path: str) -> float | None:
    """A metric of one summary or comparison dict as a float; None when null or absent."""
    if path in DERIVED:
        return _derived(record, path)
    node: Any = record
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool):
        return float(node)
    if isinstance(node, (int, float)):
        value = float(node)
        return value if not math.isnan(value) else None
    return None


def _derived(record: dict[str, Any], path: str) -> float | None:
    dist = record.get("distribution") or {}
    if path == "confident_mismatches":
        total, near = dist.get("top1_mismatches"), dist.get("mismatches_near_tie")
        return None if total is None or near is None else float(total - near)
    for bucket in dist.get("kl_buckets") or []:
        if bucket.get("range") == CONFIDENT_BUCKET:
            value = bucket.get("kl_mean" if path == "kl_confident_mean" else "kl_max")
            return None if value is None else float(value)
    return None


# -- violations and verdicts ------------------------------------------------------
@dataclass
class Violation:
    gate: str  # the tolerance as written (spaces removed), or the rule's name
    source: str  # cli, default (...), spec FILE [table]
    scope: str  # overall | prompt
    metric: str  # the name as the user wrote it
    path: str  # the dotted path it resolved to
    value: float | None
    op: str
    threshold: float | None
    message: str
    prompt_index: int | None = None
    prompt: str | None = None  # shortened
    position: int | None = None
    noise: float | None = None

    def to_json(self) -> dict[str, Any]:
        return strict_json(asdict(self))


@dataclass
class GateOutcome:
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the whole gate could not be checked


@dataclass
class Verdict:
    passed: bool
    violations: list[Violation]
    checked: list[dict[str, Any]]  # {"gate", "source", "scope", "path", "violations"}
    skipped: list[dict[str, Any]]  # {"gate", "source", "reason"}
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    schema_version: int = VERDICT_SCHEMA_VERSION

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_PARITY_FAILED

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "passed": self.passed,
            "violations": [v.to_json() for v in self.violations],
            "checked": [dict(c) for c in self.checked],
            "skipped": [dict(s) for s in self.skipped],
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }


# -- gates ------------------------------------------------------------------------
class Gate:
    """One check of a run report. Subclasses fill ``evaluate``."""

    # declared without values: a class default here would become the dataclass default of subclasses
    text: str
    source: str
    requires_full_vocab = False  # meaningless on top-N captures (skipped there)

    @property
    def key(self) -> tuple:
        """Gates with the same key replace each other across precedence layers (see ``spec``)."""
        raise NotImplementedError

    def evaluate(self, run_json: dict[str, Any], noise: Any = None) -> GateOutcome:
        raise NotImplementedError

    def check(self, run_json: dict[str, Any], noise: Any = None) -> list[Violation]:
        return self.evaluate(run_json, noise).violations

    def with_source(self, source: str) -> Gate:
        raise NotImplementedError


_EXPR = re.compile(
    r"""^\s*(?:(?P<scope>[A-Za-z]+)\s*:\s*)?
        (?P<metric>[A-Za-z_][A-Za-z0-9_.]*)\s*
        (?P<op>>=|<=|>|<)\s*
        (?P<value>\S.*?)\s*$""",
    re.VERBOSE,
)
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NOISE_TERM = re.compile(rf"^(?:(?P<k>{_NUMBER})\s*\*\s*)?noise$")
_BASE_AND_NOISE = re.compile(rf"^(?P<base>{_NUMBER})\s*(?P<sign>[+-])\s*(?P<term>.+)$")


@dataclass(frozen=True)
class MetricGate(Gate):
    """``[scope:]metric op value``: fail where the metric satisfies the comparison."""

    text: str
    scope: str
    metric: str
    path: str
    op: str
    base: float
    noise_k: float | None = None  # the tolerance is base + noise_k * noise (sign folded into noise_k)
    source: str = SOURCE_CLI
    requires_full_vocab: bool = False

    @property
    def key(self) -> tuple:
        return ("metric", self.scope, self.path, "upper" if self.op in (">", ">=") else "lower")

    def with_source(self, source: str) -> MetricGate:
        return MetricGate(**{**asdict(self), "source": source})

    def threshold(self, noise: float | None) -> float:
        if self.noise_k is None:
            return self.base
        return self.base + self.noise_k * (noise or 0.0)

    def evaluate(self, run_json: dict[str, Any], noise: Any = None) -> GateOutcome:
        out = GateOutcome()
        if self.noise_k is not None and noise is None:
            out.skipped = (f"{self.text} is relative to the noise floor, and no noise floor was measured "
                           "(repeat the target capture to measure one)")
            return out
        if self.scope == OVERALL:
            records = [(None, run_json.get("summary") or {})]
        else:
            records = [(c.get("index", i), c) for i, c in enumerate(run_json.get("comparisons") or [])]
        if self.noise_k is not None and records and all(noise.value(self.path, i) is None for i, _ in records):
            where = "the whole run" if self.scope == OVERALL else "any prompt"
            out.skipped = f"the noise floor has no value of {self.path} for {where}"
            return out
        for index, record in records:
            value = metric_value(record, self.path)
            where = "overall" if index is None else f"prompt {index}"
            spread = None
            if self.noise_k is not None:
                spread = noise.value(self.path, index)
                if spread is None:
                    out.notes.append(f"{where}: no noise measured for {self.path}; {self.text} not checked there")
                    continue
            if value is None:
                if self.path not in NULL_MEANS_NEVER:
                    out.notes.append(f"{where}: {self.metric} is null (nothing to compute it from); "
                                     f"{self.text} not checked there")
                continue
            limit = self.threshold(spread)
            if not _holds(value, self.op, limit):
                continue
            prompt = None if index is None else _short(record.get("prompt", ""))
            tail = ""
            if index is None:
                head = "overall"
                worst_index, position = _worst_prompt(run_json, self.path, self.op)
                if worst_index is not None:
                    tail = f"; worst: prompt {worst_index}" + _at(position)
            else:
                position = _position(record, self.path)
                head = f'prompt {index} "{prompt}"' + _at(position)
            noise_text = f", noise {_fmt(spread)}" if spread is not None else ""
            message = (f"{head}: {self.metric} = {_fmt(value)} {self.op} {_fmt(limit)} "
                       f"(tolerance {self.text}{noise_text}){tail}")
            out.violations.append(Violation(
                gate=self.text, source=self.source, scope=self.scope, metric=self.metric, path=self.path,
                value=value, op=self.op, threshold=limit, message=message, prompt_index=index, prompt=prompt,
                position=position, noise=spread,
            ))  # fmt: skip
        return out


def parse_gate(expr: str, source: str = SOURCE_CLI) -> MetricGate:
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
    base, noise_k = _parse_value(m["value"], op, expr)
    text = re.sub(r"\s+", "", expr)
    return MetricGate(text=text, scope=scope, metric=metric, path=path, op=op, base=base, noise_k=noise_k,
                      source=source)


def parse_gates(exprs: list[str] | tuple[str, ...], source: str = SOURCE_CLI) -> list[MetricGate]:
    return [parse_gate(e, source) for e in exprs]


def _parse_value(raw: str, op: str, expr: str) -> tuple[float, float | None]:
    raw = raw.strip()
    upper = op in (">", ">=")
    if re.fullmatch(_NUMBER, raw) or raw.lower() in ("inf", "+inf", "-inf"):
        value = float(raw)
        if math.isnan(value):
            raise UsageError(f"tolerance {expr!r}: NaN is not a tolerance", option="--fail-on")
        return value, None
    term = _NOISE_TERM.match(raw)
    if term:
        if not upper:
            raise UsageError(f"tolerance {expr!r}: a lower bound relative to noise needs a base value, "
                             f"e.g. {expr.split(op)[0].strip()}{op}0.99-3*noise", option="--fail-on")
        return 0.0, _noise_k(term, expr)
    both = _BASE_AND_NOISE.match(raw)
    if both and (term := _NOISE_TERM.match(both["term"].strip())):
        k = _noise_k(term, expr)
        if (both["sign"] == "+") != upper:
            raise UsageError(f"tolerance {expr!r}: the noise term must widen the tolerance "
                             f"({'+' if upper else '-'} with {op})", option="--fail-on")
        return float(both["base"]), k if upper else -k
    raise UsageError(f"tolerance {expr!r}: value {raw!r} is not a number, K*noise or NUMBER±K*noise",
                     option="--fail-on")


def _noise_k(term: re.Match, expr: str) -> float:
    k = float(term["k"]) if term["k"] else 1.0
    if not k >= 0 or math.isinf(k):
        raise UsageError(f"tolerance {expr!r}: the noise multiple must be a finite number >= 0", option="--fail-on")
    return k


@dataclass(frozen=True)
class ArgmaxGate(Gate):
    """The near-tie rule: a target argmax that leaves the reference's token fails the run
    where the reference was confident (top-2 margin >= tie margin); near-ties fail only
    with ``near_ties_fail``.

    Per prompt it looks at the first argmax divergence (``argmax_divergence``) and at
    the mismatch counts of the distribution summary, so a confident mismatch after a
    near-tie one is caught too. In free-running mode a token divergence without a
    logprob row to classify it is a note, or a violation with ``near_ties_fail``.
    """

    near_ties_fail: bool = False
    source: str = SOURCE_DEFAULT

    @property
    def text(self) -> str:  # type: ignore[override]
        return "argmax:any" if self.near_ties_fail else "argmax:confident"

    @property
    def key(self) -> tuple:
        return ("argmax",)

    def with_source(self, source: str) -> ArgmaxGate:
        return ArgmaxGate(near_ties_fail=self.near_ties_fail, source=source)

    def evaluate(self, run_json: dict[str, Any], noise: Any = None) -> GateOutcome:
        out = GateOutcome()
        for i, comp in enumerate(run_json.get("comparisons") or []):
            violation, note = self._judge_prompt(comp, comp.get("index", i))
            if violation is not None:
                out.violations.append(violation)
            if note:
                out.notes.append(note)
        return out

    def _judge_prompt(self, comp: dict[str, Any], index: int) -> tuple[Violation | None, str | None]:
        prompt = _short(comp.get("prompt", ""))
        head = f'prompt {index} "{prompt}"'
        dist = comp.get("distribution") or {}
        tie = dist.get("tie_margin")
        div = comp.get("argmax_divergence")

        def violation(position: int | None, count: float, detail: str) -> Violation:
            return Violation(
                gate=self.text, source=self.source, scope=PROMPT, metric="argmax", path="argmax_divergence",
                value=count, op=">", threshold=0.0, message=f"{head}{_at(position)}: {detail} (rule {self.text})",
                prompt_index=index, prompt=prompt, position=position,
            )  # fmt: skip

        note = None
        if div is not None:
            what = (f"target argmax {div.get('target_token')} != reference token {div.get('reference_token')}, "
                    f"reference top-2 margin {_fmt(div.get('margin'))} nats")
            if div.get("kind") == "disagreement":
                bound = f" >= tie margin {_fmt(tie)}" if tie is not None else ""
                return violation(div.get("position"), 1.0, f"confident argmax disagreement: {what}{bound}"), None
            if self.near_ties_fail:
                bound = f" < tie margin {_fmt(tie)}" if tie is not None else ""
                return violation(div.get("position"), 1.0, f"near-tie argmax divergence: {what}{bound}"), None
            note = f"{head}{_at(div.get('position'))}: near-tie argmax divergence ({what}), allowed"

        # the first divergence may be a near-tie while a later position disagrees confidently
        if self.near_ties_fail:
            later, kind = int(dist.get("top1_mismatches") or 0), "argmax mismatches"
        else:
            later, kind = int(metric_value(comp, "confident_mismatches") or 0), "confident argmax mismatches"
        if later > 0:
            position = _mismatch_position(comp, None if self.near_ties_fail else tie)
            return violation(position, float(later), f"{later} {kind} among the compared positions"), note

        first = comp.get("first_divergence")
        if div is None and first is not None and not comp.get("tokens_equal", True):
            detail = (f"generated tokens diverge at position {first} and no logprob row there tells a near-tie "
                      "from a disagreement")
            if self.near_ties_fail:
                return violation(first, 1.0, detail), note
            return None, f"{head}: {detail}; allowed"
        return None, note


def _mismatch_position(comp: dict[str, Any], tie_margin: float | None) -> int | None:
    """A mismatched position from the worst-KL list, confident ones only when a tie margin is given."""
    for entry in comp.get("worst_positions") or []:
        if entry.get("reference_token") == entry.get("target_argmax"):
            continue
        ref_top = entry.get("reference_topk") or []
        if tie_margin is not None and len(ref_top) >= 2:
            a, b = ref_top[0][1], ref_top[1][1]
            if a is None or b is None or a - b < tie_margin:
                continue
        return entry.get("position")
    return None


# -- built-in defaults ------------------------------------------------------------
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
                  tgt_device: str | None = None, near_ties_fail: bool = False) -> list[Gate]:
    """The built-in gates for a dtype pair (judged by its coarser side), plus the argmax rule."""
    ref = canonical_dtype(ref_dtype, ref_device)
    tgt = canonical_dtype(tgt_dtype, tgt_device)
    tier = max(ref, tgt, key=PRECISION_ORDER.index)
    source = f"{SOURCE_DEFAULT} ({ref}:{tgt})"
    gates: list[Gate] = [parse_gate(expr, source) for expr, _ in DEFAULT_TOLERANCES[tier]]
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


# -- judging ----------------------------------------------------------------------
def judge(run_json: dict[str, Any], gates: list[Gate], noise: Any = None) -> Verdict:
    """Check every gate against a report dict; all violations are collected."""
    if isinstance(noise, dict):
        from .noise import noise_from_json

        noise = noise_from_json(noise)
    full_vocab = (run_json.get("settings") or {}).get("logprobs", -1) == -1
    violations: list[Violation] = []
    checked: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    notes: list[str] = []
    warnings: list[str] = []
    for gate in gates:
        if gate.requires_full_vocab and not full_vocab:
            skipped.append({"gate": gate.text, "source": gate.source,
                            "reason": "needs a full-vocabulary capture (this run kept the top-N logprobs)"})
            continue
        outcome = gate.evaluate(run_json, noise)
        if outcome.skipped:
            skipped.append({"gate": gate.text, "source": gate.source, "reason": outcome.skipped})
            warnings.append(f"tolerance {gate.text} ({gate.source}) not checked: {outcome.skipped}")
            continue
        violations.extend(outcome.violations)
        notes.extend(outcome.notes)
        checked.append({"gate": gate.text, "source": gate.source, "scope": getattr(gate, "scope", PROMPT),
                        "path": getattr(gate, "path", "argmax_divergence"), "violations": len(outcome.violations)})
    return Verdict(passed=not violations, violations=violations, checked=checked, skipped=skipped, notes=notes,
                   warnings=warnings)


# -- helpers ----------------------------------------------------------------------
def _holds(value: float, op: str, limit: float) -> bool:
    return {">": value > limit, ">=": value >= limit, "<": value < limit, "<=": value <= limit}[op]


_KL_PATHS_PREFIX = ("distribution.kl_", "distribution.dp_", "kl_confident_")
_ABS_PATHS = ("max_abs_diff", "mean_abs_diff", "outliers", "pearson", "finite_overlap", "finite_entries")
_ARGMAX_PATHS = ("top1_match", "topk_overlap", "topk_order_match", "distribution.top1_rate",
                 "distribution.top1_mismatches", "distribution.mismatches_near_tie", "confident_mismatches",
                 "first_divergence", "tokens_equal", "texts_equal", "distribution.jaccard_mean",
                 "distribution.rank_agreement_mean")


def _position(comp: dict[str, Any], path: str) -> int | None:
    """Where in a prompt a metric is known to be worst (None when the report cannot say)."""
    if path.startswith(_KL_PATHS_PREFIX):
        worst = comp.get("worst_positions") or []
        return worst[0].get("position") if worst else None
    if path in _ABS_PATHS:
        return comp.get("worst_position")
    if path in _ARGMAX_PATHS:
        div = comp.get("argmax_divergence")
        if div is not None:
            return div.get("position")
        return comp.get("first_divergence")
    return None


# per-prompt counterpart of an overall metric, for naming the worst prompt
_OVERALL_TO_PROMPT = {"min_pearson": "pearson", "earliest_divergence": "first_divergence"}


def _worst_prompt(run_json: dict[str, Any], path: str, op: str) -> tuple[int | None, int | None]:
    """(prompt index, position) of the prompt that pushes an overall metric furthest past its bound."""
    prompt_path = _OVERALL_TO_PROMPT.get(path, path)
    if prompt_path not in metric_paths(PROMPT):
        return None, None
    best = None
    for i, comp in enumerate(run_json.get("comparisons") or []):
        value = metric_value(comp, prompt_path)
        if value is None:
            continue
        score = value if op in (">", ">=") else -value
        if best is None or score > best[0]:
            best = (score, comp.get("index", i), _position(comp, prompt_path))
    return (None, None) if best is None else (best[1], best[2])


def _at(position: int | None) -> str:
    return "" if position is None else f" position {position}"


def _short(text: str, width: int = 20) -> str:
    # one printable line: the text lands in terminals, XML and markdown
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in str(text)).split()).replace('"', "'")
    if len(text) <= width:
        return text
    cut = text[:width]
    if " " in cut.strip():
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip() + "..."


def _fmt(value: float | None) -> str:
    if value is None:
        return "null"
    return f"{value:.4g}"
