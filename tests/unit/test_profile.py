"""Trace parsing and self-time aggregation (vllm_rbln_exec.profiling.traces) on small hand-written traces
(tests/trace_samples.py), summaries of saved folders, and the profiling options' checks. The
profile-summary command itself runs as a subprocess in tests/plumbing/test_profile_cli.py."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from tests.trace_samples import EVENTS, X
from tests.trace_samples import trace_folder as _trace_folder
from tests.trace_samples import write_trace as _write_trace

from vllm_rbln_exec.core.errors import UsageError
from vllm_rbln_exec.profiling.request import profile_request
from vllm_rbln_exec.profiling.traces import (
    ProfileError,
    aggregate_events,
    find_trace_files,
    load_summaries,
    load_trace_events,
    resolve_trace_folders,
    speed_row_from_timings,
    summarize_folder,
)
from vllm_rbln_exec.setup.options import build_options


def test_self_time_subtracts_direct_children_only():
    st = aggregate_events(EVENTS)
    host = st.host
    assert host["step"].self_us == pytest.approx(100 - 50 - 30)
    assert host["step"].total_us == 100
    assert host["aten::linear"].calls == 2
    assert host["aten::linear"].self_us == pytest.approx((50 - 40) + (30 - 26))
    assert host["aten::linear"].total_us == 80
    # the launch inside addmm is addmm's child, not linear's
    assert host["aten::addmm"].self_us == pytest.approx((40 - 4) + 26)
    assert host["cudaLaunchKernel"].self_us == 4
    # same name nested in itself: self times add up, totals count both levels
    assert host["aten::add"].calls == 3
    assert host["aten::add"].self_us == pytest.approx(5 + 15 + 5)
    assert host["aten::add"].total_us == 30
    assert st.host_self_us == pytest.approx(sum(s.self_us for s in host.values()))
    # self times of one thread add up to the outermost event's duration
    assert sum(s.self_us for n, s in host.items() if n != "aten::add") == pytest.approx(100)


def test_device_kernels_and_ignored_categories():
    st = aggregate_events(EVENTS)
    assert set(st.device) == {"sgemm_kernel", "Memcpy DtoH"}
    assert st.device["sgemm_kernel"].calls == 2
    assert st.device["sgemm_kernel"].self_us == 50
    assert st.device_us == 55
    for ignored in ("gemm annotation", "<module>", "PyTorch Profiler (0)", "[memory]", "flow"):
        assert ignored not in st.host and ignored not in st.device
    assert st.start_us == 0 and st.end_us == 120 and st.span_us == 120
    assert [s.name for s in st.top("host", 2)] == ["aten::addmm", "aten::add"]
    assert [s.name for s in st.top("device")] == ["sgemm_kernel", "Memcpy DtoH"]


def test_a_trace_without_known_categories_counts_every_slice():
    st = aggregate_events([X("outer", 0, 10, cat="x"), X("inner", 2, 3, cat="x"), X("other", 0, 1, cat="y", tid=9)])
    assert st.host["outer"].self_us == 7 and st.host["inner"].self_us == 3 and st.host["other"].self_us == 1


def test_unordered_and_malformed_events_are_handled():
    events = [X("child", 5, 2), X("parent", 0, 10), {"ph": "X", "name": "no ts"},
              {"ph": "X", "cat": "cpu_op", "name": "bad", "ts": "x", "dur": 1}, X("neg", 0, -1)]
    st = aggregate_events(events)
    assert st.host["parent"].self_us == 8
    assert set(st.host) == {"parent", "child"}


def test_load_plain_gzipped_and_bare_list_traces(tmp_path):
    a = _write_trace(tmp_path / "a.json.gz", EVENTS)
    b = _write_trace(tmp_path / "b.json", EVENTS, gz=False)
    c = _write_trace(tmp_path / "c.json", EVENTS, gz=False, wrap=False)
    for path in (a, b, c):
        assert len(load_trace_events(path)) == len(EVENTS)
    (tmp_path / "broken.json.gz").write_bytes(gzip.compress(b"{not json"))
    with pytest.raises(ProfileError, match="not a readable chrome trace"):
        load_trace_events(tmp_path / "broken.json.gz")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(ProfileError, match="no traceEvents"):
        load_trace_events(tmp_path / "other.json")


def test_summarize_folder_sums_files_and_reads_meta(tmp_path):
    meta = {"side": "target", "engine": "vllm", "platform": "cpu",
            "timings": {"capture_total_s": 2.0, "generated_tokens": 16.0}}
    folder = _trace_folder(tmp_path, "target_m_20250101-000000", meta)
    _write_trace(folder / "target_rank1.456.pt.trace.json.gz", EVENTS)
    assert [p.name for p in find_trace_files(folder)] == sorted(
        ["target_m_20250101-000000_rank0.123.pt.trace.json.gz", "target_rank1.456.pt.trace.json.gz"])
    s = summarize_folder(folder)
    assert len(s.files) == 2
    assert s.stats.host["aten::linear"].calls == 4
    assert s.label == "target (vllm cpu)"
    row = speed_row_from_timings(s.label, s.meta["timings"], True)
    assert row.tokens_per_s == 8.0 and row.ms_per_token == 125.0


def test_resolve_trace_folders(tmp_path):
    root = tmp_path / "profile"
    ref = _trace_folder(root, "reference_m_20250101-000000")
    tgt = _trace_folder(root, "target_m_20250101-000000", gz=False)
    (root / "empty").mkdir()
    assert resolve_trace_folders(ref) == [ref]
    assert resolve_trace_folders(root) == [ref, tgt]
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"sides": {
        "reference": {"profile": None}, "target": {"profile": {"dir": str(tgt), "traces": []}}}}))
    assert resolve_trace_folders(run) == [tgt]  # a schema-1 run folder
    (run / "parity.json").write_text(json.dumps({"run": {"sides": {
        "reference": {"profile": {"dir": str(ref), "traces": []}}, "target": {"profile": None}}}}))
    assert resolve_trace_folders(run) == [ref]  # parity.json wins
    assert [s.folder for s in load_summaries(root)] == [ref, tgt]


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
    (lambda p: (p / "e").mkdir() or p / "e", "no traces"),
])
def test_bad_dirs_raise_usage_errors(tmp_path, setup, message):
    with pytest.raises(ProfileError, match=message) as info:
        resolve_trace_folders(setup(tmp_path))
    assert info.value.exit_code == 2


def test_an_unprofiled_run_folder_is_refused(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"sides": {"reference": {"profile": None}}}))
    with pytest.raises(ProfileError, match="was not profiled"):
        resolve_trace_folders(tmp_path)


def _request(options, side, model, stamp):
    p = options.profile
    return profile_request(p.sides, p.dir, side, model, p.memory, p.shapes, p.stack, stamp)


def test_profile_request_and_options():
    options = build_options(target="cpu", profile=True, profile_dir="somewhere", profile_shapes=True)
    assert options.profile.sides == ("reference", "target")
    req = _request(options, "target", "org/My Model", "20250101-000000")
    assert Path(req.dir).is_absolute()
    assert Path(req.dir).name == "target_My_Model_20250101-000000"
    assert (req.prefix, req.shapes, req.memory, req.stack) == ("target", True, False, False)
    only = build_options(target="cpu", profile_side="target")
    assert only.profile.sides == ("target",)
    assert _request(only, "reference", "m", "s") is None
    assert _request(build_options(target="cpu"), "target", "m", "s") is None


@pytest.mark.parametrize("kwargs, option", [
    ({"profile_side": "both-ish"}, "--profile-side"),
    ({"profile_memory": True}, "--profile-memory"),
    ({"profile_stack": True}, "--profile-stack"),
])
def test_bad_profiling_options(kwargs, option):
    with pytest.raises(UsageError) as info:
        build_options(target="cpu", **kwargs)
    assert info.value.option == option


def test_run_report_renders_tables_and_survives_a_broken_trace(tmp_path):
    import io

    from rich.console import Console

    from vllm_rbln_exec.outputs.profile_tables import render_run_profile

    good = _trace_folder(tmp_path, "target_m_20250101-000000")
    broken = tmp_path / "reference_m_20250101-000000"
    broken.mkdir()
    (broken / "r.pt.trace.json.gz").write_bytes(b"\x1f\x8b not gzip")

    def side(name, profile, wall):
        return {"engine": "vllm", "platform": "cpu", "source": "worker", "profile": profile,
                "timings": {"capture_total_s": wall, "generated_tokens": 32.0}}

    result = {"sides": {"reference": side("reference", {"dir": str(broken)}, 1.0),
                        "target": side("target", {"dir": str(good)}, 3.0)}}
    buf = io.StringIO()
    render_run_profile(Console(file=buf, width=200, no_color=True), result, top=4)
    out = buf.getvalue()
    assert "reference: " in out and "not a readable chrome trace" in out
    assert "top 4 of 5 CPU ops by self time" in out and "device kernels by time" in out
    assert "× reference" in out and "3.00" in out and "32.0" in out  # 3x the wall time, 32 tokens/s on the reference

    buf = io.StringIO()
    render_run_profile(Console(file=buf, width=200), {"sides": {"target": side("target", None, 1.0)}})
    assert buf.getvalue() == ""  # nothing profiled, nothing printed
