"""The catalogue of metrics a comparison report carries: one record per metric.

This module owns what is known about each number in a run's summary and in a
prompt's comparison record (``RunSummary.to_json()``, ``PromptComparison.to_json()``
and their ``distribution`` blocks): its dotted path in each scope, the short
names users type, its value when both sides are identical, whether a null means
"never happened", where in a prompt it is worst, which way is better, its label
in reports, and the few metrics derived from other fields. The verdict, the
noise floor and the report writers all read metrics through the small functions
below, so they always agree. It reads report dicts only: it must not compute
metrics (``metrics``, ``distribution``), judge tolerances (``verdict``), write
files, or import numpy, torch or vLLM.

The table is explicit rather than reflected from the dataclasses: a new report
field should be a deliberate decision about whether it is a metric (a unit test
compares the catalogue with what the metrics code emits, so a new field cannot
be forgotten silently).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, replace
from typing import Any

from ..core.errors import UsageError

OVERALL = "overall"  # the run's summary
PROMPT = "prompt"  # each prompt's comparison record
SCOPES = (OVERALL, PROMPT)
BOTH = SCOPES

# Where a violation's position in a prompt comes from (see ``metric_position``).
WORST_KL = "worst-kl"  # the largest-KL position (KL and Δp metrics)
WORST_ABS = "worst-abs"  # the largest-|Δ| position (element-wise metrics)
ARGMAX = "argmax"  # the first argmax divergence, else the first token divergence

LOWER = "lower"  # smaller is closer to parity
HIGHER = "higher"

# kl_confident_* read this bucket of ``distribution.kl_buckets`` (its last label, see distribution.BUCKET_LABELS)
CONFIDENT_BUCKET = "[0.95,1]"


@dataclass(frozen=True)
class Metric:
    """One gateable number of a report."""

    path: str  # dotted path in the report; the overall one when the scopes differ
    scopes: tuple[str, ...]  # the scopes it exists in
    description: str
    prompt_path: str | None = None  # the per-prompt path where it differs from ``path``
    aliases: tuple[str, ...] = ()  # short names users may type, in either scope
    identity: float | None = None  # its value when both sides are identical (None: none, e.g. counts)
    null_means_never: bool = False  # null means "never happened", not "nothing to compute it from"
    position: str | None = None  # WORST_KL | WORST_ABS | ARGMAX: where in a prompt it is worst
    better: str | None = None  # LOWER | HIGHER; None: neither (counts, signed values, ratios near 1)
    label: str | None = None  # shown in reports (default: the path's last part)
    prompt_label: str | None = None  # the per-prompt table's shorter label, where it differs
    key: tuple[str, ...] = ()  # scopes whose report tables show it as a key metric
    derived: bool = False  # computed from other fields of the same record (``metric_value``)
    floor: float | None = None  # what honest sides reach through the q16 store alone (see ``FLOORS``)

    def path_in(self, scope: str) -> str | None:
        """The dotted path in ``scope``; None where the metric does not exist."""
        if scope not in self.scopes:
            return None
        return (self.prompt_path or self.path) if scope == PROMPT else self.path

    def names(self) -> tuple[str, ...]:
        """Every name that means this metric in each of its scopes: its paths and aliases."""
        return tuple(dict.fromkeys(n for n in (self.path, self.prompt_path, *self.aliases) if n))


def _run(name: str, description: str, **kw: Any) -> Metric:
    return Metric(name, (OVERALL,), description, **kw)


def _prompt(name: str, description: str, **kw: Any) -> Metric:
    return Metric(name, (PROMPT,), description, **kw)


def _both(name: str, description: str, **kw: Any) -> Metric:
    return Metric(name, BOTH, description, **kw)


def _dist(name: str, description: str, **kw: Any) -> Metric:
    return Metric(f"distribution.{name}", BOTH, description, **kw)


def _kl(name: str, description: str, **kw: Any) -> Metric:
    """A KL or Δp statistic: 0 between identical sides, worst at the largest-KL position."""
    floor = FLOORS.get(name.split("_")[0])
    return _dist(name, description, **{"identity": 0.0, "position": WORST_KL, "better": LOWER, "floor": floor, **kw})


def _agree(metric: Metric) -> Metric:
    """An agreement rate: 1 between identical sides, worst at the first argmax divergence."""
    return replace(metric, identity=1.0, position=ARGMAX, better=HIGHER)


# The floor of a metric: the value two honest float32 captures of one model reach through the q16 store's
# rounding alone (entries kept to 2.44e-4 nats). A yardstick below it is taken at it, so a ratio to a
# yardstick that sits at the floor does not explode. Measured on SmolLM2-135M, 4 built-in prompts x 32
# tokens, vLLM CPU fp32 reference vs transformers CPU fp32 target, q16 store: KL mean 8.9e-10, p99 1.7e-8,
# max 2.2e-8, Δp RMS 2.6e-6, no flip (docs/yardstick.md "Floors" has the command):
FLOORS = {
    "kl": 1e-8,  # KL statistics (nats)
    "dp": 1e-5,  # Δp statistics (probability)
    "mismatches": 1.0,  # argmax flips are counts: a yardstick with no flip is counted as one
}

# Grouped by family; within a scope, ``metric_paths`` and the key metrics of reports follow this order.
METRICS: tuple[Metric, ...] = (
    # -- what was compared
    _run("prompts", "prompts compared"),
    _both("positions_compared", "generated positions compared (aligned on both sides)", aliases=("positions",),
          label="positions compared", prompt_label="positions", key=(PROMPT,)),
    _prompt("reference_tokens", "tokens the reference generated"),
    _prompt("target_tokens", "tokens the target generated"),
    _dist("positions", "positions in the distribution statistics"),
    # -- KL(reference || target), nats, over positions with finite KL
    _kl("kl_mean", "KL mean", aliases=("kl",), label="KL mean (nats)", prompt_label="KL mean", key=BOTH),
    _kl("kl_sem", "standard error of the KL mean"),
    _kl("kl_median", "KL median"),
    _kl("kl_p90", "KL 90th percentile"),
    _kl("kl_p99", "KL 99th percentile", label="KL p99", key=(OVERALL,)),
    _kl("kl_p999", "KL 99.9th percentile"),
    _kl("kl_max", "KL max", label="KL max", key=BOTH),
    _kl("kl_nonfinite", "positions whose KL is inf or NaN (left out of the other kl_* statistics)"),
    _both("kl_prefill", "KL at position 0, the prompt's forward pass (overall: the mean over prompts)",
          identity=0.0, better=LOWER, floor=FLOORS["kl"], label="KL at position 0 (prefill)"),
    _both("kl_decode", "KL mean over positions 1.. (decode steps, reading the KV cache)", identity=0.0,
          better=LOWER, floor=FLOORS["kl"], label="KL after position 0 (decode)"),
    Metric("kl_confident_mean", BOTH, f"KL mean over positions whose reference top-1 probability is in "
           f"{CONFIDENT_BUCKET}", identity=0.0, position=WORST_KL, better=LOWER, derived=True),
    Metric("kl_confident_max", BOTH, f"KL max over positions whose reference top-1 probability is in "
           f"{CONFIDENT_BUCKET}", identity=0.0, position=WORST_KL, better=LOWER, derived=True),
    # -- argmax and top-K agreement
    _agree(_dist("top1_rate", "share of positions whose argmax agrees", aliases=("top1", "same_top1"),
                 label="same top-1 rate", prompt_label="top-1", key=BOTH)),
    _dist("top1_se", "binomial standard error of top1_rate", identity=0.0),
    _dist("top1_mismatches", "positions whose argmax differs", aliases=("mismatches", "flips"), identity=0.0,
          position=ARGMAX, better=LOWER, floor=FLOORS["mismatches"], label="top-1 mismatches"),
    _dist("mismatches_near_tie", "top-1 mismatches where the reference's top-2 margin is below the tie margin",
          aliases=("near_tie_mismatches",), identity=0.0, position=ARGMAX, better=LOWER),
    Metric("confident_mismatches", BOTH, "top-1 mismatches where the reference was not at a near-tie",
           identity=0.0, position=ARGMAX, better=LOWER, label="confident argmax mismatches", key=(OVERALL,),
           derived=True),
    _agree(_both("top1_match", "share of positions whose argmax agrees (from the top-K ranking)")),
    _agree(_both("topk_overlap", "mean |top-K(reference) ∩ top-K(target)| / K over positions")),
    _agree(_prompt("topk_order_match", "share of positions whose top-K lists are identical in order")),
    _agree(_dist("jaccard_mean", "mean Jaccard index of the finite top-K id sets", aliases=("jaccard",))),
    _agree(_dist("rank_agreement_mean", "mean share of the reference's top-K ids at the same rank in the target's",
                 aliases=("rank_agreement",))),
    _run("argmax_divergences", "prompts whose target argmax left the reference tokens", identity=0.0,
         better=LOWER),
    _run("disagreements", "prompts whose first argmax divergence was not at a near-tie", identity=0.0,
         better=LOWER),
    _both("earliest_divergence", "first position whose generated tokens differ (null: never)",
          prompt_path="first_divergence", null_means_never=True, position=ARGMAX, better=HIGHER),
    _both("texts_equal", "prompts whose generated texts are equal (per prompt: 1 or 0)", position=ARGMAX,
          better=HIGHER),
    _both("tokens_equal", "prompts whose generated tokens are equal (per prompt: 1 or 0)", position=ARGMAX,
          better=HIGHER),
    # -- Δp: target minus reference probability of the reference token
    _kl("dp_mean", "mean Δp", better=None),
    _kl("dp_rms", "root mean square of Δp", label="Δp RMS"),
    _kl("dp_p01", "Δp 1st percentile", better=None),
    _kl("dp_p99", "Δp 99th percentile", better=None),
    _kl("dp_abs_p99", "99th percentile of |Δp|"),
    # -- perplexity of the reference tokens
    _dist("logppl_reference", "log-perplexity of the reference tokens under the reference"),
    _dist("logppl_target", "log-perplexity of the reference tokens under the target"),
    _dist("ppl_ratio", "exp(logppl_target - logppl_reference)", aliases=("ppl",), identity=1.0,
          label="perplexity ratio", key=(OVERALL,)),
    _dist("renormalized_reference", "reference rows renormalised (probability mass off by more than 1e-3)"),
    _dist("renormalized_target", "target rows renormalised (probability mass off by more than 1e-3)"),
    # -- element-wise, over the entries finite on both sides
    _both("max_abs_diff", "largest |Δ| between logprobs", aliases=("max_abs",), identity=0.0, position=WORST_ABS,
          better=LOWER, label="max abs Δ", key=BOTH),
    _both("mean_abs_diff", "mean |Δ| between logprobs", aliases=("mean_abs",), identity=0.0, position=WORST_ABS,
          better=LOWER, label="mean abs Δ", key=(OVERALL,)),
    _both("min_pearson", "Pearson r of the logprobs (overall: the smallest over prompts)", prompt_path="pearson",
          identity=1.0, position=WORST_ABS, better=HIGHER, label="min Pearson", prompt_label="Pearson",
          key=(OVERALL,)),
    _both("outliers", "entries with |Δ| >= eps", identity=0.0, position=WORST_ABS, better=LOWER),
    # no identity value: in top-N mode two captures of one side differ in which entries are finite
    _prompt("finite_overlap", "share of compared entries finite on both sides", position=WORST_ABS, better=HIGHER),
    _prompt("finite_entries", "compared entries finite on both sides", position=WORST_ABS),
)

# Report fields that are not metrics: settings, identifiers, texts and nested records (``position_stats``
# is kept in memory only and written as null; ``series`` holds per-position values for plots). Never gateable.
NOT_METRICS = frozenset({
    "index", "vocab_size", "eps", "topk", "worst_position", "tie_margin", "kl_buckets", "aligned",
    "prompt", "reference_text", "target_text", "first_position_topk", "snippet", "notes", "distribution",
    "argmax_divergence", "worst_positions", "position_stats", "series",
})  # fmt: skip

_BY_PATH = {(scope, m.path_in(scope)): m for m in METRICS for scope in m.scopes}
_BY_NAME = {name: m for m in METRICS for name in m.names()}


def lookup(path: str, scope: str | None = None) -> Metric | None:
    """The metric at a dotted path (in ``scope``, or in either); None for a path the catalogue lacks."""
    if scope is not None:
        return _BY_PATH.get((scope, path))
    return _BY_PATH.get((OVERALL, path)) or _BY_PATH.get((PROMPT, path))


def metric_paths(scope: str) -> list[str]:
    """Every gateable dotted path of one scope (report fields and derived metrics)."""
    return [m.path_in(scope) for m in METRICS if scope in m.scopes]


def report_paths(scope: str) -> list[str]:
    """The dotted paths of ``scope`` that the report itself carries (``metric_paths`` less the derived ones)."""
    return [m.path_in(scope) for m in METRICS if scope in m.scopes and not m.derived]


def short_names() -> list[str]:
    """Names a user can write without a dotted path (either scope)."""
    names = {n.removeprefix("distribution.") for m in METRICS for n in m.names()}
    return sorted(names)


def resolve_metric(name: str, scope: str = OVERALL, context: str = "") -> str:
    """The dotted path a metric name means in ``scope``; UsageError naming close names otherwise."""
    name = name.strip()
    metric = _BY_NAME.get(name) or _BY_NAME.get(f"distribution.{name}")
    if metric is not None:
        path = metric.path_in(scope)
        if path is not None:
            return path
        if scope == OVERALL:
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
    metric = lookup(path)
    if metric is not None and metric.derived:
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


def identity(path: str) -> float | None:
    """The value of a metric when both sides are identical; None where it has none."""
    metric = lookup(path)
    return None if metric is None else metric.identity


def null_means_never(path: str) -> bool:
    """Whether a null value of the metric means "never happened" rather than "not computable"."""
    metric = lookup(path)
    return metric is not None and metric.null_means_never


def prompt_counterpart(path: str) -> str | None:
    """The per-prompt path of an overall metric (``min_pearson`` -> ``pearson``); None if it has none."""
    metric = lookup(path, OVERALL)
    return None if metric is None else metric.path_in(PROMPT)


def metric_position(comp: dict[str, Any], path: str) -> int | None:
    """Where in a prompt's comparison record a metric is known to be worst (None when the report cannot say)."""
    metric = lookup(path, PROMPT)
    kind = None if metric is None else metric.position
    if kind == WORST_KL:
        worst = comp.get("worst_positions") or []
        return worst[0].get("position") if worst else None
    if kind == WORST_ABS:
        return comp.get("worst_position")
    if kind == ARGMAX:
        div = comp.get("argmax_divergence")
        if div is not None:
            return div.get("position")
        return comp.get("first_divergence")
    return None


def label(path: str, scope: str = OVERALL) -> str:
    """How reports name a metric in ``scope``."""
    metric = lookup(path, scope)
    if metric is None:
        return path.removeprefix("distribution.")
    if scope == PROMPT and metric.prompt_label:
        return metric.prompt_label
    return metric.label or path.removeprefix("distribution.")


def key_metrics(scope: str) -> list[tuple[str, str]]:
    """(label, dotted path) of the metrics report tables show for ``scope``, in catalogue order."""
    return [(label(m.path_in(scope), scope), m.path_in(scope)) for m in METRICS if scope in m.key]


def floor(path: str) -> float:
    """The floor of a metric (0 where it has none)."""
    metric = lookup(path)
    return (metric.floor if metric is not None else None) or 0.0


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
