"""Planted faults (setup.faults): the specs, and the edits they make to a copy of a model folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vllm_rbln_exec.core.errors import UsageError
from vllm_rbln_exec.setup.faults import (
    BF16_UNIT_ROUNDOFF,
    faults_for,
    parse_fault,
    plant,
    planted,
    read_safetensors,
    write_safetensors,
)
from vllm_rbln_exec.setup.zoo_families import FAMILIES, common_config


def load_file(path):
    return read_safetensors(path)[0]


def save_file(tensors, path):
    write_safetensors(path, tensors, {name: "F32" for name in tensors}, {"format": "pt"})

HEADS, HEAD_DIM, HIDDEN = 2, 4, 8


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    rng = np.random.default_rng(0)
    tensors = {"model.norm.weight": np.ones(HIDDEN, np.float32)}
    for layer in range(2):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "input_layernorm"):
            shape = (HIDDEN,) if "norm" in name else (HIDDEN, HIDDEN)
            tensors[f"model.layers.{layer}.{name}.weight"] = rng.standard_normal(shape).astype(np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    config = {"num_hidden_layers": 2, "hidden_size": HIDDEN, "num_attention_heads": HEADS, "head_dim": HEAD_DIM,
              "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}
    (path / "config.json").write_text(json.dumps(config))
    (path / ".vre-manifest.json").write_text("{}")
    return path


def changed(src, dst):
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    return {k for k in a if not np.array_equal(a[k], b[k])}, a, b


def test_a_scale_fault_scales_one_weight_and_nothing_else(folder, tmp_path):
    out = plant(folder, tmp_path / "f", parse_fault("scale:1:o_proj:1.01"))
    names, a, b = changed(folder, out)
    assert names == {"model.layers.1.self_attn.o_proj.weight"}
    np.testing.assert_allclose(b["model.layers.1.self_attn.o_proj.weight"],
                               a["model.layers.1.self_attn.o_proj.weight"] * np.float32(1.01), rtol=1e-7)
    assert not (out / ".vre-manifest.json").exists()  # the copy is not the folder the manifest describes
    assert planted(out, parse_fault("scale:1:o_proj:1.01")) and not planted(out, parse_fault("scale:1:o_proj:1.02"))


def test_final_norm_zero_head_and_noise(folder, tmp_path):
    names, _, b = changed(folder, plant(folder, tmp_path / "n", parse_fault("scale:final-norm:0.995")))
    assert names == {"model.norm.weight"} and np.allclose(b["model.norm.weight"], 0.995)
    names, a, b = changed(folder, plant(folder, tmp_path / "z", parse_fault("zero-head:0:1")))
    o = "model.layers.0.self_attn.o_proj.weight"
    assert names == {o} and not b[o][:, HEAD_DIM:].any() and np.array_equal(b[o][:, :HEAD_DIM], a[o][:, :HEAD_DIM])
    names, a, b = changed(folder, plant(folder, tmp_path / "w", parse_fault("weight-noise:bf16")))
    assert len(names) == len(a)
    rel = np.concatenate([(b[k] / a[k] - 1).ravel() for k in a if a[k].ndim == 2])
    assert 0.5 * BF16_UNIT_ROUNDOFF < rel.std() < 2 * BF16_UNIT_ROUNDOFF


def test_config_faults_edit_the_config_only(folder, tmp_path):
    out = plant(folder, tmp_path / "r", parse_fault("rope-theta:10000"))
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_theta"] == 10000
    assert not changed(folder, out)[0]
    out = plant(folder, tmp_path / "e", parse_fault("norm-eps:1e-4"))
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == 1e-4


@pytest.mark.parametrize("spec", ["scale:1:nope:1.01", "scale:x:o_proj:1", "zero-head:1", "rope-theta", "bogus:1"])
def test_bad_fault_specs(spec):
    with pytest.raises(UsageError, match="bad fault"):
        parse_fault(spec)


def test_a_fault_that_hits_nothing_is_an_error(folder, tmp_path):
    with pytest.raises(UsageError, match="hits no weight"):
        plant(folder, tmp_path / "x", parse_fault("scale:7:o_proj:1.01"))
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))  # nothing half made is left
    with pytest.raises(UsageError, match="out of range"):
        plant(folder, tmp_path / "y", parse_fault("zero-head:0:5"))


def test_safetensors_round_trip_keeps_every_dtype_and_rounds_bf16_to_nearest(tmp_path):
    path = tmp_path / "t.safetensors"
    values = np.array([1.0, 1.00390625, -2.5, 3.0e-3], np.float32)
    tensors = {"a": values.reshape(2, 2), "h": values.astype(np.float16), "b": values, "i": np.arange(3)}
    write_safetensors(path, tensors, {"a": "F32", "h": "F16", "b": "BF16", "i": "I64"}, {"format": "pt"})
    back, stored, meta = read_safetensors(path)
    assert stored == {"a": "F32", "h": "F16", "b": "BF16", "i": "I64"} and meta == {"format": "pt"}
    assert np.array_equal(back["a"], tensors["a"]) and np.array_equal(back["h"], tensors["h"])
    assert np.array_equal(back["i"], tensors["i"])
    assert np.allclose(back["b"], values, rtol=2.0**-8) and back["b"][1] == 1.0  # a tie goes to even


@pytest.fixture
def moe_folder(tmp_path):
    """A two-layer Mixtral-style checkpoint (per-expert w1/w2/w3 and a router), sliding window, rope per type."""
    rng = np.random.default_rng(1)
    shapes = {"self_attn.o_proj": (HIDDEN, HIDDEN), "post_attention_layernorm": (HIDDEN,),
              "block_sparse_moe.gate": (4, HIDDEN),
              **{f"block_sparse_moe.experts.{e}.{w}": (HIDDEN, HIDDEN) for e in range(4) for w in ("w1", "w2", "w3")}}
    tensors = {"model.norm.weight": np.ones(HIDDEN, np.float32)} | {
        f"model.layers.{layer}.{name}.weight": rng.standard_normal(shape).astype(np.float32)
        for layer in range(2) for name, shape in shapes.items()}
    config = {"model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
              "head_dim": HEAD_DIM, "num_local_experts": 4, "sliding_window": 16, "rms_norm_eps": 1e-5,
              "rope_parameters": {"sliding_attention": {"rope_theta": 1e4}, "full_attention": {"rope_theta": 1e6}}}
    path = tmp_path / "moe"
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_new_weight_faults_find_each_familys_tensor(moe_folder, tmp_path):
    p = "model.layers.1."
    names, a, b = changed(moe_folder, plant(moe_folder, tmp_path / "r", parse_fault("swap-experts:1:0:2")))
    g = p + "block_sparse_moe.gate.weight"
    assert names == {g} and np.array_equal(b[g][[0, 2]], a[g][[2, 0]]) and np.array_equal(b[g][1], a[g][1])
    names, a, b = changed(moe_folder, plant(moe_folder, tmp_path / "d", parse_fault("scale:1:down_proj:1.01")))
    assert names == {p + "block_sparse_moe.experts.0.w2.weight"}  # a short MLP name hits the first expert
    names, a, b = changed(moe_folder, plant(moe_folder, tmp_path / "s", parse_fault("scale-rows:1:o_proj:1.05")))
    o = p + "self_attn.o_proj.weight"
    assert names == {o} and np.allclose(b[o][:HIDDEN // 2], a[o][:HIDDEN // 2] * 1.05)
    assert np.array_equal(b[o][HIDDEN // 2:], a[o][HIDDEN // 2:])  # non-uniform: a norm cannot undo it
    names, a, b = changed(moe_folder, plant(moe_folder, tmp_path / "h", parse_fault("swap-heads:1:0:1")))
    assert names == {o} and np.array_equal(b[o][:, :HEAD_DIM], a[o][:, HEAD_DIM:2 * HEAD_DIM])
    n = p + "post_attention_layernorm.weight"
    names, a, b = changed(moe_folder, plant(moe_folder, tmp_path / "n",
                                            parse_fault("norm-offset:1:post_attention_layernorm:-1")))
    assert names == {n} and np.allclose(b[n], a[n] - 1)


def test_config_faults_reach_per_layer_type_ropes_and_the_window(moe_folder, tmp_path):
    cfg = json.loads((plant(moe_folder, tmp_path / "r", parse_fault("rope-theta:100")) / "config.json").read_text())
    assert {v["rope_theta"] for v in cfg["rope_parameters"].values()} == {100}
    cfg = json.loads((plant(moe_folder, tmp_path / "w", parse_fault("sliding-window:8")) / "config.json").read_text())
    assert cfg["sliding_window"] == 8


def test_faults_out_of_reach_are_refused(folder, tmp_path):
    with pytest.raises(UsageError, match="no sliding window"):
        plant(folder, tmp_path / "w", parse_fault("sliding-window:8"))  # a Llama config attends everywhere
    with pytest.raises(UsageError, match="hits no weight"):
        plant(folder, tmp_path / "e", parse_fault("swap-experts:0:0:1"))  # no router
    with pytest.raises(UsageError, match="out of range"):
        plant(folder, tmp_path / "h", parse_fault("swap-heads:0:0:9"))
    with pytest.raises(UsageError, match="bad fault"):
        parse_fault("swap-heads:0:1:1")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gets_the_faults_it_can_see(family):
    config = common_config(FAMILIES[family], 4)
    planned, blind = faults_for(config, 4)
    kinds = {f.spec.split(":")[0] for f in planned}
    assert {"swap-heads", "scale-rows", "norm-offset", "rope-theta", "weight-noise"} <= kinds
    assert ("swap-experts" in kinds) == any(k in config for k in ("num_experts", "num_local_experts"))
    assert ("sliding-window" in kinds) == bool(config.get("sliding_window"))
    for f in planned:
        parse_fault(f.spec.replace("x0.1", "1000"))  # every planned spec parses
        assert f.layer in (None, 2)  # the middle layer, where --localize must point
    assert any("sandwich" in b for b in blind) == family.startswith("zoo-gemma")
