"""Hostile saved reports and outputs (issue 26, items 4, 5 and 9): validators and writers, without a process.

Each case: the right error (one sentence), nothing replaced, nothing left behind. The same cases through the
command line are in tests/plumbing/test_hostile_reports_cli.py.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat

import numpy as np
import pytest

from vllm_rbln_exec.compare.catalogue import OVERALL, PROMPT, report_paths
from vllm_rbln_exec.compare.metrics import compare_prompt, summarize
from vllm_rbln_exec.core.errors import EXIT_PARITY_FAILED, UsageError, describe_os_error
from vllm_rbln_exec.core.jsonio import UnsafeOutput, move_tree, unsafe_output, write_text_atomic
from vllm_rbln_exec.outputs import saved
from vllm_rbln_exec.outputs.files import combined_report
from vllm_rbln_exec.pipeline.check import load_saved, rejudge
from vllm_rbln_exec.setup.checks import check_outputs
from vllm_rbln_exec.setup.options import GateOptions
from vllm_rbln_exec.setup.prompts import check_not_empty, read_prompts_file
from vllm_rbln_exec.verdict.defaults import default_gates
from vllm_rbln_exec.verdict.judge import Verdict, judge


def _report(nan: bool = False) -> dict:
    """A schema-2 combined report of two identical prompts, as parity.json holds it."""
    logprobs = np.log(np.asarray([[0.5, 0.25, 0.125, 0.125]] * 2, dtype=np.float64)).astype(np.float32)
    side = {"token_ids": [0, 0], "text": "a", "logprobs": logprobs}
    comps = [compare_prompt(i, f"prompt {i}", side, side, vocab_size=4, aligned=True, topk=3) for i in range(2)]
    sides = {s: {"side": s, "device": "cpu", "engine": "fake", "dtype": "float32", "elapsed_s": 1.0}
             for s in ("reference", "target")}
    run = {"schema_version": 2, "model": "m", "target": "cpu", "settings": {"logprobs": -1, "align": "forced"},
           "prompts": ["prompt 0", "prompt 1"], "sides": sides, "comparisons": [c.to_json() for c in comps],
           "summary": summarize(comps).to_json(), "notes": [], "cache": {}}
    return combined_report(run, Verdict(True, [], [], []))


def _save(tmp_path, data, raw: str | None = None):
    path = tmp_path / "parity.json"
    path.write_text(raw if raw is not None else json.dumps(data))
    return path


def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    message = exc.value.message
    assert "\n" not in message and "Traceback" not in message
    return message


# -- item 4: reports without numbers fail; unknown schemas and wrong types are refused ------------------------
def test_a_saved_report_of_the_harness_loads_and_passes(tmp_path):
    outcome = rejudge(_save(tmp_path, _report()), GateOptions())
    assert outcome.passed and not any("not measured" in c["gate"] for c in outcome.verdict.checked)


def test_old_saved_forms_still_load(tmp_path):
    run = _report()["run"]
    run["schema_version"] = 1
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(run))  # schema 1: a plain report.json
    assert load_saved(folder)[0]["model"] == "m"


def _strip(record: dict, scope: str) -> None:
    """Every metric of the catalogue in ``record`` set to null (what a hand-edited report may hold)."""
    for path in report_paths(scope):
        *parents, name = path.split(".")
        node = record
        for part in parents:
            node = node.get(part) or {}
        if name in node:
            node[name] = None


@pytest.mark.parametrize("case", ["null metrics", "summary of positions only", "NaN kl_mean and top1_rate"])
def test_a_report_without_the_numbers_fails_every_tolerance_as_not_measured(tmp_path, case):
    data = _report()
    run = data["run"]
    if case == "null metrics":
        _strip(run["summary"], OVERALL)
        for comp in run["comparisons"]:
            _strip(comp, PROMPT)
        run["summary"]["positions_compared"] = 5
        raw = None
    elif case == "summary of positions only":
        run["summary"] = {"positions_compared": 5}
        run["comparisons"] = [{"index": i, "prompt": c["prompt"]} for i, c in enumerate(run["comparisons"])]
        raw = None
    else:
        for record in (run["summary"], *run["comparisons"]):
            record["distribution"]["kl_mean"] = record["distribution"]["top1_rate"] = math.nan
        raw = json.dumps(data)  # NaN literals, which no writer of the harness emits
    outcome = rejudge(_save(tmp_path, data, raw), GateOptions(fail_on=("kl_max>1e-9",)))
    assert not outcome.passed and outcome.exit_code == EXIT_PARITY_FAILED
    missing = {v.gate for v in outcome.verdict.violations if "not measured" in v.message}
    assert {"kl_mean>3e-8", "top1<0.97", "prompt:kl_mean>1.5e-7"} <= missing
    if case != "NaN kl_mean and top1_rate":
        assert {"kl_max>1e-9", "kl_p99>1e-6", "argmax:confident"} <= missing


def test_a_live_report_that_measured_everything_has_nothing_not_measured():
    run = _report()["run"]
    verdict = judge(run, default_gates("float32", "float32"))
    assert verdict.passed and all(c["violations"] == 0 for c in verdict.checked)


@pytest.mark.parametrize("where, expected", [
    (("schema_version",), "its report schema version is 999"),
    (("run", "schema_version"), "its run schema version is 999"),
])
def test_an_unknown_schema_version_is_refused(tmp_path, where, expected):
    data = _report()
    (data if len(where) == 1 else data["run"])[where[-1]] = 999
    with pytest.raises(UsageError) as exc:
        load_saved(_save(tmp_path, data))
    assert expected in _one_sentence(exc)


@pytest.mark.parametrize("path, value, named", [
    (("summary", "distribution"), "kl", "summary.distribution is the string 'kl'"),
    (("comparisons", 0, "distribution"), [], "comparisons[0].distribution is a list"),
    (("summary", "distribution", "kl_mean"), "0.1", "summary.distribution.kl_mean is the string '0.1'"),
    (("comparisons", 1, "worst_positions"), {"a": 1}, "comparisons[1].worst_positions is an object"),
    (("sides", "target"), 5, "sides.target is the number 5"),
    (("prompts",), [5], "prompts[0] is the number 5"),
    (("summary", "distribution", "top1_rate"), 5.0, "top1_rate is 5.0, but a share lies between 0 and 1"),
    (("comparisons",), "x", "comparisons is the string 'x'"),
    (("comparisons", 0), {}, "comparisons[0] has no index, prompt"),
])
def test_wrong_types_in_a_saved_report_are_one_sentence(tmp_path, path, value, named):
    data = _report()
    node = data["run"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(UsageError) as exc:
        load_saved(_save(tmp_path, data))
    assert named in _one_sentence(exc)


def test_a_wrong_noise_floor_is_refused(tmp_path):
    data = _report()
    data["noise"] = {"schema_version": 1, "mode": "[/]", "runs": 2, "overall": {}}
    with pytest.raises(UsageError) as exc:
        load_saved(_save(tmp_path, data))
    assert "noise.mode" in _one_sentence(exc)


@pytest.mark.parametrize("raw, expected", [
    ("[" * 200_000 + "]" * 200_000, "nests deeper than the 32 levels"),
    ('{"run": ', "is not JSON"),
    ("\udcff", "is not UTF-8"),
])
def test_damaged_files_are_refused(tmp_path, raw, expected):
    path = tmp_path / "parity.json"
    path.write_bytes(raw.encode("utf-8", "surrogateescape"))
    with pytest.raises(UsageError) as exc:
        load_saved(path)
    assert expected in _one_sentence(exc)


def test_a_report_above_the_size_limit_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(saved, "MAX_REPORT_BYTES", 1000)
    with pytest.raises(UsageError) as exc:
        load_saved(_save(tmp_path, _report()))
    assert "a saved report may hold" in _one_sentence(exc)


def test_a_fifo_given_as_the_report_is_named_and_never_opened(tmp_path):
    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)  # opening it would block this test forever: the check must use stat only
    with pytest.raises(UsageError) as exc:
        load_saved(fifo)
    assert "not a regular file" in _one_sentence(exc)


# -- item 5: writers refuse what is not a regular file, two outputs on one path, the run's own report -------
@pytest.fixture
def places(tmp_path):
    (tmp_path / "target.txt").write_text("keep")
    (tmp_path / "link").symlink_to("target.txt")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    return tmp_path


@pytest.mark.parametrize("name, reason", [("link", "symbolic link"), ("fifo", "FIFO"), ("dir", "folder"),
                                          ("target.txt", None), ("new.json", None)])
def test_unsafe_output_is_read_without_opening(places, name, reason):
    found = unsafe_output(places / name)
    assert (found is None) if reason is None else (reason in found)


@pytest.mark.parametrize("name", ["link", "fifo"])
def test_the_atomic_writer_replaces_neither_a_link_nor_a_fifo(places, name):
    with pytest.raises(UnsafeOutput):
        write_text_atomic(places / name, "report")
    assert (places / "target.txt").read_text() == "keep"
    assert os.path.islink(places / "link") and stat.S_ISFIFO(os.lstat(places / "fifo").st_mode)
    assert sorted(p.name for p in places.iterdir()) == ["dir", "fifo", "link", "target.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(places, monkeypatch):
    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        write_text_atomic(places / "target.txt", "new")
    assert (places / "target.txt").read_text() == "keep"
    assert sorted(p.name for p in places.iterdir()) == ["dir", "fifo", "link", "target.txt"]


@pytest.mark.parametrize("files, folders, inputs, expected", [
    ({"--json": "x.json", "--junit": "x.json"}, {}, {}, "--json and --junit both name x.json"),
    ({"--json": "out"}, {"--plots": "./out"}, {}, "--json and --plots both name"),
    ({"--json": "run/parity.json"}, {}, {"the saved run run/parity.json": "run/parity.json"},
     "is the saved run run/parity.json, which this command reads"),
    ({"--junit": "link"}, {}, {}, "--junit link is a symbolic link"),
    ({"--markdown": "fifo"}, {}, {}, "--markdown fifo is a FIFO, not a regular file"),
    ({"--html": "dir"}, {}, {}, "--html dir is a folder"),
    ({}, {"--plots": "target.txt"}, {}, "--plots target.txt is not a folder"),
])
def test_output_options_are_checked_before_anything_runs(places, monkeypatch, files, folders, inputs, expected):
    monkeypatch.chdir(places)
    (places / "run").mkdir()
    (places / "run" / "parity.json").write_text("{}")
    with pytest.raises(UsageError) as exc:
        check_outputs(files, folders, inputs)
    assert expected in _one_sentence(exc)
    assert (places / "run" / "parity.json").read_text() == "{}"


def test_outputs_on_their_own_paths_pass(places, monkeypatch):
    monkeypatch.chdir(places)
    check_outputs({"--json": "a.json", "--junit": "target.txt", "--markdown": None}, {"--plots": "dir"},
                  {"the saved run x": "x.json"})


# -- item 9: a full disk, numbers as prompts --------------------------------------------------------------
def test_a_failed_copy_of_a_capture_leaves_no_half_folder(tmp_path, monkeypatch):
    src = tmp_path / "scratch" / "capture"
    src.mkdir(parents=True)
    (src / "capture.json").write_text("{}")
    dest = tmp_path / "run" / "reference" / "capture"

    def other_device(*_args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def full(source, target, **_kw):
        open(os.path.join(target, "capture.json"), "w").close()  # what a full disk left: a 0-byte capture.json
        raise shutil.Error([(str(source), str(target), "[Errno 28] No space left on device: 'a' -> 'b'")])

    monkeypatch.setattr(os, "rename", other_device)
    monkeypatch.setattr(shutil, "copytree", full)
    with pytest.raises(shutil.Error) as exc:
        move_tree(src, dest)
    assert list(dest.parent.iterdir()) == []  # no 0-byte capture.json, no temporary folder
    assert (src / "capture.json").read_text() == "{}"
    assert describe_os_error(exc.value) == f"[Errno 28] No space left on device while copying into {tmp_path / 'run'}"


@pytest.mark.parametrize("suffix, text, expected", [
    (".json", "[5]", "item 0: the prompt is 5"),
    (".json", '["a", {"prompt": [1, 2]}]', "item 1: the prompt is [1, 2]"),
    (".jsonl", '{"prompt": 5}\n', "item 0: the prompt is 5"),
    (".json", "5", "holds a list, not int"),
    (".json", '{"prompt": "a"}', "holds a list, not dict"),
    (".json", '[{"text": "a"}]', "item 0: the prompt is missing"),
])
def test_a_number_or_other_non_text_as_a_prompt_is_named(tmp_path, suffix, text, expected):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(text)
    with pytest.raises(UsageError) as exc:
        read_prompts_file(str(path))
    assert expected in _one_sentence(exc)


def test_a_number_as_a_prompt_from_the_library_is_named():
    with pytest.raises(UsageError) as exc:
        check_not_empty(["a", 5])
    assert "prompt 1 is int '5', not text" in _one_sentence(exc)


def test_rich_markup_in_user_text_is_printed_as_text(capsys):
    from rich.console import Console

    from vllm_rbln_exec.cli.common import report_error
    from vllm_rbln_exec.outputs.terminal import render_sides
    from vllm_rbln_exec.outputs.trend import render_trend

    assert report_error(UsageError("reports/[/]x[bold] does not exist")) == 2
    assert "reports/[/]x[bold] does not exist" in capsys.readouterr().err
    run = _report()["run"]
    run["model"] = "[/]model"
    run["sides"]["target"]["device"] = "[bold]cuda[/]"
    console = Console(record=True, width=200)
    render_sides(console, run)
    render_trend(console, ["[/]a", "b[bold]"], [run, run], [{"passed": True}, {"passed": False}])
    text = console.export_text()
    assert "[bold]cuda[/]" in text and "[/]a" in text and "b[bold]" in text and "[/]model" in text
