"""A side: what produces one capture, as a typed value.

A ``Side`` is a role (reference, target, yardstick, later others) on a device
profile, with an engine, a dtype, a checkpoint, engine arguments and the torch
device. ``resolve_side`` turns what the user asked (``SideOptions``) and the
device profile into one, filling the profile's defaults; it is a pure function.
``parse_yardstick`` and ``yardstick_options`` say whether a run gets a
yardstick (an honest side at the target's precision, see docs/yardstick.md) and
what it is asked to be: any later step that wants one (per-layer localisation)
reuses them. This module must not start workers, read models or import torch
or vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.dtypes import DTYPE_ALIASES, PRECISION_ORDER, canonical_dtype
from ..core.errors import UsageError
from ..core.registry import suggest
from .devices import DeviceProfile
from .options import CaptureOptions, Parallel, SideOptions

YARDSTICK = "yardstick"
YARDSTICK_MODES = ("auto", "none")
YARDSTICK_HELP = ("auto (a yardstick when the target's dtype is coarser than the reference's), none, or "
                  "ENGINE[:DTYPE] / DTYPE (e.g. vllm:bfloat16, transformers, bfloat16)")

# A server side's fixed fields: no device profile, no platform check, the API its capture speaks.
SERVER_DEVICE, SERVER_PLATFORM, SERVER_ENGINE = "server", "remote", "openai"

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
    url: str | None = None  # a server side (``server_side``): the API's base; its capture is an HTTP client's

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


def server_side(asked: SideOptions, model_id: str, checkpoint: str) -> Side:
    """A side that is a running OpenAI-compatible server (``--target-url``/``--reference-url``).

    Nothing about it is the harness's to choose: ``model_id`` is the model the server serves, ``checkpoint``
    what the server says it loaded (vLLM's ``root``), and the dtype is what the user states the server runs
    (``auto``: unknown, judged by the bfloat16 tier), since the OpenAI API does not say."""
    return Side(role=asked.role, device=SERVER_DEVICE, platform=SERVER_PLATFORM, engine=SERVER_ENGINE,
                dtype=asked.dtype or "auto", checkpoint=checkpoint, model_name=model_id, torch_device="",
                url=asked.url)


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
    for name in ("device", "platform", "engine", "dtype", "checkpoint", "torch_device", "parallel", "block_size",
                 "url"):
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            out.append((name, va, vb))
    ea, eb = a.effective_engine_args(), b.effective_engine_args()
    for key in sorted(set(ea) | set(eb)):
        if ea.get(key) != eb.get(key):
            out.append((f"engine arg {key}", ea.get(key), eb.get(key)))
    return out


@dataclass(frozen=True)
class YardstickSpec:
    """``--yardstick`` parsed: ``mode`` auto | none | named; a named one may leave engine or dtype open."""

    mode: str = "auto"
    engine: str | None = None
    dtype: str | None = None


def parse_yardstick(value: str | None, engines: Iterable[str]) -> YardstickSpec:
    """``--yardstick`` -> YardstickSpec; UsageError listing the choices (with a did-you-mean) otherwise."""
    raw = (value or "auto").strip().lower()
    if raw in YARDSTICK_MODES:
        return YardstickSpec(raw)
    engines = list(engines)
    parts = [p.strip() for p in raw.split(":")]
    engine = dtype = None
    for part in parts if len(parts) <= 2 else ["", ""]:
        if part in DTYPE_ALIASES and dtype is None:
            dtype = DTYPE_ALIASES[part]
        elif part in engines and engine is None:
            engine = part
        else:
            known = [*YARDSTICK_MODES, *engines, *sorted(set(DTYPE_ALIASES.values()))]
            hint = suggest("choice", part or raw, known) if part else f"unknown choice {value!r}"
            raise UsageError(f"--yardstick {value!r}: {hint}. Use {YARDSTICK_HELP}", option="--yardstick")
    return YardstickSpec("named", engine, dtype)


def yardstick_options(spec: YardstickSpec, reference: Side, target: Side) -> tuple[SideOptions | None, str]:
    """What the yardstick is asked to be (None: the run has none) and why, as one line for the report.

    The yardstick runs where the reference runs (its device profile and checkpoint, so its weights are
    the honest ones), at the target's precision unless named, on the same forced tokens."""
    ref_dtype = canonical_dtype(reference.dtype, reference.platform)
    tgt_dtype = canonical_dtype(target.dtype, target.platform)
    if spec.mode == "none":
        return None, "none: --yardstick none"
    if reference.url:
        return None, "none: the reference is a server (a yardstick runs where the reference runs)"
    coarser = PRECISION_ORDER.index(tgt_dtype) > PRECISION_ORDER.index(ref_dtype)
    if spec.mode == "auto" and not coarser:
        return None, f"none: the target's {tgt_dtype} is not coarser than the reference's {ref_dtype}"
    # unnamed: the reference's engine. With the default vLLM reference that is vLLM's CPU bf16, which predicted
    # vLLM CUDA bf16's KL within 2 % where transformers' CPU bf16 was 21 % off (docs/yardstick.md)
    engine = spec.engine or reference.engine
    dtype = spec.dtype or tgt_dtype
    why = (f"auto: the target's {tgt_dtype} is coarser than the reference's {ref_dtype}" if spec.mode == "auto"
           else "named with --yardstick")
    same_engine = engine == reference.engine
    asked = SideOptions(role=YARDSTICK, device=reference.device, engine=engine, dtype=dtype,
                        torch_device=None if engine == "vllm" else reference.torch_device, checkpoint=None,
                        engine_args=dict(reference.engine_args) if same_engine else {})
    return asked, why
