"""A vLLM V1 logits processor that records raw logprob rows and can force tokens.

Runs inside vLLM's engine-core process. A request opts in through
``SamplingParams.extra_args["vre"]``::

    {"file": path of a float32 .npy [max_tokens, V] (or top-N values),
     "ids_file": path of an int32 .npy [max_tokens, N] (top-N mode only),
     "topn": N or None,
     "force": [token ids] or None}

At each step the row for generated position ``t = len(output_tokens)`` is
log-softmaxed (fp32, as vLLM's own raw logprobs) and written straight into the
memory-mapped file: no per-token Python objects and no detokenising, so the
capture costs little more than the sampling it rides on. With ``force`` the
logits are then masked so greedy sampling picks ``force[t]``: the target is fed
the reference's tokens through its normal decode path.

Chunked prefill may call ``apply`` for a request before its prompt is done; the
row for position 0 is then written again by the final chunk, which wins.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.interface import MoveDirectionality

EXTRA_KEY = "vre"


def _is_writer_rank() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # not initialised (single process): we are the writer
        return True


class _Slot:
    __slots__ = ("spec", "output", "rows", "ids", "force")

    def __init__(self, spec: dict[str, Any], output: list[int]):
        self.spec = spec
        self.output = output
        self.rows = np.load(spec["file"], mmap_mode="r+") if spec.get("file") else None
        self.ids = np.load(spec["ids_file"], mmap_mode="r+") if spec.get("ids_file") else None
        self.force = spec.get("force")


class CaptureLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.slots: dict[int, _Slot] = {}
        self.writer = _is_writer_rank()

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if extra is not None and not (extra.get("file") or extra.get("force") is not None):
            raise ValueError(f"extra_args[{EXTRA_KEY!r}] needs a 'file' or 'force'")

    def is_argmax_invariant(self) -> bool:
        return False  # it may force tokens, and must see greedy requests too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.slots.pop(index, None)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            spec = (params.extra_args or {}).get(EXTRA_KEY) if params is not None else None
            if spec is None:
                self.slots.pop(index, None)
            else:
                self.slots[index] = _Slot(spec, output_ids)
        for a, b, direction in batch_update.moved:
            slot_a = self.slots.pop(a, None)
            slot_b = self.slots.pop(b, None)
            if slot_a is not None:
                self.slots[b] = slot_a
            if slot_b is not None and direction == MoveDirectionality.SWAP:
                self.slots[a] = slot_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.slots:
            return logits
        rows = sorted(i for i in self.slots if i < logits.shape[0])
        if not rows:
            return logits
        index = torch.tensor(rows, device=logits.device)
        logprobs = torch.log_softmax(logits.index_select(0, index).to(torch.float32), dim=-1)
        topn_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        dense = None
        for j, row in enumerate(rows):
            slot = self.slots[row]
            t = len(slot.output)
            if slot.rows is not None and t < slot.rows.shape[0] and self.writer:
                n = slot.spec.get("topn")
                if n:
                    if n not in topn_cache:
                        vals, ids = torch.topk(logprobs, n, dim=-1)
                        topn_cache[n] = (vals.cpu().numpy(), ids.to(torch.int32).cpu().numpy())
                    slot.rows[t] = topn_cache[n][0][j]
                    slot.ids[t] = topn_cache[n][1][j]
                else:
                    if dense is None:
                        dense = logprobs.cpu().numpy()
                    slot.rows[t] = dense[j]
            if slot.force is not None and t < len(slot.force):
                token = int(slot.force[t])
                logits[row].fill_(float("-inf"))
                logits[row, token] = 0.0
        return logits
