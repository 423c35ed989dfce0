"""The yardstick: K*yardstick tolerances, the floored ratio, the auto rule, the defaults it adds,
the prefill-or-decode split, and reports with and without one (pure logic, no engine)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vllm_rbln_exec.compare.catalogue import floor
from vllm_rbln_exec.compare.distribution import phase_kl, phase_means, position_stats
from vllm_rbln_exec.compare.yardstick import RATIO_METRICS, ratio, ratio_table, yardstick_value
from vllm_rbln_exec.core.errors import UsageError
from vllm_rbln_exec.outputs.files import markdown_summary
from vllm_rbln_exec.setup.devices import load_profiles
from vllm_rbln_exec.setup.options import build_options
from vllm_rbln_exec.setup.sides import (
    YARDSTICK,
    YardstickSpec,
    parse_yardstick,
    resolve_side,
    yardstick_options,
)
from vllm_rbln_exec.verdict.defaults import BACKSTOP_TOLERANCES, YARDSTICK_TOLERANCES, default_gates
from vllm_rbln_exec.verdict.expressions import parse_tolerance
from vllm_rbln_exec.verdict.findings import DECODE_ONLY_SHARE, phase_sentence, precision_sentence, yardstick_sentence
from vllm_rbln_exec.verdict.gates import parse_gate
from vllm_rbln_exec.verdict.judge import judge
from vllm_rbln_exec.verdict.spec import gates_for_run

ENGINES = ("vllm", "transformers")
KL = "distribution.kl_mean"


def record(kl: float, flips: int = 0, prompt: str = "p", index: int = 0, **extra) -> dict:
    dist = {"kl_mean": kl, "kl_p99": 3 * kl, "dp_rms": math.sqrt(kl), "top1_mismatches": flips, "kl_nonfinite": 0,
            "mismatches_near_tie": flips, "top1_rate": 1.0}
    return {"index": index, "prompt": prompt, "positions_compared": 8, "distribution": dist, **extra}


def report(target: list[float], yard: list[float] | None, flips=(0, 0)) -> dict:
    comps = [record(kl, flips[0], f"prompt {i}", i) for i, kl in enumerate(target)]
    run = {"model": "m", "target": "cpu", "settings": {"logprobs": -1},
           "sides": {"reference": {"dtype": "float32", "device": "cpu"},
                     "target": {"dtype": "bfloat16", "device": "cpu"}},
           "summary": {**record(float(np.mean(target)), flips[0]), "prompts": len(target)}, "comparisons": comps}
    if yard is not None:
        run["yardstick"] = {"side": {"engine": "vllm", "dtype": "bfloat16", "device": "cpu", "source": "worker"},
                            "why": "auto", "summary": record(float(np.mean(yard)), flips[1]),
                            "comparisons": [record(kl, flips[1], f"prompt {i}", i) for i, kl in enumerate(yard)]}
    return run


# -- K*yardstick expressions --------------------------------------------------------------------
@pytest.mark.parametrize("expr, base, k", [("kl_mean>3*yardstick", 0.0, 3.0), ("kl_mean > yardstick", 0.0, 1.0),
                                           ("kl_p99>1e-4+2.5*yardstick", 1e-4, 2.5)])
def test_yardstick_terms_parse(expr, base, k):
    tol = parse_tolerance(expr)
    assert (tol.base, tol.yardstick_k, tol.noise_k) == (base, k, None)


@pytest.mark.parametrize("expr, message", [
    ("top1<3*yardstick", "needs a base value"),
    ("top1<0.99-3*yardstick", "upper bound only"),
    ("kl_mean>1e-4-2*yardstick", "must widen"),
    ("kl_mean>-2*yardstick", "must be a finite number >= 0"),
    ("kl_mean>3*yardstik", "not a number"),
])
def test_bad_yardstick_terms_are_usage_errors(expr, message):
    with pytest.raises(UsageError, match=message):
        parse_tolerance(expr)


# -- gates relative to the yardstick -------------------------------------------------------------
def test_a_target_within_k_times_the_yardstick_passes_and_beyond_fails():
    gate = parse_gate("kl_mean>3*yardstick")
    assert not gate.check(report([1e-3, 2e-3], [1e-3, 1e-3]), None)
    (v,) = gate.check(report([4e-3, 4e-3], [1e-3, 1e-3]), None)
    assert v.threshold == pytest.approx(3e-3) and v.yardstick == pytest.approx(1e-3)
    assert "yardstick 0.001" in v.message and v.noise is None


def test_per_prompt_yardstick_tolerances_compare_each_prompt_with_the_yardstick_of_that_prompt():
    violations = parse_gate("prompt:kl_mean>2*yardstick").check(report([1e-3, 5e-3], [1e-3, 2e-3]), None)
    assert [v.prompt_index for v in violations] == [1]


def test_a_yardstick_below_the_floor_is_taken_at_the_floor():
    run = report([2e-8], [0.0])
    assert yardstick_value(run, KL) == floor(KL) > 0
    assert not parse_gate("kl_mean>3*yardstick").check(run, None)
    assert parse_gate("kl_mean>3*yardstick").check(report([4 * floor(KL)], [0.0]), None)


def test_flip_ratios_in_tables_count_a_yardstick_without_flips_as_one():
    # the ratio column of the reports keeps its floor; the tolerance judges counts by their test (test_counts.py)
    assert ratio(4, 0, "distribution.top1_mismatches") == 4 and ratio(0, 0, "distribution.top1_mismatches") == 0


def test_without_a_yardstick_a_relative_tolerance_is_skipped_with_a_warning_never_passed():
    verdict = judge(report([1.0], None), [parse_gate("kl_mean>3*yardstick")])
    assert verdict.passed and not verdict.checked
    assert "has none" in verdict.skipped[0]["reason"] and verdict.warnings


def test_ratio_table_has_the_four_metrics_overall_and_per_prompt():
    table = ratio_table(report([2e-3, 4e-3], [1e-3, 1e-3]))
    assert list(table["overall"]) == list(RATIO_METRICS)
    assert table["overall"][KL]["ratio"] == pytest.approx(3.0)
    assert [p[KL]["ratio"] for p in table["prompts"]] == pytest.approx([2.0, 4.0])


# -- the built-in tolerances with a yardstick ----------------------------------------------------
def test_with_a_yardstick_the_ratios_judge_and_the_fixed_limits_shrink_to_the_gross_backstop():
    plain = {g.text for g in default_gates("float32", "bfloat16")}
    with_yard = {g.text for g in default_gates("float32", "bfloat16", yardstick=True)}
    relative = {parse_gate(e).text for e, _ in YARDSTICK_TOLERANCES}
    assert relative <= with_yard and not relative & plain
    assert {parse_gate(e).text for e, _ in BACKSTOP_TOLERANCES} <= with_yard
    assert "kl_mean>1e-2" in plain and "kl_mean>1e-2" not in with_yard  # the dtype's limit, without a yardstick only
    assert {g.text for g in gates_for_run(report([1e-3], [1e-3]))} >= relative
    assert not {g.text for g in gates_for_run(report([1e-3], None))} & relative
    # float32 keeps its measured limits even with a (named) yardstick
    assert "kl_mean>3e-8" in {g.text for g in default_gates("float32", "float32", yardstick=True)}


@pytest.mark.parametrize("kl, yard_kl, passed", [
    (2.11e-2, 2.11e-2, True),  # Gemma-3-270M's honest bf16 (ratio 1.000): failed on the fixed limits before
    (2.11e-2, None, False),  # the same run without a yardstick: the dtype's fixed limit (1e-2) judges
    (1.2e-1, 1.2e-1, True),  # an honest MoE bf16 at ratio 1 (zoo-mixtral: 0.092 vLLM, 0.103 transformers): old backstop 1e-1
    (6e-1, 6e-1, False),  # the yardstick itself grossly off: the backstop (kl_mean>5e-1)
    (5e-3, 1e-3, False),  # 5x the yardstick
])
def test_a_target_at_its_yardstick_passes_whatever_the_model_and_the_backstop_catches_a_broken_yardstick(
        kl, yard_kl, passed):
    run = report([kl, kl], None if yard_kl is None else [yard_kl, yard_kl])
    assert judge(run, gates_for_run(run)).passed is passed


# -- the side --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("auto", YardstickSpec("auto")), ("NONE", YardstickSpec("none")), (None, YardstickSpec("auto")),
    ("vllm:bf16", YardstickSpec("named", "vllm", "bfloat16")), ("fp16", YardstickSpec("named", None, "float16")),
    ("transformers", YardstickSpec("named", "transformers", None)),
    ("bfloat16:transformers", YardstickSpec("named", "transformers", "bfloat16")),
])
def test_parse_yardstick(text, expected):
    assert parse_yardstick(text, ENGINES) == expected


@pytest.mark.parametrize("text, hint", [("bogus", "Known: "), ("vlm", "Did you mean 'vllm'"),
                                        ("autoo", "Did you mean 'auto'"), ("vllm:bf16:x", "unknown choice"),
                                        ("vllm:vllm", "unknown choice")])
def test_bad_yardstick_names_the_choices(text, hint):
    with pytest.raises(UsageError, match="--yardstick") as exc:
        parse_yardstick(text, ENGINES)
    assert hint in exc.value.message and "ENGINE[:DTYPE]" in exc.value.message


def sides(target_device="cpu", target_dtype=None, reference_engine="vllm"):
    options = build_options(target=target_device, target_dtype=target_dtype, reference_engine=reference_engine)
    profiles = load_profiles(None)
    ref = resolve_side(options.reference, profiles["cpu"], options.capture, "/m", "m")
    tgt = resolve_side(options.target, profiles[target_device], options.capture, "/m", "m")
    return options, profiles, ref, tgt


@pytest.mark.parametrize("device, dtype, wanted", [("cpu", None, None), ("cpu", "float32", None),
                                                   ("cpu", "bfloat16", "bfloat16"), ("cpu", "float16", "float16"),
                                                   ("cuda", None, "bfloat16"), ("cuda-fp32", "float32", None)])
def test_auto_adds_a_yardstick_only_when_the_target_is_coarser(device, dtype, wanted):
    _, profiles, ref, tgt = sides(device, dtype)
    asked, why = yardstick_options(YardstickSpec("auto"), ref, tgt)
    assert (asked.dtype if asked else None) == wanted and why
    if asked is not None:
        side = resolve_side(asked, profiles[ref.device], sides()[0].capture, ref.checkpoint, "m")
        assert (side.role, side.device, side.engine, side.checkpoint) == (YARDSTICK, "cpu", "vllm", "/m")


def test_a_named_yardstick_runs_even_at_the_same_precision_and_none_never_does():
    _, _, ref, tgt = sides("cpu", "float32", reference_engine="transformers")
    asked, _ = yardstick_options(YardstickSpec("named", None, "bfloat16"), ref, tgt)
    assert (asked.engine, asked.dtype, asked.device) == ("transformers", "bfloat16", "cpu")
    assert yardstick_options(YardstickSpec("none"), *sides("cpu", "bfloat16")[2:])[0] is None


# -- prefill or decode -----------------------------------------------------------------------------
def test_phase_kl_splits_position_zero_from_the_rest():
    rng = np.random.default_rng(0)
    ref = np.log(rng.dirichlet(np.ones(16), size=6))
    tgt = ref.copy()
    tgt[3:] = np.log(rng.dirichlet(np.ones(16), size=3))  # positions 3.. moved: a decode-only error
    stats = position_stats(ref, tgt, np.zeros(6, dtype=np.int64), 5, 0.5)
    first, rest = phase_kl(stats)
    assert first == 0.0 and rest == pytest.approx(stats.kl[1:].mean())
    assert phase_means([(1.0, 2.0, 1), (3.0, 5.0, 3), (math.nan, math.nan, 0)]) == {
        "kl_prefill": 2.0, "kl_decode": pytest.approx((2.0 + 15.0) / 4)}


@pytest.mark.parametrize("prefill, decode, words", [
    (1e-3, 1e-3, "already there at position 0"),
    (DECODE_ONLY_SHARE * 1e-3 / 2, 1e-3, "only after position 0"),
    (1e-9, 2e-9, "nothing to place"),
])
def test_phase_sentence(prefill, decode, words):
    assert words in phase_sentence({"summary": {"kl_prefill": prefill, "kl_decode": decode}})


def phased(prefill: float, decode: float, yard: tuple[float, float] | None = None, **settings) -> dict:
    run = {"summary": {"kl_prefill": prefill, "kl_decode": decode}, "settings": settings}
    if yard is not None:
        run["yardstick"] = {"side": {}, "summary": {"kl_prefill": yard[0], "kl_decode": yard[1]}}
    return run


@pytest.mark.parametrize("target, yard, words, absent", [
    # Gemma-3-270M's honest bf16: large KL, ratio ~1 in both phases: nothing to look for
    ((0.08, 0.02), (0.08, 0.02), "where honest rounding at this precision puts them, nothing to place", "look at"),
    ((0.5, 0.02), (0.08, 0.02), "excess over honest rounding is already there at position 0", "nothing to place"),
    ((0.08, 0.5), (0.08, 0.02), "excess over honest rounding appears only after position 0", "nothing to place"),
])
def test_the_phase_sentence_reads_the_yardstick(target, yard, words, absent):
    text = phase_sentence(phased(*target, yard))
    assert words in text and absent not in text


def test_a_server_scored_in_one_prefill_pass_has_no_decode_steps():
    run = phased(1e-4, 5e-3, target_url="http://h/v1", align="forced")
    text = phase_sentence(run)
    assert "ran no decode steps" in text and "decode kernels" not in text and "(decode steps)" not in text
    assert "decode kernels" in phase_sentence(phased(1e-4, 5e-3, target_url="http://h/v1", align="free"))


def test_a_servers_auto_dtype_is_stated_as_an_assumption():
    run = {"settings": {"target_url": "http://h/v1"}, "sides": {"target": {"dtype": "auto", "device": "server"}}}
    assert "an assumption" in precision_sentence(run)
    run["sides"]["target"]["dtype"] = "bfloat16"
    assert precision_sentence(run) is None
    assert precision_sentence({"settings": {}, "sides": {"target": {"dtype": "auto", "device": "cpu"}}}) is None


def test_phase_sentence_is_absent_for_reports_without_the_split():
    assert phase_sentence({"summary": {}}) is None


# -- reports -----------------------------------------------------------------------------------------
def test_reports_show_the_yardstick_and_old_reports_render_without_one():
    run = report([4e-3], [1e-3])
    verdict = judge(run, gates_for_run(run))
    assert not verdict.passed and "4x the yardstick" in yardstick_sentence(run)
    text = markdown_summary(run, verdict)
    assert "**Yardstick**" in text and "**4**" in text
    old = report([1e-3], None)
    old_text = markdown_summary(old, judge(old, gates_for_run(old)))
    assert "**Yardstick**" not in old_text and yardstick_sentence(old).startswith("No yardstick: this bfloat16")
    old["sides"]["target"]["dtype"] = "float32"
    assert yardstick_sentence(old) is None  # float32 is judged by measured limits: nothing to add


def test_spec_files_take_yardstick_tolerances_per_dtype_pair():
    from vllm_rbln_exec.verdict.spec import parse_spec, resolve_gates

    spec = parse_spec({"dtypes": {"float32:bfloat16": {"fail-on": ["kl_mean>1.5*yardstick"]}}}, "inline")
    gates = resolve_gates(spec, "m", "float32", "bfloat16", yardstick=True)
    kl = [g for g in gates if getattr(g, "path", None) == KL and g.scope == "overall"]
    assert [g.text for g in kl] == ["kl_mean>1.5*yardstick"]  # replaces the defaults on that metric
    assert kl[0].yardstick_k == 1.5 and "spec" in kl[0].source


# -- a declared quantisation -------------------------------------------------------------------------
def test_a_declared_quantisation_keeps_only_the_gross_and_structural_gates_and_is_read_from_the_report():
    gates = {g.text for g in default_gates("float32", "bfloat16", yardstick=True, quantization="w8a8")}
    assert gates == {"kl_mean>1", "prompt:kl_mean>2", "positions_compared<1", "kl_nonfinite>0"}
    run = report([0.3, 0.3], [1e-3, 1e-3], flips=(40, 1))  # W4A16-sized KL, many flips: what it does by design
    assert not judge(run, gates_for_run(run)).passed
    run["settings"]["target_quantization"] = "w4a16"
    verdict = judge(run, gates_for_run(run))
    assert verdict.passed and any("declared to quantise (w4a16)" in f for f in verdict.findings)
    assert any("declared quantisation (w4a16) costs" in f for f in verdict.findings)


@pytest.mark.parametrize("label, ok", [("w8a8", True), ("q4_1-a8", True), ("fp8:e4m3", True), ("", False),
                                       ("w8 a8", False), ("x" * 41, False), ("$(rm)", False)])
def test_the_quantisation_label_is_checked(label, ok):
    if ok:
        assert build_options(target_quantization=label).gates.target_quantization == label
    else:
        with pytest.raises(UsageError, match="--target-quantization"):
            build_options(target_quantization=label)


def test_the_findings_read_rounding_where_the_verdict_passes_it():
    from vllm_rbln_exec.verdict.findings import ROUNDING_RATIO

    assert parse_gate(YARDSTICK_TOLERANCES[0][0]).path == KL
    assert parse_gate(YARDSTICK_TOLERANCES[0][0]).yardstick_k == ROUNDING_RATIO
    # Gemma-3-270M, transformers bf16 against the vLLM bf16 yardstick (4 x 16): 2.00x overall, 7.32x on one prompt
    run = report([0.00313, 0.00299, 0.0150, 0.0041], [0.0033, 0.0030, 0.00205, 0.00091])
    verdict = judge(run, gates_for_run(run))
    assert verdict.passed and "within what honest rounding" in yardstick_sentence(run)
