"""The fake plugin's worker: vLLM's CPU worker, with the plugin's "broken" switch.

``VRE_FAKE_PLUGIN_BROKEN=N`` (an integer >= 0) makes the model's next-token
logits wrong from generated position N of every sequence on: the runner-up
token is raised ``MARGIN`` nats above the top one. Before position N the
numbers are the CPU platform's own, so a parity run against the CPU reference
agrees exactly up to N and the target's argmax leaves the reference token at N.

The position of a row is read from the V1 model runner's input batch (tokens so
far minus prompt tokens, the index of the token this row predicts); another
model runner stops the worker with a message rather than perturbing the wrong
rows.
"""

from __future__ import annotations

import os

import torch
from vllm.v1.worker.cpu_worker import CPUWorker

from . import BROKEN_ENV

MARGIN = 2.0  # nats: the runner-up ends this far above the old top token


def broken_from() -> int | None:
    raw = os.environ.get(BROKEN_ENV, "").strip()
    if not raw:
        return None
    value = int(raw)
    if value < 0:
        raise ValueError(f"{BROKEN_ENV}={raw!r}: a generated position (an integer >= 0)")
    return value


class VreFakeWorker(CPUWorker):
    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        start = broken_from()
        if start is None:
            return
        runner = self.model_runner
        batch = getattr(runner, "input_batch", None)
        if batch is None or not hasattr(batch, "num_tokens_no_spec"):
            raise RuntimeError(f"{BROKEN_ENV}: the fake plugin knows only vLLM's V1 model runner, "
                               f"not {type(runner).__name__}")
        model = runner.model
        honest = model.compute_logits

        def compute_logits(hidden_states: torch.Tensor, *a, **kw) -> torch.Tensor:
            logits = honest(hidden_states, *a, **kw)
            rows = logits.shape[0]
            position = batch.num_tokens_no_spec[:rows] - batch.num_prompt_tokens[:rows]
            for row in (position >= start).nonzero()[0].tolist():
                top = torch.topk(logits[row], 2)
                logits[row, top.indices[1]] = top.values[0] + MARGIN
            return logits

        model.compute_logits = compute_logits
