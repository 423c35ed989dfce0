"""The seeded tiny Llama model: reproducible bytes, loadable, torch-free to make.

Integration tier: making it needs safetensors and tokenizers (the engines extra), checking it
needs transformers and torch, and one case runs a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_rbln_exec.setup.tiny import make_tiny_model

pytestmark = pytest.mark.integration

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def test_two_builds_are_byte_identical(tiny, tmp_path):
    other = make_tiny_model(tmp_path / "elsewhere" / "another-name")
    for name in FILES:
        assert digest(tiny / name) == digest(other / name), name
    assert not [p for p in other.parent.iterdir() if ".tmp" in p.name]  # the temporary folder was moved away


def test_seed_changes_weights_not_tokenizer(tiny, tmp_path):
    other = make_tiny_model(tmp_path / "seed1", seed=1)
    assert digest(tiny / "model.safetensors") != digest(other / "model.safetensors")
    assert digest(tiny / "tokenizer.json") == digest(other / "tokenizer.json")


def test_existing_folder_is_reused_or_refused(tiny, tmp_path):
    before = (tiny / "model.safetensors").stat().st_mtime_ns
    assert make_tiny_model(tiny) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="other parameters"):
        make_tiny_model(tiny, seed=7)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "something").write_text("x")
    with pytest.raises(FileExistsError):
        make_tiny_model(tmp_path / "busy")


def test_config_loads_with_transformers(tiny):
    from transformers import AutoConfig

    raw = json.loads((tiny / "config.json").read_text())
    assert raw["vocab_size"] == 128256
    assert raw["tie_word_embeddings"] is False
    config = AutoConfig.from_pretrained(str(tiny), local_files_only=True)
    assert config.model_type == "llama"
    assert config.vocab_size == 128256
    assert config.head_dim == 64  # a size every attention backend takes (vLLM CPU refuses 16)
    assert config.num_key_value_heads == 2 and config.num_attention_heads == 4
    assert config.max_position_embeddings == 4096


def test_tokenizer_has_the_vocabulary_size_and_adds_bos(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny), local_files_only=True)
    assert len(tok) == 128256
    assert (tok.bos_token_id, tok.eos_token_id) == (128254, 128255)
    text = "The capital of France is Paris. 42 ünïcode!"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    assert len(ids) < len(text.encode())  # merges do apply
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_small_vocabulary(tmp_path):
    from tokenizers import Tokenizer

    folder = make_tiny_model(tmp_path / "small", vocab_size=1000)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == 1000
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 1000
    with pytest.raises(ValueError):
        make_tiny_model(tmp_path / "too-small", vocab_size=100)


def test_next_token_distributions_are_peaked(tiny):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32, attn_implementation="eager")
    ids = torch.from_numpy(__import__("numpy").random.default_rng(0).integers(0, 128000, (4, 32)))
    with torch.inference_mode():
        probs = model(input_ids=ids).logits.float().softmax(-1)
    top2 = probs.topk(2, dim=-1).values
    median_top1 = top2[..., 0].median().item()
    assert 0.2 < median_top1 < 0.9, median_top1
    near_ties = ((top2[..., 0] - top2[..., 1]) / top2[..., 0] < 1e-3).float().mean().item()
    assert near_ties < 0.05


def test_making_it_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from vllm_rbln_exec.setup.tiny import make_tiny_model\n"
        f"make_tiny_model({str(tmp_path / 'm')!r}, vocab_size=2000)\n"
        "heavy = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_a_damaged_alias_folder_is_made_again_before_a_worker_sees_it(tmp_path):
    """The pipeline's model step verifies a folder it made (here the tiny alias) against its manifest."""
    from vllm_rbln_exec.pipeline.context import RunContext
    from vllm_rbln_exec.pipeline.models import prepare_model

    ctx = RunContext.create(str(tmp_path / "cache"), None, 60.0)
    _, path = prepare_model(ctx, "tiny-llama3", None)
    good = (path / "tokenizer.json").read_bytes()
    assert ctx.notes == []
    with open(path / "tokenizer.json", "r+b") as f:  # a few bytes overwritten in place, as a bad copy leaves them
        f.seek(len(good) // 2)
        f.write(b"\x00\x00\x00")
    _, again = prepare_model(ctx, "tiny-llama3", None)
    assert again == path and (path / "tokenizer.json").read_bytes() == good
    assert len(ctx.notes) == 1 and "tokenizer.json: digest mismatch" in ctx.notes[0] and "made again" in ctx.notes[0]
    _, third = prepare_model(ctx, "tiny-llama3", None)
    assert len(ctx.notes) == 1  # whole again: nothing more to say
