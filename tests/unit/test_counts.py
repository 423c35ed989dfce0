"""Argmax flips judged as counts: the exact test's arithmetic, its false-alarm rate on simulated counts, and the
built-in ``mismatches>2*yardstick`` as a gate (pure logic, no engine)."""

from __future__ import annotations

import math
import random

import pytest

from vllm_rbln_exec.verdict.counts import COUNT_ALPHA, binomial_tail, critical_count, excess_p_value
from vllm_rbln_exec.verdict.gates import parse_gate
from vllm_rbln_exec.verdict.judge import judge
from vllm_rbln_exec.verdict.spec import gates_for_run

POSITIONS = 128  # the default run: 4 built-in prompts x 32 tokens


def run_with_flips(t: int, y: int, positions: int = POSITIONS, kl: float = 1e-3) -> dict:
    def record(flips: int) -> dict:
        dist = {"kl_mean": kl, "kl_p99": 3 * kl, "dp_rms": math.sqrt(kl), "top1_mismatches": flips, "kl_nonfinite": 0,
                "mismatches_near_tie": flips, "top1_rate": 1 - flips / positions}
        return {"index": 0, "prompt": "p", "positions_compared": positions, "distribution": dist}

    return {"model": "m", "target": "cpu", "settings": {"logprobs": -1},
            "sides": {"reference": {"dtype": "float32", "device": "cpu"},
                      "target": {"dtype": "bfloat16", "device": "cpu"}},
            "summary": record(t), "comparisons": [record(t)],
            "yardstick": {"side": {"engine": "vllm", "dtype": "bfloat16", "device": "cpu"},
                          "summary": record(y), "comparisons": [record(y)]}}


def test_binomial_tail_is_exact():
    assert binomial_tail(0, 5, 0.3) == 1.0 and binomial_tail(6, 5, 0.3) == 0.0
    assert binomial_tail(4, 5, 0.5) == pytest.approx(6 / 32)
    assert binomial_tail(3, 10, 0.2) == pytest.approx(sum(math.comb(10, i) * 0.2**i * 0.8 ** (10 - i)
                                                          for i in range(3, 11)))
    assert 0.0 < binomial_tail(900, 2000, 0.4) < 1.0  # thousands of positions: no overflow


def test_the_issues_held_out_honest_target_passes_and_many_flips_against_none_fail():
    # transformers CPU bf16 against the vLLM CPU bf16 yardstick on SmolLM2: 4 near-tie flips against 1 (p = 0.46)
    assert excess_p_value(4, 1, 2.0) == pytest.approx(0.4609, abs=1e-4)
    assert judge(run_with_flips(4, 1), [parse_gate("mismatches>2*yardstick")]).passed
    assert critical_count(0, 2.0) == 12 and critical_count(1, 2.0) == 16
    verdict = judge(run_with_flips(12, 0), [parse_gate("mismatches>2*yardstick")])
    assert not verdict.passed
    message = verdict.violations[0].message
    assert "mismatches = 12 > 11" in message and "one-sided exact test p = 0.0077 < 0.01" in message


def test_unequal_positions_scale_the_expected_share():
    # the same 6 flips are more surprising over half the yardstick's positions
    assert excess_p_value(6, 3, 1.0, n_t=64, n_y=128) < excess_p_value(6, 3, 1.0, n_t=128, n_y=128)


def simulated_false_alarms(rate_target: float, rate_yard: float, k: float, trials: int, seed: int) -> float:
    rng = random.Random(seed)
    alarms = 0
    for _ in range(trials):
        t = sum(rng.random() < rate_target for _ in range(POSITIONS))
        y = sum(rng.random() < rate_yard for _ in range(POSITIONS))
        alarms += excess_p_value(t, y, k, POSITIONS, POSITIONS) < COUNT_ALPHA
    return alarms / trials


@pytest.mark.parametrize("rate", [0.01, 0.03, 0.1])
def test_equal_flip_rates_almost_never_fail(rate):
    # honest sides flip at the same near-ties: equal rates fail far below the stated 1 % (measured 0.0-0.1 %)
    assert simulated_false_alarms(rate, rate, 2.0, 3000, seed=1) <= 0.002


@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_at_the_boundary_the_false_alarm_rate_is_the_stated_one(rate):
    # a target flipping exactly twice as often as the yardstick: failed at most COUNT_ALPHA of the time
    # (3000 trials: the Monte Carlo error is ~0.2 %)
    assert simulated_false_alarms(2 * rate, rate, 2.0, 3000, seed=2) <= COUNT_ALPHA + 0.006


def test_a_target_flipping_far_more_often_is_caught():
    # 32 flips in 128 against ~3: caught in ~91 % of runs (a 7.5x rate, 19 against 3, in ~39 %: 128 positions
    # cannot tell more; confident flips are the argmax rule's, which fails on one)
    assert simulated_false_alarms(0.25, 0.02, 2.0, 500, seed=3) >= 0.85


def test_the_built_in_rule_is_the_test_and_a_users_tolerance_on_the_same_metric_replaces_it():
    run = run_with_flips(12, 0)
    gates = gates_for_run(run)
    assert "mismatches>2*yardstick" in {g.text for g in gates}
    assert not judge(run, gates).passed
    relaxed = gates_for_run(run, cli_exprs=["mismatches>20"])
    assert "mismatches>2*yardstick" not in {g.text for g in relaxed} and judge(run, relaxed).passed


def test_prompt_scope_counts_are_tested_per_prompt():
    verdict = judge(run_with_flips(16, 1), [parse_gate("prompt:mismatches>2*yardstick")])
    assert not verdict.passed and verdict.violations[0].prompt_index == 0
