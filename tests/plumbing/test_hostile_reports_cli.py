"""Hostile saved reports, output paths and text through the real command line (issue 26, items 4, 5 and 9).

Each case: the exit code, one sentence on stderr (no traceback), nothing replaced (a link's target keeps its
content, a FIFO stays a FIFO) and nothing left behind (a refused run makes no run folder). A FIFO is never
opened by a check, so none of these can block. The validators themselves: tests/unit/test_hostile_reports.py.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
from tests.helpers import FAKE_CLI, fake_env, run_cli

pytestmark = pytest.mark.plumbing


def _cli(tmp_path, *args: str):
    return run_cli([*args], cwd=tmp_path, env=fake_env(), module=FAKE_CLI, timeout=120)


def _one_sentence(proc, code: int, expected: str) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) <= 2, proc.stderr  # Rich may wrap one sentence
    assert expected in " ".join(lines), proc.stderr


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, fake_model):
    """One passing run on the fake engine, its folder reused by the compare cases (never modified)."""
    from tests.helpers import fake_args

    root = tmp_path_factory.mktemp("hostile")
    run_dir = root / "run"
    proc = run_cli(["--cache-dir", str(root / "cache"), "--run-dir", str(run_dir), *fake_args(fake_model),
                    "--no-color", "--no-inspect-logits", "--fail-on", "kl_max>1e-9", "--fail-on", "pearson<0.9"],
                   cwd=root, env=fake_env(), module=FAKE_CLI)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not measured" not in proc.stdout  # a live run never lacks a number it measured
    return run_dir


def _hostile_copy(tmp_path, saved_run, change) -> str:
    data = json.loads((saved_run / "parity.json").read_text())
    change(data)
    folder = tmp_path / "hostile-run"
    folder.mkdir()
    (folder / "parity.json").write_text(json.dumps(data))
    return str(folder)


def _null_metrics(data):
    run = data["run"]
    run["summary"] = {"positions_compared": 5}
    for comp in run["comparisons"]:
        comp["distribution"] = None
        for key in ("max_abs_diff", "mean_abs_diff", "pearson", "top1_match", "topk_overlap"):
            comp[key] = None


def test_a_failing_live_run_is_judged_on_what_it_measured(fake_cli):
    live = fake_cli("--no-color", "--no-inspect-logits", switches={"sides": "target", "shift": "2@1:3"})
    assert live.returncode == 1 and "not measured" not in live.stdout


def test_compare_fails_a_report_without_numbers_as_not_measured(tmp_path, saved_run):
    proc = _cli(tmp_path, "compare", _hostile_copy(tmp_path, saved_run, _null_metrics), "--no-color",
                "--fail-on", "kl_max>1e-9")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "PARITY FAILS" in proc.stdout and "kl_max>1e-9: not measured" in proc.stdout


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.update(schema_version=999), "its report schema version is 999"),
    (lambda d: d["run"]["summary"].update(distribution="kl"), "summary.distribution is the string 'kl'"),
    (lambda d: d["run"]["comparisons"][0].update(prompt=5), "comparisons[0].prompt is the number 5"),
])
def test_compare_refuses_a_report_it_cannot_read_in_one_sentence(tmp_path, saved_run, change, expected):
    proc = _cli(tmp_path, "compare", _hostile_copy(tmp_path, saved_run, change), "--no-color")
    _one_sentence(proc, 2, expected)


def test_compare_never_writes_over_the_run_it_reads(tmp_path, saved_run):
    before = (saved_run / "parity.json").read_bytes()
    proc = _cli(tmp_path, "compare", str(saved_run), "--no-color", "--json", str(saved_run / "parity.json"))
    _one_sentence(proc, 2, "which this command reads")
    assert (saved_run / "parity.json").read_bytes() == before


@pytest.fixture
def places(tmp_path):
    (tmp_path / "target.txt").write_text("keep")
    (tmp_path / "link").symlink_to("target.txt")
    os.mkfifo(tmp_path / "fifo")
    return tmp_path


def _unchanged(places) -> None:
    assert (places / "target.txt").read_text() == "keep" and os.path.islink(places / "link")
    assert stat.S_ISFIFO(os.lstat(places / "fifo").st_mode)


@pytest.mark.parametrize("args, expected", [
    (["--json", "fifo"], "--json fifo is a FIFO, not a regular file"),
    (["--junit", "link"], "--junit link is a symbolic link"),
    (["--json", "same.json", "--markdown", "same.json"], "--json and --markdown both name same.json"),
    (["--html", "out", "--plots", "out"], "--html and --plots both name out"),
])
def test_a_run_refuses_its_outputs_before_any_engine_starts(fake_cli, places, args, expected):
    result = fake_cli("--no-color", *args)
    _one_sentence(result, 2, expected)
    assert not result.run_dir.exists()  # refused at option-check time: no run folder, no worker
    _unchanged(places)


def test_compare_refuses_a_fifo_in_the_plots_folder_without_blocking(tmp_path, saved_run, places):
    plots = places / "plots"
    plots.mkdir()
    os.mkfifo(plots / "kl-positions.png")
    proc = _cli(places, "compare", str(saved_run), "--no-color", "--plots", str(plots))
    _one_sentence(proc, 2, "kl-positions.png is a FIFO")
    assert stat.S_ISFIFO(os.lstat(plots / "kl-positions.png").st_mode)
    assert not [p for p in plots.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_cache_export_refuses_a_fifo(tmp_path, places):
    proc = _cli(places, "cache", "export", "abc", "fifo", "--cache-dir", str(tmp_path / "cache"))
    _one_sentence(proc, 2, "DEST fifo is a FIFO")
    _unchanged(places)


def test_markup_in_a_file_name_and_a_prompt_is_text(fake_cli, tmp_path):
    proc = _cli(tmp_path, "compare", "[/]runs[bold]", "--no-color")
    _one_sentence(proc, 2, "[/]runs[bold] does not exist")
    live = fake_cli("--no-color", "--prompts", "a [bold]prompt[/] with [/] markup", "--prompts", "b")
    assert live.returncode == 0, live.stdout + live.stderr
    assert "a [bold]prompt[/] with" in live.stdout


def test_a_number_as_a_prompt_in_a_prompts_file_is_a_usage_error(fake_cli, tmp_path):
    (tmp_path / "prompts.json").write_text('["fine", 5]')
    result = fake_cli("--no-color", "--prompts", f"@{tmp_path / 'prompts.json'}")
    _one_sentence(result, 2, "item 1: the prompt is 5")
    assert not result.run_dir.exists()
