"""The CI report files (vllm_rbln_exec.outputs.files): strict combined JSON, JUnit XML, markdown summary."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from vllm_rbln_exec.compare.metrics import compare_prompt, summarize
from vllm_rbln_exec.outputs.files import (
    PARITY_REPORT_KIND,
    load_report,
    markdown_summary,
    write_json,
    write_junit,
    write_markdown,
)
from vllm_rbln_exec.verdict.gates import ArgmaxGate, parse_gate
from vllm_rbln_exec.verdict.judge import judge
from vllm_rbln_exec.verdict.noise import measure_noise

SURE = [0.5, 0.25, 0.125, 0.125]
SWAPPED = [0.25, 0.5, 0.125, 0.125]  # KL(SURE || SWAPPED) = 0.25 ln 2 = 0.1733, confident argmax flip


def rows(*dists):
    return np.log(np.asarray(dists, dtype=np.float64)).astype(np.float32)


def build_run(targets, prompts=None, model="org/Some.Model"):
    """Reference SURE,SURE for every prompt; ``targets`` gives each prompt's target rows."""
    prompts = prompts or [f"prompt {i}" for i in range(len(targets))]
    comps = [
        compare_prompt(i, prompts[i], {"token_ids": [0, 0], "text": "a", "logprobs": rows(SURE, SURE)},
                       {"token_ids": [0, 0], "text": "b", "logprobs": tgt}, vocab_size=4, aligned=True, topk=3)
        for i, tgt in enumerate(targets)
    ]
    side = {"device": "cpu", "engine": "vllm", "engine_version": "0.32.0", "platform": "cpu", "dtype": "float32"}
    return {
        "schema_version": 1,
        "harness_version": "0.1.0",
        "model": model,
        "target": "cpu",
        "settings": {"logprobs": -1, "align": "forced"},
        "prompts": prompts,
        "sides": {"reference": {**side, "side": "reference", "elapsed_s": 2.0, "env": {"VLLM_PLUGINS": "cpu"}},
                  "target": {**side, "side": "target", "elapsed_s": 3.5}},
        "comparisons": [c.to_json() for c in comps],
        "summary": summarize(comps).to_json(),
        "notes": [],
        "cache": {"enabled": False, "key": "abc", "hit": False},
    }


@pytest.fixture
def failing():
    run = build_run([rows(SURE, SURE), rows(SURE, SWAPPED), rows(SWAPPED, SWAPPED)],
                    prompts=["The capital of France is", "a | pipe and <b>tag</b>", "bad \x01 char"])
    gates = [parse_gate("kl_mean>1e-3"), parse_gate("prompt:kl_max>0.1"), ArgmaxGate(), parse_gate("kl_p99>3*noise")]
    return run, judge(run, gates)


@pytest.fixture
def passing():
    run = build_run([rows(SURE, SURE), rows(SURE, SURE)])
    return run, judge(run, [parse_gate("kl_mean>1e-3"), ArgmaxGate()])


def strict_load(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# -- JSON -----------------------------------------------------------------------------
def test_combined_json_is_strict_and_complete(tmp_path, failing):
    run, verdict = failing
    run["summary"]["extra_nan"] = float("nan")
    run["summary"]["extra_inf"] = float("-inf")
    run["summary"]["extra_numpy"] = np.float32(0.25)
    run["summary"]["extra_tuple"] = (1, np.int64(2))
    noise = measure_noise([run, run])
    path = write_json(tmp_path / "out" / "parity.json", run, verdict, noise)
    data = strict_load(path.read_text())
    assert data["schema_version"] == 1 and data["kind"] == PARITY_REPORT_KIND
    assert data["passed"] is False and data["verdict"]["passed"] is False
    assert len(data["verdict"]["violations"]) == len(verdict.violations)
    assert data["noise"]["schema_version"] == 1 and data["noise"]["runs"] == 2
    inner = data["run"]
    assert inner["schema_version"] == 1 and inner["cache"]["key"] == "abc"
    assert inner["sides"]["reference"]["env"] == {"VLLM_PLUGINS": "cpu"}
    assert inner["summary"]["extra_nan"] is None and inner["summary"]["extra_inf"] is None
    assert inner["summary"]["extra_numpy"] == 0.25 and inner["summary"]["extra_tuple"] == [1, 2]
    assert inner["comparisons"][1]["distribution"]["kl_max"] == pytest.approx(0.25 * math.log(2), rel=1e-5)
    assert [p.name for p in path.parent.iterdir()] == ["parity.json"]  # no temporary file left behind


def test_json_without_noise_and_load_report(tmp_path, passing):
    run, verdict = passing
    path = write_json(tmp_path / "parity.json", run, verdict)
    run_back, verdict_back, noise_back = load_report(path)
    assert run_back == json.loads(json.dumps(run)) and verdict_back["passed"] is True and noise_back is None
    plain = tmp_path / "report.json"
    plain.write_text(json.dumps(run))
    assert load_report(plain) == (run, None, None)
    # a saved report can be judged again without any model
    again = judge(run_back, [parse_gate("kl_mean>1e-3")])
    assert again.passed


# -- JUnit ------------------------------------------------------------------------------
def test_junit_counts_and_failures(tmp_path, failing):
    run, verdict = failing
    path = write_junit(tmp_path / "junit.xml", run, verdict)
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "vllm-rbln-exec"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["overall", "prompt_0", "prompt_1", "prompt_2"]
    assert {c.get("classname") for c in cases} == {"vllm_rbln_exec.org_Some_Model.cpu"}
    assert suite.get("tests") == "4" and suite.get("errors") == "0"
    # overall: kl_mean; prompt 1: kl_max + argmax; prompt 2: kl_max + argmax; prompt 0 passes
    assert suite.get("failures") == "3" == root.get("failures")
    assert float(suite.get("time")) == pytest.approx(5.5)
    assert cases[1].find("failure") is None
    fail = cases[2].find("failure")
    messages = [v.message for v in verdict.violations if v.prompt_index == 1]
    assert len(messages) == 2
    assert fail.get("message") == messages[0]
    assert fail.text == "\n".join(messages)
    assert fail.get("type") == "ParityViolation"
    assert "kl_mean" in cases[0].find("failure").get("message")
    # the control character of prompt 2 was replaced, so the file parsed at all
    assert "bad \ufffd char" in cases[3].find("system-out").text
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["passed"] == "false" and props["model"] == "org/Some.Model"
    assert "kl_p99>3*noise" in props["skipped"]


def test_junit_of_a_passing_run(tmp_path, passing):
    run, verdict = passing
    root = ET.parse(write_junit(tmp_path / "j.xml", run, verdict)).getroot()
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("3", "0")
    assert suite.findall(".//failure") == []


def test_junit_classname_of_a_model_folder(tmp_path, passing):
    run, verdict = passing
    run["model"] = "/data/models/llama3.2-1b/"
    root = ET.parse(write_junit(tmp_path / "j.xml", run, verdict)).getroot()
    assert root.find(".//testcase").get("classname") == "vllm_rbln_exec.llama3_2-1b.cpu"


# -- markdown ---------------------------------------------------------------------------
def test_markdown_of_a_failing_run(tmp_path, failing):
    run, verdict = failing
    text = write_markdown(tmp_path / "summary.md", run, verdict).read_text()
    first = text.splitlines()[0]
    assert first.startswith("### ❌") and f"{len(verdict.violations)} violations" in first
    assert "**org/Some.Model**" in text and "target `cpu` (vllm 0.32.0, float32)" in text
    for v in verdict.violations:
        assert v.message.replace("<", "&lt;") in text
    assert "| KL mean (nats) |" in text and "`kl_mean>1e-3`" in text
    assert "`argmax:confident`" in text
    assert "a \\| pipe and &lt;b>tag&lt;/b>" in text  # no table break, no HTML tag
    assert "**Worst positions by KL**" in text
    assert "skipped `kl_p99>3*noise`" in text
    # every table row has as many cells as its header
    for block in text.split("\n\n"):
        table = [line for line in block.splitlines() if line.startswith("|")]
        if table:
            widths = {line.replace("\\|", "").count("|") for line in table}
            assert len(widths) == 1, table


def test_markdown_of_a_passing_run_with_noise(passing):
    run, verdict = passing
    text = markdown_summary(run, verdict, measure_noise([run, run]))
    assert text.startswith("### ✅ Parity holds")
    assert "| metric | value | noise | tolerance |" in text
    assert "**Violations**" not in text
