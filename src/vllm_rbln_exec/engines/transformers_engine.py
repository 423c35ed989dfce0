"""Hugging Face transformers (eager attention) as a capture engine; workers only.

The model runs on the side's ``torch_device`` (``cpu``, ``cuda``, ``cuda:1``,
or any device type torch knows) and is driven by hand: the prompt is prefilled
once, then one token per step goes through the decode path with the KV cache
(``DynamicCache``), EOS ignored. At each step the last position's logits are
taken in float32, log-softmaxed, and written straight into the memory-mapped
row file the ``CaptureWriter`` preallocated (full vocabulary, or ``torch.topk``
values and int32 ids). ``force`` feeds the given tokens instead of the argmax
(teacher forcing), and the row is still recorded: the same contract as the vLLM
engine. ``capture: "plain"`` (the benchmark's baseline) skips the rows and
records tokens only; ``fast`` and ``api`` are the same path here.

Nothing is fetched from a model hub: the harness hands a local folder (already
truncated to fewer layers when asked), and the hub is switched off.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..capture.store import CaptureWriter
from ..core.dtypes import DTYPE_ALIASES
from .base import Engine


class TransformersEngine(Engine):
    name = "transformers"

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        # Before transformers / huggingface_hub are imported: they read these once.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.logging.set_verbosity_error()
        side = self.request.side
        model_path = side.checkpoint
        trust = bool(self.request.trust_remote_code)
        self.device = torch.device(side.torch_device or "cpu")
        self.dtype = self._resolve_dtype(side.dtype or "auto", model_path, self.device.type)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust)
        from packaging.version import Version  # a dependency of transformers

        dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        kwargs: dict[str, Any] = {
            dtype_kw: self.dtype,
            "attn_implementation": "eager",
            "local_files_only": True,
            "trust_remote_code": trust,
        }
        if self.device.type == "cuda":  # straight onto the GPU, no full copy in host memory
            kwargs["device_map"] = {"": str(self.device)}
        kwargs.update(side.engine_args)  # --X-args: from_pretrained keywords (checked before the worker started)
        self.kwargs = kwargs
        self.model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        if self.device.type != "cuda":
            self.model.to(self.device)
        self.model.eval()
        params = inspect.signature(self.model.forward).parameters
        # Only the last position's logits are needed: skip the [T, V] prefill logits.
        self.keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    @staticmethod
    def _resolve_dtype(name: str, model_path: str, device_type: str):
        """``auto``: float32 on cpu (the exact reference), else the checkpoint's
        dtype (float32 when the config names none)."""
        import torch

        name = str(name).lower()
        if name == "auto":
            if device_type == "cpu":
                return torch.float32
            try:
                config = json.loads((Path(model_path) / "config.json").read_text())
            except (OSError, ValueError):
                config = {}
            text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
            name = str(
                config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
                or "float32"
            )
        if name not in DTYPE_ALIASES:  # the checkpoint's own spelling ("auto" was validated up front)
            raise ValueError(f"dtype {name!r} is not one of float32, bfloat16, float16 or auto")
        return getattr(torch, DTYPE_ALIASES[name])

    def platform(self) -> str:
        return next(self.model.parameters()).device.type

    def versions(self) -> dict[str, str]:
        import torch
        import transformers

        return {"engine_version": transformers.__version__, "torch_version": torch.__version__}

    def tokenizer_vocab_size(self) -> int:
        return len(self.tokenizer)

    def effective_settings(self) -> dict[str, Any]:
        """What decides the numbers here: the dtype the weights were loaded in, the attention code, matmul precision."""
        return {**super().effective_settings(), "torch_dtype": str(self.dtype).removeprefix("torch."),
                "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                "from_pretrained": {k: v for k, v in self.kwargs.items() if isinstance(v, (str, int, float, bool))}}

    def close(self) -> None:
        model = getattr(self, "model", None)
        if model is None:
            return
        self.model = None
        del model
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- capture --------------------------------------------------------------
    def generate_greedy_logprobs(
        self,
        prompts: list[str],
        writer: CaptureWriter,
        force: list[list[int]] | None = None,
    ) -> None:
        # One prompt at a time, deliberately, although request.batch is known:
        # batching moves the numbers. A left-padded batch (attention mask, position
        # ids from the mask) runs every matmul with other shapes: prefill over the
        # longest prompt, decode as a [B, H] GEMM where one sequence takes the GEMV
        # path, and kernels choose their blocking, hence their float summation
        # order, by shape. The masked positions add exact zeros; the shapes do not.
        # Measured on the tiny model, CPU float32, batch of 4 teacher-forced on the
        # unpadded tokens: max |logprob difference| 2.7e-5..3.2e-5 per prompt, the
        # longest (unpadded) prompt of the batch included, so it is the batching and
        # not the padding (bfloat16 on CPU happened to match exactly). One sequence
        # per forward is the unpadded run by construction, on every device.
        total = len(prompts)
        for i, prompt in enumerate(prompts):
            forced = None if force is None else [int(t) for t in force[i]]
            self._one(i, prompt, writer, forced)
            done = i + 1
            self.emit("generate", f"{done}/{total} prompts", done=done, total=total)

    def _one(self, index: int, prompt: str, writer: CaptureWriter, forced: list[int] | None) -> None:
        import torch

        r = self.request
        topn = None if int(r.logprobs) == -1 else int(r.logprobs)
        plain = r.capture == "plain"  # the benchmark's baseline: tokens only
        if plain and forced is not None:
            raise ValueError("capture 'plain' cannot force tokens (as with vLLM, where it runs no logits processor)")
        max_tokens = int(r.max_tokens)
        # Same tokenization as vLLM: the tokenizer's defaults (add_special_tokens=True).
        prompt_ids = [int(t) for t in self.tokenizer(prompt)["input_ids"]]
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        steps = max_tokens
        max_len = r.max_model_len
        if max_len:
            if len(prompt_ids) >= int(max_len):
                raise ValueError(
                    f"prompt {index} has {len(prompt_ids)} tokens, not fewer than max_model_len {max_len}"
                )
            steps = min(max_tokens, int(max_len) - len(prompt_ids))  # as vLLM: stop at max_model_len
        keep = {self.keep_kw: 1} if self.keep_kw else {}
        tokens: list[int] = []
        rows = ids = None
        t_start = time.perf_counter()
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([prompt_ids], dtype=torch.long, device=self.device), use_cache=True, **keep
            )
            writer.add_time("prefill_s", time.perf_counter() - t_start)
            for t in range(steps):
                logits = out.logits[0, -1].to(torch.float32)
                if not plain:
                    logprobs = torch.log_softmax(logits, dim=-1)
                    if rows is None:
                        width = topn or int(logprobs.shape[-1])
                        lp_path, ids_path = writer.allocate(index, max_tokens, width, with_ids=topn is not None)
                        rows = np.load(lp_path, mmap_mode="r+")
                        ids = np.load(ids_path, mmap_mode="r+") if ids_path is not None else None
                    if topn is None:
                        rows[t] = logprobs.cpu().numpy()
                    else:
                        values, top = torch.topk(logprobs, topn)
                        rows[t] = values.cpu().numpy()
                        ids[t] = top.to(torch.int32).cpu().numpy()
                if forced is not None and t < len(forced):
                    token = forced[t]
                else:
                    token = int(torch.argmax(logits))  # first index among ties, as vLLM's greedy
                tokens.append(token)
                if t + 1 < steps:
                    out = self.model(
                        input_ids=torch.tensor([[token]], dtype=torch.long, device=self.device),
                        past_key_values=out.past_key_values,
                        use_cache=True,
                        **keep,
                    )
        writer.add_time("generate_s", time.perf_counter() - t_start)
        for array in (rows, ids):
            if array is not None:
                array.flush()
        del rows, ids
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        writer.add(index, prompt, prompt_ids, tokens, text)


    # -- corpus windows (prompt logprobs) ----------------------------------------
    def score_windows(self, windows, scored, writer, skip, labels, done) -> dict[str, Any]:
        """One forward pass per window, no cache; the logits of the positions that predict the scored tokens,
        log-softmaxed in float32 (only those positions' logits are computed when the model can skip the rest)."""
        import torch

        todo = [i for i in range(len(windows)) if i not in skip]
        for n, i in enumerate(todo):
            ids = [int(t) for t in windows[i]]
            keep = {self.keep_kw: scored + 1} if self.keep_kw else {}  # the last position predicts past the window
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                                    use_cache=False, **keep).logits[0]
                rows = logits[-scored - 1:-1].log_softmax(dim=-1, dtype=torch.float32).cpu().numpy()
            writer.add_time("prefill_s", time.perf_counter() - t0)
            lp_path, _ = writer.allocate(i, scored, int(rows.shape[1]), with_ids=False)
            target = np.load(lp_path, mmap_mode="r+")
            target[:] = rows
            target.flush()
            del target
            writer.add(i, labels[i], ids[:len(ids) - scored], ids[len(ids) - scored:], "")
            done(i)
            self.emit("corpus", f"{n + 1}/{len(todo)} windows", done=n + 1, total=len(todo))
        return {"prompt_rows": "one forward pass per window (no KV cache), logits log-softmaxed in float32"}

    # -- hidden states (a localisation pass) ------------------------------------
    def capture_hidden(self, prompts: list[str], force: list[list[int]], positions: list[list[int]],
                       modules: bool) -> tuple[list[str], dict[int, dict[str, Any]], dict[str, Any]]:
        """The same stepping as the capture (prefill, then one forced token per decode step with the KV
        cache), with ``engines.hidden_hooks`` copying rows at the positions asked."""
        import torch

        from . import hidden_hooks

        recorder = hidden_hooks.Recorder(self.model, "transformers", modules)
        keep = {self.keep_kw: 1} if self.keep_kw else {}
        rows: dict[int, dict[str, Any]] = {}
        try:
            for i, prompt in enumerate(prompts):
                ids = [int(t) for t in self.tokenizer(prompt)["input_ids"]]
                steps = max(positions[i]) + 1
                recorder.arm(list(positions[i]), [])
                with torch.inference_mode():
                    out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, **keep)
                    for t in range(1, steps):
                        token = torch.tensor([[int(force[i][t - 1])]], device=self.device)
                        out = self.model(input_ids=token, past_key_values=out.past_key_values, use_cache=True,
                                         **keep)
                rows[i] = recorder.arrays()
                self.emit("hidden", f"{i + 1}/{len(prompts)} prompts", done=i + 1, total=len(prompts))
        finally:
            recorder.remove()
        return hidden_hooks.captured(recorder.names, rows), rows, {"attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                                      "steps": "prefill of the prompt, then one decode step per forced token"}
