"""vLLM's offline engine (``vllm.LLM``) as a capture engine; imported in workers only.

Two capture paths:

* ``fast`` (default): a V1 logits processor (``vllm_logits``) writes each raw
  logprob row straight into a memory-mapped ``.npy`` while vLLM generates
  with no logprobs requested, so the cost is close to plain generation.
* ``api``: vLLM's own ``logprobs`` output (``flat_logprobs``, no detokenising),
  turned into dense rows with numpy. Slow at full vocabulary; kept for
  comparison and for platforms whose model runner skips custom processors.

Both force the reference tokens, when asked, through the same logits processor.

``plain`` is the benchmark's baseline, not a CLI choice: greedy generation with
no logprobs and no logits processor registered at all, tokens recorded only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..capture.store import CaptureWriter
from .base import Engine

PROCESSOR = "vllm_rbln_exec.engines.vllm_logits:CaptureLogitsProcessor"
SPEC_CAPTURE_NOTE = ("api: vLLM's own logprobs of the accepted tokens, no teacher forcing (vLLM refuses custom "
                     "logits processors with speculative decoding)")


class VllmEngine(Engine):
    name = "vllm"

    def start(self) -> None:
        from vllm import LLM

        self.speculative = bool(self.request.side.effective_engine_args().get("speculative_config"))
        self.kwargs = self.engine_kwargs(LLM)
        self.llm = LLM(**self.kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())

    def engine_kwargs(self, llm_cls) -> dict[str, Any]:
        """``vllm.LLM`` keywords: what the harness sets, then the profile's defaults, then the side's own args."""
        r = self.request
        side = r.side
        full = r.logprobs == -1
        kwargs: dict[str, Any] = dict(
            model=side.checkpoint,
            tokenizer=side.checkpoint,
            dtype=side.dtype or "auto",
            max_model_len=r.max_model_len,
            trust_remote_code=bool(r.trust_remote_code),
            tensor_parallel_size=side.parallel.tp,
            pipeline_parallel_size=side.parallel.pp,
            max_num_seqs=r.batch,
            max_logprobs=r.max_logprobs_cap or (-1 if full else r.logprobs),
            # plain: vLLM exactly as it runs without this harness; speculative decoding: vLLM refuses custom
            # logits processors with it, so that side captures through vLLM's own logprobs (_capture_mode)
            logits_processors=[] if r.capture == "plain" or getattr(self, "speculative", False) else [PROCESSOR],
            seed=r.seed,
        )
        if side.parallel.dp > 1:
            kwargs["data_parallel_size"] = side.parallel.dp
        if side.parallel.ep:
            kwargs["enable_expert_parallel"] = True
        if r.max_batched:
            kwargs["max_num_batched_tokens"] = r.max_batched
        if side.block_size:
            kwargs["block_size"] = side.block_size
        if r.profile:
            from ..profiling.session import vllm_profiler_kwargs

            kwargs.update(vllm_profiler_kwargs(r.profile, llm_cls))
        kwargs.update(side.effective_engine_args())
        if getattr(self, "speculative", False):
            kwargs["disable_log_stats"] = False  # the acceptance counters (spec_decode_stats) need the stats
        if self.corpus_pass:
            # one window per step, prefilled whole (no chunk split, no prefix-cache hit from an earlier window),
            # so the prompt logits of a window arrive as one call the hook can tell apart (engines.prompt_rows)
            kwargs.update(enable_prefix_caching=False, max_num_seqs=1)
            kwargs["max_num_batched_tokens"] = max(int(kwargs.get("max_num_batched_tokens") or 0), r.max_model_len)
        if self.hidden_pass:
            # hooks must see every forward: no torch.compile, no CUDA graphs; one sequence per step, and each
            # prompt prefilled whole (no prefix-cache hit from the previous prompt, no chunk split)
            kwargs.update(enforce_eager=True, enable_prefix_caching=False, max_num_seqs=1)
            kwargs["max_num_batched_tokens"] = max(int(kwargs.get("max_num_batched_tokens") or 0), r.max_model_len)
            import dataclasses

            from vllm.engine.arg_utils import EngineArgs

            if "async_scheduling" in {f.name for f in dataclasses.fields(EngineArgs)}:
                kwargs["async_scheduling"] = False  # one forward per step, in order
        return kwargs

    def effective_settings(self) -> dict[str, Any]:
        """What decides the numbers: vLLM's resolved attention backend, compilation and CUDA graphs, KV-cache dtype.

        Read after the capture: the attention backend, the CUDA graph mode the model runner settled on and
        the float32 matmul precision are known only in the engine core (another process on CUDA), which
        the logits processor asked it to record (``engine_core``); those override what this process sees."""
        out = {**super().effective_settings(),
               "engine_args": {k: v for k, v in self.kwargs.items()
                               if k not in ("logits_processors", "profiler_config") and _plain(v)},
               "platform": self.platform_record()}
        config = getattr(self.llm.llm_engine, "vllm_config", None)
        if config is None:
            return out
        model_config = getattr(config, "model_config", None)
        cache_config = getattr(config, "cache_config", None)
        compilation = getattr(config, "compilation_config", None)
        out.update({
            "model_dtype": str(getattr(model_config, "dtype", "")).removeprefix("torch.") or None,
            "enforce_eager": getattr(model_config, "enforce_eager", None),
            "kv_cache_dtype": getattr(cache_config, "cache_dtype", None),
            "compilation_mode": _name(getattr(compilation, "mode", getattr(compilation, "level", None))),
            "cudagraph_mode": _name(getattr(compilation, "cudagraph_mode", None)),
            "attention_backend": _attention_backend(config),
        })
        if getattr(self, "speculative", False):
            out["capture_path"] = SPEC_CAPTURE_NOTE
            out["spec_decode"] = self.spec_decode_stats()
        core = self._engine_core_settings()
        out["engine_core"] = core or "not recorded (no logits processor ran)"
        if core:
            backends = core.get("attention_backends")
            if isinstance(backends, list) and backends:
                out["attention_backend"] = ", ".join(backends)
            for key in ("cudagraph_mode", "float32_matmul_precision", "cuda_matmul_fp32_precision",
                        "cuda_matmul_allow_tf32", "cudnn_allow_tf32", "triton_fp32_dot"):
                if key in core:
                    out[key] = core[key]
        return out

    def spec_decode_stats(self) -> dict[str, Any]:
        """Drafts, draft tokens and accepted tokens over the whole capture (vLLM's counters), and their rate."""
        try:
            metrics = self.llm.get_metrics()
        except Exception as exc:  # stats off or not kept by this vLLM
            return {"error": f"{type(exc).__name__}: {exc}"}
        names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}
        out: dict[str, Any] = {v: 0 for v in names.values()}
        for metric in metrics:
            if metric.name in names and isinstance(getattr(metric, "value", None), (int, float)):
                out[names[metric.name]] += int(metric.value)
        out["acceptance_rate"] = (out["accepted_tokens"] / out["draft_tokens"]) if out["draft_tokens"] else None
        return out

    def _engine_core_settings(self) -> dict[str, Any] | None:
        path = getattr(self, "_meta_path", None)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)

    def platform(self) -> str:
        """vLLM's own platforms by device type; a plugin's by its entry point (``setup.devices.platform_identity``)."""
        return self.platform_record()["name"]

    def platform_before_start(self) -> str | None:
        """vLLM resolves its platform (loading the platform plugins) on first use, without a model."""
        return self.platform()

    def platform_note(self) -> str:
        record = self.platform_record()
        plugin = record["plugin"]
        source = (f", from the plugin entry point {plugin['entry_point']!r} of {plugin['distribution']} "
                  f"{plugin['version']}" if plugin else "")
        return f" ({record['class']}{source})"

    def platform_record(self) -> dict[str, Any]:
        """Which platform vLLM activated: the name checked against the profile, its class, device name and
        type, and the plugin (entry point, distribution, version) it came from."""
        from vllm.platforms import current_platform

        from ..setup.devices import platform_identity

        cls = type(current_platform)
        name, plugin = platform_identity(cls.__module__, str(current_platform.device_type))
        return {"name": name, "class": f"{cls.__module__}.{cls.__qualname__}",
                "device_name": str(current_platform.device_name), "device_type": str(current_platform.device_type),
                "plugin": plugin}

    def versions(self) -> dict[str, str]:
        import torch
        import vllm

        return {"engine_version": vllm.__version__, "torch_version": torch.__version__}

    def tokenizer_vocab_size(self) -> int:
        return len(self.tokenizer)

    def start_profile(self) -> None:
        from ..profiling.session import vllm_start_profile

        vllm_start_profile(self.llm, self.request.profile)

    def stop_profile(self) -> None:
        self.llm.stop_profile()

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
            self.llm = None

    # -- hidden states (a localisation pass) ------------------------------------
    def capture_hidden(self, prompts: list[str], force: list[list[int]], positions: list[list[int]],
                       modules: bool) -> tuple[list[str], dict[int, dict[str, Any]], dict[str, Any]]:
        """Hooks installed in the process that runs the model (the engine core, through ``apply_model``),
        one prompt at a time: generate with the forced tokens up to the last position asked, copy the
        rows at the steps asked, dump them to a file this process reads back."""
        from functools import partial

        from vllm import TokensPrompt

        from . import hidden_hooks

        names = self.llm.apply_model(partial(hidden_hooks.install, engine="vllm", modules=modules))[0]
        scratch = Path(tempfile.mkdtemp(prefix="vre-hidden-"))
        rows: dict[int, dict[str, Any]] = {}
        try:
            for i, prompt in enumerate(prompts):
                ids = [int(t) for t in self.tokenizer(prompt)["input_ids"]]
                steps = max(positions[i]) + 1
                self.llm.apply_model(partial(hidden_hooks.arm, wanted=list(positions[i]),
                                             counts=[len(ids)] + [1] * steps))
                params = self._sampling_params({"force": [int(t) for t in force[i]]}, None)
                params.max_tokens = steps
                self.llm.generate([TokensPrompt(prompt_token_ids=ids)], [params], use_tqdm=False)
                path = scratch / f"p{i}.npz"
                self.llm.apply_model(partial(hidden_hooks.dump, path=str(path)))
                with np.load(path, allow_pickle=False) as data:
                    rows[i] = {name: np.asarray(data[name]) for name in names if name in data.files}
                self.emit("hidden", f"{i + 1}/{len(prompts)} prompts", done=i + 1, total=len(prompts))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        config = self.llm.llm_engine.vllm_config
        how = {"enforce_eager": bool(config.model_config.enforce_eager),
               "compilation_mode": _name(config.compilation_config.mode),
               "cudagraph_mode": _name(config.compilation_config.cudagraph_mode),
               "steps": "prefill of the prompt, then one decode step per forced token (as in the run)"}
        return hidden_hooks.captured(names, rows), rows, how

    # -- corpus windows (prompt logprobs) ------------------------------------------
    def score_windows(self, windows, scored, writer, skip, labels, done) -> dict[str, Any]:
        """One ``generate`` per window with ``prompt_logprobs=0`` and one token to sample; the hook of
        ``engines.prompt_rows`` keeps the full rows of the prompt's logits, checked against vLLM's own logprob
        of each scored token."""
        from functools import partial

        from vllm import SamplingParams, TokensPrompt

        from . import prompt_rows

        self.llm.apply_model(prompt_rows.install)
        self._meta_path = Path(tempfile.mkdtemp(prefix="vre-core-")) / "engine_core.json"  # effective_settings
        worst = 0.0
        todo = [i for i in range(len(windows)) if i not in skip]
        for n, i in enumerate(todo):
            ids = [int(t) for t in windows[i]]
            lp_path, _ = writer.allocate(i, scored, self.vocab_size, with_ids=False)
            first = len(ids) - 1 - scored  # logits row j predicts token j + 1
            self.llm.apply_model(partial(prompt_rows.arm, path=str(lp_path), n_logits=len(ids) - 1, first=first,
                                         count=scored))
            params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False, prompt_logprobs=0,
                                    extra_args={"vre": {"meta": str(self._meta_path)}} if n == 0 else None)
            t0 = time.perf_counter()
            out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], [params], use_tqdm=False)[0]
            writer.add_time("prefill_s", time.perf_counter() - t0)
            seen = self.llm.apply_model(prompt_rows.report)[0]
            if not seen["done"]:
                raise RuntimeError(f"window {i}: no logits call of {len(ids) - 1} rows was seen (calls: "
                                   f"{seen['calls']}); was its prefill split?")
            worst = max(worst, _check_rows(lp_path, out.prompt_logprobs, ids, scored, i))
            writer.add(i, labels[i], ids[:len(ids) - scored], ids[len(ids) - scored:], "")
            done(i)
            self.emit("corpus", f"{n + 1}/{len(todo)} windows", done=n + 1, total=len(todo))
        return {"prompt_rows": "a forward hook on vLLM's logits processor during prompt_logprobs=0 "
                               "(engines.prompt_rows)",
                "max_abs_diff_vs_vllm_prompt_logprobs": worst}

    # -- capture --------------------------------------------------------------
    def _sampling_params(self, extra: dict[str, Any] | None, api_logprobs: int | None):
        from vllm import SamplingParams

        kwargs: dict[str, Any] = dict(
            temperature=0.0,
            max_tokens=self.request.max_tokens,
            ignore_eos=True,
            detokenize=False,
            extra_args={"vre": extra} if extra else None,
        )
        if api_logprobs is not None:
            kwargs.update(logprobs=api_logprobs, flat_logprobs=True)
        return SamplingParams(**kwargs)

    def generate_greedy_logprobs(
        self,
        prompts: list[str],
        writer: CaptureWriter,
        force: list[list[int]] | None = None,
    ) -> None:
        r = self.request
        topn = None if r.logprobs == -1 else int(r.logprobs)
        mode = "api" if self.speculative and r.capture != "plain" else r.capture
        fast = mode == "fast"
        plain = mode == "plain"
        if (plain or self.speculative) and force is not None:
            raise ValueError("this side registers no logits processor (capture 'plain', or speculative decoding, "
                             "with which vLLM refuses custom logits processors), so it cannot force tokens")
        batch = max(1, int(r.batch))
        max_tokens = int(r.max_tokens)
        done = 0
        recorded = not plain and not self.speculative  # a logits processor runs that can record the settings
        if recorded:  # the first request asks the engine core to record its settings (effective_settings)
            self._meta_path = Path(tempfile.mkdtemp(prefix="vre-core-")) / "engine_core.json"
        for start in range(0, len(prompts), batch):
            group = list(range(start, min(start + batch, len(prompts))))
            params = []
            for i in group:
                extra: dict[str, Any] = {}
                if fast:
                    width = topn or self.vocab_size
                    lp_path, ids_path = writer.allocate(i, max_tokens, width, with_ids=topn is not None)
                    extra.update(file=str(lp_path), ids_file=str(ids_path) if ids_path else None, topn=topn)
                if force is not None:
                    extra["force"] = [int(t) for t in force[i]]
                if i == 0 and recorded:
                    extra["meta"] = str(self._meta_path)
                params.append(self._sampling_params(extra or None, None if fast or plain else r.logprobs))
            t0 = time.perf_counter()
            outputs = self.llm.generate([prompts[i] for i in group], params, use_tqdm=False)
            writer.add_time("generate_s", time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i, out in zip(group, outputs):
                completion = out.outputs[0]
                tokens = list(completion.token_ids)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if fast or plain:
                    writer.add(i, prompts[i], list(out.prompt_token_ids), tokens, text)
                else:
                    rows, ids = flat_to_arrays(completion.logprobs, self.vocab_size, topn)
                    writer.add(i, prompts[i], list(out.prompt_token_ids), tokens, text, rows, ids)
            writer.add_time("collect_s", time.perf_counter() - t0)
            done += len(group)
            self.emit("generate", f"{done}/{len(prompts)} prompts", done=done, total=len(prompts))


def _check_rows(path: Path, prompt_logprobs, ids: list[int], scored: int, index: int) -> float:
    """The largest |row value - vLLM's prompt logprob| of the scored tokens; RuntimeError past 1e-5 nats
    (both are float32 log-softmaxes of the same logits: anything but ~0 means the hook kept another call)."""
    rows = np.load(path, mmap_mode="r")
    start = len(ids) - scored
    ours = np.asarray([rows[j - start, ids[j]] for j in range(start, len(ids))], dtype=np.float64)
    theirs = np.asarray([prompt_logprobs[j][ids[j]].logprob for j in range(start, len(ids))], dtype=np.float64)
    worst = float(np.max(np.abs(ours - theirs))) if scored else 0.0
    if not worst <= 1e-5:
        raise RuntimeError(f"window {index}: the kept rows differ from vLLM's prompt logprobs by {worst:.3g} nats")
    return worst


def _name(value: Any) -> str:
    """An enum member by its name (``CompilationMode.VLLM_COMPILE``, not ``3``), anything else as text."""
    return str(getattr(value, "name", value))


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


def _attention_backend(config) -> str | None:
    """The attention backend asked for in the config (None: left to vLLM, which picks it in the engine core).

    What vLLM picked is known only after the model is built, in the engine core's attention layers
    (``compilation_config.static_forward_context[...].attn_backend``): ``vllm_logits.engine_core_settings``
    reads it there, and ``effective_settings`` puts it in place of this."""
    for holder, attr in ((getattr(config, "attention_config", None), "backend"),
                         (getattr(config, "model_config", None), "attention_backend")):
        value = getattr(holder, attr, None) if holder is not None else None
        if value is not None:
            return str(getattr(value, "name", value))
    import os

    return os.environ.get("VLLM_ATTENTION_BACKEND")


def flat_to_arrays(flat, vocab_size: int, topn: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """vLLM ``FlatLogprobs`` to dense rows [T, V] (full) or (values, ids) [T, N] (top-N).

    Each position holds the sampled token first, then the requested entries in
    rank order; the sampled token's own entry is skipped.
    """
    starts = np.asarray(flat.start_indices, dtype=np.int64)
    ends = np.asarray(flat.end_indices, dtype=np.int64)
    token_ids = np.asarray(flat.token_ids, dtype=np.int64)
    values = np.asarray(flat.logprobs, dtype=np.float32)
    n_pos = len(starts)
    width = vocab_size if topn is None else topn
    counts = ends - starts - 1
    if n_pos and (counts != width).any():
        raise RuntimeError(f"vLLM returned {counts.min()}..{counts.max()} logprobs per position, expected {width}")
    take = (starts[:, None] + 1 + np.arange(width)[None, :]).reshape(-1)
    ids = token_ids[take].reshape(n_pos, width)
    vals = values[take].reshape(n_pos, width)
    if topn is not None:
        return vals, ids.astype(np.int32)
    rows = np.full((n_pos, vocab_size), -np.inf, dtype=np.float32)
    np.put_along_axis(rows, ids, vals, axis=1)
    return rows, None
