"""Planted faults: edited copies of a model folder, of the kinds real device bugs produce.

A fault is named by a short spec (``scale:L:MODULE:F``, ``zero-head:L:H``,
``rope-theta:V``, ``norm-eps:V``, ``weight-noise:REL``) and applied to a copy of a
Llama-style model folder (safetensors and ``config.json``): the copy is what a
target with that bug would compute, so running it as ``--target-model`` against
the honest folder shows whether the verdict catches the bug. This module owns
parsing the specs and editing the copies; it is plain file work with numpy (the
safetensors format is read and written here: an 8-byte header length, a JSON
header, raw little-endian data), and must not run engines, judge, or import
torch or vLLM.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import UsageError

# The module names of a Llama decoder layer a scale fault may hit, and where their weights live.
LAYER_MODULES = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj", "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
}  # fmt: skip
FINAL_NORM = "model.norm.weight"
KINDS = ("scale", "zero-head", "rope-theta", "norm-eps", "weight-noise")
BF16_UNIT_ROUNDOFF = 2.0**-9  # bfloat16 keeps 8 significant bits: relative rounding error at most 2^-9


@dataclass(frozen=True)
class Fault:
    """One planted fault: ``kind`` with its arguments, as parsed from ``spec``."""

    spec: str
    kind: str
    layer: int | None = None  # None with scale: the final norm
    module: str | None = None
    value: float = 0.0  # scale factor, head index, rope theta, norm epsilon or relative noise

    @property
    def slug(self) -> str:
        """A folder name for the edited copy."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.spec)


def parse_fault(spec: str) -> Fault:
    """``scale:L:MODULE:F`` (``scale:final-norm:F``), ``zero-head:L:H``, ``rope-theta:V``, ``norm-eps:V``,
    ``weight-noise:REL`` (``weight-noise:bf16`` is 2^-9); UsageError on anything else."""
    parts = [p.strip() for p in str(spec).split(":")]
    kind = parts[0]
    try:
        if kind == "scale" and len(parts) == 3 and parts[1] == "final-norm":
            return Fault(spec, kind, None, "final-norm", float(parts[2]))
        if kind == "scale" and len(parts) == 4 and parts[2] in LAYER_MODULES:
            return Fault(spec, kind, int(parts[1]), parts[2], float(parts[3]))
        if kind == "zero-head" and len(parts) == 3:
            return Fault(spec, kind, int(parts[1]), "o_proj", float(int(parts[2])))
        if kind in ("rope-theta", "norm-eps") and len(parts) == 2:
            return Fault(spec, kind, value=float(parts[1]))
        if kind == "weight-noise" and len(parts) == 2:
            return Fault(spec, kind, value=BF16_UNIT_ROUNDOFF if parts[1] == "bf16" else float(parts[1]))
    except ValueError:
        pass
    raise UsageError(f"bad fault {spec!r}: expected scale:LAYER:MODULE:FACTOR (MODULE one of "
                     f"{', '.join(LAYER_MODULES)}), scale:final-norm:FACTOR, zero-head:LAYER:HEAD, "
                     "rope-theta:VALUE, norm-eps:VALUE or weight-noise:REL|bf16")


MARKER = ".planted-fault.json"  # written last: a folder without it is half made


def planted(dest: Path, fault: Fault) -> bool:
    """Whether ``dest`` is a finished copy with ``fault`` planted."""
    try:
        return json.loads((Path(dest) / MARKER).read_text()).get("spec") == fault.spec
    except (OSError, ValueError):
        return False


def plant(source: Path, dest: Path, fault: Fault, seed: int = 0) -> Path:
    """Copy the model folder ``source`` to ``dest`` and apply ``fault`` to the copy; returns ``dest``.

    Made under a temporary name and renamed when done, so an interrupted plant never leaves a folder that
    looks finished (``planted`` checks the marker written last)."""
    source, dest = Path(source), Path(dest)
    work = dest.with_name(f".{dest.name}.partial")
    for path in (work, dest):
        if path.exists():
            shutil.rmtree(path)
    shutil.copytree(source, work, ignore=shutil.ignore_patterns(".*"))  # the manifest and hashes describe source
    try:
        _apply(source, work, fault, seed)
        (work / MARKER).write_text(json.dumps({"spec": fault.spec, "source": str(source), "seed": seed}))
        work.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _apply(source: Path, work: Path, fault: Fault, seed: int) -> None:
    config_path = work / "config.json"
    config = json.loads(config_path.read_text())
    if fault.kind in ("rope-theta", "norm-eps"):
        _edit_config(config, fault)
        config_path.write_text(json.dumps(config, indent=2))
        return
    files = sorted(work.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{source} has no safetensors file to plant {fault.spec!r} in")
    rng = np.random.default_rng(seed)
    touched = 0
    for path in files:
        tensors, stored, metadata = read_safetensors(path)
        hit = _edit_tensors(tensors, fault, config, rng)
        if hit:
            write_safetensors(path, tensors, stored, metadata)
            touched += hit
    if not touched:
        raise UsageError(f"fault {fault.spec!r} hits no weight of {source} (layers: "
                         f"{config.get('num_hidden_layers')})")


def _edit_config(config: dict, fault: Fault) -> None:
    if fault.kind == "norm-eps":
        config["rms_norm_eps"] = fault.value
        return
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        rope["rope_theta"] = fault.value
    config["rope_theta"] = fault.value


def _edit_tensors(tensors: dict[str, np.ndarray], fault: Fault, config: dict, rng: np.random.Generator) -> int:
    """Apply a weight fault in place; the number of tensors changed."""
    if fault.kind == "weight-noise":
        names = [n for n, t in tensors.items() if np.issubdtype(t.dtype, np.floating)]
        for name in names:
            t = tensors[name]
            tensors[name] = (t * (1.0 + fault.value * rng.standard_normal(t.shape))).astype(t.dtype)
        return len(names)
    if fault.kind == "scale" and fault.layer is None:
        name = FINAL_NORM
    else:
        name = f"model.layers.{fault.layer}.{LAYER_MODULES[fault.module]}.weight"
    if name not in tensors:
        return 0
    t = tensors[name].copy()
    if fault.kind == "scale":
        t *= np.asarray(fault.value, dtype=t.dtype)
    else:  # zero-head: the head's slice of o_proj's input columns, so its output never reaches the residual
        head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        head = int(fault.value)
        if not 0 <= head < int(config["num_attention_heads"]):
            raise UsageError(f"fault {fault.spec!r}: head {head} out of range (the model has "
                             f"{config['num_attention_heads']})")
        t[:, head * head_dim:(head + 1) * head_dim] = 0
    tensors[name] = t
    return 1


# -- safetensors, with numpy only ----------------------------------------------------------------
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict | None]:
    """(tensors, their stored dtype names, the file's metadata); BF16 tensors come back as float32."""
    raw = Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    metadata = header.pop("__metadata__", None)
    data = memoryview(raw)[8 + size:]
    tensors, stored = {}, {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        kind = info["dtype"]
        if kind == "BF16":
            bits = np.frombuffer(data[start:end], dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif kind in _NUMPY:
            array = np.frombuffer(data[start:end], dtype=np.dtype(_NUMPY[kind]).newbyteorder("<")).copy()
        else:
            raise UsageError(f"{path}: tensor {name} has dtype {kind}, which planted faults do not handle")
        tensors[name], stored[name] = array.reshape(info["shape"]), kind
    return tensors, stored, metadata


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], stored: dict[str, str],
                      metadata: dict | None = None) -> None:
    """Write ``tensors`` back in their stored dtypes (BF16 rounded to nearest even from float32)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, array in tensors.items():
        kind = stored.get(name, "F32")
        if kind == "BF16":
            bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
            blob = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
        else:
            blob = np.ascontiguousarray(array, dtype=np.dtype(_NUMPY[kind]).newbyteorder("<")).tobytes()
        header[name] = {"dtype": kind, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)
