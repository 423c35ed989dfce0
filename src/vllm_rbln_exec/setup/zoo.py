"""The model zoo: small checkpoints of the architectures plugin teams ship, built offline from trained weights.

One builder for every family, driven by ``FAMILIES`` (one row per family: its
architecture, its configuration's family-specific keys, its tensor layout).
Each zoo model is four decoder layers of SmolLM2-135M's trained tensors
(hidden 576, 9 query heads, 3 key/value heads, head size 64, MLP 1536, its real
49152-token tokenizer), re-laid out into the family's parameter names and
shapes (fused QKV for Phi-3, experts and a router for the MoE families,
``1 + w`` norm weights for Gemma, QK-norm and sandwich-norm weights where the
family has them), with the family's own configuration (rope base and scaling,
sliding windows, activation, multipliers). Trained tensors, not random ones:
random initialisation gives next-token distributions near uniform (every
position a near-tie, nothing tested); these are as peaked as a trained model's
(docs/zoo.md measures the entropy). Where a family's arithmetic differs from
Llama's by a constant (Granite's multipliers, Gemma's embedding scale) the
tensors are pre-scaled so the function stays close to SmolLM2's.

The source is the converted default model folder (``cache/models/smollm2-135m``);
the tensors that a family adds (biases, router weights) come from numpy's
seeded PCG64, so the same source gives the same bytes on any machine. Folders
are made once, under a lock, with a manifest, through ``tiny.build_folder``.
This module runs in the main process: numpy and plain files only, never torch
or vLLM; it must not run engines.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .faults import read_safetensors
from .models import weights_fingerprint
from .tiny import build_folder
from .zoo_families import FAMILIES, HEAD_DIM, HEADS, HIDDEN, INTER, KV_HEADS, Family, common_config

FORMAT_VERSION = 1
# Which of SmolLM2's 30 layers become the zoo's four. The first two build the token representations, the
# last two sharpen the next-token distribution: docs/zoo.md measured this pick's mean entropy.
SOURCE_LAYERS = (0, 1, 28, 29)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# -- tensors ----------------------------------------------------------------------------------------
class Source:
    """SmolLM2's tensors by short name: ``embed``, ``norm``, and per layer ``q k v o gate up down in post``."""

    def __init__(self, folder: Path):
        self.t, _, _ = read_safetensors(Path(folder) / "model.safetensors")

    def layer(self, i: int, name: str) -> np.ndarray:
        full = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", "in": "input_layernorm",
                "post": "post_attention_layernorm"}[name]
        return self.t[f"model.layers.{i}.{full}.weight"]


def _llama_layer(src: Source, i: int, rng: np.random.Generator, fam: Family) -> dict[str, np.ndarray]:
    g = src.layer
    out = {"input_layernorm.weight": g(i, "in"), "post_attention_layernorm.weight": g(i, "post"),
           "self_attn.q_proj.weight": g(i, "q"), "self_attn.k_proj.weight": g(i, "k"),
           "self_attn.v_proj.weight": g(i, "v"), "self_attn.o_proj.weight": g(i, "o"),
           "mlp.gate_proj.weight": g(i, "gate"), "mlp.up_proj.weight": g(i, "up"), "mlp.down_proj.weight": g(i, "down")}
    if fam.alias == "zoo-qwen2.5":  # the family's q/k/v biases: small, so the trained attention keeps its shape
        for p, n in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
            out[f"self_attn.{p}_proj.bias"] = _normal(rng, (n * HEAD_DIM,), 0.05)
    if fam.alias == "zoo-qwen3":
        out.update(_qk_norm(rng, HEAD_DIM, HEAD_DIM))
    return out


def _qk_norm(rng: np.random.Generator, q_width: int, k_width: int, offset: float = 0.0) -> dict[str, np.ndarray]:
    # QK-norm makes every head's query and key unit-RMS; a gain of 2 (+/-10 %) gives scores of the sharpness
    # the trained heads had (docs/zoo.md measures the entropy that results)
    return {"self_attn.q_norm.weight": 2.0 + _normal(rng, (q_width,), 0.2) - offset,
            "self_attn.k_norm.weight": 2.0 + _normal(rng, (k_width,), 0.2) - offset}


def _phi3_layer(src: Source, i: int, rng: np.random.Generator, fam: Family) -> dict[str, np.ndarray]:
    base = _llama_layer(src, i, rng, fam)
    qkv = np.concatenate([base.pop(f"self_attn.{p}_proj.weight") for p in "qkv"])
    gate_up = np.concatenate([base.pop("mlp.gate_proj.weight"), base.pop("mlp.up_proj.weight")])
    return {**base, "self_attn.qkv_proj.weight": qkv, "mlp.gate_up_proj.weight": gate_up}


def _granite_layer(src: Source, i: int, rng: np.random.Generator, fam: Family) -> dict[str, np.ndarray]:
    # attention_multiplier 1/16 = (1/8) / 2: queries x2; residual_multiplier 1/2: block outputs x2
    out = _llama_layer(src, i, rng, fam)
    for name in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight"):
        out[name] = out[name] * np.float32(2.0)
    return out


def _gemma_layer(src: Source, i: int, rng: np.random.Generator, fam: Family) -> dict[str, np.ndarray]:
    out = _llama_layer(src, i, rng, fam)
    # Gemma's norms compute x * (1 + w): the stored weight is SmolLM2's minus one. The sandwich norms after
    # attention and after the MLP bring block outputs to unit RMS times their gain (0.5 +/- 10 %).
    out["input_layernorm.weight"] = out["input_layernorm.weight"] - np.float32(1.0)
    out["pre_feedforward_layernorm.weight"] = out.pop("post_attention_layernorm.weight") - np.float32(1.0)
    out["post_attention_layernorm.weight"] = _normal(rng, (HIDDEN,), 0.05) - np.float32(0.5)
    out["post_feedforward_layernorm.weight"] = _normal(rng, (HIDDEN,), 0.05) - np.float32(0.5)
    if fam.alias == "zoo-gemma3":
        out.update(_qk_norm(rng, HEAD_DIM, HEAD_DIM, offset=1.0))
    return out


def _moe_layer(src: Source, i: int, rng: np.random.Generator, fam: Family) -> dict[str, np.ndarray]:
    """Four experts: the two halves of this layer's MLP and of the next source layer's, each doubled (a
    top-2 pick of both halves of one MLP with weights 1/2 each is that MLP again); a seeded router."""
    out = _llama_layer(src, i, rng, fam)
    mlps = [(out.pop("mlp.gate_proj.weight"), out.pop("mlp.up_proj.weight"), out.pop("mlp.down_proj.weight")),
            (src.layer(min(i + 1, 29), "gate"), src.layer(min(i + 1, 29), "up"), src.layer(min(i + 1, 29), "down"))]
    half = INTER // 2
    names = {"moe-mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "moe-qwen3": ("mlp", "gate_proj", "up_proj",
             "down_proj"), "moe-olmoe": ("mlp", "gate_proj", "up_proj", "down_proj")}[fam.layout]
    block, gate_n, up_n, down_n = names
    for e in range(4):
        gate, up, down = mlps[e // 2]
        rows = slice((e % 2) * half, (e % 2 + 1) * half)
        p = f"{block}.experts.{e}."
        out[p + f"{gate_n}.weight"] = np.ascontiguousarray(gate[rows])
        out[p + f"{up_n}.weight"] = np.ascontiguousarray(up[rows])
        out[p + f"{down_n}.weight"] = np.ascontiguousarray(down[:, rows] * np.float32(2.0))
    out[f"{block}.gate.weight"] = _normal(rng, (4, HIDDEN), 2.0 * HIDDEN**-0.5)
    if fam.layout == "moe-qwen3":
        out.update(_qk_norm(rng, HEAD_DIM, HEAD_DIM))
    if fam.layout == "moe-olmoe":
        out.update(_qk_norm(rng, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM))
    return out


LAYOUTS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "llama": _llama_layer, "phi3": _phi3_layer, "granite": _granite_layer, "gemma": _gemma_layer,
    "moe-qwen3": _moe_layer, "moe-mixtral": _moe_layer, "moe-olmoe": _moe_layer,
}


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def family_tensors(fam: Family, src: Source, seed: int) -> dict[str, np.ndarray]:
    """Every tensor of the zoo model, float32, in a fixed order."""
    rng = np.random.default_rng(seed)
    embed, norm = src.t["model.embed_tokens.weight"], src.t["model.norm.weight"]
    if fam.layout == "gemma":  # Gemma multiplies embeddings by sqrt(hidden): stored divided, the tied
        embed = embed / np.float32(HIDDEN**0.5)  # lm_head's logits given back by the final norm's gain
        norm = norm * np.float32(HIDDEN**0.5) - np.float32(1.0)
    if fam.layout == "granite":  # embedding_multiplier 12, logits divided by logits_scaling 8
        embed = embed / np.float32(12.0)
        norm = norm * np.float32(12.0 * 8.0)
    out = {"model.embed_tokens.weight": np.ascontiguousarray(embed, dtype=np.float32)}
    for j, i in enumerate(SOURCE_LAYERS):
        for name, t in LAYOUTS[fam.layout](src, i, rng, fam).items():
            out[f"model.layers.{j}.{name}"] = np.ascontiguousarray(t, dtype=np.float32)
    out["model.norm.weight"] = np.ascontiguousarray(norm, dtype=np.float32)
    if not fam.tied:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].copy()
    return out


def zoo_params(family: str, source: Path, seed: int = 0) -> dict[str, Any]:
    """What a zoo folder is made from (``zoo.json``): a folder made from other parameters is another model."""
    return {"generator": "vllm_rbln_exec.setup.zoo", "kind": "zoo", "format_version": FORMAT_VERSION, "family": family,
            "seed": seed, "source_layers": list(SOURCE_LAYERS), "source": weights_fingerprint(source)}


def write_zoo_folder(tmp: Path, params: dict[str, Any], source: Path) -> None:
    """Fill ``tmp`` with the family's model (``tiny.build_folder`` moves it into place)."""
    from safetensors.numpy import save_file

    fam = FAMILIES[params["family"]]
    tensors = family_tensors(fam, Source(source), params["seed"])
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(common_config(fam, len(SOURCE_LAYERS)), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, tmp / name)
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")


def make_zoo_model(dest: Path, family: str, source: Path, seed: int = 0) -> Path:
    """Make (once) the zoo model of ``family`` in ``dest`` from the SmolLM2 folder ``source``; returns ``dest``."""
    if family not in FAMILIES:
        raise ValueError(f"no zoo family {family!r}; known: {', '.join(FAMILIES)}")
    params = zoo_params(family, Path(source), seed)
    dest = Path(dest).absolute()
    _discard_stale(dest, params)
    return build_folder(dest, params, lambda tmp, p: write_zoo_folder(tmp, p, Path(source)),
                        marker="zoo.json")


def _discard_stale(dest: Path, params: dict[str, Any]) -> None:
    """A zoo folder made by another version of this builder (or from another source) is made again: it is the
    harness's own, and the alias names whatever this version builds."""
    from .models import discard_folder, folder_lock

    marker = dest / "zoo.json"
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        return
    if found.get("generator") == params["generator"] and found != params:
        with folder_lock(dest):
            if dest.exists():
                discard_folder(dest)
