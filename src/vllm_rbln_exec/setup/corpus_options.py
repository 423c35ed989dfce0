"""What the ``corpus`` command was asked: the reference, the targets (formats, devices, engines) and the corpus.

Owns parsing ``--target SPEC`` into a labelled ``SideOptions`` and building the frozen ``CorpusOptions``
record, checked before any model is read or engine started (UsageError, exit 2). A target is written

* as a model folder: ``exports/smollm2-w4a16`` (label: the folder's name);
* as comma-separated ``key=value`` items, where a bare item is the model folder:
  ``exports/smollm2-w4a16,label=W4A16``, ``dtype=bfloat16`` (the reference's checkpoint at bfloat16),
  ``engine=transformers,dtype=bfloat16``, ``device=cuda``;
* or as a JSON object with the same keys, which may also carry ``args`` (engine arguments):
  ``{"model": "exports/w8a8", "args": {"enforce_eager": false}}``.

Keys: ``model``, ``label``, ``device`` (a device profile, default ``cpu``), ``engine`` (default ``vllm``),
``dtype``, ``args``. A target with its own model runs at the dtype its checkpoint was saved in unless
``dtype`` says otherwise (a format is measured as it was made: W4A16 exports run 16-bit activations);
one without runs at its device profile's dtype. Nothing here reads a model or starts a worker.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.errors import UsageError
from ..core.registry import suggest
from .checks import DTYPES, STORES
from .options import REFERENCE, SideOptions, parse_engine_args

TARGET_KEYS = ("model", "label", "device", "engine", "dtype", "args")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,47}$")  # it names the target's folder in the run


@dataclass(frozen=True)
class CorpusTarget:
    label: str
    side: SideOptions


@dataclass(frozen=True)
class CorpusOptions:
    model: str
    reference: SideOptions
    targets: tuple[CorpusTarget, ...]
    corpus: str  # "builtin" or a text file
    window: int
    stride: int
    max_windows: int | None
    num_hidden_layers: int | None
    store: str
    use_cache: bool
    yardstick: str
    cache_dir: str
    devices_file: str | None
    run_dir: str | None
    runs_dir: str
    resume: bool
    html: str | None
    plots: str | None
    json: str | None
    timeout: float
    kv_cache_gib: int | None
    trust_remote_code: bool
    topk: int = 5
    no_color: bool = False

    def plan_json(self) -> dict[str, Any]:
        """What decides the run's numbers (a resumed run must match it); outputs and display left out."""
        data = asdict(self)
        for name in ("run_dir", "runs_dir", "resume", "html", "plots", "json", "no_color", "timeout"):
            data.pop(name)
        return data


def parse_target(spec: str, index: int) -> CorpusTarget:
    """One ``--target`` value -> CorpusTarget (module docstring); UsageError naming the value otherwise."""
    raw = spec.strip()
    if not raw:
        raise UsageError("--target is empty: give a model folder, key=value items or a JSON object", option="--target")
    if raw.startswith("{"):
        try:
            items = json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"--target {spec!r} is not a JSON object: {exc}", option="--target") from exc
        if not isinstance(items, dict):
            raise UsageError(f"--target {spec!r} must be a JSON object", option="--target")
    else:
        items = {}
        for part in (p.strip() for p in raw.split(",")):
            key, sep, value = part.partition("=")
            if not sep:
                key, value = "model", part
            if key.strip() in items:
                raise UsageError(f"--target {spec!r} names {key.strip()!r} twice", option="--target")
            items[key.strip()] = value.strip()
    unknown = [k for k in items if k not in TARGET_KEYS]
    if unknown:
        raise UsageError(f"--target {spec!r}: {suggest('key', unknown[0], TARGET_KEYS)}", option="--target")
    model = items.get("model") or None
    dtype = items.get("dtype") or None
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--target {spec!r}: {suggest('dtype', dtype, DTYPES)}", option="--target")
    side = SideOptions(role="target", device=items.get("device") or "cpu", engine=items.get("engine") or "vllm",
                       dtype=dtype, torch_device=None, checkpoint=model,
                       engine_args=parse_engine_args(items.get("args"), "--target args"))
    label = str(items.get("label") or default_label(side, index))
    if not LABEL_RE.match(label):
        raise UsageError(f"--target {spec!r}: label {label!r} must be letters, digits, '_.+-' (up to 48), "
                         "starting with a letter or digit", option="--target")
    return CorpusTarget(label, side)


def default_label(side: SideOptions, index: int) -> str:
    """The model folder's name, else what differs from a plain CPU vLLM side, else ``target-N``."""
    if side.checkpoint:
        name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", Path(side.checkpoint.rstrip("/")).name).lstrip("_.+-")
        if name:
            return name[:48]
    parts = [p for p, default in ((side.engine, "vllm"), (side.dtype, None), (side.device, "cpu")) if p != default]
    return "-".join(parts)[:48] if parts else f"target-{index + 1}"


def build_corpus_options(targets: list[str], **v: Any) -> CorpusOptions:
    """The command's values -> checked CorpusOptions; UsageError on bad input."""
    if not targets:
        raise UsageError("give at least one --target (a model folder, e.g. an export of scripts/quantize_exports.py, "
                         "or dtype=bfloat16)", option="--target")
    parsed = tuple(parse_target(spec, i) for i, spec in enumerate(targets))
    labels = [t.label for t in parsed]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes or REFERENCE in labels or "yardstick" in labels:
        bad = dupes[0] if dupes else next(x for x in labels if x in (REFERENCE, "yardstick"))
        raise UsageError(f"two targets, or a target and the reference/yardstick, share the label {bad!r}: give "
                         "label=NAME", option="--target")
    for name in ("window", "stride", "topk"):
        if isinstance(v[name], bool) or not isinstance(v[name], int) or v[name] < 1:
            raise UsageError(f"--{name} must be a positive number, got {v[name]}", option=f"--{name}")
    for name in ("max_windows", "num_hidden_layers", "kv_cache_gib"):
        if v[name] is not None and (isinstance(v[name], bool) or v[name] < 1):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number", option=f"--{name}")
    if v["store"] not in STORES:
        raise UsageError(f"--store: {suggest('store', v['store'], STORES)}", option="--store")
    if v["reference_dtype"] is not None and v["reference_dtype"] not in DTYPES:
        raise UsageError(f"--reference-dtype: {suggest('dtype', v['reference_dtype'], DTYPES)}",
                         option="--reference-dtype")
    if not v["timeout"] > 0:
        raise UsageError("--timeout must be greater than 0", option="--timeout")
    if v["resume"] and not v["run_dir"]:
        raise UsageError("--resume continues the run in --run-dir DIR: give that folder", option="--resume")
    reference = SideOptions(REFERENCE, v["reference_device"] or "cpu", v["reference_engine"], v["reference_dtype"],
                            None, None, parse_engine_args(v["reference_args"], "--reference-args"))
    return CorpusOptions(
        model=v["model"], reference=reference, targets=parsed, corpus=v["corpus"], window=v["window"],
        stride=v["stride"], max_windows=v["max_windows"], num_hidden_layers=v["num_hidden_layers"],
        store=v["store"], use_cache=bool(v["use_cache"]), yardstick=str(v["yardstick"] or "auto"),
        cache_dir=v["cache_dir"], devices_file=v["devices_file"], run_dir=v["run_dir"], runs_dir=v["runs_dir"],
        resume=bool(v["resume"]), html=v["html"], plots=v["plots"], json=v["json"], timeout=float(v["timeout"]),
        kv_cache_gib=v["kv_cache_gib"], trust_remote_code=bool(v["trust_remote_code"]), topk=v["topk"],
        no_color=bool(v["no_color"]),
    )
