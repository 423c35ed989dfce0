"""Hand-checkable cases for vllm_rbln_exec.verdict.gates (tolerances, argmax rule, defaults, judge) and noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vllm_rbln_exec.compare.catalogue import (
    NOT_METRICS,
    OVERALL,
    PROMPT,
    metric_value,
    report_paths,
    resolve_metric,
)
from vllm_rbln_exec.compare.metrics import compare_prompt, summarize
from vllm_rbln_exec.core.dtypes import canonical_dtype
from vllm_rbln_exec.core.errors import EXIT_OK, EXIT_PARITY_FAILED, UsageError
from vllm_rbln_exec.verdict.defaults import default_gates, run_dtypes
from vllm_rbln_exec.verdict.gates import ArgmaxGate, MetricGate, parse_gate
from vllm_rbln_exec.verdict.judge import judge
from vllm_rbln_exec.verdict.noise import measure_noise, merge_noise, noise_from_json, noise_to_json

LN2 = math.log(2.0)
# Four-token distributions whose KL and margins are easy to do by hand.
SURE = [0.5, 0.25, 0.125, 0.125]  # top-2 margin ln 2 = 0.693 nats: confident at tie margin 0.5
SURE_SWAPPED = [0.25, 0.5, 0.125, 0.125]  # KL(SURE || SURE_SWAPPED) = 0.25 ln 2 = 0.1733
TIE = [0.4, 0.35, 0.15, 0.1]  # margin ln(8/7) = 0.1335 nats: a near-tie
TIE_SWAPPED = [0.35, 0.4, 0.15, 0.1]  # KL(TIE || TIE_SWAPPED) = 0.05 ln(8/7) = 0.006677
KL_SURE = 0.25 * LN2
KL_TIE = 0.05 * math.log(8 / 7)


def rows(*dists):
    return np.log(np.asarray(dists, dtype=np.float64)).astype(np.float32)


def build_run(prompts, *, aligned=True, logprobs=-1, dtypes=("float32", "float32"), target="cpu"):
    """A RunResult.to_json()-shaped dict from (ref rows, tgt rows, ref tokens, tgt tokens) per prompt."""
    comps = []
    for i, (ref, tgt, ref_tok, tgt_tok) in enumerate(prompts):
        comps.append(compare_prompt(
            i, f"prompt number {i} with some words", {"token_ids": ref_tok, "text": "r", "logprobs": ref},
            {"token_ids": tgt_tok, "text": "t", "logprobs": tgt}, vocab_size=ref.shape[1], aligned=aligned,
            tie_margin=0.5, topk=3,
        ))  # fmt: skip
    side = {"device": "cpu", "engine": "vllm", "engine_version": "0.32.0", "platform": "cpu", "elapsed_s": 1.5}
    return {
        "schema_version": 1,
        "model": "tiny-llama3",
        "target": target,
        "settings": {"logprobs": logprobs, "align": "forced" if aligned else "free", "tie_margin": 0.5},
        "prompts": [c.prompt for c in comps],
        "sides": {"reference": {**side, "side": "reference", "dtype": dtypes[0]},
                  "target": {**side, "side": "target", "device": target, "dtype": dtypes[1]}},
        "comparisons": [c.to_json() for c in comps],
        "summary": summarize(comps).to_json(),
        "notes": [],
        "cache": {},
    }


@pytest.fixture
def run():
    """prompt 0 identical; prompt 1 confident disagreement at position 1; prompt 2 near-tie at position 0."""
    return build_run([
        (rows(SURE, SURE), rows(SURE, SURE), [0, 0], [0, 0]),
        (rows(SURE, SURE), rows(SURE, SURE_SWAPPED), [0, 0], [0, 0]),
        (rows(TIE, SURE), rows(TIE_SWAPPED, SURE), [0, 0], [0, 0]),
    ])  # fmt: skip


def test_the_fixture_is_what_the_comments_say(run):
    c0, c1, c2 = run["comparisons"]
    assert c0["distribution"]["kl_max"] == pytest.approx(0.0, abs=1e-7)
    assert c1["distribution"]["kl_max"] == pytest.approx(KL_SURE, rel=1e-5)
    assert c1["argmax_divergence"]["kind"] == "disagreement" and c1["argmax_divergence"]["position"] == 1
    assert c2["argmax_divergence"]["kind"] == "near-tie" and c2["argmax_divergence"]["position"] == 0
    assert run["summary"]["distribution"]["kl_max"] == pytest.approx(KL_SURE, rel=1e-5)
    # six positions: KL 0,0 | 0,KL_SURE | KL_TIE,0
    assert run["summary"]["distribution"]["kl_mean"] == pytest.approx((KL_SURE + KL_TIE) / 6, rel=1e-5)


# -- parsing ------------------------------------------------------------------------
def test_parse_overall_and_prompt_scope():
    g = parse_gate("kl_mean>1e-3")
    assert (g.scope, g.metric, g.path, g.op, g.base, g.noise_k) == ("overall", "kl_mean", "distribution.kl_mean",
                                                                      ">", 1e-3, None)
    p = parse_gate("  prompt : kl_max >= 0.5 ", source="spec x")
    assert (p.scope, p.path, p.op, p.base, p.source) == ("prompt", "distribution.kl_max", ">=", 0.5, "spec x")
    assert p.text == "prompt:kl_max>=0.5"
    assert parse_gate("overall:top1<=0.9").scope == "overall"


@pytest.mark.parametrize(("name", "scope", "path"), [
    ("top1", "overall", "distribution.top1_rate"),
    ("same_top1", "prompt", "distribution.top1_rate"),
    ("pearson", "overall", "min_pearson"),
    ("pearson", "prompt", "pearson"),
    ("min_pearson", "prompt", "pearson"),
    ("max_abs", "overall", "max_abs_diff"),
    ("mean_abs", "prompt", "mean_abs_diff"),
    ("distribution.kl_p99", "overall", "distribution.kl_p99"),
    ("dp_rms", "prompt", "distribution.dp_rms"),
    ("first_divergence", "overall", "earliest_divergence"),
    ("confident_mismatches", "overall", "confident_mismatches"),
    ("finite_overlap", "prompt", "finite_overlap"),
])  # fmt: skip
def test_aliases_and_paths(name, scope, path):
    assert resolve_metric(name, scope) == path


def test_unknown_metric_lists_known_names_and_a_close_one():
    with pytest.raises(UsageError) as exc:
        parse_gate("kl_mena>1e-3")
    assert "Did you mean 'kl_mean'" in exc.value.message
    assert "Known:" in exc.value.message and "top1" in exc.value.message
    assert "'kl_mena>1e-3'" in exc.value.message
    with pytest.raises(UsageError, match="Did you mean 'distribution.kl_p99'"):
        parse_gate("distribution.kl_p9>1")


def test_metrics_of_one_scope_only_say_which_prefix_to_use():
    with pytest.raises(UsageError, match="write prompt:finite_overlap"):
        parse_gate("finite_overlap<1")
    with pytest.raises(UsageError, match="drop the prompt: prefix"):
        parse_gate("prompt:disagreements>0")


@pytest.mark.parametrize("expr", [
    "kl_mean=1", "kl_mean>", "kl_mean>abc", "kl_mean 1e-3", "kl_mean>>1", "foo:kl_mean>1",
    "top1<3*noise", "kl_mean>1e-3-noise", "top1<0.9+noise", "kl_mean>nan", "kl_mean>-1*noise",
])  # fmt: skip
def test_malformed_expressions_quote_the_text(expr):
    with pytest.raises(UsageError) as exc:
        parse_gate(expr)
    assert repr(expr) in exc.value.message or expr in exc.value.message


def test_empty_expression():
    with pytest.raises(UsageError, match="empty"):
        parse_gate("  ")


def test_noise_values_parse_into_base_and_multiple():
    assert (parse_gate("kl_mean>3*noise").base, parse_gate("kl_mean>3*noise").noise_k) == (0.0, 3.0)
    assert parse_gate("kl_mean>noise").noise_k == 1.0
    g = parse_gate("kl_mean>1e-4+2*noise")
    assert (g.base, g.noise_k, g.threshold(0.5)) == (1e-4, 2.0, 1e-4 + 1.0)
    low = parse_gate("top1<0.99-2.5*noise")
    assert low.threshold(0.01) == pytest.approx(0.965)


# -- judging ------------------------------------------------------------------------
def test_overall_violation_names_the_worst_prompt(run):
    verdict = judge(run, [parse_gate("kl_max>0.1")])
    assert not verdict.passed and verdict.exit_code == EXIT_PARITY_FAILED
    (v,) = verdict.violations
    assert (v.scope, v.prompt_index, v.path) == ("overall", None, "distribution.kl_max")
    assert v.value == pytest.approx(KL_SURE, rel=1e-5) and v.threshold == 0.1
    assert v.message == "overall: kl_max = 0.1733 > 0.1 (tolerance kl_max>0.1); worst: prompt 1 position 1"
    assert v.position == 1


def test_per_prompt_violation_message_and_position(run):
    verdict = judge(run, [parse_gate("prompt:kl_max>0.1")])
    (v,) = verdict.violations
    assert (v.scope, v.prompt_index, v.position) == ("prompt", 1, 1)
    assert v.prompt == "prompt number 1..."
    assert v.message == 'prompt 1 "prompt number 1..." position 1: kl_max = 0.1733 > 0.1 (tolerance prompt:kl_max>0.1)'


def test_every_violation_is_collected(run):
    gates = [parse_gate("prompt:kl_max>=0"), parse_gate("top1<1"), parse_gate("kl_mean>0.001")]
    verdict = judge(run, gates)
    assert len(verdict.violations) == 3 + 1 + 1
    assert [c["violations"] for c in verdict.checked] == [3, 1, 1]
    assert [v.prompt_index for v in verdict.violations[:3]] == [0, 1, 2]


def test_lower_bound_and_passing_run(run):
    verdict = judge(run, [parse_gate("top1<0.5"), parse_gate("kl_mean>1")])
    assert verdict.passed and verdict.exit_code == EXIT_OK and verdict.violations == []
    low = judge(run, [parse_gate("prompt:top1<0.75")])
    # prompts 1 and 2 agree on one position of two
    assert [v.prompt_index for v in low.violations] == [1, 2]
    assert low.violations[0].position == 1 and low.violations[1].position == 0


def test_a_null_value_where_others_were_measured_is_a_note(run):
    run["comparisons"][0]["pearson"] = None
    verdict = judge(run, [parse_gate("prompt:pearson<0.5")])
    assert verdict.passed
    assert any("prompt 0: pearson is null" in n for n in verdict.notes)


@pytest.mark.parametrize("gate", ["pearson<0.99", "prompt:pearson<0.5"])
def test_a_tolerance_the_report_holds_no_number_for_fails_as_not_measured(run, gate):
    run["summary"]["min_pearson"] = None
    for comp in run["comparisons"]:
        comp["pearson"] = None
    verdict = judge(run, [parse_gate(gate)])
    assert not verdict.passed and verdict.exit_code == EXIT_PARITY_FAILED
    (violation,) = verdict.violations
    assert violation.value is None and violation.scope == OVERALL
    assert violation.message.startswith(f"{gate}: not measured")


def test_null_first_divergence_means_never(run):
    verdict = judge(run, [parse_gate("prompt:first_divergence<5")])
    assert verdict.violations == [] and verdict.notes == []


def test_verdict_json_is_strict(run):
    verdict = judge(run, default_gates("float32", "float32") + [parse_gate("kl_mean>3*noise")])
    text = json.dumps(verdict.to_json(), allow_nan=False)
    data = json.loads(text)
    assert data["schema_version"] == 1 and data["passed"] is False
    assert {s["gate"] for s in data["skipped"]} == {"kl_mean>3*noise"}
    assert all({"gate", "source", "violations"} <= set(c) for c in data["checked"])


# -- near-tie rule ----------------------------------------------------------------------
def test_argmax_rule_fails_confident_and_allows_near_ties(run):
    verdict = judge(run, [ArgmaxGate()])
    (v,) = verdict.violations
    assert (v.prompt_index, v.position, v.gate) == (1, 1, "argmax:confident")
    assert "confident argmax disagreement" in v.message and "target argmax 1 != reference token 0" in v.message
    assert any("prompt 2" in n and "near-tie" in n for n in verdict.notes)


def test_argmax_rule_can_fail_near_ties(run):
    verdict = judge(run, [ArgmaxGate(near_ties_fail=True)])
    assert [(v.prompt_index, v.position) for v in verdict.violations] == [(1, 1), (2, 0)]
    assert verdict.violations[1].gate == "argmax:any"
    assert "near-tie argmax divergence" in verdict.violations[1].message


def test_confident_mismatch_after_a_near_tie_is_caught():
    run = build_run([(rows(TIE, SURE, SURE), rows(TIE_SWAPPED, SURE_SWAPPED, SURE), [0, 0, 0], [0, 0, 0])])
    comp = run["comparisons"][0]
    assert comp["argmax_divergence"]["kind"] == "near-tie"
    assert metric_value(comp, "confident_mismatches") == 1.0
    (v,) = judge(run, [ArgmaxGate()]).violations
    assert v.position == 1 and v.value == 1.0 and "1 confident argmax mismatches" in v.message


def test_free_running_divergence_is_classified_like_forced():
    # target follows its own argmax: token 1 at position 1, where the reference was confident
    run = build_run([(rows(SURE, SURE, SURE), rows(SURE, SURE_SWAPPED, SURE), [0, 0, 0], [0, 1, 0])], aligned=False)
    comp = run["comparisons"][0]
    assert comp["positions_compared"] == 2 and comp["argmax_divergence"]["kind"] == "disagreement"
    assert [v.position for v in judge(run, [ArgmaxGate()]).violations] == [1]
    tie = build_run([(rows(TIE, SURE), rows(TIE_SWAPPED, SURE), [0, 0], [1, 0])], aligned=False)
    assert judge(tie, [ArgmaxGate()]).passed
    assert not judge(tie, [ArgmaxGate(near_ties_fail=True)]).passed


def test_unclassifiable_token_divergence(run):
    comp = run["comparisons"][0]
    comp.update(argmax_divergence=None, first_divergence=2, tokens_equal=False)
    loose = judge(run, [ArgmaxGate()])
    assert [v.prompt_index for v in loose.violations] == [1]
    assert any("diverge at position 2" in n for n in loose.notes)
    strict = judge(run, [ArgmaxGate(near_ties_fail=True)])
    assert (0, 2) in [(v.prompt_index, v.position) for v in strict.violations]


# -- defaults ---------------------------------------------------------------------------
def _limits(gates):
    return {g.text for g in gates if isinstance(g, MetricGate)}


def test_defaults_per_dtype_pair():
    fp32 = _limits(default_gates("float32", "float32"))
    bf16 = _limits(default_gates("float32", "bfloat16"))
    fp16 = _limits(default_gates("fp32", "fp16"))
    assert {"kl_mean>3e-8", "kl_p99>1e-6", "kl_max>1e-5", "top1<0.97", "kl_nonfinite>0", "positions_compared<1"} <= fp32
    assert {"kl_mean>1e-2", "kl_p99>1e-1", "top1<0.9"} <= bf16
    assert {"kl_mean>2e-3", "kl_p99>2e-2", "top1<0.95"} <= fp16
    # the coarser side decides
    assert _limits(default_gates("bfloat16", "float16")) == bf16
    assert _limits(default_gates("float16", "float32")) == fp16
    gates = default_gates("float32", "bfloat16", near_ties_fail=True)
    (rule,) = [g for g in gates if isinstance(g, ArgmaxGate)]
    assert rule.near_ties_fail and rule.source == "default (float32:bfloat16)"


def test_default_limits_are_ordered_by_precision():
    def kl_mean_limit(ref, tgt):
        return next(g.base for g in default_gates(ref, tgt) if getattr(g, "text", "").startswith("kl_mean>"))

    assert kl_mean_limit("float32", "float32") < kl_mean_limit("float32", "float16") < kl_mean_limit(
        "float32", "bfloat16")


def test_auto_dtype_depends_on_the_device():
    assert canonical_dtype("auto", "cpu") == "float32"
    assert canonical_dtype(None, "cpu") == "float32"
    assert canonical_dtype("auto", "cuda:1") == "bfloat16"
    assert canonical_dtype("auto", None) == "bfloat16"
    assert canonical_dtype("BF16") == "bfloat16" and canonical_dtype("half") == "float16"
    with pytest.raises(UsageError, match="Did you mean 'float16'"):
        canonical_dtype("float61")


def test_run_dtypes_read_sides_and_map_auto():
    run = build_run([(rows(SURE), rows(SURE), [0], [0])], dtypes=("auto", "auto"), target="cuda")
    assert run_dtypes(run) == ("float32", "bfloat16")


def test_defaults_pass_a_clean_fp32_run_and_fail_a_broken_one(run):
    clean = build_run([(rows(SURE, TIE), rows(SURE, TIE), [0, 0], [0, 0])])
    assert judge(clean, default_gates("float32", "float32")).passed
    verdict = judge(run, default_gates("float32", "bfloat16"))
    failed = {v.gate for v in verdict.violations}
    # overall KL mean 0.0300 > 1e-2, prompt 1 KL mean 0.0866 > 5e-2, top-1 4/6 < 0.9, argmax rule on prompt 1
    assert failed == {"kl_mean>1e-2", "prompt:kl_mean>5e-2", "top1<0.9", "argmax:confident", "kl_p99>1e-1"}


def test_nonfinite_kl_gate_is_skipped_on_top_n_captures(run):
    run["settings"]["logprobs"] = 2
    verdict = judge(run, default_gates("float32", "float32"))
    assert [s["gate"] for s in verdict.skipped] == ["kl_nonfinite>0"]
    assert "full-vocabulary" in verdict.skipped[0]["reason"]


def test_infinite_kl_fails_the_default_gate():
    tgt = rows(SURE)
    tgt[0, 3] = -np.inf  # the reference gives token 3 probability 1/8
    run = build_run([(rows(SURE), tgt, [0], [0])])
    assert run["summary"]["distribution"]["kl_nonfinite"] == 1
    assert "kl_nonfinite>0" in {v.gate for v in judge(run, default_gates("float32", "float32")).violations}


# -- the catalogue follows metrics.py ---------------------------------------------------
def test_every_numeric_report_field_is_registered(run):
    def numeric(record):
        return {k for k, v in record.items() if isinstance(v, (int, float)) or v is None}

    def fields(scope):  # the record's own fields and its distribution block's, as the catalogue lists them
        paths = report_paths(scope)
        return [p for p in paths if "." not in p], [p.removeprefix("distribution.") for p in paths if "." in p]

    (SUMMARY_FIELDS, DISTRIBUTION_FIELDS), (PROMPT_FIELDS, prompt_distribution) = fields(OVERALL), fields(PROMPT)
    assert prompt_distribution == DISTRIBUTION_FIELDS
    comp = run["comparisons"][1]
    summary = run["summary"]
    registered_prompt = set(PROMPT_FIELDS) | NOT_METRICS
    registered_summary = set(SUMMARY_FIELDS) | NOT_METRICS
    assert numeric(comp) - {"argmax_divergence", "first_position_topk", "position_stats"} <= registered_prompt
    assert numeric(summary) <= registered_summary
    assert numeric(comp["distribution"]) <= set(DISTRIBUTION_FIELDS) | NOT_METRICS
    # and nothing registered is missing from the report
    assert set(PROMPT_FIELDS) <= set(comp) and set(SUMMARY_FIELDS) <= set(summary)
    assert set(DISTRIBUTION_FIELDS) <= set(summary["distribution"])


def test_derived_metrics(run):
    comp = run["comparisons"][2]
    assert metric_value(comp, "distribution.top1_mismatches") == 1.0
    assert metric_value(comp, "confident_mismatches") == 0.0
    assert metric_value(comp, "tokens_equal") == 1.0
    assert metric_value(comp, "no.such.path") is None
    assert metric_value(run["summary"], "kl_confident_max") is None  # no position has p(top1) >= 0.95


# -- noise ------------------------------------------------------------------------------
def _variant(kl_scale_rows):
    return build_run([(rows(SURE, SURE), kl_scale_rows, [0, 0], [0, 0])])


def test_noise_from_repeats_is_the_range():
    a = _variant(rows(SURE, SURE))
    b = _variant(rows(SURE, SURE_SWAPPED))
    c = _variant(rows(SURE, SURE))
    floor = measure_noise([a, b, c])
    spread = floor.overall["distribution.kl_mean"]
    assert spread.values == pytest.approx([0.0, KL_SURE / 2, 0.0], abs=1e-7)
    assert spread.noise == pytest.approx(KL_SURE / 2, rel=1e-5)
    assert spread.mean == pytest.approx(KL_SURE / 6, rel=1e-5)
    assert spread.std == pytest.approx(np.std([0, KL_SURE / 2, 0], ddof=1), rel=1e-5)
    assert floor.value("distribution.kl_mean", 0) == pytest.approx(KL_SURE / 2, rel=1e-5)
    assert floor.value("distribution.kl_mean", 5) is None


def test_zero_noise_makes_any_nonzero_value_fail(run):
    floor = measure_noise([run, json.loads(json.dumps(run))])
    assert floor.overall["distribution.kl_mean"].noise == 0.0
    verdict = judge(run, [parse_gate("kl_mean>3*noise"), parse_gate("prompt:kl_max>3*noise")], noise=floor)
    assert [(v.scope, v.prompt_index) for v in verdict.violations] == [("overall", None), ("prompt", 1),
                                                                         ("prompt", 2)]
    assert "noise 0" in verdict.violations[0].message and verdict.violations[0].threshold == 0.0


def test_noise_relative_threshold_uses_the_measured_spread():
    a, b = _variant(rows(SURE, SURE)), _variant(rows(SURE, SURE_SWAPPED))
    floor = measure_noise([a, b])
    noise = KL_SURE / 2
    assert judge(b, [parse_gate("kl_mean>1*noise")], noise=floor).passed  # equal, not greater
    verdict = judge(b, [parse_gate("kl_mean>0.5*noise")], noise=floor)
    assert verdict.violations[0].threshold == pytest.approx(noise / 2, rel=1e-5)
    # top-1 moved by 0.5 between the repeats: 0.99 - 1*0.5 = 0.49 < 0.5, so it passes
    assert judge(b, [parse_gate("top1<0.99-noise")], noise=floor).passed
    # the JSON form works the same
    assert not judge(b, [parse_gate("kl_mean>0.5*noise")], noise=noise_to_json(floor)).passed


def test_noise_relative_gate_without_noise_is_skipped_with_a_warning(run):
    verdict = judge(run, [parse_gate("kl_mean>3*noise")])
    assert verdict.passed and verdict.checked == []
    assert "no noise floor was measured" in verdict.skipped[0]["reason"]
    assert verdict.warnings and "kl_mean>3*noise" in verdict.warnings[0]


def test_self_comparison_noise_is_the_distance_from_identical():
    ref_vs_ref = _variant(rows(SURE, SURE_SWAPPED))
    floor = measure_noise([ref_vs_ref], mode="self")
    assert floor.overall["distribution.kl_mean"].noise == pytest.approx(KL_SURE / 2, rel=1e-5)
    assert floor.overall["distribution.top1_rate"].noise == pytest.approx(0.5)
    assert floor.overall["distribution.logppl_reference"].noise == 0.0  # no identity value: range of one


def test_noise_needs_two_repeats_and_the_same_prompts(run):
    with pytest.raises(UsageError, match="at least 2"):
        measure_noise([run])
    other = json.loads(json.dumps(run))
    other["comparisons"][0]["prompt"] = "something else"
    with pytest.raises(UsageError, match="prompts"):
        measure_noise([run, other])


def test_noise_json_round_trip_and_merge():
    a, b = _variant(rows(SURE, SURE)), _variant(rows(SURE, SURE_SWAPPED))
    floor = measure_noise([a, b])
    data = json.loads(json.dumps(noise_to_json(floor), allow_nan=False))
    again = noise_from_json(data)
    assert again.value("distribution.kl_mean") == floor.value("distribution.kl_mean")
    assert again.value("distribution.kl_mean", 0) == floor.value("distribution.kl_mean", 0)
    selfish = measure_noise([_variant(rows(SURE, TIE))], mode="self")
    merged = merge_noise(floor, selfish)
    assert merged.value("distribution.kl_mean") == max(floor.value("distribution.kl_mean"),
                                                       selfish.value("distribution.kl_mean"))
    assert merged.mode == "repeats+self" and merged.runs == 3
    # the larger floor's spread whole: its values are never pooled with the other's
    winner = max((floor, selfish), key=lambda f: f.value("distribution.kl_mean"))
    assert merged.overall["distribution.kl_mean"] == winner.overall["distribution.kl_mean"]
    summaries_only = measure_noise([a["summary"], b["summary"]])
    assert summaries_only.prompts == [] and summaries_only.value("distribution.kl_mean", 0) is None


def test_per_prompt_noise_gate_without_per_prompt_noise_is_skipped():
    a, b = _variant(rows(SURE, SURE)), _variant(rows(SURE, SURE_SWAPPED))
    floor = measure_noise([a["summary"], b["summary"]])
    verdict = judge(b, [parse_gate("prompt:kl_max>noise"), parse_gate("kl_max>noise")], noise=floor)
    assert [s["gate"] for s in verdict.skipped] == ["prompt:kl_max>noise"]
    assert "for any prompt" in verdict.skipped[0]["reason"]
    assert [c["gate"] for c in verdict.checked] == ["kl_max>noise"]
