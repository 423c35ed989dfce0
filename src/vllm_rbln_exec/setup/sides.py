"""A side: what produces one capture, as a typed value.

A ``Side`` is a role (reference, target, later others) on a device profile,
with an engine, a dtype, a checkpoint, engine arguments and the torch device.
``resolve_side`` turns what the user asked (``SideOptions``) and the device
profile into one, filling the profile's defaults; it is a pure function. This
module must not start workers, read models or import torch or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .devices import DeviceProfile
from .options import CaptureOptions, Parallel, SideOptions

# Profile engine defaults that are vLLM engine arguments, passed through unless the side's own args say otherwise.
PROFILE_ENGINE_ARGS = ("enforce_eager", "gpu_memory_utilization")


@dataclass(frozen=True)
class Side:
    role: str
    device: str  # device profile name
    platform: str  # what the worker must find itself running on
    engine: str
    dtype: str
    checkpoint: str  # model folder
    model_name: str  # what the user called the model
    torch_device: str
    parallel: Parallel = Parallel()
    block_size: int | None = None
    engine_args: dict[str, Any] = field(default_factory=dict, hash=False)  # the user's, as given
    profile_engine_args: dict[str, Any] = field(default_factory=dict, hash=False)  # the profile's defaults

    def effective_engine_args(self) -> dict[str, Any]:
        """The engine arguments in force beyond what the harness sets itself: profile defaults, then the user's."""
        return {**self.profile_engine_args, **self.engine_args}


def resolve_side(asked: SideOptions, profile: DeviceProfile, capture: CaptureOptions, checkpoint: str,
                 model_name: str, parallel: Parallel = Parallel()) -> Side:
    """The side that will run: the user's choices, else the profile's defaults."""
    torch_device = asked.torch_device or profile.torch_device
    platform = profile.platform if asked.engine == "vllm" else torch_device.split(":")[0]
    return Side(
        role=asked.role,
        device=profile.name,
        platform=platform,
        engine=asked.engine,
        dtype=asked.dtype or profile.engine_default("dtype", "auto"),
        checkpoint=str(checkpoint),
        model_name=model_name,
        torch_device=torch_device,
        parallel=parallel,
        block_size=_block_size(asked, profile, capture),
        engine_args=dict(asked.engine_args),
        # vLLM engine arguments: a transformers side never sees them, so they are not its to record
        profile_engine_args={k: profile.engine[k] for k in PROFILE_ENGINE_ARGS
                             if asked.engine == "vllm" and profile.engine.get(k) is not None},
    )


def _block_size(asked: SideOptions, profile: DeviceProfile, capture: CaptureOptions) -> int | None:
    """``--block`` for this side, else ``--block-size-cpu``/``--block-size-rbln`` by profile, else the profile's."""
    if profile.name == "rbln":
        return asked.block or capture.block_size_rbln
    if profile.name == "cpu":
        return asked.block or capture.block_size_cpu
    return asked.block or profile.engine_default("block_size")


def side_differences(a: Side, b: Side) -> list[tuple[str, Any, Any]]:
    """(what, a's value, b's value) for everything that differs between two sides, role aside."""
    out = []
    for name in ("device", "platform", "engine", "dtype", "checkpoint", "torch_device", "parallel", "block_size"):
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            out.append((name, va, vb))
    ea, eb = a.effective_engine_args(), b.effective_engine_args()
    for key in sorted(set(ea) | set(eb)):
        if ea.get(key) != eb.get(key):
            out.append((f"engine arg {key}", ea.get(key), eb.get(key)))
    return out
