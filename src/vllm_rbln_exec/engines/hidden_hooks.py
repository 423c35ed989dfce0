"""Forward hooks that copy hidden states at chosen steps, in the process that runs the model; torch only.

Owns the module map (the same names on every engine and family: ``embed``, ``layers.{i}``,
the layer's sub-modules ``layers.{i}.NAME`` of ``SUBMODULES`` that its family has (attention and MLP
always; norms, QK-norms, an MoE block's router and experts where present), ``norm``, ``logits``) and the recorder
the hooks feed. It must not know about requests, files other than the one it is
asked to dump into, or sides.

What each name holds (one row, the position that produces a logprob row):

* ``layers.{i}``: the residual stream after decoder layer ``i``. vLLM's Llama-style
  layers return ``(hidden_states, residual)`` with the last residual add left to the
  next layer's fused norm, so their true output is the sum; transformers returns the
  sum itself.
* ``layers.{i}.attn`` / ``.mlp``: the attention block's output (after ``o_proj``) and
  the MLP's output (after ``down_proj``), before the residual add, on both engines.
* ``norm``: the final norm's output (vLLM's fused add+norm returns ``(out, residual)``).
* ``logits``: raw logits (vLLM's ``logits_processor``, transformers' ``lm_head``).

vLLM's fused kernels (add+RMSNorm) overwrite their inputs in place, so every hook
copies (``clone``) its row at once: a saved view would be rewritten by the next layer.

torch is imported inside the functions that need it, so the module map can be
checked without it. A *step* is one forward call of the model: step 0 is the prefill of the prompt,
step ``t`` the decode step that produces generated position ``t``. The row taken at a
step is the last real token of that forward (``counts[step] - 1`` in vLLM's flattened
batch of one request, where padding could follow; the last one in transformers).
"""

from __future__ import annotations

from typing import Any

ATTR = "_vre_hidden_recorder"


# The attribute that holds a decoder layer's attention and MLP blocks, by family (the first found is used):
# every family of the zoo names its attention ``self_attn``; Mixtral's MLP is ``block_sparse_moe`` in vLLM.
ATTENTION_NAMES = ("self_attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward")
# A layer's sub-modules in the order its forward pass runs them: (name in the map, where it is found). A
# module a family lacks is left out; which one departs first names the culprit inside a layer
# (compare.layers.SUBMODULE_ORDER is this order). ``post_attention_layernorm`` is the norm before the MLP in
# Llama-style layers and the sandwich norm after attention in Gemma's; either way it runs between them.
SUBMODULES = (
    ("input_layernorm", "input_layernorm"),
    ("q_norm", "{attn}.q_norm"),
    ("k_norm", "{attn}.k_norm"),
    ("attn", "{attn}"),
    ("post_attention_layernorm", "post_attention_layernorm"),
    ("pre_feedforward_layernorm", "pre_feedforward_layernorm"),
    ("router", "{mlp}.gate"),
    ("experts", "{mlp}.experts"),
    ("mlp", "{mlp}"),
    ("post_feedforward_layernorm", "post_feedforward_layernorm"),
)


def _find(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def layer_parts(layer: Any) -> dict[str, Any]:
    """sub-module name -> module of one decoder layer, in forward order (SUBMODULES), those it has."""
    attn = next((n for n in ATTENTION_NAMES if getattr(layer, n, None) is not None), None)
    mlp = next((n for n in MLP_NAMES if getattr(layer, n, None) is not None), None)
    out = {}
    for name, where in SUBMODULES:
        if ("{attn}" in where and attn is None) or ("{mlp}" in where and mlp is None):
            continue
        module = _find(layer, where.format(attn=attn, mlp=mlp))
        if module is not None:
            out[name] = module
    return out


def module_map(model: Any, engine: str, modules: bool) -> dict[str, tuple[Any, str]]:
    """name -> (module, how its output is read); ``model`` is the causal-LM wrapper of either engine."""
    inner = model.model
    out: dict[str, tuple[Any, str]] = {"embed": (inner.embed_tokens, "tensor")}
    for i, layer in enumerate(inner.layers):
        if not any(hasattr(layer, n) for n in ATTENTION_NAMES):  # pipeline-parallel placeholder (PPMissingLayer)
            continue
        if modules:
            for name, module in layer_parts(layer).items():
                out[f"layers.{i}.{name}"] = (module, "first")
        out[f"layers.{i}"] = (layer, "sum" if engine == "vllm" else "first")
    out["norm"] = (inner.norm, "first")
    out["logits"] = (model.logits_processor, "logits") if engine == "vllm" else (model.lm_head, "logits")
    return out


def is_chain(name: str) -> bool:
    """Entries of the residual stream (always captured); sub-modules a family's engine may not call are not."""
    return name in ("embed", "norm", "logits") or (name.startswith("layers.") and name.count(".") == 1)


def _read(output: Any, how: str) -> Any:
    if how == "sum" and isinstance(output, tuple):
        hidden, residual = output[0], output[1]
        return hidden if residual is None else hidden + residual
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _token_rows(tensor: Any, engine: str, tokens: int | None = None) -> Any:
    """[tokens, features]: vLLM's tensors lead with the flattened tokens; transformers' with batch (1) and
    tokens when 3-D or more, or (a QK-norm applied after the heads were moved forward, as Gemma-3's:
    [1, heads, T, head_dim]) batch, heads and tokens: the token axis is the one of the forward's length
    ``tokens``, or when heads and tokens are equally many the one of the larger stride (a transposed view
    keeps the token axis's stride); tokens when 2-D (an MoE block's router logits and expert outputs)."""
    if engine == "vllm" or tensor.dim() <= 2:
        return tensor.reshape(tensor.shape[0], -1)
    if tensor.dim() >= 4:
        axis = 1
        if tokens is not None and tensor.shape[2] == tokens and (tensor.shape[1] != tokens
                                                                  or tensor.stride(2) > tensor.stride(1)):
            axis = 2
        tensor = tensor.movedim(axis, 1)
    return tensor.reshape(tensor.shape[0] * tensor.shape[1], -1)


class Recorder:
    """Copies one row of each hooked module's output at the wanted steps, as float32 on the host."""

    def __init__(self, model: Any, engine: str, modules: bool):
        self.engine = engine
        self.names = list(module_map(model, engine, modules))
        # vLLM's Gemma multiplies the embedding by sqrt(hidden) after the embedding module, transformers'
        # inside it: the recorded embedding is scaled alike on both
        normalizer = getattr(model.model, "normalizer", None) if engine == "vllm" else None
        self.embed_scale = None if normalizer is None else float(normalizer)
        # the step counter rides on the token embedding, called once per forward on both engines (vLLM's
        # compile wrapper calls LlamaModel.forward directly, so a hook on the model itself never fires)
        self.handles = [model.model.embed_tokens.register_forward_pre_hook(self._step)]
        for name, (module, how) in module_map(model, engine, modules).items():
            self.handles.append(module.register_forward_hook(self._hook(name, how)))
        self.arm([], [])

    def arm(self, wanted: list[int], counts: list[int]) -> None:
        """Capture at these steps; ``counts[s]``: how many real tokens step ``s`` feeds (vLLM only)."""
        self.wanted = set(int(s) for s in wanted)
        self.counts = [int(c) for c in counts]
        self.step = -1
        self.rows: dict[str, dict[int, Any]] = {name: {} for name in self.names}
        self.errors: list[str] = []

    def _step(self, module: Any, args: Any) -> None:
        self.step += 1
        ids = args[0] if args else None
        self.tokens = int(ids.shape[-1]) if getattr(ids, "dim", None) is not None and ids.dim() >= 1 else None

    def _row_index(self, how: str, n_rows: int) -> int:
        if how == "logits" or self.engine != "vllm" or self.step >= len(self.counts):
            return n_rows - 1
        expected = self.counts[self.step]
        if n_rows < expected:  # a chunked prefill split the prompt: the row is not in this forward
            self.errors.append(f"step {self.step} ran {n_rows} tokens, expected {expected}")
            return n_rows - 1
        return expected - 1

    def _hook(self, name: str, how: str):
        import torch

        def hook(module: Any, args: Any, output: Any) -> None:
            if self.step not in self.wanted:
                return
            tensor = _read(output, how)
            if tensor is None:  # logits on a tensor-parallel rank other than 0
                return
            if name == "embed" and self.embed_scale is not None:
                tensor = tensor * self.embed_scale
            flat = _token_rows(tensor, self.engine, getattr(self, "tokens", None))
            row = flat[self._row_index(how, flat.shape[0])]
            self.rows[name][self.step] = row.detach().to(torch.float32).cpu().clone()

        return hook

    def arrays(self) -> dict[str, Any]:
        """name -> float32 array [wanted steps in order, width]; missing steps are an error."""
        import torch

        steps = sorted(self.wanted)
        out = {}
        for name in self.names:
            got = self.rows[name]
            missing = [s for s in steps if s not in got]
            if missing and not got and not is_chain(name):
                continue  # a sub-module this engine never calls as a module (left out, not an error)
            if missing:
                raise RuntimeError(f"hidden-state hook of {name!r} saw no forward at step(s) {missing} "
                                   "(compiled or graph-captured model? the pass runs with enforce_eager)")
            out[name] = torch.stack([got[s] for s in steps]).numpy() if steps else None
        if self.errors:
            raise RuntimeError("; ".join(self.errors[:3]))
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def captured(names: list[str], rows: dict[int, dict[str, Any]]) -> list[str]:
    """The names every prompt's rows hold (a sub-module its engine never called is left out), in model order."""
    return [n for n in names if all(n in r for r in rows.values())]


# -- entry points for vLLM's ``apply_model`` (module-level: picklable by reference) ----------------
def install(model: Any, engine: str, modules: bool) -> list[str]:
    old = getattr(model, ATTR, None)
    if old is not None:
        old.remove()
    recorder = Recorder(model, engine, modules)
    setattr(model, ATTR, recorder)
    return recorder.names


def arm(model: Any, wanted: list[int], counts: list[int]) -> None:
    getattr(model, ATTR).arm(wanted, counts)


def dump(model: Any, path: str) -> list[str]:
    """Write the captured rows into ``path`` (a .npz); only the tensor-parallel rank 0 writes."""
    import numpy as np

    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
    except Exception:  # not initialised: a single process
        rank = 0
    if rank != 0:
        return []
    arrays = getattr(model, ATTR).arrays()
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return list(arrays)
