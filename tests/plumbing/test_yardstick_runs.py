"""The yardstick through the real CLI and real workers (fake engine): added by --yardstick auto when the
target is coarser, cached like a reference, filed next to a reference file, shown in every output, and
re-judged from a saved run with K*yardstick tolerances."""

from __future__ import annotations

import json

import pytest
from tests.helpers import fake_env, run_cli

pytestmark = pytest.mark.plumbing

BF16 = ("--target-dtype", "bfloat16", "--no-inspect-logits")


def flat(text: str) -> str:
    return " ".join(text.split())


def test_a_coarser_target_gets_a_yardstick_that_is_cached_filed_and_shown(fake_cli, tmp_path):
    ref_file = tmp_path / "golden.tar"
    out = tmp_path / "reports"
    first = fake_cli(*BF16, "--use-cache", "--save-reference", str(ref_file), "--markdown", str(out / "r.md"),
                     "--junit", str(out / "r.xml"))
    assert first.returncode == 0, first.stdout + first.stderr
    yard = first.report["yardstick"]
    assert yard["side"]["source"] == "worker" and yard["side"]["dtype"] == "bfloat16"
    assert yard["side"]["engine"] == "fake"  # unnamed: the reference's engine
    assert set(yard["ratios"]["overall"]) == {"distribution.kl_mean", "distribution.kl_p99",
                                              "distribution.dp_rms", "distribution.top1_mismatches"}
    assert len(yard["comparisons"]) == len(first.report["comparisons"])
    assert "yardstick fake bfloat16" in flat(first.stdout) and "Prefill or decode" in flat(first.stdout)
    companion = tmp_path / "golden.yardstick-fake-bfloat16.tar"
    assert companion.is_file()
    assert "**Yardstick**" in (out / "r.md").read_text()
    assert "yardstick_side" in (out / "r.xml").read_text()
    verdict = json.loads((first.run_dir / "parity.json").read_text())["verdict"]
    assert any(c["gate"] == "kl_mean>3*yardstick" for c in verdict["checked"])

    cached = fake_cli(*BF16, "--use-cache")
    assert cached.returncode == 0, cached.stderr
    assert cached.report["yardstick"]["side"]["source"] == "cache"
    assert not (cached.run_dir / "yardstick" / "worker.log").exists()

    filed = fake_cli(*BF16, "--reference", str(ref_file))
    assert filed.returncode == 0, filed.stderr
    assert filed.report["yardstick"]["side"]["source"] == "file"
    companion.unlink()
    computed = fake_cli(*BF16, "--reference", str(ref_file))
    assert computed.report["yardstick"]["side"]["source"] == "worker"
    assert any("no yardstick next to the reference file" in n for n in computed.report["notes"])

    # a saved run is judged again against its yardstick, with no engine
    proc = run_cli(["compare", str(first.run_dir), "--fail-on", "kl_mean>1e-9+2*yardstick"], cwd=tmp_path,
                   env=fake_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "yardstick fake bfloat16" in flat(proc.stdout)
    # the fake engine ignores the dtype, so target and yardstick agree: only ">= 0*yardstick" holds
    proc = run_cli(["compare", str(first.run_dir), "--fail-on", "kl_mean>=0*yardstick"], cwd=tmp_path,
                   env=fake_env())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "(tolerance kl_mean>=0*yardstick, yardstick 1e-08)" in flat(proc.stdout)


def test_no_yardstick_at_the_same_precision_or_when_switched_off(fake_cli, tmp_path):
    same = fake_cli("--no-inspect-logits", "--fail-on", "kl_mean>3*yardstick")
    assert same.returncode == 0, same.stderr
    assert same.report["yardstick"] is None
    assert "has none" in flat(same.stdout)  # the relative tolerance is listed as not checked
    off = fake_cli(*BF16, "--yardstick", "none")
    assert off.returncode == 0 and off.report["yardstick"] is None
    assert off.report["resolved"]["yardstick"].startswith("none")


def test_verdict_and_findings_follow_the_yardstick(fake_cli, tmp_path):
    """A target exactly as far off as its yardstick passes and its findings say so, even where that distance is
    beyond the dtype's fixed limits (Gemma-3-270M's honest bf16); the same target without a yardstick is judged
    by those limits; a target far beyond its yardstick fails and the findings point at it."""
    shift = {"shift": "0.45", "sides": "target,yardstick"}
    honest = fake_cli(*BF16, switches=shift)
    report = honest.report
    kl, yard_kl = report["summary"]["distribution"]["kl_mean"], report["yardstick"]["summary"]["distribution"]["kl_mean"]
    assert 1e-2 < kl < 1e-1 and kl == pytest.approx(yard_kl)  # beyond bf16's fixed kl_mean>1e-2, at ratio 1
    assert honest.returncode == 0, honest.stdout
    verdict = json.loads((honest.run_dir / "parity.json").read_text())["verdict"]
    text = " ".join(verdict["findings"])
    assert "within what honest rounding" in text and "nothing to place" in text and "look at" not in text
    assert {"kl_mean>5e-1", "mismatches>2*yardstick"} <= {c["gate"] for c in verdict["checked"]}

    without = fake_cli(*BF16, "--yardstick", "none", switches=shift)
    assert without.returncode == 1 and "kl_mean>1e-2" in flat(without.stdout)

    faulty = fake_cli(*BF16, switches={"shift": "1.5", "sides": "target"})
    assert faulty.returncode == 1
    verdict = json.loads((faulty.run_dir / "parity.json").read_text())["verdict"]
    text = " ".join(verdict["findings"])
    assert "beyond what honest rounding" in text and "excess over honest rounding is already there" in text
    assert any(v["gate"] == "kl_mean>3*yardstick" for v in verdict["violations"])

    # a saved run is judged again by the same rules
    again = run_cli(["compare", str(honest.run_dir)], cwd=tmp_path, env=fake_env())
    assert again.returncode == 0, again.stdout + again.stderr

    # the same faulty target declared to quantise: judged by the gross backstop only, and said so
    declared = fake_cli(*BF16, "--target-quantization", "w8a8", switches={"shift": "1.5", "sides": "target"})
    assert declared.returncode == 0, declared.stdout
    assert declared.report["settings"]["target_quantization"] == "w8a8"
    assert "declared to quantise (w8a8)" in flat(declared.stdout)
    again = run_cli(["compare", str(declared.run_dir)], cwd=tmp_path, env=fake_env())
    assert again.returncode == 0, again.stdout + again.stderr
    bad = fake_cli(*BF16, "--target-quantization", "w8 a8")
    assert bad.returncode == 2 and "--target-quantization" in bad.stderr and "Traceback" not in bad.stderr
