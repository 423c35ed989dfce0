"""Engine arguments of a side (``--target-args``/``--reference-args``), checked before any engine starts.

vLLM's arguments are the fields of its ``EngineArgs``, read from the installed
vLLM's source as text (``engine/arg_utils.py``) so that the main process never
imports vLLM; transformers' are ``from_pretrained`` keywords and the model's
own config keys. Arguments the harness sets itself from its own options are
refused with the option to use instead. This module must not start engines.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..core.errors import UsageError
from ..core.registry import suggest

# Set by the harness from its own options (or needed by the capture): giving them as engine args would
# make the side differ from what the report and the cache key say.
VLLM_OWNED = {
    "model": "--model / --target-model", "tokenizer": "--model", "dtype": "--{role}-dtype",
    "max_model_len": "--max-model-len", "trust_remote_code": "--trust-remote-code",
    "tensor_parallel_size": "--tp", "pipeline_parallel_size": "--pp", "data_parallel_size": "--dp",
    "enable_expert_parallel": "--ep", "max_logprobs": "--max-logprobs-cap",
    "logits_processors": "(the capture's own logits processor)",
    "seed": "(greedy decoding: the seed is fixed)",
}  # fmt: skip
# max_num_seqs and max_num_batched_tokens are accepted per side (over --batch and --max-batched, which set
# both sides): one side at batch 1 against the other at batch N is what --ab batch-invariance compares. The
# harness still hands the engine --batch prompts per generate call; max_num_seqs below that runs them fewer
# at a time. Both are recorded in the side's engine args, its differences and the cache key.
TRANSFORMERS_OWNED = {
    "dtype": "--{role}-dtype", "torch_dtype": "--{role}-dtype", "device_map": "--{role}-device",
    "local_files_only": "(the harness never fetches weights)", "trust_remote_code": "--trust-remote-code",
}  # fmt: skip
TRANSFORMERS_KEYWORDS = frozenset({
    "attn_implementation", "revision", "low_cpu_mem_usage", "use_safetensors", "quantization_config",
    "variant", "subfolder", "key_mapping", "tp_plan", "output_loading_info", "weights_only",
    "max_memory", "offload_folder", "offload_state_dict", "use_kernels",
})  # fmt: skip


@lru_cache(maxsize=1)
def vllm_engine_arg_names() -> frozenset[str] | None:
    """Field names of the installed vLLM's ``EngineArgs`` (None: no vLLM here, or its source could not be read)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "engine" / "arg_utils.py"
        if path.is_file():
            return _dataclass_fields(path.read_text(encoding="utf-8"), "EngineArgs")
    return None


def _dataclass_fields(source: str, class_name: str) -> frozenset[str] | None:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return frozenset(s.target.id for s in node.body
                             if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name))
    return None


def check_engine_args(engine: str, args: dict[str, Any], role: str, model_config: dict[str, Any] | None = None,
                      known_vllm: frozenset[str] | None = None) -> None:
    """UsageError naming the first argument ``engine`` would not accept (or that the harness owns)."""
    option = f"--{role}-args"
    if engine == "vllm":
        owned, known = VLLM_OWNED, known_vllm if known_vllm is not None else vllm_engine_arg_names()
    elif engine == "transformers":
        owned = TRANSFORMERS_OWNED
        known = TRANSFORMERS_KEYWORDS | frozenset(model_config or {})
    else:
        return  # an out-of-tree engine checks its own arguments
    for name in args:
        if name in owned:
            instead = owned[name].format(role=role)
            raise UsageError(f"{option}: {name!r} is set by the harness; use {instead} instead", option=option)
        if known is not None and name not in known:
            raise UsageError(f"{option}: {_unknown(engine, name, known)}", option=option)


def _unknown(engine: str, name: str, known: frozenset[str]) -> str:
    if len(known) <= 40:
        return suggest(f"{engine} engine argument", name, known)
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    where = "the fields of vllm.EngineArgs" if engine == "vllm" else "from_pretrained keywords and config keys"
    return f"unknown {engine} engine argument {name!r}.{hint} ({where} are accepted)"
