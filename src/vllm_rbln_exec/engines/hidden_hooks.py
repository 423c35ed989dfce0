"""Forward hooks that copy hidden states at chosen steps, in the process that runs the model; torch only.

Owns the module map (the same names on every engine: ``embed``, ``layers.{i}``,
``layers.{i}.attn``, ``layers.{i}.mlp``, ``norm``, ``logits``) and the recorder
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


def module_map(model: Any, engine: str, modules: bool) -> dict[str, tuple[Any, str]]:
    """name -> (module, how its output is read); ``model`` is the causal-LM wrapper of either engine."""
    inner = model.model
    out: dict[str, tuple[Any, str]] = {"embed": (inner.embed_tokens, "tensor")}
    for i, layer in enumerate(inner.layers):
        if not hasattr(layer, "self_attn"):  # pipeline-parallel placeholder (PPMissingLayer)
            continue
        if modules:
            out[f"layers.{i}.attn"] = (layer.self_attn, "first")
            out[f"layers.{i}.mlp"] = (layer.mlp, "first")
        out[f"layers.{i}"] = (layer, "sum" if engine == "vllm" else "first")
    out["norm"] = (inner.norm, "first")
    out["logits"] = (model.logits_processor, "logits") if engine == "vllm" else (model.lm_head, "logits")
    return out


def _read(output: Any, how: str) -> Any:
    if how == "sum" and isinstance(output, tuple):
        hidden, residual = output[0], output[1]
        return hidden if residual is None else hidden + residual
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


class Recorder:
    """Copies one row of each hooked module's output at the wanted steps, as float32 on the host."""

    def __init__(self, model: Any, engine: str, modules: bool):
        self.engine = engine
        self.names = list(module_map(model, engine, modules))
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
            flat = tensor.reshape(-1, tensor.shape[-1])
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
