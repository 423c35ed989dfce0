"""The hidden-state capture of a localisation pass, on disk: compact, chosen positions only.

One folder per side::

    hidden.json   metadata: side, engine, dtype, platform, the module names in model order,
                  the generated positions of each prompt, the engine's settings for the pass
    hidden.npz    float32 arrays ``p{prompt}.{name}`` of shape [positions, width]

SmolLM2-135M with 30 layers, 3 positions: 30 x 3 x 576 floats per prompt, plus the
logits row (49152 floats) at each position: under 1 MiB. This module owns the format;
it must not import torch or know about engines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import HarnessError
from ..core.jsonio import write_json_atomic

HIDDEN_SCHEMA_VERSION = 1
META, ARRAYS = "hidden.json", "hidden.npz"


class HiddenError(HarnessError):
    pass


@dataclass
class HiddenCapture:
    root: Path
    meta: dict[str, Any]
    names: list[str]  # in model order: embed, layers.0[.attn, .mlp], ..., norm, logits
    positions: dict[int, list[int]]  # prompt index -> generated positions captured
    arrays: dict[str, np.ndarray]

    def rows(self, prompt: int, name: str) -> np.ndarray:
        """float32 [positions of that prompt, width]."""
        return self.arrays[f"p{prompt}.{name}"]


def write_hidden(root: Path, meta: dict[str, Any], names: list[str], positions: dict[int, list[int]],
                 rows: dict[int, dict[str, np.ndarray]]) -> Path:
    """``rows[prompt][name]``: float32 [len(positions[prompt]), width]."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prompt, by_name in rows.items():
        for name in names:
            a = np.asarray(by_name[name], dtype=np.float32)
            if a.shape[0] != len(positions[prompt]):
                raise HiddenError(f"prompt {prompt} {name}: {a.shape[0]} rows for {len(positions[prompt])} positions")
            arrays[f"p{prompt}.{name}"] = a
    np.savez(root / ARRAYS, **arrays)
    write_json_atomic(root / META, {"schema_version": HIDDEN_SCHEMA_VERSION, **meta, "names": list(names),
                                    "positions": {str(k): [int(t) for t in v] for k, v in positions.items()}})
    return root


def load_hidden(root: Path) -> HiddenCapture:
    root = Path(root)
    try:
        meta = json.loads((root / META).read_text())
        if meta.get("schema_version") != HIDDEN_SCHEMA_VERSION:
            raise HiddenError(f"{root / META}: schema version {meta.get('schema_version')!r}, "
                              f"expected {HIDDEN_SCHEMA_VERSION}")
        names = [str(n) for n in meta["names"]]
        positions = {int(k): [int(t) for t in v] for k, v in meta["positions"].items()}
        with np.load(root / ARRAYS, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k], dtype=np.float32) for k in data.files}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HiddenError(f"{root} is not a readable hidden-state capture: {exc}") from exc
    for prompt, pos in positions.items():
        for name in names:
            a = arrays.get(f"p{prompt}.{name}")
            if a is None or a.ndim != 2 or a.shape[0] != len(pos):
                raise HiddenError(f"{root}: rows of prompt {prompt} {name} missing or of the wrong shape")
    return HiddenCapture(root, meta, names, positions, arrays)
