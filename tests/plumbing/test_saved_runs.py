"""A saved run renders as the live run did: ``compare RUN_DIR`` prints the same report from ``parity.json``.

One rendering path serves both (``outputs.terminal.render_run`` over the run's
saved form), so everything above the verdict must match line for line; and
run folders of the earlier layout (a schema-1 ``report.json``) still load.
"""

from __future__ import annotations

import json

import pytest
from tests.helpers import FAKE_CLI, fake_env, run_cli

pytestmark = pytest.mark.plumbing


def _report_part(stdout: str) -> list[str]:
    """The report above the verdict: everything up to and including the 'run folder' line."""
    lines = stdout.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("run folder"))
    return lines[: end + 1]


def _compare(run_dir, tmp_path, *args: str):
    return run_cli(["compare", str(run_dir), "--no-color", *args], cwd=tmp_path, env=fake_env(), module=FAKE_CLI)


def test_compare_prints_every_section_the_run_printed(fake_cli, tmp_path):
    live = fake_cli("--no-color", "--target-args", '{"some_arg": 1}', switches={"sides": "target", "shift": "2@1:3"})
    assert live.returncode == 1, live.stdout + live.stderr
    saved = _compare(live.run_dir, tmp_path)
    assert saved.returncode == 1, saved.stdout + saved.stderr
    assert _report_part(saved.stdout) == _report_part(live.stdout)
    for section in ("Prompt 0:", "Prompt 1:", "top-5 at position 0", "summary over all prompts",
                    "KL by the reference's top-1 probability", "worst positions by KL",
                    "differs      engine arg some_arg: null vs 1"):
        assert section in saved.stdout, section
    # the verdict is the same too (the run also names the files it wrote)
    assert "PARITY FAILS" in saved.stdout and "prompt 1" in saved.stdout
    brief = _compare(live.run_dir, tmp_path, "--no-inspect-logits")
    assert "Prompt 0:" not in brief.stdout and "summary over all prompts" in brief.stdout


def test_a_schema_1_run_folder_still_loads(fake_cli, tmp_path):
    live = fake_cli("--no-color", "--no-inspect-logits")
    assert live.returncode == 0
    run = json.loads((live.run_dir / "parity.json").read_text())["run"]
    old = tmp_path / "old-run"
    old.mkdir()
    for key in ("options", "resolved"):
        run.pop(key)
    for side in run["sides"].values():
        for key in ("engine_args", "effective", "torch_device"):
            side.pop(key)
    run["schema_version"] = 1
    (old / "report.json").write_text(json.dumps(run))
    saved = _compare(old, tmp_path, "--no-inspect-logits")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert "summary over all prompts" in saved.stdout and "PARITY HOLDS" in saved.stdout
    assert "Traceback" not in saved.stderr


def test_compare_of_a_folder_that_is_not_a_finished_run_exits_2(tmp_path):
    (tmp_path / "unfinished" / "reference").mkdir(parents=True)
    res = _compare(tmp_path / "unfinished", tmp_path)
    assert res.returncode == 2 and "not a run folder" in res.stderr, res.stderr


def test_engine_arguments_and_the_reference_device_enter_the_cache_key(fake_cli):
    plain = fake_cli("--use-cache", "--no-inspect-logits")
    args = fake_cli("--use-cache", "--no-inspect-logits", "--reference-args", '{"some_arg": true}',
                    "--reference-device", "cpu")
    assert plain.returncode == 0 and args.returncode == 0, args.stdout + args.stderr
    assert plain.report["cache"]["key"] != args.report["cache"]["key"]
    assert args.report["cache"]["hit"] is False
    assert args.report["sides"]["reference"]["engine_args"] == {"some_arg": True}
    again = fake_cli("--use-cache", "--no-inspect-logits")  # without them: the first key again
    assert again.report["cache"]["hit"] is True and again.report["cache"]["key"] == plain.report["cache"]["key"]
