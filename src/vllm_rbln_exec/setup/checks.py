"""Checks of flat option values, before any record is built or any engine starts.

Each check raises ``UsageError`` naming the option and the value. Owns value
ranges, choices and combinations of options; it must not read models, start
workers or import torch or vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.dtypes import DTYPE_ALIASES
from ..core.errors import UsageError
from ..core.jsonio import unsafe_output
from ..core.paths import not_a_file
from .server import check_server_flat

ALIGN_MODES = ("forced", "free")
CAPTURE_MODES = ("fast", "api")
STORES = ("q16", "fp32")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PROFILE_SIDES = ("reference", "target")
POSITIVE = ("max_model_len", "tp", "pp", "dp", "batch", "max_tokens", "num_prompts", "topk",
            "block_size_cpu", "block_size_rbln", "snippet_elems", "repeat")
POSITIVE_OR_NONE = ("num_hidden_layers", "max_batched", "block", "max_logprobs_cap", "kv_cache_gib")


def check_flat(v: dict[str, Any]) -> None:
    _check_numbers(v)
    _check_choices(v)
    _check_profiling(v)
    _check_files(v)
    saved_yardsticks(v["save_yardsticks"], v["save_reference"])
    check_server_flat(v)


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _check_numbers(v: dict[str, Any]) -> None:
    for name in POSITIVE + POSITIVE_OR_NONE:
        value = v[name]
        if value is None and name in POSITIVE_OR_NONE:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{_flag(name)} must be a positive number, got {value}", option=_flag(name))
    if v["logprobs"] == 0 or v["logprobs"] < -1:
        raise UsageError(f"--logprobs must be -1 (full vocabulary) or a positive N, got {v['logprobs']}",
                         option="--logprobs")
    if v["max_logprobs_cap"] is not None and v["logprobs"] > v["max_logprobs_cap"]:
        raise UsageError(f"--logprobs {v['logprobs']} exceeds --max-logprobs-cap {v['max_logprobs_cap']}",
                         option="--logprobs")
    if not v["eps"] > 0:
        raise UsageError(f"--eps must be greater than 0, got {v['eps']}", option="--eps")
    if not v["timeout"] > 0:
        raise UsageError("--timeout must be greater than 0", option="--timeout")
    if v["tie_margin"] < 0:
        raise UsageError("--tie-margin must be 0 or more", option="--tie-margin")
    if v["max_tokens"] >= v["max_model_len"]:
        raise UsageError(f"--max-tokens {v['max_tokens']} leaves no room for the prompt in --max-model-len "
                         f"{v['max_model_len']}", option="--max-tokens")


def _check_choices(v: dict[str, Any]) -> None:
    choices = (("align", ALIGN_MODES), ("capture", CAPTURE_MODES), ("store", STORES),
               ("reference_dtype", DTYPES), ("target_dtype", DTYPES))
    for name, allowed in choices:
        value = v[name]
        if value is not None and value not in allowed:
            raise UsageError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {value!r}", option=_flag(name))
    for name in ("reference_engine", "target_engine", "target", "model"):
        if not isinstance(v[name], str) or not v[name]:
            raise UsageError(f"{_flag(name)} must name something, got {v[name]!r}", option=_flag(name))


def _check_profiling(v: dict[str, Any]) -> None:
    side = v["profile_side"]
    if side is not None and side not in PROFILE_SIDES:
        raise UsageError(f"--profile-side must be one of {', '.join(PROFILE_SIDES)}, got {side!r}",
                         option="--profile-side")
    sides = profiled_sides(v)
    if not sides:
        for name in ("profile_memory", "profile_shapes", "profile_stack"):
            if v[name]:
                raise UsageError(f"{_flag(name)} needs --profile or --profile-side", option=_flag(name))
    if side == "reference" and v["reference_file"]:
        raise UsageError("--profile-side reference: with --reference FILE no reference worker runs",
                         option="--profile-side")
    if v["require_cache"] and "reference" in sides and not v["reference_file"]:
        raise UsageError("profiling the reference computes it, which --require-cache forbids; "
                         "use --profile-side target", option="--profile-side" if side else "--profile")


DEFAULT_SAVED_YARDSTICKS = ("bfloat16", "float16")  # the precisions a device team runs against a float32 golden


def saved_yardsticks(value: Any, save_reference: str | None) -> tuple[str, ...]:
    """``--save-yardsticks``: the dtypes whose yardstick travels with a saved reference (none: no extra engine)."""
    if value is None:
        return DEFAULT_SAVED_YARDSTICKS if save_reference else ()
    if not save_reference:
        raise UsageError("--save-yardsticks goes with --save-reference (the yardsticks travel with that file)",
                         option="--save-yardsticks")
    items = [value] if isinstance(value, str) else list(value)
    names = [n.strip().lower() for item in items for n in str(item).split(",") if n.strip()]
    if names == ["none"]:
        return ()
    out: list[str] = []
    for name in names:
        dtype = DTYPE_ALIASES.get(name)
        if dtype not in DEFAULT_SAVED_YARDSTICKS:
            raise UsageError(f"--save-yardsticks {value!r}: {name!r} is not a precision a yardstick is made for; "
                             "use bfloat16, float16, both comma-separated, or none", option="--save-yardsticks")
        if dtype not in out:
            out.append(dtype)
    return tuple(out)


def _check_files(v: dict[str, Any]) -> None:
    if v["reference_file"] and (what := not_a_file(v["reference_file"])) is not None:
        raise UsageError(f"reference file {v['reference_file']} {what}", option="--reference")
    if v["reference_file"] and v["save_reference"]:
        raise UsageError("--reference and --save-reference cannot be combined", option="--save-reference")
    if v["reference_file"] and v["ab"] is not None:
        # the file is a capture made elsewhere, with its own settings: it cannot be the preset's side A
        raise UsageError(f"--ab {v['ab']} runs both sides live on the target's device, A with the preset's "
                         "settings; --reference FILE would replace side A with a capture made elsewhere. Drop "
                         "--reference (side A is cached after its first run) or drop --ab and set --target-args",
                         option="--reference")
    check_outputs({"--json": v["json_out"], "--junit": v["junit_out"], "--markdown": v["markdown_out"],
                   "--html": v["html_out"], "--save-reference": v["save_reference"]},
                  {"--plots": v["plots_dir"]},
                  {"the --reference file": v["reference_file"], "the --spec file": v["spec"]})


def check_outputs(files: dict[str, str | None], folders: dict[str, str | None] | None = None,
                  inputs: dict[str, str | None] | None = None) -> None:
    """Where the reports go, before anything runs (found now, not after a run of many minutes whose verdict it
    would lose): each file option names a regular file or a new one in a writable folder (never a link, a FIFO,
    a device or a folder: ``core.jsonio.unsafe_output``), each folder option a folder, no two options one path,
    and no output one of the run's inputs (``compare --json RUN/parity.json`` would overwrite the run)."""
    named: dict[str, str] = {}
    for option, value in {**files, **(folders or {})}.items():
        if value is None:
            continue
        is_folder = option in (folders or {})
        place = Path(value)
        if is_folder:
            if os.path.lexists(place) and not place.is_dir():
                raise UsageError(f"{option} {value} is not a folder; give a folder", option=option)
        elif (reason := unsafe_output(place)) is not None:
            raise UsageError(f"{option} {value} {reason}", option=option)
        blocked = unwritable_place(place / "x" if is_folder and place.is_dir() else place)
        if blocked is not None:
            raise UsageError(f"{option} {value} cannot be written: {blocked} is not a writable folder", option=option)
        key = os.path.realpath(place)
        if key in named:
            raise UsageError(f"{named[key]} and {option} both name {value}: one would overwrite the other; "
                             "give each its own path", option=option)
        named[key] = option
    for what, value in (inputs or {}).items():
        if value and (clash := named.get(os.path.realpath(value))):
            raise UsageError(f"{clash} {value} is {what}, which this command reads: writing there would destroy "
                             "it; give another path", option=clash)


def profiled_sides(v: dict[str, Any]) -> tuple[str, ...]:
    """The sides whose generation runs under the profiler (--profile-side wins over --profile)."""
    if v["profile_side"]:
        return (v["profile_side"],)
    return PROFILE_SIDES if v["profile"] else ()


def unwritable_place(path: Path) -> Path | None:
    """None if ``path`` could be created (its nearest existing ancestor is a writable folder), else that ancestor."""
    place = path.absolute().parent
    while not place.exists() and place != place.parent:
        place = place.parent
    return None if place.is_dir() and os.access(place, os.W_OK | os.X_OK) else place
