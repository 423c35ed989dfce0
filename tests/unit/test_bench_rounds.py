"""How ``scripts/bench.py`` folds repeated rounds into one row per variant (pure logic)."""

from __future__ import annotations

import importlib.util

import pytest
from tests.helpers import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_script", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(total, generate=None, rss=100):
    return {"total_s": total, "generate_s": generate if generate is not None else total, "peak_rss_mib": rss}


def test_ratios_pair_each_round_with_its_own_plain_run(bench):
    # Round 2 ran on a slow machine: both sides slowed down, the paired ratio did not.
    rounds = [
        {"plain": _row(1.0), "fast": _row(1.2, rss=90)},
        {"plain": _row(3.0), "fast": _row(3.3, rss=120)},
        {"plain": _row(1.1), "fast": _row(1.43)},
    ]
    rows = bench.aggregate_rounds(rounds)
    fast = rows["fast"]
    assert fast["rounds"] == 3
    assert fast["x_plain_rounds"] == pytest.approx([1.2, 1.1, 1.3])
    assert fast["x_plain"] == pytest.approx(1.2)  # not 5.93/5.1 = 1.16 from summed times
    assert fast["x_plain_range"] == pytest.approx([1.1, 1.3])
    assert fast["total_s"] == 1.43  # the median round's own row
    assert fast["total_s_rounds"] == [1.2, 3.3, 1.43]
    assert fast["peak_rss_mib"] == 120  # the worst round
    assert rows["plain"]["x_plain"] == 1.0 and rows["plain"]["total_s"] == 1.1


def test_an_even_number_of_rounds_keeps_a_measured_row(bench):
    rows = bench.aggregate_rounds([{"plain": _row(2.0)}, {"plain": _row(1.0)}])
    assert rows["plain"]["total_s"] == 1.0  # the lower median, a run that happened


def test_rounds_below_one_are_refused(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--rounds", "0"])
    assert exc.value.code == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err
