"""Writing JSON the harness can read back anywhere: strict values, atomic files.

Owns the conversion of run data to plain JSON (no NaN or inf, which strict
parsers reject: they become null) and the one atomic writer every report,
capture and worker file goes through. Pure standard library; it must not import
numpy, torch or any other module of the harness.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def strict_json(value: Any) -> Any:
    """Plain JSON types only: non-finite floats -> None, numpy scalars -> Python, tuples -> lists.

    Anything else is written as its text, so an unexpected type in a record can
    never lose a report that took minutes of engine time to make.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar (numpy is not needed to detect it)
        return strict_json(value.item())
    return str(value)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n")
