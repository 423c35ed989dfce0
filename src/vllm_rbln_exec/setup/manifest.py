"""Manifests of the model folders the harness makes (converted, truncated, tiny), and their verification.

A folder the harness writes gets ``.vre-manifest.json`` last, before it is
renamed into place: the size, modification time and SHA-256 of every file,
and what the folder was made from. ``verify_folder`` compares a folder with its
manifest cheaply (size and mtime; the full hash only for a file whose mtime
changed), so a damaged or half-written folder is found before a worker loads
it. Folders the user brings have no manifest and are not ours to judge. This
module must not rebuild anything (``pipeline.models`` decides that).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = ".vre-manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 22


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    """The folder's own files: hidden ones (locks, digest sidecars, this manifest) are not part of a model."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def write_manifest(folder: Path, source: dict[str, Any]) -> None:
    folder = Path(folder)
    files = {}
    for path in _files(folder):
        st = path.stat()
        files[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}
    data = {"version": MANIFEST_VERSION, "source": source, "files": files}
    tmp = folder / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)



def verify_folder(folder: Path) -> str | None:
    """None when the folder matches its manifest; else what is wrong, naming the file."""
    folder = Path(folder)
    try:
        data = json.loads((folder / MANIFEST).read_text())
        recorded = data["files"]
    except FileNotFoundError:
        return "it has no manifest (half-written, or made by an earlier version)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its manifest is unreadable ({exc})"
    present = {p.name: p for p in _files(folder)}
    for name, entry in sorted(recorded.items()):
        path = present.pop(name, None)
        if path is None:
            return f"{name} is missing"
        st = path.stat()
        if st.st_size != entry.get("size"):
            return f"{name} has {st.st_size} bytes, {entry.get('size')} when it was made"
        if st.st_mtime_ns != entry.get("mtime_ns") and _sha256(path) != entry.get("sha256"):
            return f"{name}: digest mismatch (changed or damaged since it was made)"
    if present:
        return f"it holds files it was not made with: {', '.join(sorted(present))}"
    return None
