"""What the user asked for: small frozen records, built and checked once from flat option values.

The CLI, the pytest plugin and the benchmark all call :func:`build_options`
with the same flat names (``FLAT_DEFAULTS``), so one set of checks serves all
three. The records are never mutated: what a run decides on its own (a device
for ``--target auto``, expert parallelism for a MoE model, settings adopted
from a reference file) goes into the resolved sides and the report's
``resolved`` record, next to these options. Nothing here starts an engine,
reads a model or imports torch or vLLM.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UsageError
from .checks import check_flat, profiled_sides, saved_yardsticks
from .prompts import builtin_prompts, check_not_empty, expand_prompt_args
from .server import normalize_url

REFERENCE, TARGET = "reference", "target"

# Every flat option name with its default: the vocabulary of the CLI, the pytest plugin and the benchmark.
FLAT_DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m", "target": "auto", "max_model_len": 2048, "num_hidden_layers": None,
    "trust_remote_code": False, "tp": 1, "pp": 1, "dp": 1, "ep": False, "batch": 4, "max_tokens": 32,
    "max_batched": None, "prompts": (), "num_prompts": 4, "logprobs": -1, "max_logprobs_cap": None,
    "inspect_logits": True, "topk": 5, "block_size_cpu": 128, "block_size_rbln": 8192, "block": None,
    "no_color": False, "no_snippet": False, "snippet_elems": 5, "use_cache": False, "require_cache": False,
    "profile": False, "profile_side": None, "profile_memory": False, "profile_shapes": False,
    "profile_stack": False, "profile_dir": "profile", "eps": 0.5, "reference_engine": "vllm",
    "target_engine": "vllm", "reference_dtype": None, "target_dtype": None, "reference_device": None,
    "target_device": None, "reference_args": None, "target_args": None, "target_model": None,
    "align": "forced", "tie_margin": 0.5, "capture": "fast", "store": "q16", "fail_on": (), "spec": None,
    "no_default_gates": False, "near_ties_fail": None, "repeat": 1, "json_out": None, "junit_out": None,
    "html_out": None, "plots_dir": None,
    "markdown_out": None, "reference_file": None, "save_reference": None, "save_yardsticks": None, "devices_file": None,
    "cache_dir": "cache", "runs_dir": "runs", "run_dir": None, "timeout": 1800.0, "kv_cache_gib": None,
    "verbose": False, "localize": False, "localize_modules": False, "yardstick": "auto", "ab": None,
    "target_url": None, "reference_url": None, "served_model": None, "api_key_env": None, "api_key_file": None,
    "server_logprobs": None, "server_retries": 3, "server_scoring": "auto", "target_quantization": None,
}  # fmt: skip


@dataclass(frozen=True)
class SideOptions:
    """One side as asked: ``device`` is a device profile name (None: the role's default), the rest overrides."""

    role: str
    device: str | None
    engine: str
    dtype: str | None
    torch_device: str | None
    checkpoint: str | None
    engine_args: dict[str, Any] = field(default_factory=dict, hash=False)
    block: int | None = None
    url: str | None = None  # an OpenAI-compatible server is this side (setup.server); its API's base, .../v1


@dataclass(frozen=True)
class Parallel:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: bool = False


@dataclass(frozen=True)
class CaptureOptions:
    prompts: tuple[str, ...]
    max_tokens: int
    batch: int
    max_batched: int | None
    logprobs: int
    max_logprobs_cap: int | None
    align: str
    capture: str
    store: str
    max_model_len: int
    trust_remote_code: bool
    num_hidden_layers: int | None
    block_size_cpu: int
    block_size_rbln: int
    kv_cache_gib: int | None
    timeout: float


@dataclass(frozen=True)
class CompareOptions:
    eps: float
    topk: int
    snippet_elems: int
    tie_margin: float


@dataclass(frozen=True)
class GateOptions:
    """What decides the verdict, apart from the run itself."""

    fail_on: tuple[str, ...] = ()
    spec: str | None = None
    use_defaults: bool = True
    near_ties_fail: bool | None = None
    target_quantization: str | None = None  # declared by the user (verdict.defaults.QUANTIZED_TOLERANCES)


@dataclass(frozen=True)
class ReferenceOptions:
    file: str | None
    save: str | None
    use_cache: bool
    require_cache: bool
    yardsticks: tuple[str, ...] = ()  # the dtypes whose yardstick is written next to ``save`` (--save-yardsticks)


@dataclass(frozen=True)
class OutputOptions:
    json: str | None
    junit: str | None
    markdown: str | None
    run_dir: str | None
    runs_dir: str
    html: str | None = None  # the self-contained HTML report
    plots: str | None = None  # a folder for the plots as PNG and SVG files


@dataclass(frozen=True)
class DisplayOptions:
    no_color: bool = False
    inspect_logits: bool = True
    snippet: bool = True
    snippet_elems: int = 5
    verbose: bool = False


@dataclass(frozen=True)
class ProfileOptions:
    sides: tuple[str, ...]
    memory: bool
    shapes: bool
    stack: bool
    dir: str


@dataclass(frozen=True)
class LocalizeOptions:
    """``--localize``: after the run, find the first layer whose output departs (``pipeline.localize``)."""

    enabled: bool = False
    modules: bool = False  # attention and MLP outputs too


@dataclass(frozen=True)
class ServerOptions:
    """How the server sides (``--target-url``, ``--reference-url``) are asked; the API key itself is never here,
    only where it is read from (``setup.server.read_api_key``)."""

    served_model: str | None = None  # None: the one model the server lists
    api_key_env: str | None = None
    api_key_file: str | None = None
    logprobs: int | None = None  # what the server is asked for; None: --logprobs
    retries: int = 3
    scoring: str = "auto"  # auto | prompt_logprobs | echo


@dataclass(frozen=True)
class RunOptions:
    model: str
    reference: SideOptions
    target: SideOptions
    parallel: Parallel
    capture: CaptureOptions
    compare: CompareOptions
    gates: GateOptions
    reference_source: ReferenceOptions
    outputs: OutputOptions
    display: DisplayOptions
    profile: ProfileOptions
    repeat: int
    cache_dir: str
    devices_file: str | None
    explicit: frozenset[str] = frozenset()
    localize: LocalizeOptions = LocalizeOptions()
    yardstick: str = "auto"  # auto | none | ENGINE[:DTYPE] | DTYPE (setup.sides.parse_yardstick)
    ab: str | None = None  # --ab NAME: the A/B preset folded into these options (setup.ab)
    server: ServerOptions = ServerOptions()

    def side(self, role: str) -> SideOptions:
        return self.reference if role == REFERENCE else self.target

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["explicit"] = sorted(self.explicit)
        return data


def build_options(explicit: frozenset[str] | set[str] | None = None, **flat: Any) -> RunOptions:
    """Flat option values (names of ``FLAT_DEFAULTS``) -> checked ``RunOptions``; UsageError on bad input."""
    unknown = sorted(set(flat) - set(FLAT_DEFAULTS))
    if unknown:
        from ..core.registry import suggest

        raise UsageError("; ".join(suggest("option", name, FLAT_DEFAULTS) for name in unknown))
    v = {**FLAT_DEFAULTS, **flat}
    explicit = frozenset(explicit if explicit is not None else flat)
    if "max_model_len" not in explicit:
        from .models import default_max_model_len

        v["max_model_len"] = default_max_model_len(str(v["model"])) or v["max_model_len"]
    if v["ab"] is not None:
        from .ab import apply_preset

        given = {role: parse_engine_args(v[f"{role}_args"], f"--{role}-args") for role in (REFERENCE, TARGET)}
        v = apply_preset(v, explicit, given)
    check_flat(v)
    return _records(v, explicit)


def _records(v: dict[str, Any], explicit: frozenset[str]) -> RunOptions:
    prompts = tuple(expand_prompt_args(list(v["prompts"]))) if v["prompts"] else tuple(builtin_prompts(v["num_prompts"]))
    check_not_empty(prompts)
    ref_device, ref_torch = _reference_device(v["reference_device"])
    return RunOptions(
        model=v["model"],
        reference=SideOptions(REFERENCE, ref_device, v["reference_engine"], v["reference_dtype"], ref_torch,
                              None, parse_engine_args(v["reference_args"], "--reference-args"),
                              url=_url(v["reference_url"], "--reference-url")),
        target=SideOptions(TARGET, v["target"], v["target_engine"], v["target_dtype"], v["target_device"],
                           v["target_model"], parse_engine_args(v["target_args"], "--target-args"), v["block"],
                           url=_url(v["target_url"], "--target-url")),
        parallel=Parallel(v["tp"], v["pp"], v["dp"], bool(v["ep"])),
        capture=CaptureOptions(
            prompts=prompts, max_tokens=v["max_tokens"], batch=v["batch"], max_batched=v["max_batched"],
            logprobs=v["logprobs"], max_logprobs_cap=v["max_logprobs_cap"], align=v["align"], capture=v["capture"],
            store=v["store"], max_model_len=v["max_model_len"], trust_remote_code=bool(v["trust_remote_code"]),
            num_hidden_layers=v["num_hidden_layers"], block_size_cpu=v["block_size_cpu"],
            block_size_rbln=v["block_size_rbln"], kv_cache_gib=v["kv_cache_gib"], timeout=float(v["timeout"])),
        compare=CompareOptions(v["eps"], v["topk"], v["snippet_elems"], v["tie_margin"]),
        gates=GateOptions(tuple(v["fail_on"]), v["spec"], not v["no_default_gates"], v["near_ties_fail"],
                          _quantization(v["target_quantization"])),
        reference_source=ReferenceOptions(v["reference_file"], v["save_reference"],
                                          bool(v["use_cache"] or v["require_cache"]), bool(v["require_cache"]),
                                          saved_yardsticks(v["save_yardsticks"], v["save_reference"])),
        outputs=OutputOptions(v["json_out"], v["junit_out"], v["markdown_out"], v["run_dir"], v["runs_dir"],
                              v["html_out"], v["plots_dir"]),
        display=DisplayOptions(bool(v["no_color"]), bool(v["inspect_logits"]), not v["no_snippet"],
                               v["snippet_elems"], bool(v["verbose"])),
        profile=ProfileOptions(profiled_sides(v), bool(v["profile_memory"]), bool(v["profile_shapes"]),
                               bool(v["profile_stack"]), v["profile_dir"]),
        repeat=v["repeat"], cache_dir=v["cache_dir"], devices_file=v["devices_file"], explicit=explicit,
        localize=LocalizeOptions(bool(v["localize"] or v["localize_modules"]), bool(v["localize_modules"])),
        yardstick=str(v["yardstick"] or "auto"),
        ab=v["ab"],
        server=ServerOptions(v["served_model"], v["api_key_env"], v["api_key_file"], v["server_logprobs"],
                             int(v["server_retries"]), str(v["server_scoring"])),
    )


def _quantization(value: str | None) -> str | None:
    """``--target-quantization``: a short label of the scheme (w8a8, fp8, q4_1-a8, ...), recorded as given."""
    if value is None:
        return None
    label = str(value).strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,39}", label):
        raise UsageError(f"--target-quantization {value!r}: a short label of the scheme, e.g. w8a8, fp8, w4a16, "
                         "q4_1-a8 (letters, digits and _ . : + -, at most 40)", option="--target-quantization")
    return label


def _url(value: str | None, option: str) -> str | None:
    return None if value is None else normalize_url(value, option)


def _reference_device(value: str | None) -> tuple[str | None, str | None]:
    """``--reference-device``: a device profile name, or ``NAME:INDEX`` (profile NAME on that torch device)."""
    if not value:
        return None, None
    name, _, index = value.partition(":")
    return name, (value if index else None)


def parse_engine_args(value: Any, option: str) -> dict[str, Any]:
    """``--target-args``/``--reference-args``: a JSON object (or a dict from Python), keys are engine arguments."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        text = value
        if value.startswith("@"):
            path = Path(value[1:]).expanduser()
            if not path.is_file():
                raise UsageError(f"{option} file {path} does not exist", option=option)
            text = path.read_text(encoding="utf-8", errors="replace")
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{option} must be a JSON object, e.g. '{{\"enable_prefix_caching\": true}}': {exc}",
                             option=option) from exc
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise UsageError(f"{option} must be a JSON object of engine arguments, got {type(value).__name__}",
                         option=option)
    return dict(value)
