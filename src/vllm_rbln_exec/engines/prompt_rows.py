"""A forward hook on vLLM's logits processor that keeps the prompt's full-vocabulary logprob rows; torch only.

Runs in the process that runs the model (reached through ``LLM.apply_model``). When a request asks for
prompt logprobs, vLLM's model runner computes the logits of every prompt position with
``model.compute_logits`` (one call with ``len(prompt) - 1`` rows when the prompt is prefilled in one piece)
and log-softmaxes them in float32; the hook sees those logits, applies the same ``log_softmax(dtype=float32)``
and writes the rows asked for straight into a memory-mapped ``.npy`` file. The request itself asks for
``prompt_logprobs=0`` (the prompt token's own logprob only), which the engine compares with the kept rows:
the two come from the same logits, so any difference means the hook kept the wrong call.

Why not vLLM's own ``prompt_logprobs=-1``: measured on SmolLM2-135M (2 layers, vLLM 0.32 CPU, 256-token
windows, 128 rows kept) it took 11.7 s per window, almost all of it building and carrying 12.6 M
(token, logprob) pairs, against 1.3 s per window here; the rows were identical (max |difference| 0.0).

It must not know about requests, windows or captures beyond the file and the rows it is armed with.
"""

from __future__ import annotations

from typing import Any

ATTR = "_vre_prompt_rows"


class Recorder:
    def __init__(self, model: Any):
        self.handle = model.logits_processor.register_forward_hook(self._hook)
        self.arm(None, 0, 0, 0)

    def arm(self, path: str | None, n_logits: int, first: int, count: int) -> None:
        """Keep rows ``first .. first + count`` of the next logits call with ``n_logits`` rows into ``path``."""
        self.path, self.n_logits, self.first, self.count = path, int(n_logits), int(first), int(count)
        self.calls: list[int] = []
        self.done = False

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        import numpy as np
        import torch

        logits = output[0] if isinstance(output, (tuple, list)) else output
        if logits is None:  # a tensor-parallel rank other than the first: vLLM gathers the logits on rank 0
            return
        self.calls.append(int(logits.shape[0]))
        if self.path is None or self.done or logits.shape[0] != self.n_logits:
            return
        with torch.no_grad():
            rows = logits[self.first:self.first + self.count].log_softmax(dim=-1, dtype=torch.float32)
        target = np.load(self.path, mmap_mode="r+")
        target[:] = rows.cpu().numpy()
        target.flush()
        del target
        self.done = True


def install(model: Any) -> bool:
    if getattr(model, ATTR, None) is None:
        setattr(model, ATTR, Recorder(model))
    return True


def arm(model: Any, path: str, n_logits: int, first: int, count: int) -> bool:
    getattr(model, ATTR).arm(path, n_logits, first, count)
    return True


def report(model: Any) -> dict[str, Any]:
    recorder = getattr(model, ATTR)
    return {"done": recorder.done, "calls": list(recorder.calls)}
