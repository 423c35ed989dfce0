"""The argmax rule against a yardstick that flips confident argmaxes itself: the target's confident flips judged
against the yardstick's by the exact test of two counts; unchanged without a yardstick, against one without
confident flips, for argmax:any, and for reports saved without the near-tie counts (pure logic, no engine)."""

from __future__ import annotations

import pytest

from vllm_rbln_exec.compare.yardstick import confident_flips
from vllm_rbln_exec.verdict.counts import confident_flip_test
from vllm_rbln_exec.verdict.gates import ArgmaxGate
from vllm_rbln_exec.verdict.judge import judge
from vllm_rbln_exec.verdict.spec import gates_for_run

RULE = "argmax:confident"
POSITIONS = 16  # per prompt: four prompts of 16 tokens, as the zoo's runs


def record(confident: int, near: int = 0, index: int | None = None) -> dict:
    dist = {"kl_mean": 1e-3, "kl_p99": 3e-3, "dp_rms": 0.03, "kl_nonfinite": 0, "top1_rate": 1.0,
            "top1_mismatches": confident + near, "mismatches_near_tie": near, "tie_margin": 0.5}
    rec = {"positions_compared": POSITIONS, "distribution": dist}
    if index is not None:
        rec.update(index=index, prompt=f"prompt {index}")
    return rec


def summary(counts: list[int], near: int = 0) -> dict:
    rec = record(sum(counts), near)
    rec["positions_compared"] = POSITIONS * len(counts)
    return rec


def report(target: list[int], yard: list[int] | None, near: int = 0) -> dict:
    run = {"model": "m", "target": "cpu", "settings": {"logprobs": -1},
           "sides": {"reference": {"dtype": "float32", "device": "cpu"},
                     "target": {"dtype": "bfloat16", "device": "cpu"}},
           "summary": summary(target, near), "comparisons": [record(c, near, i) for i, c in enumerate(target)]}
    if yard is not None:
        run["yardstick"] = {"side": {"engine": "vllm", "dtype": "bfloat16", "device": "cpu", "source": "worker"},
                            "why": "auto", "summary": summary(yard, near),
                            "comparisons": [record(c, near, i) for i, c in enumerate(yard)]}
    return run


def argmax_violations(run: dict, near_ties_fail: bool = False) -> list:
    return judge(run, [ArgmaxGate(near_ties_fail=near_ties_fail)]).violations


@pytest.mark.parametrize("yard", [None, [0, 0, 0, 0]])
def test_without_a_yardstick_or_against_one_without_confident_flips_any_confident_flip_fails(yard):
    violations = argmax_violations(report([0, 1, 0, 0], yard))
    assert [v.prompt_index for v in violations] == [1]
    assert "1 confident argmax mismatches" in violations[0].message and "yardstick" not in violations[0].message
    assert not any("Confident argmax flips" in f for f in judge(report([0, 1, 0, 0], yard), []).findings)


@pytest.mark.parametrize("target, yard", [
    ([0, 1, 0, 0], [0, 1, 0, 0]),  # zoo-mixtral's honest vLLM bf16 against its yardstick (itself)
    ([0, 0, 1, 0], [0, 1, 0, 0]),  # zoo-mixtral's honest transformers bf16: the flip on another prompt
    ([1, 1, 1, 1], [2, 0, 1, 1]),  # equal counts
    ([3, 0, 0, 0], [1, 1, 1, 1]),  # fewer
])
def test_as_many_confident_flips_as_the_yardstick_pass_and_say_why(target, yard):
    run = report(target, yard)
    verdict = judge(run, gates_for_run(run))
    assert verdict.passed, [v.message for v in verdict.violations]
    note = [n for n in verdict.notes if "confident flips against the yardstick's" in n]
    assert note and "as honest rounding gives" in note[0] and RULE in note[0]
    sentence = [f for f in verdict.findings if f.startswith("Confident argmax flips")]
    assert sentence and f"{sum(target)} confident flips against the yardstick's {sum(yard)} over 64" in sentence[0]


def test_a_target_with_many_more_confident_flips_than_the_yardstick_fails_once_saying_so():
    violations = argmax_violations(report([4, 3, 3, 2], [0, 1, 0, 0]))
    assert len(violations) == 1
    v = violations[0]
    assert v.gate == RULE and v.value == 12 and v.yardstick == 1 and v.prompt_index == 0
    assert "12 confident flips against the yardstick's 1 over 64 positions: more than honest rounding gives" in \
        v.message
    assert "first: prompt 0" in v.message


def test_the_boundary_is_the_exact_test_at_one_percent():
    # equal rates, one yardstick flip: 9 flips give p = 11/1024 >= 0.01, 10 give 12/2048 < 0.01
    assert confident_flip_test(9, 1, 64, 64)[0] is False
    assert confident_flip_test(10, 1, 64, 64)[0] is True
    assert not argmax_violations(report([3, 3, 3, 0], [0, 1, 0, 0]))
    assert len(argmax_violations(report([3, 3, 3, 1], [0, 1, 0, 0]))) == 1


def test_argmax_any_still_fails_on_every_flip_whatever_the_yardstick():
    violations = argmax_violations(report([0, 1, 0, 0], [0, 1, 0, 0]), near_ties_fail=True)
    assert [v.prompt_index for v in violations] == [1] and violations[0].gate == "argmax:any"


def test_a_report_saved_without_the_near_tie_counts_judges_as_before():
    run = report([0, 1, 0, 0], [0, 1, 0, 0])
    for rec in [run["yardstick"]["summary"], *run["yardstick"]["comparisons"]]:
        del rec["distribution"]["mismatches_near_tie"]
    assert confident_flips(run) is None
    violations = argmax_violations(run)
    assert [v.prompt_index for v in violations] == [1] and "yardstick" not in violations[0].message
    assert not any(f.startswith("Confident argmax flips") for f in judge(run, []).findings)
