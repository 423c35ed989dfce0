"""The metric catalogue (vllm_rbln_exec.compare.catalogue) against what the metrics code emits."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_rbln_exec.compare import catalogue as cat
from vllm_rbln_exec.compare.catalogue import NOT_METRICS, OVERALL, PROMPT, SCOPES
from vllm_rbln_exec.compare.distribution import BUCKET_LABELS
from vllm_rbln_exec.compare.metrics import compare_prompt, summarize
from vllm_rbln_exec.core.errors import UsageError

# Every short name users could type before the catalogue, and what it meant per scope:
# --fail-on expressions and spec files must keep their meaning.
ALIASES_BEFORE = {
    "top1": ("distribution.top1_rate", "distribution.top1_rate"),
    "same_top1": ("distribution.top1_rate", "distribution.top1_rate"),
    "kl": ("distribution.kl_mean", "distribution.kl_mean"),
    "pearson": ("min_pearson", "pearson"),
    "min_pearson": ("min_pearson", "pearson"),
    "max_abs": ("max_abs_diff", "max_abs_diff"),
    "mean_abs": ("mean_abs_diff", "mean_abs_diff"),
    "ppl": ("distribution.ppl_ratio", "distribution.ppl_ratio"),
    "mismatches": ("distribution.top1_mismatches", "distribution.top1_mismatches"),
    "near_tie_mismatches": ("distribution.mismatches_near_tie", "distribution.mismatches_near_tie"),
    "jaccard": ("distribution.jaccard_mean", "distribution.jaccard_mean"),
    "rank_agreement": ("distribution.rank_agreement_mean", "distribution.rank_agreement_mean"),
    "positions": ("positions_compared", "positions_compared"),
    "first_divergence": ("earliest_divergence", "first_divergence"),
    "earliest_divergence": ("earliest_divergence", "first_divergence"),
}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=1, keepdims=True))).astype(np.float32)


def capture(seed: int, positions: int = 5, vocab: int = 40) -> dict:
    """One side of a prompt: varied rows, the first one confident (top-1 probability >= 0.95)."""
    logits = np.random.default_rng(seed).normal(size=(positions, vocab)) * 2
    logits[0, 3] += 30.0
    rows = log_softmax(logits)
    return {"token_ids": rows.argmax(axis=1).tolist(), "text": f"text {seed}", "logprobs": rows}


def top_n(side: dict, n: int = 6) -> dict:
    """The same side as a top-N capture."""
    rows = np.asarray(side["logprobs"])
    ids = np.argsort(-rows, axis=1, kind="stable")[:, :n]
    return {**side, "logprobs": np.take_along_axis(rows, ids, axis=1), "ids": ids.astype(np.int32)}


def report(pairs: list[tuple[dict, dict]], vocab: int = 40) -> dict:
    comps = [compare_prompt(i, f"prompt {i}", ref, tgt, vocab_size=vocab, topk=3) for i, (ref, tgt) in
             enumerate(pairs)]
    return {"summary": summarize(comps).to_json(), "comparisons": [c.to_json() for c in comps]}


@pytest.fixture(scope="module")
def run() -> dict:
    """A run whose prompts differ (the target is a perturbed reference), and one whose target diverges."""
    ref, other = capture(1), capture(2)
    noisy = {**ref, "logprobs": log_softmax(ref["logprobs"] + np.float32(0.3) * capture(3)["logprobs"])}
    return report([(ref, noisy), (ref, other)])


def records(run: dict) -> list[tuple[str, dict]]:
    return [(OVERALL, run["summary"]), *((PROMPT, c) for c in run["comparisons"])]


# -- the catalogue follows what metrics.py emits ----------------------------------------
def test_every_emitted_field_is_catalogued_or_excluded(run):
    for scope, record in records(run):
        paths = set(cat.report_paths(scope))
        own = {p for p in paths if "." not in p}
        dist = {p.removeprefix("distribution.") for p in paths if p.startswith("distribution.")}
        assert set(record) - NOT_METRICS == own, scope
        assert set(record["distribution"]) - NOT_METRICS == dist, scope
        assert not (own | dist) & NOT_METRICS


def test_every_catalogued_path_has_a_value_in_a_report(run):
    for scope, record in records(run):
        for path in cat.metric_paths(scope):
            metric = cat.lookup(path, scope)
            if metric.null_means_never:
                continue  # null unless the tokens diverge: see below
            assert cat.metric_value(record, path) is not None, (scope, path)
    assert cat.metric_value(run["comparisons"][1], "first_divergence") is not None
    assert cat.metric_value(run["summary"], "earliest_divergence") is not None


def test_derived_metrics_are_in_both_scopes_and_read_the_confident_bucket():
    assert cat.CONFIDENT_BUCKET == BUCKET_LABELS[-1]
    derived = [m for m in cat.METRICS if m.derived]
    assert {m.path for m in derived} == {"confident_mismatches", "kl_confident_mean", "kl_confident_max"}
    assert all(m.scopes == SCOPES for m in derived)
    assert not set(cat.report_paths(OVERALL)) & {m.path for m in derived}


# -- names -----------------------------------------------------------------------------
def test_names_are_unique_and_every_alias_resolves_in_its_scopes():
    seen: dict[str, str] = {}
    for metric in cat.METRICS:
        for name in metric.names():
            assert seen.setdefault(name, metric.path) == metric.path, name
        for scope in SCOPES:
            for name in metric.names():
                if scope in metric.scopes:
                    assert cat.resolve_metric(name, scope) == metric.path_in(scope), (name, scope)
                else:
                    with pytest.raises(UsageError, match="prefix" if scope == PROMPT else "per prompt only"):
                        cat.resolve_metric(name, scope)


@pytest.mark.parametrize("name", sorted(ALIASES_BEFORE))
def test_existing_aliases_keep_their_meaning(name):
    assert tuple(cat.resolve_metric(name, scope) for scope in SCOPES) == ALIASES_BEFORE[name]


def test_bare_distribution_names_and_dotted_paths_resolve():
    for scope in SCOPES:
        for path in cat.metric_paths(scope):
            assert cat.resolve_metric(path, scope) == path
            bare = path.removeprefix("distribution.")
            if bare not in ALIASES_BEFORE:  # "positions" is positions_compared, not distribution.positions
                assert cat.resolve_metric(bare, scope) == path
    assert cat.resolve_metric("positions") == "positions_compared"
    assert set(ALIASES_BEFORE) <= set(cat.short_names())


def test_paths_differ_by_scope_only_where_the_record_says():
    differ = {m.path: m.prompt_path for m in cat.METRICS if m.prompt_path}
    assert differ == {"min_pearson": "pearson", "earliest_divergence": "first_divergence"}
    assert cat.prompt_counterpart("min_pearson") == "pearson"
    assert cat.prompt_counterpart("distribution.kl_mean") == "distribution.kl_mean"
    assert cat.prompt_counterpart("prompts") is None


# -- identity values ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "top-n"])
def test_identity_values_are_what_a_capture_compared_with_itself_gives(mode):
    sides = [capture(1), capture(2)]
    if mode == "top-n":
        sides = [top_n(s) for s in sides]
    same = report([(s, {**s, "logprobs": np.array(s["logprobs"])}) for s in sides])
    checked = 0
    for scope, record in records(same):
        for path in cat.metric_paths(scope):
            expected = cat.identity(path)
            if expected is None:
                continue
            assert cat.metric_value(record, path) == pytest.approx(expected, abs=1e-12), (mode, scope, path)
            checked += 1
    assert checked > 40


def test_identity_lookup_covers_both_scope_paths():
    assert cat.identity("min_pearson") == cat.identity("pearson") == 1.0
    assert cat.identity("distribution.kl_mean") == 0.0
    assert cat.identity("finite_overlap") is None  # top-N captures of one side need not overlap fully
    assert cat.identity("no.such.path") is None


# -- reports -------------------------------------------------------------------------------
def test_positions_come_from_the_record_they_name():
    comp = {"worst_positions": [{"position": 7}], "worst_position": 3, "argmax_divergence": {"position": 5},
            "first_divergence": 9}
    assert cat.metric_position(comp, "distribution.kl_p99") == 7
    assert cat.metric_position(comp, "distribution.dp_rms") == 7
    assert cat.metric_position(comp, "kl_confident_max") == 7
    assert cat.metric_position(comp, "pearson") == 3
    assert cat.metric_position(comp, "distribution.top1_rate") == 5
    assert cat.metric_position({"first_divergence": 9}, "confident_mismatches") == 9
    assert cat.metric_position(comp, "distribution.logppl_target") is None
    for metric in cat.METRICS:
        if metric.position is not None:
            assert PROMPT in metric.scopes, metric.path  # positions are per prompt


def test_key_metrics_have_labels_and_exist_in_their_scope():
    for scope in SCOPES:
        keys = cat.key_metrics(scope)
        assert keys and all(label and path in cat.metric_paths(scope) for label, path in keys)
    assert cat.key_metrics(OVERALL)[0] == ("KL mean (nats)", "distribution.kl_mean")
    assert cat.label("distribution.kl_mean", PROMPT) == "KL mean"
    assert cat.label("distribution.kl_p90") == "kl_p90"


def test_better_direction_is_one_of_two_words():
    assert {m.better for m in cat.METRICS} <= {cat.LOWER, cat.HIGHER, None}
    assert cat.lookup("distribution.kl_mean").better == cat.LOWER
    assert cat.lookup("distribution.top1_rate").better == cat.HIGHER
