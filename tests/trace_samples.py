"""Small hand-written torch-profiler traces shared by the unit tests of trace parsing and the
plumbing tests of the profile-summary command."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from vllm_rbln_exec.profiling.traces import META


def X(name, ts, dur, cat="cpu_op", tid=1, pid=7):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}


# One decode step on thread 1:
#   step [0, 100)                       user annotation
#     aten::linear [10, 60)
#       aten::addmm [15, 55)
#         cudaLaunchKernel [50, 54)     runtime call inside addmm
#     aten::linear [60, 90)
#       aten::addmm [62, 88)
# thread 2: aten::add [0, 5), and the same name again nested in itself [20, 40) > [25, 30)
# device: two kernels, one memcpy; plus events that must be ignored.
EVENTS = [
    {"ph": "M", "name": "process_name", "pid": 7, "tid": 0, "args": {"name": "python"}},
    X("step", 0, 100, cat="user_annotation"),
    X("aten::linear", 10, 50),
    X("aten::addmm", 15, 40),
    X("cudaLaunchKernel", 50, 4, cat="cuda_runtime"),
    X("aten::linear", 60, 30),
    X("aten::addmm", 62, 26),
    X("aten::add", 0, 5, tid=2),
    X("aten::add", 20, 20, tid=2),
    X("aten::add", 25, 5, tid=2),
    X("sgemm_kernel", 52, 30, cat="kernel", tid=7, pid=0),
    X("sgemm_kernel", 90, 20, cat="kernel", tid=7, pid=0),
    X("Memcpy DtoH", 115, 5, cat="gpu_memcpy", tid=7, pid=0),
    X("gemm annotation", 52, 40, cat="gpu_user_annotation", tid=7, pid=0),
    X("<module>", 0, 500, cat="python_function"),
    X("PyTorch Profiler (0)", -10, 1000, cat="Trace", pid="Spans"),
    {"ph": "i", "cat": "cpu_instant_event", "name": "[memory]", "ts": 12, "pid": 7, "tid": 1, "args": {}},
    {"ph": "f", "cat": "ac2g", "name": "flow", "ts": 50, "pid": 7, "tid": 1},
]


def write_trace(path: Path, events, gz: bool = True, wrap: bool = True) -> Path:
    data = {"schemaVersion": 1, "traceEvents": events} if wrap else events
    text = json.dumps(data)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def trace_folder(root: Path, name: str, meta: dict | None = None, gz: bool = True) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    write_trace(folder / f"{name}_rank0.123.pt.trace.json{'.gz' if gz else ''}", EVENTS, gz=gz)
    if meta is not None:
        (folder / META).write_text(json.dumps(meta))
    return folder
