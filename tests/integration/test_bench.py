"""``scripts/bench.py --quick`` runs end to end and writes valid JSON (no timing assertions).

Four vLLM CPU workers on the tiny Llama (about 1.5 minutes on two cores).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tests.helpers import REPO, make_cache_dir

from vllm_rbln_exec.capture.q16 import Q16_MAX_ERROR

pytestmark = pytest.mark.integration


def test_quick_benchmark_writes_its_results(tmp_path):
    out = tmp_path / "results.json"
    cache = make_cache_dir(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--out", str(out), "--cache-dir", str(cache),
         "--runs-dir", str(tmp_path / "runs")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())  # strict JSON: no NaN
    assert results["schema_version"] == 2 and results["settings"]["rounds"] == 1
    assert results["machine"]["cores"] >= 1 and len(results["load_average"]["after"]) == 3
    (model,) = results["models"]
    assert model["model"] == "tiny-llama3" and model["vocab"] == 128256
    variants = model["variants"]
    assert set(variants) == {"plain", "api", "fast", "fast-q16"}
    for name, row in variants.items():
        assert row["generated_tokens"] == 2 * 8
        assert row["generate_s"] > 0 and row["engine_start_s"] > 0 and row["peak_rss_mib"] > 0
        assert row["rounds"] == 1 and row["total_s_rounds"] == [row["total_s"]]
        assert row["x_plain_range"] == [row["x_plain"], row["x_plain"]]
        if name != "plain":
            assert row["tokens_match_plain"] is True
    assert variants["fast"]["bytes_per_entry"] == pytest.approx(4.0, rel=0.01)
    assert variants["fast-q16"]["bytes_per_entry"] == pytest.approx(2.0, rel=0.01)
    assert variants["fast-q16"]["store_s"] > 0 and variants["fast"]["store_s"] == 0
    exact = model["comparisons"]["fast vs api"]
    assert exact["max_abs_diff"] <= 1e-6 and exact["tokens_equal"] == exact["prompts"] == 2
    q16 = model["comparisons"]["fast-q16 vs api"]
    # Half a quantisation step, plus float32 rounding of values up to 32 nats below the top.
    assert q16["max_abs_diff_within_q16_range"] <= Q16_MAX_ERROR + 4e-6
    assert results["synthetic_metric"]["seconds"] > 0
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # captures removed
    assert "fast vs api" in proc.stdout
