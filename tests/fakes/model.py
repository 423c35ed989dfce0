"""A minimal model folder for the fake engine.

The folder is what ``setup.models`` needs and nothing more: ``config.json``
(vocabulary size, layer count, architecture ``FakeForCausalLM``), a
``model.safetensors`` whose tensors follow the ``model.layers.N.`` naming (so
``--num-hidden-layers`` truncation has layers to cut) plus ``lm_head.bias``
(added to the fake engine's logits: perturbing it perturbs the model), and a
``tokenizer.json`` describing the fake's byte-level tokenizer (so the tokenizer
fingerprint is that of a real file). ``resolve_model`` accepts it as a local folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tests.fakes.tensorfile import write_safetensors

ARCHITECTURE = "FakeForCausalLM"
DEFAULT_VOCAB = 257  # 256 bytes and a BOS token


def make_fake_model(folder: Path, vocab_size: int = DEFAULT_VOCAB, num_hidden_layers: int = 2, seed: int = 0,
                    bias: np.ndarray | None = None) -> Path:
    """Write a fake-engine model folder; returns it. ``bias`` ([vocab]) is added to every logit row."""
    if vocab_size < 2:
        raise ValueError("the fake tokenizer needs at least 2 tokens (one byte class and BOS)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": "fake",
        "vocab_size": int(vocab_size),
        "num_hidden_layers": int(num_hidden_layers),
        "fake_seed": int(seed),
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)
    tensors = {f"model.layers.{i}.mlp.weight": rng.standard_normal((4, 4)).astype(np.float32)
               for i in range(num_hidden_layers)}
    tensors["model.norm.weight"] = np.ones(4, dtype=np.float32)
    tensors["lm_head.bias"] = (np.zeros(vocab_size, dtype=np.float32) if bias is None
                               else np.asarray(bias, dtype=np.float32).reshape(vocab_size))
    write_safetensors(tensors, folder / "model.safetensors", metadata={"format": "np"})
    (folder / "tokenizer.json").write_text(json.dumps(byte_tokenizer(vocab_size), indent=1))
    return folder


def byte_tokenizer(vocab_size: int) -> dict:
    """A ``tokenizers`` JSON that counts as the fake engine encodes: BOS, then one token per UTF-8 byte
    (BPE with no merges and byte fallback). Ids are the bytes' own; the engine folds them into its vocabulary."""
    bos = "<bos>"
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab[bos] = max(256, int(vocab_size) - 1)
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "pre_tokenizer": None,
        "added_tokens": [{"id": vocab[bos], "content": bos, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
        },
        "decoder": {"type": "ByteFallback"},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": True, "vocab": vocab,
                  "merges": []},
    }
