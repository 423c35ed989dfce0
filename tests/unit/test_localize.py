"""Localisation logic without engines: per-layer error math, the created/inherited rule, the module
names both engines map to, the choice of positions from a saved run, the hidden-state store."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from vllm_rbln_exec.capture.hidden import HiddenError, load_hidden, write_hidden
from vllm_rbln_exec.compare.layers import (
    FLOOR,
    SUBMODULE_ORDER,
    G,
    K,
    chain_names,
    errors,
    floor_of,
    judge_chain,
    localize_prompt,
    summarize_layers,
)
from vllm_rbln_exec.engines.hidden_hooks import module_map
from vllm_rbln_exec.pipeline.localize import auto_yardstick, choose_positions, sides_from_run


def test_relative_l2_and_cosine_per_row():
    ref = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    tgt = np.array([[3.0, 4.5], [0.0, 1.0], [0.0, 0.0]])
    rel, cos = errors(ref, tgt)
    assert rel[0] == pytest.approx(0.5 / 5.0)
    assert rel[1] == pytest.approx(np.sqrt(2.0))
    assert cos[0] == pytest.approx((9 + 18) / (5 * np.hypot(3, 4.5)))
    assert cos[1] == pytest.approx(0.0)
    assert (rel[2], cos[2]) == (0.0, 1.0)  # two zero rows agree
    with pytest.raises(ValueError):
        errors(ref, tgt[:2])


def test_honest_chain_names_no_layer():
    floor = FLOOR["float32"]
    judged = judge_chain([0.0, 1e-7, 5e-7, 2e-6, 2.4e-6, 1e-6], None, floor)
    assert judged.verdict == "none" and judged.first is None
    assert set(judged.status) == {"ok"}


def test_a_jump_is_created_and_what_follows_is_inherited():
    floor = FLOOR["float32"]
    judged = judge_chain([0.0, 1e-7, 5e-7, 6e-3, 7e-3, 7.5e-3], None, floor)
    assert judged.verdict == "created" and judged.first == 3
    assert judged.status == ["ok", "ok", "ok", "created", "inherited", "inherited"]
    # a second fault later on jumps again: created there too
    judged = judge_chain([0.0, 6e-3, 7e-3, 3e-1], None, floor)
    assert judged.status == ["ok", "created", "inherited", "created"]


def test_slow_growth_is_drift_not_created():
    floor = FLOOR["float32"]
    errs = [floor * x for x in (1.0, 1.6, 2.5, 3.8, 6.0)]  # x1.6 per entry: above K without a jump of G
    judged = judge_chain(errs, None, floor)
    assert errs[3] / floor > K and 1.6 < G
    assert judged.verdict == "drift" and judged.first == 3
    assert judged.status[3:] == ["inherited", "inherited"]


def test_the_yardstick_sets_the_scale_at_each_entry():
    # bf16-like: the target matches the yardstick until entry 2, where it jumps
    err_y = [0.0, 5e-3, 8e-3, 1e-2, 1.2e-2]
    err_t = [0.0, 5e-3, 1.2e-1, 1.3e-1, 1.3e-1]
    judged = judge_chain(err_t, err_y, FLOOR["float32"])
    assert judged.verdict == "created" and judged.first == 2
    assert judged.ratio[1] == pytest.approx(1.0)
    # without a yardstick the same errors are judged against the bf16 floor: this fault is under it
    assert max(err_t) < K * FLOOR["bfloat16"]
    assert judge_chain(err_t, None, FLOOR["bfloat16"]).verdict == "none"


def test_floor_is_the_least_precise_dtype():
    assert floor_of("float32", "float32") == FLOOR["float32"]
    assert floor_of("float32", "bfloat16") == FLOOR["bfloat16"]
    assert floor_of("auto", "weird") == FLOOR["float32"]
    assert G > 1 and K > 1


def _fake_model(engine: str, layers: int):
    """The attribute shape of vLLM's and transformers' Llama: model.model.{embed_tokens, layers, norm}."""
    def layer():
        return SimpleNamespace(self_attn=object(), mlp=object())

    inner = SimpleNamespace(embed_tokens=object(), layers=[layer() for _ in range(layers)], norm=object())
    extra = {"logits_processor": object()} if engine == "vllm" else {"lm_head": object()}
    return SimpleNamespace(model=inner, **extra)


def test_both_engines_map_to_the_same_names_in_model_order():
    v = module_map(_fake_model("vllm", 3), "vllm", modules=True)
    h = module_map(_fake_model("transformers", 3), "transformers", modules=True)
    assert list(v) == list(h)
    assert list(v)[:5] == ["embed", "layers.0.attn", "layers.0.mlp", "layers.0", "layers.1.attn"]
    assert list(v)[-2:] == ["norm", "logits"]
    assert v["layers.1"][1] == "sum"  # vLLM: hidden + residual is the layer's output
    assert h["layers.1"][1] == "first"
    assert chain_names(list(v)) == ["embed", "layers.0", "layers.1", "layers.2", "norm", "logits"]
    assert list(module_map(_fake_model("vllm", 2), "vllm", modules=False)) == [
        "embed", "layers.0", "layers.1", "norm", "logits"]


def _rows(names, n_pos, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((n_pos, 16)).astype(np.float32) for n in names}


def test_localize_prompt_names_the_layer_and_module_where_the_target_departs():
    names = ["embed"] + [f"layers.{i}{s}" for i in range(4) for s in (".attn", ".mlp", "")] + ["norm", "logits"]
    ref = _rows(names, 2)
    tgt = {n: a.copy() for n, a in ref.items()}
    for n in names:  # everything from layer 2's MLP on is off by 1%
        if n in ("layers.2.mlp", "layers.2", "layers.3.attn", "layers.3.mlp", "layers.3", "norm", "logits"):
            tgt[n] = tgt[n] * 1.01
    out = localize_prompt(names, [0, 3], ref, tgt, None, FLOOR["float32"])
    for pos in out["positions"]:
        assert pos["verdict"] == "created" and pos["first"] == "layers.2" and pos["module"] == "mlp"
        assert [e["name"] for e in pos["entries"]][:2] == ["embed", "layers.0"]
    assert [p["phase"] for p in out["positions"]] == ["prefill", "decode"]
    summary = summarize_layers([{"index": 0, **out}])
    assert summary["verdict"] == "created" and summary["layer"] == "layers.2" and summary["module"] == "mlp"
    assert summary["shows_at"] == ["prefill", "decode"]
    honest = localize_prompt(names, [0], ref, {n: a.copy() for n, a in ref.items()}, None, FLOOR["float32"])
    assert summarize_layers([{"index": 0, **honest}])["verdict"] == "none"


def test_a_decode_only_difference_shows_at_decode():
    names = ["embed", "layers.0", "layers.1", "norm", "logits"]
    ref = _rows(names, 2)
    tgt = {n: a.copy() for n, a in ref.items()}
    for n in ("layers.1", "norm", "logits"):
        tgt[n][1] *= 1.05  # only the second position (a decode step)
    summary = summarize_layers([{"index": 0, **localize_prompt(names, [0, 4], ref, tgt, None, 1e-4)}])
    assert summary["layer"] == "layers.1" and summary["shows_at"] == ["decode"] and summary["positions"] == [4]


def _run(violations=(), kl=(0.1, 0.3)):
    comps = [{"index": i, "distribution": {"kl_max": k},
              "worst_positions": [{"position": 5, "kl": k}, {"position": 0, "kl": k / 2}, {"position": 2, "kl": k / 3}],
              "argmax_divergence": None} for i, k in enumerate(kl)]
    run = {"comparisons": comps, "reference_tokens": [[1] * 8, [2] * 8], "prompts": ["a", "b"]}
    return run, {"violations": list(violations)}


def test_positions_are_the_failing_ones_then_the_worst():
    run, verdict = _run([{"prompt_index": 0, "position": 3}])
    chosen, why = choose_positions(run, verdict)
    assert chosen == {0: [0, 2, 3]} and "failing" in why
    chosen, why = choose_positions(*_run())
    assert list(chosen) == [1, 0] and chosen[1] == [0, 2, 5] and "nothing failed" in why
    chosen, _ = choose_positions(*_run(), max_prompts=1, max_decode=1)
    assert chosen == {1: [0, 2]}


def _resolved_run(ref_dtype="float32", tgt_dtype="bfloat16"):
    side = {"device": "cpu", "platform": "cpu", "engine": "vllm", "torch_device": "cpu", "checkpoint": "/m",
            "block_size": 128, "parallel": {"tp": 1, "pp": 1, "dp": 1, "ep": False}, "engine_args": {}}
    return {"model": "m", "resolved": {"sides": {"reference": {**side, "dtype": ref_dtype},
                                                 "target": {**side, "dtype": tgt_dtype}}}}


def test_sides_from_a_saved_run_and_the_automatic_yardstick():
    ref, tgt = sides_from_run(_resolved_run())
    assert (ref.role, ref.dtype, tgt.role, tgt.dtype) == ("reference", "float32", "target", "bfloat16")
    yard = auto_yardstick(ref, tgt)
    assert yard.role == "yardstick" and yard.dtype == "bfloat16" and yard.engine == ref.engine
    assert auto_yardstick(*sides_from_run(_resolved_run(tgt_dtype="float32"))) is None
    # the run's own rule: a CUDA target's "auto" dtype counts as bfloat16
    from dataclasses import replace

    cuda_auto = replace(tgt, dtype="auto", platform="cuda", device="cuda")
    assert auto_yardstick(ref, cuda_auto).dtype == "bfloat16"
    from vllm_rbln_exec.core.errors import UsageError

    with pytest.raises(UsageError, match="older version"):
        sides_from_run({"model": "m"})


def test_hidden_store_round_trip_and_damage(tmp_path):
    names = ["embed", "layers.0", "norm"]
    rows = {0: _rows(names, 2), 1: _rows(names, 1, seed=1)}
    write_hidden(tmp_path / "h", {"engine": "vllm"}, names, {0: [0, 4], 1: [0]}, rows)
    h = load_hidden(tmp_path / "h")
    assert h.names == names and h.positions == {0: [0, 4], 1: [0]}
    assert np.array_equal(h.rows(1, "layers.0"), rows[1]["layers.0"])
    meta = json.loads((tmp_path / "h" / "hidden.json").read_text())
    meta["positions"]["0"] = [0, 4, 6]
    (tmp_path / "h" / "hidden.json").write_text(json.dumps(meta))
    with pytest.raises(HiddenError, match="wrong shape"):
        load_hidden(tmp_path / "h")
    (tmp_path / "h" / "hidden.npz").write_bytes(b"not a zip")
    with pytest.raises(HiddenError):
        load_hidden(tmp_path / "h")


# Each family's decoder-layer attributes on each engine (vLLM 0.32's and transformers 5's module trees):
# attention, its QK-norms, the MLP (Mixtral's is block_sparse_moe in vLLM, mlp in transformers), an MoE
# block's router (gate) and experts, and the norms around them.
def _ns(*names, **children):
    return SimpleNamespace(**{n: object() for n in names}, **children)


def _layer(family: str, engine: str):
    qk = ("q_norm", "k_norm") if family in ("qwen3", "qwen3-moe", "olmoe", "gemma3", "olmo2") else ()
    attn = _ns("o_proj", *qk, *(("qkv_proj",) if engine == "vllm" else ("q_proj", "k_proj", "v_proj")))
    norms = {"llama": ("input_layernorm", "post_attention_layernorm"),
             "gemma": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                       "post_feedforward_layernorm"),
             "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm")}
    kind = "gemma" if family.startswith("gemma") else "olmo2" if family == "olmo2" else "llama"
    mlp = _ns("gate", "experts") if family in ("qwen3-moe", "mixtral", "olmoe") else _ns("down_proj")
    mlp_name = "block_sparse_moe" if family == "mixtral" and engine == "vllm" else "mlp"
    return _ns(*norms[kind], self_attn=attn, **{mlp_name: mlp})


ZOO_SUBMODULES = {
    "llama": ["input_layernorm", "attn", "post_attention_layernorm", "mlp"],
    "qwen3": ["input_layernorm", "q_norm", "k_norm", "attn", "post_attention_layernorm", "mlp"],
    "qwen3-moe": ["input_layernorm", "q_norm", "k_norm", "attn", "post_attention_layernorm", "router", "experts",
                  "mlp"],
    "mixtral": ["input_layernorm", "attn", "post_attention_layernorm", "router", "experts", "mlp"],
    "olmoe": ["input_layernorm", "q_norm", "k_norm", "attn", "post_attention_layernorm", "router", "experts", "mlp"],
    "gemma2": ["input_layernorm", "attn", "post_attention_layernorm", "pre_feedforward_layernorm", "mlp",
               "post_feedforward_layernorm"],
    "gemma3": ["input_layernorm", "q_norm", "k_norm", "attn", "post_attention_layernorm",
               "pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"],
    "olmo2": ["q_norm", "k_norm", "attn", "post_attention_layernorm", "mlp", "post_feedforward_layernorm"],
}


@pytest.mark.parametrize("family", sorted(ZOO_SUBMODULES))
def test_every_familys_layer_maps_to_the_same_sub_modules_on_both_engines(family):
    maps = {}
    for engine in ("vllm", "transformers"):
        inner = SimpleNamespace(embed_tokens=object(), layers=[_layer(family, engine) for _ in range(2)], norm=object())
        head = {"logits_processor": object()} if engine == "vllm" else {"lm_head": object()}
        maps[engine] = module_map(SimpleNamespace(model=inner, **head), engine, modules=True)
    assert list(maps["vllm"]) == list(maps["transformers"])
    subs = [n.split(".", 2)[2] for n in maps["vllm"] if n.startswith("layers.1.")]
    assert subs == ZOO_SUBMODULES[family]
    assert chain_names(list(maps["vllm"])) == ["embed", "layers.0", "layers.1", "norm", "logits"]
    # the rule inside a layer reads them in this order
    assert [s for s in SUBMODULE_ORDER if s in subs] == subs


def test_the_culprit_module_is_the_first_to_depart_in_forward_order():
    names = ["embed", "layers.0.router", "layers.0.experts", "layers.0.mlp", "layers.0", "norm", "logits"]
    ref = _rows(names, 1)
    tgt = {n: v.copy() for n, v in ref.items()}
    for n in ("layers.0.router", "layers.0.experts", "layers.0.mlp", "layers.0", "norm", "logits"):
        tgt[n] = tgt[n] * 1.5  # a wrong expert routed: the router departs first, the experts inherit
    judged = localize_prompt(names, [0], ref, tgt, None, FLOOR["float32"])
    assert judged["positions"][0]["first"] == "layers.0" and judged["positions"][0]["module"] == "router"
