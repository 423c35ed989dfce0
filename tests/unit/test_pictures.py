"""Plots and trends from synthetic reports: what each plot draws, what it says it cannot draw, the trend's rules.

No process, no torch: report dicts are built here, including the optional keys
of the parallel issues (``yardstick``, ``localization``) in the shape
``outputs.plotdata`` documents; matplotlib draws in memory (Agg).
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest

from vllm_rbln_exec.outputs import plotdata, trend

SRC = Path(__file__).resolve().parents[2] / "src" / "vllm_rbln_exec"


def comparison(index: int, kl, top1, margin, dp=None) -> dict:
    n = len(kl)
    return {"index": index, "prompt": f"prompt {index}", "positions_compared": n,
            "distribution": {"kl_mean": 0.01, "kl_max": 0.05, "top1_rate": sum(top1) / n},
            "series": {"version": 1, "kl": kl, "top1": top1, "p_top1": [0.5] * n, "margin": margin,
                       "dp": dp or [0.01] * n}}


def report(**extra) -> dict:
    comps = [comparison(0, [0.001, 0.02, None, 0.0], [1, 0, 1, 0], [2.0, 0.1, 1.0, 3.0]),
             comparison(1, [0.003, 0.004, 0.005, 0.006], [1, 1, 1, 1], [1.0, 1.0, 1.0, 1.0])]
    dist = {"positions": 8, "kl_mean": 0.006, "kl_median": 0.004, "kl_p90": 0.01, "kl_p99": 0.02, "kl_p999": 0.02,
            "kl_max": 0.02, "tie_margin": 0.5, "top1_rate": 0.75, "dp_p01": -0.01, "dp_p99": 0.02,
            "kl_buckets": [{"range": "[0,0.25)", "count": 0, "kl_mean": None, "kl_max": None, "top1_rate": None},
                           {"range": "[0.95,1]", "count": 8, "kl_mean": 0.006, "kl_max": 0.02, "top1_rate": 0.75}]}
    run = {"model": "m", "target": "cpu", "prompts": ["a", "b"], "settings": {"num_hidden_layers": None},
           "summary": {"positions_compared": 8, "distribution": dist, "max_abs_diff": 0.3},
           "comparisons": comps, "sides": {"reference": {}, "target": {}}}
    run.update(extra)
    return run


def by_name(run: dict, noise=None) -> dict[str, plotdata.Plot]:
    return {p.name: p for p in plotdata.run_plots(run, noise)}


def test_flips_and_near_ties_are_marked_and_an_infinite_kl_is_named_not_drawn_as_zero():
    plots = by_name(report())
    rows = plots["kl-positions"].data["rows"]
    assert rows[0]["flips"] == [1, 3] and rows[0]["near_ties"] == [1]  # margin 0.1 < 0.5; 3.0 is a real flip
    assert rows[1]["flips"] == []
    assert rows[0]["kl"][2] is None
    assert any("1 position(s) with an infinite or NaN KL" in n for n in plots["kl-positions"].notes)
    dist = plots["kl-distribution"]
    assert 0.0 not in dist.data["values"] and None not in dist.data["values"] and len(dist.data["values"]) == 6
    assert any("KL exactly 0" in n for n in dist.notes) and any("infinite or NaN" in n for n in dist.notes)
    assert plots["flips"].data["tie_margin"] == 0.5
    assert any("no positions in [0,0.25)" in n for n in plots["kl-confidence"].notes)


def test_an_old_report_draws_what_its_summary_allows_and_names_the_rest():
    run = report()
    for c in run["comparisons"]:
        del c["series"]
    plots = by_name(run)
    for name in ("kl-positions", "delta-p", "flips"):
        assert plots[name].data is None and "without per-position values" in plots[name].missing
    assert plots["kl-distribution"].data["quantiles"][0] == ("median", 0.004)
    assert plots["kl-confidence"].data is not None
    assert "not localised" in plots["layers"].missing and "profiled" in plots["speed"].missing


def test_noise_floor_yardstick_and_layers_are_drawn_when_the_report_has_them():
    yard_comps = [{"series": {"kl": [0.01, 0.02]}}]
    run = report(yardstick={"label": "bf16", "summary": {"distribution": {"kl_mean": 0.004}},
                            "comparisons": yard_comps},
                 localization={"layers": [{"name": "embed", "rel_l2": 1e-6, "yardstick_rel_l2": None},
                                          {"name": "layers.0", "rel_l2": None, "yardstick_rel_l2": None},
                                          {"name": "layers.1", "rel_l2": 3e-3, "yardstick_rel_l2": 1e-3}],
                               "layer": "layers.1", "verdict": "created", "yardstick": None,
                               "rule": {"k": 3.0, "floor": 1e-4}})
    noise = {"overall": {"distribution.kl_mean": {"noise": 0.002}}}
    plots = by_name(run, noise)
    lines = dict(plots["kl-distribution"].data["lines"])
    assert lines["noise floor (KL mean)"] == 0.002 and lines["yardstick KL mean"] == 0.004
    assert plots["kl-distribution"].data["others"]["yardstick"] == [0.01, 0.02]
    layers = plots["layers"].data["layers"]
    assert [name for name, _, _ in layers] == ["embed", "layers.0", "layers.1"]
    assert layers[1][1] is None and "layers.0" in plots["layers"].notes[0]  # not measured: said, not drawn as 0
    assert plots["layers"].data["first_over"] == "layers.1" and plots["layers"].data["threshold"] == 3.0 * 1e-4


def test_figures_become_inline_svg_that_follows_the_page_colour_and_keeps_ids_apart():
    from vllm_rbln_exec.outputs import plots

    run = report(localization={"layers": [{"name": "a", "rel_l2": 1e-4, "yardstick_rel_l2": 1e-4},
                                          {"name": "b", "rel_l2": 1e-2, "yardstick_rel_l2": 1e-4}], "layer": "b"})
    svgs = {}
    for plot in plotdata.run_plots(run):
        if plot.data is not None:
            svgs[plot.name] = plots.svg_text(plots.draw(plot, "inline"), plot.name)
    assert set(svgs) == {"kl-positions", "kl-distribution", "kl-confidence", "delta-p", "flips", "layers"}
    for name, svg in svgs.items():
        assert svg.startswith("<svg") and "currentColor" in svg and plots.INK not in svg, name
        assert not re.search(r'<svg[^>]* width="', svg), name  # scales with its box
        ids = re.findall(r'id="([^"]+)"', svg)
        assert ids and all(i.startswith(name + "-") for i in ids), name
        assert set(re.findall(r'url\(#([^)]+)\)', svg)) <= set(ids), name  # every reference resolves here


def test_matplotlib_is_imported_only_inside_the_functions_of_outputs_plots():
    places = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                if any(n.split(".")[0] == "matplotlib" for n in names):
                    places.append((path.relative_to(SRC).as_posix(), id(node) in inside))
    assert places and all(where == "outputs/plots.py" and in_function for where, in_function in places), places


# -- the trend -----------------------------------------------------------------------------------
def test_runs_of_other_models_layer_cuts_or_prompts_are_named_as_different():
    a, b, c = report(), report(), report()
    assert trend.differences(["a", "b"], [a, b]) == []
    b["model"] = "other"
    c["prompts"] = ["a", "B changed"]
    found = trend.differences(["a", "b", "c"], [a, b, c])
    assert found == ["model: a has 'm', b has 'other'", "prompt 1: a has 'b', c has 'B changed'"]
    d = copy.deepcopy(a)
    d["prompts"], d["settings"]["num_hidden_layers"] = ["a"], 4
    found = trend.differences(["a", "d"], [a, d])
    assert found == ["--num-hidden-layers: a has None, d has 4", "prompts: a has 2, d has 1"]


def test_the_side_by_side_table_and_the_series_keep_a_missing_metric_missing():
    a, b = report(), report()
    del b["summary"]["distribution"]["kl_p99"]
    rows = trend.table_rows(["a", "b"], [a, b], [{"passed": True}, {"passed": False}])
    assert rows[0] == ["", "a", "b"] and rows[2] == ["verdict", "PASS", "FAIL"]
    p99 = next(r for r in rows if r[0] == "KL p99")
    assert p99 == ["KL p99", "0.0200", "-"]
    series = {s["path"]: s for s in trend.series([a, b])}
    assert series["distribution.kl_p99"]["values"] == [0.02, None] and series["distribution.kl_mean"]["log"]
    assert "min_pearson" not in series  # in neither run: no empty panel


@pytest.mark.parametrize(("path", "name"), [("runs/2024-build-7", "2024-build-7"),
                                            ("runs/build-7/parity.json", "build-7"), ("reports/b7.json", "b7")])
def test_a_run_is_named_by_its_folder_or_its_report_file(path, name):
    assert trend.run_name(path) == name
