"""``localize RUN_DIR`` on folders that cannot be localised: a message and exit 2 (3 when a worker fails),
never a traceback. What a localisation finds is tested on real engines (tests/integration/test_localize.py)."""

from __future__ import annotations

import json

import pytest
from tests.helpers import FAKE_CLI, fake_env, run_cli

pytestmark = pytest.mark.plumbing


def _localize(path, tmp_path, *args: str):
    return run_cli(["localize", str(path), "--no-color", "--cache-dir", str(tmp_path / "cache"), *args],
                   cwd=tmp_path, env=fake_env(), module=FAKE_CLI)


def test_missing_unfinished_and_damaged_run_folders_exit_2(tmp_path):
    res = _localize(tmp_path / "nowhere", tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr, res.stderr
    (tmp_path / "unfinished" / "reference").mkdir(parents=True)
    res = _localize(tmp_path / "unfinished", tmp_path)
    assert res.returncode == 2 and "not a run folder" in res.stderr, res.stderr
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "parity.json").write_text('{"kind": "vllm-rbln-exec/parity-report", "run": ')
    res = _localize(damaged, tmp_path)
    assert res.returncode == 2 and "is not a vllm-rbln-exec report" in res.stderr, res.stderr
    res = _localize(tmp_path / "unfinished", tmp_path, "--max-prompts", "0")
    assert res.returncode == 2 and "--max-prompts" in res.stderr
    for r in (res,):
        assert "Traceback" not in r.stderr


def test_a_schema_1_folder_is_refused_and_an_engine_without_hooks_fails_cleanly(fake_cli, tmp_path):
    live = fake_cli("--no-color", "--no-inspect-logits")
    assert live.returncode == 0, live.stdout + live.stderr
    run = json.loads((live.run_dir / "parity.json").read_text())["run"]
    old = tmp_path / "old-run"
    old.mkdir()
    run.pop("resolved")
    run["schema_version"] = 1
    (old / "report.json").write_text(json.dumps(run))
    res = _localize(old, tmp_path)
    assert res.returncode == 2 and "older version" in res.stderr, res.stderr
    # the fake engine has no hidden-state hooks: its workers fail, and say why
    res = _localize(live.run_dir, tmp_path)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "cannot capture hidden states" in res.stderr and "Traceback" not in res.stderr.split("last lines")[0]
    assert "localization" not in json.loads((live.run_dir / "parity.json").read_text())["run"]
