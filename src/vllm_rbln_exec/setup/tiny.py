"""A seeded random-weight Llama model folder, made offline in seconds.

``make_tiny_model(dest)`` writes ``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and
``tiny.json`` (the parameters it was made from). The same arguments give the
same bytes on any machine:

* weights come from numpy's ``default_rng(seed)`` (PCG64; never torch's RNG,
  whose streams differ between devices and versions), drawn in float32 in a
  fixed tensor order and saved with ``safetensors.numpy``;
* the tokenizer is a byte-level BPE written here as JSON (fixed key order,
  legacy ``"a b"`` merge strings that every ``tokenizers`` release reads), then
  loaded back with the ``tokenizers`` library as a check, so its bytes do not
  depend on the installed ``tokenizers`` version.

The shapes are Llama 3's where it matters to engines (vocabulary 128256, GQA,
rope_theta 500000, untied lm_head) and tiny elsewhere. ``head_dim`` is 64
although ``hidden_size`` is 64 with 4 heads: vLLM's CPU attention accepts head
sizes 32..512 only (16 would be refused), and 64 is the size every attention
kernel supports. The lm_head is scaled so next-token distributions are peaked
(top-1 probability mostly 0.2-0.9), so near-ties are rare.

This module runs in the harness's main process: it must never import torch or
vLLM (numpy, safetensors.numpy and tokenizers only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import write_manifest
from .models import folder_lock, is_model_folder

FORMAT_VERSION = 1
MARKER = "tiny.json"
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
N_SPECIAL = 2  # bos, eos: the last two ids, like Llama 3's specials after its BPE vocabulary
# English letters, most frequent first: merges of frequent pairs get low ranks.
LOWER = "etaoinshrdlcumwfgypbvkjxqz"
UPPER = LOWER.upper()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _merges() -> Iterator[tuple[str, str]]:
    """Deterministic merges, shortest tokens first: "Ġ"+letter and letter+lowercase
    pairs, then each earlier token extended by a lowercase letter, level by level.
    Every merge's parts already exist when it is listed, so the BPE is valid."""
    space = _bytes_to_unicode()[ord(" ")]  # "Ġ"
    letters = LOWER + UPPER
    level: list[str] = []
    for c in letters:
        yield space, c
        level.append(space + c)
    for a in letters:
        for b in LOWER:
            yield a, b
            level.append(a + b)
    while True:
        nxt: list[str] = []
        for parent in level:
            for b in LOWER:
                yield parent, b
                nxt.append(parent + b)
        level = nxt


def tokenizer_json(vocab_size: int, max_len: int = 4096) -> dict[str, Any]:
    """The tokenizer.json content: 256 byte tokens, merges up to ``vocab_size - 2``,
    then bos and eos as special added tokens (ids ``vocab_size - 2`` and ``- 1``)."""
    if vocab_size < 256 + N_SPECIAL + 1:
        raise ValueError(f"vocab_size must be at least {256 + N_SPECIAL + 1}")
    b2u = _bytes_to_unicode()
    vocab: dict[str, int] = {b2u[b]: b for b in range(256)}
    merges: list[str] = []
    n_merges = vocab_size - N_SPECIAL - 256
    gen = _merges()
    while len(merges) < n_merges:
        a, b = next(gen)
        vocab[a + b] = len(vocab)
        merges.append(f"{a} {b}")
    bos_id, eos_id = vocab_size - 2, vocab_size - 1

    def added(content: str, i: int) -> dict[str, Any]:
        return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(BOS, bos_id), added(EOS, eos_id)],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _config(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
            intermediate: int, max_len: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_len,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "torch_dtype": "float32",
        # The legacy (4.x) config format, and said so: transformers 5 warns about a
        # "Mistral regex" for any local config.json that names no version.
        "transformers_version": "4.57.1",
    }


def _weights(rng: np.random.Generator, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
             head_dim: int, intermediate: int, logit_scale: float) -> dict[str, np.ndarray]:
    """float32 tensors drawn in a fixed order. Projections are scaled by
    1/sqrt(fan_in) so attention and MLP outputs are O(1) next to the O(1)
    embedding rows (the context matters, the KV cache is exercised); the lm_head
    is scaled so the logits of a unit-RMS hidden state have std ``logit_scale``."""

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def norm_weight() -> np.ndarray:  # near 1, not exactly, so the weight is really applied
        return np.float32(1.0) + normal((hidden,), 0.1)

    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal((vocab_size, hidden), 1.0)}
    q, kv = heads * head_dim, kv_heads * head_dim
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm_weight()
        t[p + "self_attn.q_proj.weight"] = normal((q, hidden), hidden**-0.5)
        t[p + "self_attn.k_proj.weight"] = normal((kv, hidden), hidden**-0.5)
        t[p + "self_attn.v_proj.weight"] = normal((kv, hidden), hidden**-0.5)
        t[p + "self_attn.o_proj.weight"] = normal((hidden, q), q**-0.5)
        t[p + "post_attention_layernorm.weight"] = norm_weight()
        t[p + "mlp.gate_proj.weight"] = normal((intermediate, hidden), hidden**-0.5)
        t[p + "mlp.up_proj.weight"] = normal((intermediate, hidden), hidden**-0.5)
        t[p + "mlp.down_proj.weight"] = normal((hidden, intermediate), intermediate**-0.5)
    t["model.norm.weight"] = norm_weight()
    t["lm_head.weight"] = normal((vocab_size, hidden), logit_scale * hidden**-0.5)
    return t


def _dump(path: Path, data: Any) -> None:
    path.write_bytes((json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _check_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, not {vocab_size}")
    text = "The tiny model says hello."
    enc = tok.encode(text)
    if enc.ids[0] != vocab_size - 2 or tok.decode(enc.ids, skip_special_tokens=True) != text:
        raise RuntimeError("tiny tokenizer does not round-trip text")


def make_tiny_model(
    dest: Path,
    vocab_size: int = 128256,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 64,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    logit_scale: float = 8.0,
) -> Path:
    """Make (once) the tiny model folder ``dest`` and return it.

    An existing folder made with the same parameters is returned as is; one made
    with other parameters, or anything else already at ``dest``, is an error.
    """
    dest = Path(dest).absolute()
    params = {
        "generator": "vllm_rbln_exec.setup.tiny",
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "logit_scale": logit_scale,
    }
    if num_attention_heads % num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    return build_folder(dest, params, _write_folder)


def build_folder(dest: Path, params: dict, write: Callable[[Path, dict], None], marker: str = MARKER) -> Path:
    """The one builder of the folders the harness makes from parameters (the tiny model, the zoo): ``dest``
    as is when ``marker`` in it holds ``params``; else made once, under a lock, in a temporary folder that
    ``write(tmp, params)`` fills, given the marker and a manifest, and renamed into place."""
    if (done := _existing(dest, params, marker)) is not None:
        return done
    with folder_lock(dest):
        if (done := _existing(dest, params, marker)) is not None:
            return done
        tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write(tmp, params)
            _dump(tmp / marker, params)
            for item in tmp.iterdir():  # safetensors writes 0600; a shared model folder wants 0644
                item.chmod(0o644)
            write_manifest(tmp, {"kind": params.get("kind", "tiny"), "params": params})
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _existing(dest: Path, params: dict, marker: str = MARKER) -> Path | None:
    """``dest`` when it already holds this model, None when it does not exist; anything else is an error."""
    if not dest.exists():
        return None
    try:
        found = json.loads((dest / marker).read_text())
    except (OSError, ValueError):
        found = None
    if found == params and is_model_folder(dest):
        return dest
    raise FileExistsError(
        f"{dest} exists and is not the model asked for "
        f"({'other parameters: ' + json.dumps(found) if found else 'no ' + marker + ' in it'}); "
        "remove it or choose another folder"
    )


def _write_folder(tmp: Path, p: dict) -> None:
    from safetensors.numpy import save_file

    shape = (p["vocab_size"], p["hidden_size"], p["num_hidden_layers"], p["num_attention_heads"],
             p["num_key_value_heads"], p["head_dim"], p["intermediate_size"])
    weights = _weights(np.random.default_rng(p["seed"]), *shape, p["logit_scale"])
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del weights
    _dump(tmp / "config.json", _config(*shape, p["max_position_embeddings"]))
    _dump(tmp / "tokenizer.json", tokenizer_json(p["vocab_size"], p["max_position_embeddings"]))
    _check_tokenizer(tmp / "tokenizer.json", p["vocab_size"])
    _dump(tmp / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "clean_up_tokenization_spaces": False,
        "model_max_length": p["max_position_embeddings"],
        "model_input_names": ["input_ids", "attention_mask"],
    })
    _dump(tmp / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_rbln_exec.setup.tiny",
                                     description="Make the seeded random-weight tiny Llama model folder.")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    path = make_tiny_model(args.dest, vocab_size=args.vocab_size, seed=args.seed, num_hidden_layers=args.layers)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
