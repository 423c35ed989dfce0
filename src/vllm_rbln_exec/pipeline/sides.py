"""Pipeline step: the two sides of the run, resolved from the options, the device profiles and the models.

Decides what the user left open (the device behind ``--target auto``, expert
parallelism for a mixture-of-experts model) and records each decision; checks
engine names and engine arguments, all before any engine starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..core.errors import HarnessError
from ..engines import ENGINES
from ..remote.probe import ServerInfo
from ..setup.ab import check_preset_device, check_speculative
from ..setup.capabilities import side_gap
from ..setup.devices import DeviceProfile, get_profile, resolve_auto_target
from ..setup.engine_args import check_engine_args
from ..setup.models import read_config, text_config
from ..setup.options import RunOptions, SideOptions
from ..setup.sides import Side, YardstickSpec, parse_yardstick, resolve_side, server_side, yardstick_options
from .context import RunContext
from .models import PreparedModels

DEFAULT_REFERENCE_DEVICE = "cpu"


@dataclass(frozen=True)
class Devices:
    """The device profile of each side, found before anything is loaded (a typo costs no model preparation)."""

    reference: DeviceProfile | None  # None: the side is a server (--reference-url / --target-url)
    target: DeviceProfile | None
    decisions: dict[str, Any] = field(default_factory=dict, hash=False)
    yardstick: YardstickSpec = YardstickSpec()


@dataclass(frozen=True)
class ResolvedSides:
    reference: Side
    target: Side
    decisions: dict[str, Any] = field(default_factory=dict, hash=False)  # what the run chose on its own
    yardstick: Side | None = None  # an honest side at the target's precision (setup.sides.yardstick_options)

    def all(self) -> tuple[Side, ...]:
        return (self.reference, self.target) + ((self.yardstick,) if self.yardstick else ())


def resolve_devices(ctx: RunContext, options: RunOptions) -> Devices:
    decisions: dict[str, Any] = {}
    target = None if options.target.url else _target_profile(ctx, options, decisions)
    reference_name = options.reference.device or DEFAULT_REFERENCE_DEVICE
    if options.ab is not None:
        check_preset_device(options.ab, target.name)
        if options.reference.device is None:  # A/B: both sides on one device
            reference_name = target.name
            decisions["reference_device"] = f"--ab {options.ab}: the target's ({target.name})"
    # a yardstick runs on the reference's profile, so a server reference keeps the default one for it
    reference = get_profile(reference_name, ctx.profiles, option="--reference-device")
    if target is not None:
        p = options.parallel
        target.check_parallel(tp=p.tp, pp=p.pp, dp=p.dp, ep=p.ep)
    for side in (options.reference, options.target):
        if side.url:
            decisions[f"{side.role}_server"] = side.url
            continue
        ENGINES.check(side.engine, option=f"--{side.role}-engine")
        if side.engine == "vllm":  # transformers' arguments are checked against the model's config later
            check_engine_args(side.engine, side.engine_args, side.role)
            check_speculative(side.engine_args, side.role, options.capture.align)
    yardstick = parse_yardstick(options.yardstick, ENGINES.names())
    return Devices(reference, target, decisions, yardstick)


def _target_profile(ctx: RunContext, options: RunOptions, decisions: dict[str, Any]) -> DeviceProfile:
    target_name = options.target.device or "auto"
    if target_name == "auto":
        target_name, note = resolve_auto_target()
        decisions["target_device"] = f"auto -> {target_name}"
        if note:
            ctx.note(note)
    return get_profile(target_name, ctx.profiles, option="--target")


def resolve_sides(ctx: RunContext, options: RunOptions, devices: Devices, models: PreparedModels,
                  servers: dict[str, ServerInfo] | None = None) -> ResolvedSides:
    """Both sides (and a yardstick); ``servers``: what each server side said about itself (``pipeline.served``)."""
    decisions = dict(devices.decisions)
    servers = servers or {}
    parallel = options.parallel
    alias = models.reference.alias
    if alias is not None and alias.needs_ep and not parallel.ep and devices.target is not None:
        parallel = replace(parallel, ep=True)
        devices.target.check_parallel(ep=True)
        decisions["ep"] = "on: mixture-of-experts model"
        ctx.note(f"{alias.name} is a mixture-of-experts model: expert parallelism (--ep) enabled on the target")
    ref_model, tgt_model = options.model, options.target.checkpoint or options.model
    reference = (_served(options.reference, servers) if options.reference.url else
                 resolve_side(options.reference, devices.reference, options.capture, str(models.reference_path),
                              ref_model))
    target = (_served(options.target, servers) if options.target.url else
              resolve_side(options.target, devices.target, options.capture, str(models.target_path), tgt_model,
                           parallel))
    asked, why = yardstick_options(devices.yardstick, reference, target)
    decisions["yardstick"] = why
    yardstick = None if asked is None else resolve_side(asked, devices.reference, options.capture,
                                                        str(models.reference_path), ref_model)
    for side, path in ((reference, models.reference_path), (target, models.target_path),
                       (yardstick, models.reference_path)):
        if side is not None and side.engine != "vllm" and not side.url:
            check_engine_args(side.engine, side.engine_args, side.role, text_config(read_config(path)))
    check_runnable(options, (reference, target, yardstick))
    return ResolvedSides(reference, target, decisions, yardstick)


def check_runnable(options: RunOptions, sides: tuple[Side | None, ...]) -> None:
    """Refuse, before any engine starts, a side whose engine build lacks a kernel its checkpoint needs here
    (``setup.capabilities``); a reference read from a file runs nowhere and is not asked."""
    for side in sides:
        if side is None or (side.role == "reference" and options.reference_source.file):
            continue
        gap = side_gap(side)
        if gap is not None:
            raise HarnessError(f"the {side.role} cannot run on this machine: {gap}")


def _served(asked: SideOptions, servers: dict[str, ServerInfo]) -> Side:
    info = servers[asked.role]
    return server_side(asked, info.model, str(info.model_record.get("root") or info.model))
