"""Planted faults: edited copies of a model folder, of the kinds real device bugs produce.

A fault is named by a short spec (``scale:L:MODULE:F``, ``scale-rows:L:MODULE:F``,
``zero-head:L:H``, ``swap-heads:L:A:B``, ``norm-offset:L:MODULE:V``, ``swap-experts:L:A:B``,
``rope-theta:V``, ``sliding-window:N``, ``norm-eps:V``, ``weight-noise:REL``) and applied to a
copy of a model folder of any family the zoo holds (safetensors and ``config.json``; a short
module name finds the family's own tensor: ``down_proj`` is an MoE's first expert's, ``router``
Mixtral's ``block_sparse_moe.gate``): the copy is what a
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

# The module names of a decoder layer a fault may hit, and where their weights live in each family (the
# first path the checkpoint has is used): Phi-3 fuses q/k/v and gate/up, the MoE families keep per-expert
# MLPs (a short MLP name hits expert 0) and a router, Gemma adds sandwich norms, Qwen3 and Gemma-3 QK-norms.
LAYER_MODULES = {
    "q_proj": ("self_attn.q_proj",), "k_proj": ("self_attn.k_proj",), "v_proj": ("self_attn.v_proj",),
    "o_proj": ("self_attn.o_proj",), "qkv_proj": ("self_attn.qkv_proj",),
    "gate_proj": ("mlp.gate_proj", "mlp.experts.0.gate_proj", "block_sparse_moe.experts.0.w1"),
    "up_proj": ("mlp.up_proj", "mlp.experts.0.up_proj", "block_sparse_moe.experts.0.w3"),
    "down_proj": ("mlp.down_proj", "mlp.experts.0.down_proj", "block_sparse_moe.experts.0.w2"),
    "gate_up_proj": ("mlp.gate_up_proj",), "router": ("mlp.gate", "block_sparse_moe.gate"),
    "q_norm": ("self_attn.q_norm",), "k_norm": ("self_attn.k_norm",),
    "input_layernorm": ("input_layernorm",), "post_attention_layernorm": ("post_attention_layernorm",),
    "pre_feedforward_layernorm": ("pre_feedforward_layernorm",),
    "post_feedforward_layernorm": ("post_feedforward_layernorm",),
}  # fmt: skip
FINAL_NORM = "model.norm.weight"
KINDS = ("scale", "scale-rows", "zero-head", "swap-heads", "norm-offset", "swap-experts", "rope-theta",
         "sliding-window", "norm-eps", "weight-noise")
LAYER_KINDS = ("scale", "scale-rows", "norm-offset")  # KIND:LAYER:MODULE:VALUE
PAIR_KINDS = ("swap-heads", "swap-experts")  # KIND:LAYER:A:B
BF16_UNIT_ROUNDOFF = 2.0**-9  # bfloat16 keeps 8 significant bits: relative rounding error at most 2^-9


@dataclass(frozen=True)
class Fault:
    """One planted fault: ``kind`` with its arguments, as parsed from ``spec``."""

    spec: str
    kind: str
    layer: int | None = None  # None with scale: the final norm
    module: str | None = None
    value: float = 0.0  # scale factor, head index, rope theta, window, norm epsilon, offset or relative noise
    other: int = 0  # the second head or expert of a swap

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
        if kind in LAYER_KINDS and len(parts) == 4 and parts[2] in LAYER_MODULES:
            return Fault(spec, kind, int(parts[1]), parts[2], float(parts[3]))
        if kind == "zero-head" and len(parts) == 3:
            return Fault(spec, kind, int(parts[1]), "o_proj", float(int(parts[2])))
        if kind in PAIR_KINDS and len(parts) == 4 and int(parts[2]) != int(parts[3]):
            module = "o_proj" if kind == "swap-heads" else "router"
            return Fault(spec, kind, int(parts[1]), module, float(int(parts[2])), int(parts[3]))
        if kind in ("rope-theta", "norm-eps") and len(parts) == 2:
            return Fault(spec, kind, value=float(parts[1]))
        if kind == "sliding-window" and len(parts) == 2 and int(parts[1]) > 0:
            return Fault(spec, kind, value=float(int(parts[1])))
        if kind == "weight-noise" and len(parts) == 2:
            return Fault(spec, kind, value=BF16_UNIT_ROUNDOFF if parts[1] == "bf16" else float(parts[1]))
    except ValueError:
        pass
    raise UsageError(f"bad fault {spec!r}: expected scale:LAYER:MODULE:FACTOR (MODULE one of "
                     f"{', '.join(LAYER_MODULES)}), scale-rows:LAYER:MODULE:FACTOR (the first half of its output "
                     "rows), norm-offset:LAYER:MODULE:ADD, scale:final-norm:FACTOR, zero-head:LAYER:HEAD, "
                     "swap-heads:LAYER:A:B, swap-experts:LAYER:A:B, rope-theta:VALUE, sliding-window:TOKENS, "
                     "norm-eps:VALUE or weight-noise:REL|bf16")


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
    if fault.kind in ("rope-theta", "norm-eps", "sliding-window"):
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
    if fault.kind == "sliding-window":
        if not config.get("sliding_window"):
            raise UsageError(f"fault {fault.spec!r}: the model has no sliding window to get wrong")
        config["sliding_window"] = int(fault.value)
        return
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        # one rope per layer type (Gemma-3: sliding_attention, full_attention) or one for all
        for params in [v for v in rope.values() if isinstance(v, dict)] or [rope]:
            params["rope_theta"] = fault.value
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
        prefix = f"model.layers.{fault.layer}."
        name = next((prefix + p + ".weight" for p in LAYER_MODULES[fault.module] if prefix + p + ".weight" in tensors),
                    prefix + LAYER_MODULES[fault.module][0] + ".weight")
    if name not in tensors:
        return 0
    t = tensors[name].copy()
    if fault.kind == "scale":
        t *= np.asarray(fault.value, dtype=t.dtype)
    elif fault.kind == "scale-rows":  # a non-uniform scale: a norm after the module cannot undo it
        t[: t.shape[0] // 2] *= np.asarray(fault.value, dtype=t.dtype)
    elif fault.kind == "norm-offset":  # a norm computing x*(w+V): Gemma's 1+w forgotten (V=-1) or added (V=1)
        t += np.asarray(fault.value, dtype=t.dtype)
    elif fault.kind == "swap-experts":  # the router's rows of two experts swapped: tokens go to the wrong one
        a, b = _checked(fault, int(fault.value), fault.other, t.shape[0], "experts")
        t[[a, b]] = t[[b, a]]
    else:  # zero-head / swap-heads: the heads' slices of o_proj's input columns
        head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        n = int(config["num_attention_heads"])
        a = _checked(fault, int(fault.value), int(fault.value), n, "heads")[0]
        cols = slice(a * head_dim, (a + 1) * head_dim)
        if fault.kind == "zero-head":  # its output never reaches the residual
            t[:, cols] = 0
        else:  # two heads' outputs leave through each other's projection
            b = _checked(fault, a, fault.other, n, "heads")[1]
            other = slice(b * head_dim, (b + 1) * head_dim)
            t[:, cols], t[:, other] = tensors[name][:, other], tensors[name][:, cols]
    tensors[name] = t
    return 1


def _checked(fault: Fault, a: int, b: int, n: int, what: str) -> tuple[int, int]:
    if not (0 <= a < n and 0 <= b < n):
        raise UsageError(f"fault {fault.spec!r}: {what} out of range (the model has {n})")
    return a, b


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


# -- the planted set an architecture can see ---------------------------------------------------------
@dataclass(frozen=True)
class PlannedFault:
    spec: str
    gross: bool  # must be flagged at bfloat16 too (a fault of the size of bf16 rounding need not be)
    layer: int | None  # the layer --localize must name (None: the fault is in every layer, or in the config)
    why: str


def faults_for(config: dict, layers: int) -> tuple[list[PlannedFault], list[str]]:
    """The planted faults a model of this configuration can see (placed in its middle layer), and one sentence
    per fault it cannot see and why. ``config`` is the text config; ``layers`` the layers the run keeps."""
    mid = layers // 2
    gemma = str(config.get("model_type", "")).startswith("gemma")
    sandwich = gemma  # a norm right after attention and after the MLP
    moe = any(k in config for k in ("num_experts", "num_local_experts"))
    out = [
        PlannedFault(f"swap-heads:{mid}:0:1", True, mid, "two attention heads' outputs permuted"),
        PlannedFault(f"scale-rows:{mid}:o_proj:1.05", False, mid,
                     "a non-uniform scale: half of o_proj's output channels 5 % high"),
        PlannedFault(f"norm-offset:{mid}:post_attention_layernorm:{-1 if gemma else 1}", True, mid,
                     "Gemma's 1+w norm offset forgotten" if gemma else "a 1+w norm offset applied to a plain norm"),
        PlannedFault("rope-theta:x0.1", True, None, "rope base 10x too small"),
        PlannedFault("weight-noise:1e-3", False, None, "relative noise of 1e-3 on every weight"),
    ]
    if config.get("sliding_window"):
        out.append(PlannedFault(f"sliding-window:{int(config['sliding_window']) // 2}", True, None,
                                "the sliding window half as wide"))
    if moe:
        out.append(PlannedFault(f"swap-experts:{mid}:0:1", True, mid, "two experts' router rows swapped"))
    blind = []
    if sandwich:
        blind.append("a uniform scale of o_proj or down_proj (the sandwich norm after each divides it out), and of "
                     "the weight of a norm whose output is normalised again")
    if not config.get("sliding_window"):
        blind.append("a wrong sliding window (the family attends to every position)")
    if not moe:
        blind.append("a wrong expert routed (no experts)")
    return out, blind
