"""The zoo's families: one row per architecture plugin teams ship, and the configuration each is given.

The table ``setup.zoo`` builds from (architecture, family-specific configuration keys, tensor layout) and
``setup.models`` lists as aliases. Plain data: it must not import the rest of the harness, read files or
build anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# SmolLM2-135M's shapes, which every zoo model keeps (its trained tensors are reused as they are)
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 576, 9, 3, 64, 1536
LAYERS = 4


@dataclass(frozen=True)
class Family:
    alias: str
    architecture: str
    model_type: str
    layout: str  # the tensor layout: llama, phi3, gemma, olmo2, granite, moe-qwen3, moe-mixtral, moe-olmoe
    config: dict[str, Any] = field(default_factory=dict)  # the family's own keys, over the common ones
    tied: bool = True
    note: str = ""


def _rope(theta: float, **extra: Any) -> dict[str, Any]:
    return {"rope_type": extra.pop("rope_type", "default"), "rope_theta": theta, **extra}


# Sliding windows are 16 tokens (the real ones are 512-4096): shorter than a run's prompt plus its tokens,
# so the window is exercised and a wrong window shows.
WINDOW = 16
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": INTER // 2}
FAMILIES: dict[str, Family] = {f.alias: f for f in [
    Family("zoo-llama3", "LlamaForCausalLM", "llama", "llama",
           {"rope_parameters": _rope(500000.0, rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8192),
            "max_position_embeddings": 131072},
           note="Llama-3.2 layout: llama3 rope scaling, tied embeddings"),
    Family("zoo-qwen2.5", "Qwen2ForCausalLM", "qwen2", "llama",
           {"rope_parameters": _rope(1000000.0), "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": 4}, note="Qwen2.5 layout: q/k/v biases"),
    Family("zoo-qwen3", "Qwen3ForCausalLM", "qwen3", "llama",
           {"rope_parameters": _rope(1000000.0), "use_sliding_window": False, "sliding_window": None,
            "attention_bias": False}, note="Qwen3 layout: per-head QK-norm"),
    Family("zoo-qwen3-moe", "Qwen3MoeForCausalLM", "qwen3_moe", "moe-qwen3",
           {"rope_parameters": _rope(1000000.0), "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": None, **MOE},
           note="Qwen3-MoE layout: 4 experts, top-2 router, QK-norm"),
    Family("zoo-mixtral", "MixtralForCausalLM", "mixtral", "moe-mixtral",
           {"rope_parameters": _rope(1000000.0), "sliding_window": None, "num_local_experts": 4,
            "num_experts_per_tok": 2, "intermediate_size": INTER // 2}, tied=False,
           note="Mixtral layout: 4 experts (w1/w2/w3), top-2 router, untied lm_head"),
    Family("zoo-olmoe", "OlmoeForCausalLM", "olmoe", "moe-olmoe",
           {"rope_parameters": _rope(10000.0), "norm_topk_prob": False, "num_experts": 4,
            "num_experts_per_tok": 2, "intermediate_size": INTER // 2, "clip_qkv": None}, tied=False,
           note="OLMoE layout: 4 experts, top-2 router, full-width QK-norm"),
    Family("zoo-gemma3", "Gemma3ForCausalLM", "gemma3_text", "gemma",
           {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": HEAD_DIM, "sliding_window": WINDOW,
            "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
            "rope_parameters": {"sliding_attention": _rope(10000.0), "full_attention": _rope(1000000.0)},
            "final_logit_softcapping": None, "attn_logit_softcapping": None},
           note="Gemma-3 layout: sandwich norms, QK-norm, 1+w norms, 3 sliding-window layers then a global one"),
    Family("zoo-gemma2", "Gemma2ForCausalLM", "gemma2", "gemma",
           {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": HEAD_DIM, "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * 2, "rope_parameters": _rope(10000.0),
            "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
           note="Gemma-2 layout: sandwich norms, logit soft-capping, alternating sliding windows"),
    Family("zoo-mistral", "MistralForCausalLM", "mistral", "llama",
           {"rope_parameters": _rope(1000000.0), "sliding_window": WINDOW}, tied=False,
           note="Mistral layout: sliding-window attention, untied lm_head"),
    Family("zoo-phi3", "Phi3ForCausalLM", "phi3", "phi3",
           {"rope_parameters": _rope(10000.0), "sliding_window": None, "partial_rotary_factor": 1.0,
            "original_max_position_embeddings": 4096, "resid_pdrop": 0.0, "embd_pdrop": 0.0}, tied=False,
           note="Phi-3 layout: fused qkv_proj and gate_up_proj, untied lm_head"),
    Family("zoo-granite", "GraniteForCausalLM", "granite", "granite",
           {"rope_parameters": _rope(10000000.0), "embedding_multiplier": 12.0, "attention_multiplier": 0.0625,
            "residual_multiplier": 0.5, "logits_scaling": 8.0},
           note="Granite-3 layout: embedding, attention, residual and logit multipliers"),
]}


def common_config(family: Family, layers: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": [family.architecture], "model_type": family.model_type, "vocab_size": 49152,
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden_act": "silu",
        "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
        "attention_bias": family.alias == "zoo-qwen2.5", "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": family.tied, "use_cache": True, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "dtype": "float32", "transformers_version": "5.19.0",
    }
    cfg.update(json.loads(json.dumps(family.config)))
    return cfg


