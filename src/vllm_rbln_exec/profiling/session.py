"""Starting and stopping the torch profiler inside a worker (imports torch lazily).

Two ways in: vLLM's own profiler configuration (``profiler_config`` on
``vllm.LLM``, or the ``VLLM_TORCH_PROFILER_*`` variables of older vLLM), which
profiles where vLLM's model runner lives, also in another process; and
``torch.profiler`` directly for engines that run in the worker's own process
(transformers). Both write chrome traces into ``ProfileRequest.dir``; the
worker then notes what it measured in ``profile.json`` beside them. Reading the
traces is ``vllm_rbln_exec.profiling.traces``'s job, not this module's; nothing here
touches the capture.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from ..core.jsonio import write_json_atomic
from .request import META, ProfileRequest
from .traces import find_trace_files

# Older vLLM (before ProfilerConfig) read these when its workers started.
LEGACY_ENV = {
    "dir": "VLLM_TORCH_PROFILER_DIR",
    "shapes": "VLLM_TORCH_PROFILER_RECORD_SHAPES",
    "memory": "VLLM_TORCH_PROFILER_WITH_PROFILE_MEMORY",
    "stack": "VLLM_TORCH_PROFILER_WITH_STACK",
}


def vllm_profiler_kwargs(options: ProfileRequest, llm_cls) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` that make its workers record torch traces.

    The activities are left to vLLM: CPU on a CPU platform, CPU and CUDA on a GPU."""
    folder = Path(options.dir)  # made by whoever writes the first trace: a failed start leaves nothing
    if "profiler_config" in inspect.signature(llm_cls.__init__).parameters:
        return {"profiler_config": {
            "profiler": "torch",
            "torch_profiler_dir": str(folder),
            "torch_profiler_record_shapes": bool(options.shapes),
            "torch_profiler_with_memory": bool(options.memory),
            "torch_profiler_with_stack": bool(options.stack),
            "torch_profiler_use_gzip": True,
        }}
    # vLLM reads its variables lazily, so setting them before the engine starts is
    # enough; engine processes it spawns inherit them.
    os.environ[LEGACY_ENV["dir"]] = str(folder)
    for key in ("shapes", "memory", "stack"):
        os.environ[LEGACY_ENV[key]] = "1" if getattr(options, key) else "0"
    return {}


def vllm_start_profile(llm, options: ProfileRequest) -> None:
    params = inspect.signature(llm.start_profile).parameters
    if "profile_prefix" in params:
        llm.start_profile(profile_prefix=options.prefix or None)
    else:
        llm.start_profile()


class TorchProfileSession:
    """``torch.profiler`` around code that runs in this process."""

    def __init__(self, options: ProfileRequest, torch_device: str | None = None):
        self.options = options
        self.device_type = (torch_device or "cpu").split(":")[0]
        self.profiler = None

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device_type == "cuda" and torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self.profiler = profile(
            activities=activities,
            record_shapes=bool(self.options.shapes),
            profile_memory=bool(self.options.memory),
            with_stack=bool(self.options.stack),
        )
        self.profiler.start()

    def stop(self) -> Path | None:
        if self.profiler is None:
            return None
        import torch

        if self.device_type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels still queued would miss the trace
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        folder = Path(self.options.dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{self.options.prefix or 'worker'}_{self.device_type}.{os.getpid()}.pt.trace.json.gz"
        path = folder / name
        profiler.export_chrome_trace(str(path))
        return path


def write_profile_meta(options: ProfileRequest, info: dict[str, Any]) -> dict[str, Any]:
    """Note what was profiled beside the traces; returns what the worker's result names."""
    folder = Path(options.dir)
    traces = [p.name for p in find_trace_files(folder)]
    meta = {**info, "options": {k: bool(getattr(options, k)) for k in ("memory", "shapes", "stack")}, "traces": traces}
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / META, meta)
    return {"dir": str(folder), "traces": traces}
