"""Planted faults for the localisation tests (integration and gpu tiers): a copy of a model folder
with one tensor edited. Imports safetensors, so unit tests must not import it."""

from __future__ import annotations

from pathlib import Path


def plant_fault(src: Path, dest: Path, key: str, scale: float | None = None, head: int | None = None,
                head_dim: int = 64) -> Path:
    """A copy of a model folder with one tensor edited: scaled, or one attention head's input columns zeroed."""
    import shutil

    from safetensors.numpy import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(".") and f.name != "model.safetensors":
            shutil.copy2(f, dest / f.name)
    weights = load_file(src / "model.safetensors")
    w = weights[key].copy()
    if scale is not None:
        w = (w * scale).astype(w.dtype)
    if head is not None:
        w[:, head * head_dim:(head + 1) * head_dim] = 0
    weights[key] = w
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest
