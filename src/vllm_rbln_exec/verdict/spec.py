"""Parity spec files: tolerances per model and per dtype pair, and their precedence.

This module owns reading a TOML parity spec (``--spec FILE``, or the
``[tool.vllm-rbln-exec]`` table of ./pyproject.toml), validating it, and
resolving which gates apply to one run. Parsing single tolerances belongs to
``expressions`` (through ``gates.parse_gate``), the built-in tolerances to
``defaults``, metric names to :mod:`~vllm_rbln_exec.compare.catalogue`, judging
to ``judge``; this module must not judge reports, write files, or import torch
or vLLM.

Format (a plain spec file has the same tables without the ``tool.vllm-rbln-exec``
prefix)::

    [tool.vllm-rbln-exec]
    fail-on = ["kl_mean>1e-3"]          # every run
    near-ties-fail = false               # argmax rule: do near-tie divergences fail too?
    defaults = true                      # start from the built-in tolerances of the dtype pair
    ignore = ["kl_p99"]                  # drop inherited gates on these metrics ("argmax": the rule)

    [tool.vllm-rbln-exec.dtypes."float32:bfloat16"]   # REF:TGT, "*" matches any side
    fail-on = ["kl_mean>5e-3"]

    [tool.vllm-rbln-exec.models."smollm2-135m"]
    fail-on = ["top1<0.99"]

    [tool.vllm-rbln-exec.models."smollm2-135m".dtypes."float32:bfloat16"]
    fail-on = ["prompt:kl_max>0.2"]

Precedence, least to most specific: built-in defaults, an ``--ab`` preset's
tolerances for the run's precision (``presets``), the top table,
``dtypes`` (``*:*``, then one-sided wildcards, then the exact pair), the model's
table, the model's ``dtypes``, then the command line. A layer's tolerance
replaces every tolerance of earlier layers on the same metric, scope and
direction (upper bound ``>``/``>=`` or lower bound ``<``/``<=``); tolerances of
one layer on the same metric are all kept. ``near-ties-fail`` and ``defaults``
take their most specific setting (the command line's, when given). A model
table matches the run's model name as given (alias, hub id or folder) or the
folder's last component.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compare.catalogue import OVERALL, PROMPT, resolve_metric
from ..core.dtypes import canonical_dtype
from ..core.errors import UsageError
from .defaults import default_gates, run_dtypes
from .gates import ArgmaxGate, Gate, parse_gate
from .presets import preset_gates

TOOL_TABLE = "vllm-rbln-exec"
LAYER_KEYS = ("fail-on", "near-ties-fail", "defaults", "ignore")
ROOT_KEYS = (*LAYER_KEYS, "models", "dtypes")
MODEL_KEYS = (*LAYER_KEYS, "dtypes")
ARGMAX_RULE = "argmax"


@dataclass
class SpecLayer:
    """One table of a spec: what it adds, drops and sets."""

    where: str  # e.g. 'spec parity.toml [models."smollm2-135m"]'
    gates: list[Gate] = field(default_factory=list)
    ignore: list[tuple] = field(default_factory=list)  # prefixes of Gate.key (see _ignore_key)
    near_ties_fail: bool | None = None
    defaults: bool | None = None


@dataclass
class ParitySpec:
    path: str | None = None
    root: SpecLayer | None = None
    dtypes: dict[tuple[str, str], SpecLayer] = field(default_factory=dict)
    models: dict[str, SpecLayer] = field(default_factory=dict)
    model_dtypes: dict[str, dict[tuple[str, str], SpecLayer]] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> ParitySpec:
        return cls()

    def layers_for(self, model: str | None, ref: str, tgt: str) -> list[SpecLayer]:
        """The layers that apply to one run, least specific first."""
        out = [self.root] if self.root else []
        out += _matching_dtypes(self.dtypes, ref, tgt)
        key = _model_key(self.models, model)
        if key is not None:
            out.append(self.models[key])
            out += _matching_dtypes(self.model_dtypes.get(key, {}), ref, tgt)
        return out


def load_spec(path: str | Path | None = None, cwd: str | Path | None = None) -> ParitySpec:
    """The spec from ``path`` (``--spec``), else ./pyproject.toml's table, else an empty spec."""
    if path is None:
        candidate = Path(cwd or Path.cwd()) / "pyproject.toml"
        if not candidate.is_file():
            return ParitySpec.empty()
        data = _read_toml(candidate)
        table = (data.get("tool") or {}).get(TOOL_TABLE)
        if table is None:
            return ParitySpec.empty()
        return parse_spec(table, str(candidate), prefix=f"tool.{TOOL_TABLE}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"spec file {file} does not exist", option="--spec")
    data = _read_toml(file)
    if "tool" in data or file.name == "pyproject.toml":
        table = (data.get("tool") or {}).get(TOOL_TABLE)
        if table is None:
            raise UsageError(f"{file} has no [tool.{TOOL_TABLE}] table", option="--spec")
        return parse_spec(table, str(file), prefix=f"tool.{TOOL_TABLE}")
    return parse_spec(data, str(file))


def parse_spec(data: dict[str, Any], origin: str = "<spec>", prefix: str = "") -> ParitySpec:
    """Validate a spec table (already parsed TOML); UsageError naming the file and key on any problem."""
    spec = ParitySpec(path=origin)
    _check_keys(data, ROOT_KEYS, origin, prefix)
    spec.root = _layer(data, origin, prefix)
    spec.dtypes = _dtype_tables(data.get("dtypes"), origin, _join(prefix, "dtypes"))
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise _error(origin, _join(prefix, "models"), "must be a table of model names")
    for name, table in models.items():
        key = _join(prefix, f"models.{_quote(name)}")
        if not isinstance(table, dict):
            raise _error(origin, key, "must be a table")
        _check_keys(table, MODEL_KEYS, origin, key)
        spec.models[name] = _layer(table, origin, key)
        spec.model_dtypes[name] = _dtype_tables(table.get("dtypes"), origin, _join(key, "dtypes"))
    return spec


def resolve_gates(
    spec: ParitySpec | None,
    model: str | None,
    ref_dtype: str | None,
    tgt_dtype: str | None,
    cli_exprs: list[str] | tuple[str, ...] = (),
    use_defaults: bool = True,
    *,
    near_ties_fail: bool | None = None,
    ref_device: str | None = "cpu",
    tgt_device: str | None = None,
    yardstick: bool = False,
    ab: str | None = None,
    quantization: str | None = None,
) -> list[Gate]:
    """The gates of one run with their source recorded, by the precedence in the module docstring; an
    ``--ab`` preset's tolerances (``presets``) sit right above the built-in defaults.

    ``use_defaults=False`` (e.g. ``--no-default-gates``) drops the built-in
    tolerances whatever the spec says; with True the spec's ``defaults`` decides.
    ``near_ties_fail`` from the command line overrides the spec's.
    """
    spec = spec or ParitySpec.empty()
    ref = canonical_dtype(ref_dtype, ref_device)
    tgt = canonical_dtype(tgt_dtype, tgt_device)
    layers = spec.layers_for(model, ref, tgt)

    defaults_on = use_defaults
    ties, ties_source = False, None
    for layer in layers:
        if layer.defaults is not None and use_defaults:
            defaults_on = layer.defaults
        if layer.near_ties_fail is not None:
            ties, ties_source = layer.near_ties_fail, layer.where
    if near_ties_fail is not None:
        ties, ties_source = near_ties_fail, "cli"

    gates: list[Gate] = []
    if defaults_on:
        gates = default_gates(ref, tgt, near_ties_fail=ties, yardstick=yardstick, quantization=quantization)
        if ties_source:
            gates = [g.with_source(ties_source) if isinstance(g, ArgmaxGate) else g for g in gates]
    elif ties_source:
        # setting the near-tie policy asks for the argmax rule even without the defaults
        gates = [ArgmaxGate(near_ties_fail=ties, source=ties_source)]

    preset, dropped = preset_gates(ab, ref, tgt)
    layers = [SpecLayer(f"--ab {ab}", preset, [_ignore_key(k, f"--ab {ab}", "") for k in dropped]), *layers]
    for layer in layers:
        gates = [g for g in gates if not any(_ignored(g, k) for k in layer.ignore)]
        gates = _apply(gates, layer.gates)
    cli = [parse_gate(e, "cli") for e in cli_exprs]
    return _apply(gates, cli)


def gates_for_run(run_json: dict[str, Any], spec: ParitySpec | None = None, cli_exprs: list[str] | tuple = (),
                  use_defaults: bool = True, near_ties_fail: bool | None = None) -> list[Gate]:
    """``resolve_gates`` with the model, dtypes and ``--ab`` preset read from a report (a live run's and a
    re-judged saved run's gates are the same)."""
    ref, tgt = run_dtypes(run_json)
    options = run_json.get("options") if isinstance(run_json.get("options"), dict) else {}
    ab = options.get("ab") if isinstance(options.get("ab"), str) else None
    settings = run_json.get("settings") if isinstance(run_json.get("settings"), dict) else {}
    quantization = settings.get("target_quantization")
    return resolve_gates(spec, run_json.get("model"), ref, tgt, cli_exprs, use_defaults,
                         near_ties_fail=near_ties_fail, yardstick=isinstance(run_json.get("yardstick"), dict), ab=ab,
                         quantization=quantization if isinstance(quantization, str) and quantization else None)


# -- helpers ----------------------------------------------------------------------
def _apply(gates: list[Gate], newer: list[Gate]) -> list[Gate]:
    replaced = {g.key for g in newer}
    return [g for g in gates if g.key not in replaced] + newer


def _ignored(gate: Gate, key: tuple) -> bool:
    return gate.key[: len(key)] == key


def _ignore_key(entry: Any, origin: str, key: str) -> tuple:
    if not isinstance(entry, str) or not entry.strip():
        raise _error(origin, key, f"entries must be metric names, got {entry!r}")
    name = entry.strip()
    if name == ARGMAX_RULE:
        return ("argmax",)
    scope = OVERALL
    if ":" in name:
        prefix, name = (part.strip() for part in name.split(":", 1))
        if prefix not in (OVERALL, PROMPT):
            raise _error(origin, key, f"unknown scope {prefix!r} in {entry!r} (use prompt: or none)")
        scope = prefix
    try:
        return ("metric", scope, resolve_metric(name, scope))
    except UsageError as exc:
        raise _error(origin, key, exc.message) from exc


def _layer(table: dict[str, Any], origin: str, key: str) -> SpecLayer:
    layer = SpecLayer(where=f"spec {origin}" + (f" [{key}]" if key else ""))
    exprs = table.get("fail-on", [])
    if isinstance(exprs, str):
        exprs = [exprs]
    if not isinstance(exprs, list):
        raise _error(origin, _join(key, "fail-on"), "must be a list of tolerance strings")
    for i, expr in enumerate(exprs):
        if not isinstance(expr, str):
            raise _error(origin, f"{_join(key, 'fail-on')}[{i}]", f"must be a string, got {expr!r}")
        try:
            layer.gates.append(parse_gate(expr, layer.where))
        except UsageError as exc:
            raise _error(origin, f"{_join(key, 'fail-on')}[{i}]", exc.message) from exc
    for name, attr in (("near-ties-fail", "near_ties_fail"), ("defaults", "defaults")):
        if name in table:
            value = table[name]
            if not isinstance(value, bool):
                raise _error(origin, _join(key, name), f"must be true or false, got {value!r}")
            setattr(layer, attr, value)
    ignore = table.get("ignore", [])
    if not isinstance(ignore, list):
        raise _error(origin, _join(key, "ignore"), "must be a list of metric names")
    layer.ignore = [_ignore_key(e, origin, _join(key, "ignore")) for e in ignore]
    return layer


def _dtype_tables(tables: Any, origin: str, key: str) -> dict[tuple[str, str], SpecLayer]:
    if tables is None:
        return {}
    if not isinstance(tables, dict):
        raise _error(origin, key, 'must be a table of "REF:TGT" dtype pairs')
    out = {}
    for pair, table in tables.items():
        where = f"{key}.{_quote(pair)}"
        if not isinstance(table, dict):
            raise _error(origin, where, "must be a table")
        _check_keys(table, LAYER_KEYS, origin, where)
        parsed = _dtype_pair(pair, origin, where)
        if parsed in out:
            raise _error(origin, where, f"the same pair as another key ({parsed[0]}:{parsed[1]})")
        out[parsed] = _layer(table, origin, where)
    return out


def _dtype_pair(pair: str, origin: str, key: str) -> tuple[str, str]:
    parts = [p.strip() for p in pair.split(":")]
    if len(parts) != 2 or not all(parts):
        raise _error(origin, key, 'a dtype pair is "REFERENCE:TARGET", e.g. "float32:bfloat16" or "*:float16"')
    out = []
    for part in parts:
        if part == "*":
            out.append("*")
            continue
        if part.lower() == "auto":
            raise _error(origin, key, "name a dtype, not auto: auto is resolved per device before matching")
        try:
            out.append(canonical_dtype(part))
        except UsageError as exc:
            raise _error(origin, key, exc.message) from exc
    return out[0], out[1]


def _matching_dtypes(tables: dict[tuple[str, str], SpecLayer], ref: str, tgt: str) -> list[SpecLayer]:
    order = [("*", "*"), ("*", tgt), (ref, "*"), (ref, tgt)]
    return [tables[k] for k in dict.fromkeys(order) if k in tables]


def _model_key(models: dict[str, SpecLayer], model: str | None) -> str | None:
    if not model:
        return None
    if model in models:
        return model
    name = Path(model.rstrip("/")).name
    return name if name in models else None


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], origin: str, key: str) -> None:
    for name in table:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise _error(origin, _join(key, name), f"unknown key.{hint} Known here: {', '.join(allowed)}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # TOML is UTF-8 by definition
        raise UsageError(f"{path} is not valid TOML: {exc}", option="--spec") from exc
    except OSError as exc:
        raise UsageError(f"cannot read spec file {path}: {exc}", option="--spec") from exc


def _error(origin: str, key: str, message: str) -> UsageError:
    return UsageError(f"{origin}: {key or '(top level)'}: {message}", option="--spec")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _quote(name: str) -> str:
    return f'"{name}"'
