"""--profile end to end on CPU: the same run with and without the profiler.

The reference runs on vLLM (its own profiler configuration) and the target on
transformers (torch.profiler in the worker), so both ways of profiling are
covered by two runs. Profiling must not move a single number, the traces must
be chrome-trace JSON with events, and the report and ``profile-summary`` must
print the tables.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import make_cache_dir, run_cli

from vllm_rbln_exec.capture.store import load_capture

pytestmark = pytest.mark.integration

ARGS = ["--target", "cpu", "--target-engine", "transformers", "--num-hidden-layers", "4", "--max-tokens", "8",
        "--num-prompts", "2", "--store", "fp32", "--no-inspect-logits"]
ENV = {"NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb"}
SIDES = ("reference", "target")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    cache = make_cache_dir(root)  # shared by both runs: the second reuses the first's compile cache
    out = {"root": root, "traces": root / "traces"}
    for name, extra in (("plain", []), ("profiled", ["--profile", "--profile-dir", str(out["traces"])])):
        run_dir = root / name
        proc = run_cli(["--cache-dir", str(cache), "--run-dir", str(run_dir), *ARGS, *extra], cwd=root, env=ENV)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[name] = {"run_dir": run_dir, "stdout": proc.stdout, "stderr": proc.stderr,
                     "report": json.loads((run_dir / "parity.json").read_text())["run"]}
    return out


def test_profiling_changes_no_number(runs):
    for side in SIDES:
        plain = load_capture(runs["plain"]["run_dir"] / side / "capture", verify_arrays=True)
        profiled = load_capture(runs["profiled"]["run_dir"] / side / "capture", verify_arrays=True)
        assert len(plain.prompts) == len(profiled.prompts) == 2
        for i, (a, b) in enumerate(zip(plain.prompts, profiled.prompts, strict=True)):
            assert a.token_ids == b.token_ids, (side, i)
            rows_a, rows_b = np.asarray(plain.logprobs(i)), np.asarray(profiled.logprobs(i))
            assert rows_a.dtype == rows_b.dtype == np.float32
            assert rows_a.shape == rows_b.shape == (8, 49152)
            assert np.array_equal(rows_a, rows_b), f"{side} prompt {i}: the profiler moved the logprobs"
    assert runs["plain"]["report"]["summary"] == runs["profiled"]["report"]["summary"]


def test_only_the_profiled_run_names_traces(runs):
    for side in SIDES:
        assert runs["plain"]["report"]["sides"][side]["profile"] is None
        assert "profiled" not in runs["plain"]["report"]["sides"][side]["timings"]
    assert not (runs["root"] / "profile").exists()  # --profile-dir was honoured, nothing in the cwd


def test_traces_are_chrome_json_with_events(runs):
    for side in SIDES:
        info = runs["profiled"]["report"]["sides"][side]["profile"]
        folder = Path(info["dir"])
        assert folder.parent == runs["traces"].resolve()
        assert re.fullmatch(rf"{side}_smollm2-135m_\d{{8}}-\d{{6}}", folder.name), folder.name
        assert info["traces"], f"{side}: no trace files named"
        for name in info["traces"]:
            path = folder / name
            assert path.name.endswith(".json.gz")
            data = json.loads(gzip.decompress(path.read_bytes()))
            complete = [e for e in data["traceEvents"] if e.get("ph") == "X"]
            assert len(complete) > 100, f"{path}: only {len(complete)} complete events"
            assert any(e.get("cat") == "cpu_op" for e in complete)
        meta = json.loads((folder / "profile.json").read_text())
        assert meta["side"] == side and meta["traces"] == info["traces"]
        assert meta["timings"]["generated_tokens"] == 16
        assert runs["profiled"]["report"]["sides"][side]["timings"]["profiled"] == 1.0


def test_report_prints_top_ops_and_speed(runs):
    out = " ".join(runs["profiled"]["stdout"].split())
    for expected in ("profile of the measured generation", "reference (vllm cpu): top 15 of",
                     "target (transformers cpu): top 15 of", "CPU ops by self time", "self ms", "aten::",
                     "speed of the measured generation", "tokens/s", "ms/token", "× reference",
                     "profile-summary DIR"):
        assert expected in out, f"missing {expected!r} in:\n{runs['profiled']['stdout']}"
    assert "profile of the measured generation" not in runs["plain"]["stdout"]


@pytest.mark.parametrize("where", ["run", "traces", "one"])
def test_profile_summary_reads_saved_traces(runs, where):
    folders = [Path(runs["profiled"]["report"]["sides"][s]["profile"]["dir"]) for s in SIDES]
    target = {"run": runs["profiled"]["run_dir"], "traces": runs["traces"], "one": folders[1]}[where]
    proc = run_cli(["profile-summary", str(target), "--top", "5"], cwd=runs["root"], env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert "target (transformers cpu): top 5 of" in out
    assert ("reference (vllm cpu): top 5 of" in out) == (where != "one")
    assert "speed of the measured generation" in out
