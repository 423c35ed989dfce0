"""The worker's own main: read the request, do one task, write the result, exit.

Tasks:
  capture       build an engine, check its platform, capture, write the capture folder
  convert_gguf  turn a GGUF file into a model folder (needs transformers + gguf)

Runs with the device's environment already in place (the parent built it). The
result is ``result.json``: ``{"ok": true, ..., "peak_rss_mib": ...}`` or ``{"ok": false, "error": ...}``.
``capture: "plain"`` (benchmark only, not a CLI choice) generates without logprobs and
writes a tokens-only capture.
Progress lines go to ``events.jsonl``. Exit codes: 0 done, 1 failed, 4 wrong platform.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..capture.store import FULL, TOKENS, TOPN, CaptureWriter, SideInfo
from ..core.jsonio import write_json_atomic
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


def task_capture(request: dict[str, Any], emit: Events) -> dict[str, Any]:
    from ..engines import ENGINES

    folder = Path(request["folder"])
    capture_dir = folder / "capture"
    engine_cls = ENGINES.load(request["engine"])
    engine = engine_cls(request, emit)
    info = SideInfo(
        side=request["side"],
        device=request["device"],
        engine=request["engine"],
        dtype=str(request.get("dtype") or "auto"),
        model=request["model_name"],
        model_fingerprint=request.get("model_fingerprint", ""),
        tokenizer_fingerprint=request.get("tokenizer_fingerprint", ""),
        hostname=socket.gethostname(),
        env=request.get("env_record", {}),
    )
    try:
        emit("engine_start", f"starting {request['engine']} on {request['device']}")
        t0 = time.perf_counter()
        engine.start()
        info.timings["engine_start_s"] = time.perf_counter() - t0
        platform = engine.platform()
        info.platform = platform
        info.__dict__.update(engine.versions())
        expected = request.get("expected_platform")
        if expected and platform != expected:
            raise TaskError(
                f"asked for device {request['device']!r} (platform {expected!r}) but "
                f"{request['engine']} ran on platform {platform!r}; is the device's plugin "
                f"installed and visible in this environment?",
                code=EXIT_PLATFORM,
                kind="platform_mismatch",
            )
        emit("engine_ready", f"{request['engine']} ready on {platform} "
             f"in {info.timings['engine_start_s']:.1f} s", platform=platform)
        settings = dict(request.get("settings", {}))
        settings["tokenizer_vocab_size"] = engine.tokenizer_vocab_size()
        if request.get("capture") == "plain":  # benchmark baseline: tokens only
            mode = TOKENS
        else:
            mode = FULL if request["logprobs"] == -1 else TOPN
        writer = CaptureWriter(capture_dir, info, settings, mode)
        prompts = request["prompts"]
        emit("generate", f"0/{len(prompts)} prompts", done=0, total=len(prompts))
        profile = request.get("profile") or None
        if profile:
            emit("profile", f"profiling the generation into {profile['dir']}")
            engine.start_profile()
            info.timings["profiled"] = 1.0  # these timings include the profiler's overhead
        t0 = time.perf_counter()
        try:
            engine.generate_greedy_logprobs(prompts, writer, request.get("force"))
        finally:
            # the clock stops before the trace is written out: that is not generation
            info.timings["capture_total_s"] = time.perf_counter() - t0
            if profile:
                t1 = time.perf_counter()
                engine.stop_profile()
                info.timings["profile_write_s"] = time.perf_counter() - t1
        info.timings["generated_tokens"] = float(sum(len(r.token_ids) for r in writer.records.values()))
        capture = writer.finish(store=request.get("store", "fp32"))
        result = {"capture": str(capture_dir), "platform": platform, "vocab_size": capture.vocab_size}
        if profile:
            from ..profiling.session import write_profile_meta

            result["profile"] = write_profile_meta(profile, {
                "side": info.side, "device": info.device, "engine": info.engine, "platform": platform,
                "engine_version": info.engine_version, "dtype": info.dtype, "model": info.model,
                "prompts": len(prompts), "max_tokens": request.get("max_tokens"), "batch": request.get("batch"),
                "timings": dict(info.timings), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })
        return result
    finally:
        try:
            engine.close()
        except Exception:  # closing must not hide the real outcome
            traceback.print_exc()


def task_convert_gguf(request: dict[str, Any], emit: Events) -> dict[str, Any]:
    from ..setup.models import folder_lock, is_model_folder

    gguf = Path(request["gguf_file"])
    dest = Path(request["dest"])
    with folder_lock(dest):
        if is_model_folder(dest):
            return {"path": str(dest), "converted": False}
        emit("convert", f"converting {gguf.name} into {dest} (once)")
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.logging.set_verbosity_error()
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
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
        os.replace(tmp, dest)
        emit("convert", f"converted into {dest}")
    return {"path": str(dest), "converted": True}


def peak_rss() -> dict[str, float]:
    """Peak resident memory in MiB: this process, and the largest child it waited for
    (an engine core process, when vLLM runs one; a child still running is not counted)."""
    import resource

    def mib(who: int) -> float:
        return round(resource.getrusage(who).ru_maxrss / 1024.0, 1)  # Linux reports KiB

    return {"peak_rss_mib": mib(resource.RUSAGE_SELF), "peak_rss_children_mib": mib(resource.RUSAGE_CHILDREN)}


TASKS = {"capture": task_capture, "convert_gguf": task_convert_gguf}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m vllm_rbln_exec.worker REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    folder = Path(request["folder"])
    emit = Events(folder)
    try:
        result = TASKS[request["task"]](request, emit)
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
