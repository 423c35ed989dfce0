"""What a side's weights cost in memory: bytes and bits per weight, read from safetensors headers only.

A format's cost is counted as its engine holds it: floating tensors (embeddings, norms, the scales of a
quantized layer) at the dtype the side runs in, every other tensor (int8 or fp8 weights, int32-packed 4-bit
weights, shapes) as stored. Bits per weight divide by the number of weights of the full-precision reference
checkpoint, so a packed 4-bit layer and a dense one are counted against the same parameters:

* ``bits_per_weight``: the whole model (embeddings included; SmolLM2-135M's tied 49152 x 576 embedding is
  21 % of its weights and is left unquantized by the usual recipes, so it pulls every format towards 16);
* ``linear_bits_per_weight``: the decoder layers' linear projections only, what the format's recipe decides
  (exllamav3's and llama.cpp's bits per weight are of the quantized tensors too).

No tensor data is read, only the JSON headers. This module must not import torch or start workers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..core.dtypes import DTYPE_ALIASES
from .models import LAYER_KEY_RE, read_config, safetensors_header, text_config

FLOAT_TYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
STORED_BYTES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5}
RUN_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) over every ``*.safetensors`` file of ``folder``."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        _, header = safetensors_header(shard)
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
    return out


def checkpoint_dtype(folder: Path) -> str:
    """The dtype a checkpoint says it was saved in (config ``dtype``/``torch_dtype``), float32 when it says none."""
    config = read_config(folder)
    text = text_config(config)
    name = str(config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
               or "float32").lower()
    return DTYPE_ALIASES.get(name, "float32")


def _module(name: str) -> str:
    """The module a tensor belongs to: ``model.layers.0.mlp.up_proj.weight_packed`` -> ``...up_proj``."""
    return name.rsplit(".", 1)[0]


def _linear_modules(reference: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, int]:
    """Decoder-layer linear modules of the reference checkpoint -> their number of weights."""
    return {_module(name): math.prod(shape) for name, (_, shape) in reference.items()
            if name.endswith(".weight") and len(shape) == 2 and LAYER_KEY_RE.search(name)}


def tensor_bytes(dtype: str, shape: tuple[int, ...], run_dtype: str) -> float:
    count = math.prod(shape)
    if dtype in FLOAT_TYPES:
        return count * RUN_BYTES[run_dtype]
    return count * STORED_BYTES.get(dtype, 1)


def weight_size(folder: Path, run_dtype: str, reference_folder: Path) -> dict[str, Any]:
    """Bytes and bits per weight of the checkpoint in ``folder`` run in ``run_dtype`` (module docstring)."""
    run_dtype = DTYPE_ALIASES.get(str(run_dtype).lower(), "float32")
    mine = tensors(folder)
    reference = mine if Path(folder).resolve() == Path(reference_folder).resolve() else tensors(reference_folder)
    weights = sum(math.prod(shape) for _, shape in reference.values())
    linear = _linear_modules(reference)
    total = sum(tensor_bytes(dtype, shape, run_dtype) for dtype, shape in mine.values())
    linear_bytes = sum(tensor_bytes(dtype, shape, run_dtype) for name, (dtype, shape) in mine.items()
                       if _module(name) in linear)
    linear_weights = sum(linear.values())
    return {
        "bytes": int(round(total)),
        "weights": int(weights),
        "run_dtype": run_dtype,
        "bits_per_weight": 8.0 * total / weights if weights else None,
        "linear_bits_per_weight": 8.0 * linear_bytes / linear_weights if linear_weights else None,
    }
