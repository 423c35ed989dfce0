#!/usr/bin/env python
"""What full-vocabulary capture costs next to plain greedy generation, on vLLM directly (GPU or CPU).

Standalone: vLLM plus the harness's logits processor (``vllm_rbln_exec.engines.vllm_logits``), tiny
seeded Llama models made here (``setup.tiny.make_tiny_model``), the harness's built-in prompts; nothing
is read from the hub. Each engine runs in its own subprocess (vLLM engines do not shut down cleanly
in one process), with the defaults users run (on CUDA: torch.compile and CUDA graphs on, bfloat16):

    plain      no logits processor registered; greedy, no logprobs (the baseline)
    harness    logits_processors=[PROCESSOR]; per batch size: ``idle`` (plain greedy through this
               engine: what the registered processor costs while unused), ``fast`` (each request with a
               "vre" row file) and ``api`` (vLLM's logprobs=-1, flat_logprobs=True, rows made with the
               harness's flat_to_arrays, that conversion timed too)
    sync       as harness, with VLLM_RBLN_EXEC_SYNC_CAPTURE=1 (rows copied and written synchronously):
               ``fast`` only
    harness-w1 as harness, with VLLM_RBLN_EXEC_WRITER_THREADS=1 (the async writer with one writing
               thread, as before the pool): ``fast`` only
    harness-w4 as harness, with four writing threads at every step size (the default uses them only
               for steps of 8 MiB or more): ``fast`` only
    plain-v1   as plain, with VLLM_USE_V2_MODEL_RUNNER=0: vLLM runs its V1 model runner whenever a
               custom logits processor is registered, so plain vs plain-v1 vs idle splits the
               processor's idle cost into the runner switch and the processor itself (``--extra-engines``,
               run after the others while time is left)

Per batch size B: B prompts x T tokens (temperature 0, ignore_eos, detokenize off), one warm-up generate
of the same shape, then the median of ``--reps`` timed ``llm.generate`` calls, each with fresh row files
(``time.perf_counter``; for ``fast`` until generate returns: the processor drains a request's last rows
before its output leaves the engine). ``api`` is costly at full vocabulary (vLLM builds Python lists,
some 100 bytes and 100+ ns per entry): a batch size whose call is predicted (linearly in B from the
largest one measured) to take more than ``--api-max-s`` is skipped, and one predicted over
``--api-full-s`` is timed once with no warm-up of its own.

Checks, once per engine and vocabulary, at the check batch size (8, else the largest): ``fast`` rows'
argmax equal the generated tokens and every row's logsumexp is ~0; ``sync`` rows equal ``harness``
(async) rows for the same prompts; ``api`` rows equal ``fast`` rows at the smallest B; the tokens of
every engine are compared with plain's.

A micro-benchmark (first, in its own process) measures the parts of a capture step apart:
log_softmax of a [B, V] float32 batch on the device, its copy to pinned and to pageable host memory,
and the page-cache write of T steps of such rows into fresh files (the harness's own ``_RowFile``), by one
thread and by four (the writer's default pool).

    # GPU (vLLM 0.24 bundle), from the repository root of the device's copy:
    PYTHONPATH=/tmp/site:$PWD/.gpu/src VLLM_USE_FLASHINFER_SAMPLER=0 python3 .gpu/gpu_capture_bench.py --out $OUT
    # CPU smoke run:
    PYTHONPATH=src python scripts/gpu_capture_bench.py --device cpu --vocabs 49152 --batches 1,8 --tokens 16

Prints one markdown table (``x idle``: fast against plain greedy through the same engine); writes
``results.json`` and ``table.md`` into ``--out``. ``--table-from results.json`` prints an earlier run's table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PROCESSOR = "vllm_rbln_exec.engines.vllm_logits:CaptureLogitsProcessor"
SYNC_ENV = "VLLM_RBLN_EXEC_SYNC_CAPTURE"
ENGINES: dict[str, dict[str, Any]] = {
    "plain": {"processor": False, "env": {}, "paths": ["plain"]},
    "harness": {"processor": True, "env": {}, "paths": ["idle", "fast", "api"]},
    "sync": {"processor": True, "env": {SYNC_ENV: "1"}, "paths": ["fast"]},
    # the async writer with one writing thread (the default spreads a step's rows over up to 4)
    "harness-w1": {"processor": True, "env": {"VLLM_RBLN_EXEC_WRITER_THREADS": "1"}, "paths": ["fast"]},
    "harness-w4": {"processor": True, "paths": ["fast"],
                   "env": {"VLLM_RBLN_EXEC_WRITER_THREADS": "4", "VLLM_RBLN_EXEC_WRITER_POOL_MIN_BYTES": "0"}},
    "plain-v1": {"processor": False, "env": {"VLLM_USE_V2_MODEL_RUNNER": "0"}, "paths": ["plain"]},
}
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "VLLM_PLUGINS": "cpu",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _src_on_path() -> None:
    """Runnable from a checkout (scripts/ beside src/) or from a copy with src/ beside the script."""
    try:
        import vllm_rbln_exec  # noqa: F401
    except ImportError:
        here = Path(__file__).resolve().parent
        for cand in (here / "src", here.parent / "src"):
            if (cand / "vllm_rbln_exec").is_dir():
                sys.path.insert(0, str(cand))
                os.environ["PYTHONPATH"] = os.pathsep.join(
                    [str(cand)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
                return


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# worker: one engine
# ---------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.T = int(cfg["tokens"])
        self.deadline = float(cfg["deadline"])
        self.work = Path(cfg["work"])
        self.rows_dir = self.work / "rows" / f"{cfg['vocab']}-{cfg['engine']}"
        self.check_dir = self.work / "check" / str(cfg["vocab"])
        for d in (self.rows_dir, self.check_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.result_path = Path(cfg["result"])
        self.res: dict[str, Any] = {"engine": cfg["engine"], "vocab": cfg["vocab"], "env": cfg["env"],
                                    "batches": {}, "checks": {}, "skipped": []}
        self.pending: list[Path] = []  # row files of the last generate: removed after the next one returns
        self.n_files = 0

    def save(self) -> None:
        _write_json(self.result_path, self.res)

    def left(self) -> float:
        return self.deadline - time.time()

    # -- engine ------------------------------------------------------------------------------------
    def start(self) -> None:
        from vllm import LLM

        cfg = self.cfg
        kwargs: dict[str, Any] = dict(model=cfg["model"], tokenizer=cfg["model"], dtype=cfg["dtype"],
                                      max_model_len=cfg["max_model_len"], max_num_seqs=cfg["max_num_seqs"],
                                      max_logprobs=-1, seed=0)
        if cfg["device"] == "cuda":
            kwargs["gpu_memory_utilization"] = cfg["gpu_memory_utilization"]
        else:
            kwargs["enforce_eager"] = True
        if ENGINES[cfg["engine"]]["processor"]:
            kwargs["logits_processors"] = [PROCESSOR]
        self.res["engine_args"] = {k: v for k, v in kwargs.items()}
        import torch
        import vllm

        self.res["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__}
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.res["start_s"] = time.perf_counter() - t0
        config = self.llm.llm_engine.vllm_config
        self.V = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.res["vocab_engine"] = self.V
        for key, read in (("use_v2_model_runner", lambda: bool(config.use_v2_model_runner)),
                          ("compilation_mode", lambda: str(getattr(config.compilation_config.mode, "name",
                                                                   config.compilation_config.mode))),
                          ("cudagraph_mode", lambda: str(getattr(config.compilation_config.cudagraph_mode,
                                                                 "name", config.compilation_config.cudagraph_mode))),
                          ("async_scheduling", lambda: bool(config.scheduler_config.async_scheduling)),
                          ("enforce_eager", lambda: bool(config.model_config.enforce_eager)),
                          ("dtype", lambda: str(config.model_config.dtype))):
            try:
                self.res[key] = read()
            except Exception as exc:  # noqa: BLE001 - a record
                self.res[key] = f"unknown ({type(exc).__name__})"
        _log(f"{cfg['engine']} V={self.V}: engine started in {self.res['start_s']:.1f} s "
             f"(model runner {'V2' if self.res.get('use_v2_model_runner') is True else 'V1'}, "
             f"cudagraph {self.res.get('cudagraph_mode')})")
        self.save()

    def params(self, extra: dict | None = None, logprobs: int | None = None):
        from vllm import SamplingParams

        kw: dict[str, Any] = dict(temperature=0.0, max_tokens=self.T, ignore_eos=True, detokenize=False,
                                  extra_args={"vre": extra} if extra else None)
        if logprobs is not None:
            kw.update(logprobs=logprobs, flat_logprobs=True)
        return SamplingParams(**kw)

    def alloc(self, B: int, where: Path, tag: str) -> list[Path]:
        paths = []
        for i in range(B):
            p = where / f"{tag}-{self.n_files}-{i}.npy"
            m = np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=(self.T, self.V))
            m.flush()
            del m
            paths.append(p)
        self.n_files += 1
        return paths

    def generate(self, prompts: list[str], params) -> tuple[float, list]:
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        # The engine closes a finished request's files at its next step: the last call's files are
        # removed only now, after another generate, so no timed step pays for freeing their pages.
        for p in self.pending:
            p.unlink(missing_ok=True)
        self.pending = []
        return dt, outs

    @staticmethod
    def tokens(outs) -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in outs]

    # -- paths ------------------------------------------------------------------------------------
    def run_plain(self, prompts: list[str], keep_tokens: bool) -> dict[str, Any]:
        ps = [self.params() for _ in prompts]
        warm, _ = self.generate(prompts, ps)
        times, toks = [], None
        for _ in range(self.cfg["reps"]):
            dt, outs = self.generate(prompts, ps)
            times.append(dt)
            toks = self.tokens(outs)
        out = {"warmup_s": warm, "times": times, "median": _median(times)}
        if keep_tokens:
            out["tokens"] = toks
        return out

    def run_fast(self, prompts: list[str], keep: bool, meta: str | None) -> dict[str, Any]:
        B = len(prompts)
        times, kept, toks = [], None, None
        warm = None
        for rep in range(self.cfg["reps"] + 1):  # rep 0: the warm-up
            last = rep == self.cfg["reps"]
            where = self.check_dir if (keep and last) else self.rows_dir
            paths = self.alloc(B, where, f"{self.cfg['engine']}-B{B}")
            ps = []
            for i, p in enumerate(paths):
                extra = {"file": str(p), "ids_file": None, "topn": None, "force": None}
                if meta and rep == 0 and i == 0:
                    extra["meta"] = meta
                ps.append(self.params(extra))
            dt, outs = self.generate(prompts, ps)
            if rep == 0:
                warm = dt
            else:
                times.append(dt)
            toks = self.tokens(outs)
            if keep and last:
                kept = paths
            else:
                self.pending = paths
        out = {"warmup_s": warm, "times": times, "median": _median(times),
               "bytes_per_call": B * self.T * self.V * 4}
        if keep:
            out["tokens"] = toks
            out["files"] = [str(p) for p in kept]
        return out

    def run_api(self, prompts: list[str], predicted: float | None) -> dict[str, Any]:
        from vllm_rbln_exec.engines.vllm_engine import flat_to_arrays

        cfg = self.cfg
        full = predicted is None or predicted <= cfg["api_full_s"]
        reps = cfg["reps"] if full else 1
        ps = [self.params(logprobs=-1) for _ in prompts]
        warm = None
        if full:
            warm, outs = self.generate(prompts, ps)
            del outs
        gen, conv, total, rows0, toks = [], [], [], None, None
        for _ in range(reps):
            dt, outs = self.generate(prompts, ps)
            t0 = time.perf_counter()
            rows = [flat_to_arrays(o.outputs[0].logprobs, self.V, None)[0] for o in outs]
            dc = time.perf_counter() - t0
            gen.append(dt)
            conv.append(dc)
            total.append(dt + dc)
            toks = self.tokens(outs)
            rows0 = rows[0]
            del outs, rows
        return {"warmup_s": warm, "generate_times": gen, "convert_times": conv, "times": total,
                "median": _median(total), "generate_median": _median(gen), "convert_median": _median(conv),
                "reps": reps, "predicted_s": predicted, "tokens": toks, "_rows0": rows0}

    # -- checks -----------------------------------------------------------------------------------
    @staticmethod
    def row_check(files: list[str], tokens: list[list[int]]) -> dict[str, Any]:
        argmax_equal = 0
        n = 0
        lse_max = 0.0
        for f, tok in zip(files, tokens):
            rows = np.load(f, mmap_mode="r")[: len(tok)]
            rows = np.asarray(rows, dtype=np.float64)
            am = rows.argmax(axis=1)
            argmax_equal += int((am == np.asarray(tok)).sum())
            n += len(tok)
            m = rows.max(axis=1)
            lse = m + np.log(np.exp(rows - m[:, None]).sum(axis=1))
            lse_max = max(lse_max, float(np.abs(lse).max()))
        return {"positions": n, "argmax_equal": argmax_equal, "argmax_equal_all": argmax_equal == n,
                "max_abs_logsumexp": lse_max, "normalised": lse_max < 1e-4}

    @staticmethod
    def compare_files(a: list[str], b: list[str], T: int) -> float:
        worst = 0.0
        for fa, fb in zip(a, b):
            ra = np.load(fa, mmap_mode="r")[:T]
            rb = np.load(fb, mmap_mode="r")[:T]
            worst = max(worst, float(np.abs(np.asarray(ra) - np.asarray(rb)).max()))
        return worst

    # -- main -------------------------------------------------------------------------------------
    def run(self) -> None:
        from vllm_rbln_exec.setup.prompts import builtin_prompts

        cfg = self.cfg
        paths = ENGINES[cfg["engine"]]["paths"]
        batches = cfg["batches"]
        check_b = 8 if 8 in batches else batches[-1]
        small_b = min(batches)
        self.start()
        meta = str(self.work / f"engine-core-{cfg['vocab']}-{cfg['engine']}.json") \
            if ENGINES[cfg["engine"]]["processor"] else None
        api_per_b: float | None = None  # api seconds per prompt, from the largest B measured
        for B in batches:
            if self.left() < cfg["min_batch_s"]:
                self.res["skipped"].append(f"B={B}: deadline")
                _log(f"{cfg['engine']} V={self.V}: B={B} skipped (deadline)")
                continue
            prompts = builtin_prompts(B)
            entry: dict[str, Any] = self.res["batches"].setdefault(str(B), {})
            for path in paths:
                if path in ("plain", "idle"):
                    entry[path] = self.run_plain(prompts, keep_tokens=B == check_b)
                elif path == "fast":
                    entry["fast"] = self.run_fast(prompts, keep=B in (check_b, small_b), meta=meta)
                    meta = None
                elif path == "api":
                    predicted = None if api_per_b is None else api_per_b * B
                    if predicted is not None and predicted > cfg["api_max_s"]:
                        entry["api"] = {"skipped": f"predicted {predicted:.1f} s > --api-max-s {cfg['api_max_s']}"}
                    elif self.left() < 4 * (predicted or 5.0) + 10:
                        entry["api"] = {"skipped": "deadline"}
                    else:
                        api = self.run_api(prompts, predicted)
                        api_per_b = api["median"] / B
                        rows0 = api.pop("_rows0")
                        if B == small_b and "fast" in entry and rows0 is not None:
                            fast_rows = np.load(entry["fast"]["files"][0], mmap_mode="r")[: len(rows0)]
                            api["max_abs_diff_vs_fast"] = float(np.abs(np.asarray(fast_rows) - rows0).max())
                            api["tokens_equal_fast"] = api["tokens"] == entry["fast"]["tokens"]
                        if B != small_b:
                            api.pop("tokens")
                        entry["api"] = api
                        del rows0
                self.save()
                summary = entry[path].get("median")
                _log(f"{cfg['engine']} V={self.V} B={B} {path}: "
                     + (f"median {summary:.3f} s over {entry[path].get('reps', cfg['reps'])} "
                        f"(warm-up {entry[path].get('warmup_s') or 0:.2f} s)" if summary is not None
                        else str(entry[path].get("skipped"))))
            if "fast" in entry and B == check_b:
                self.check_rows(entry["fast"], B)
        for p in self.pending:
            p.unlink(missing_ok=True)
        if meta is None and ENGINES[cfg["engine"]]["processor"]:
            mp = Path(str(self.work / f"engine-core-{cfg['vocab']}-{cfg['engine']}.json"))
            if mp.is_file():
                self.res["engine_core"] = json.loads(mp.read_text())
        self.save()

    def check_rows(self, fast: dict[str, Any], B: int) -> None:
        t0 = time.perf_counter()
        chk = self.row_check(fast["files"], fast["tokens"])
        _write_json(self.check_dir / f"{self.cfg['engine']}-B{B}.json", {"files": fast["files"], "tokens": fast["tokens"]})
        if self.cfg["engine"] == "sync":
            ref = self.check_dir / f"harness-B{B}.json"
            if ref.is_file():
                other = json.loads(ref.read_text())
                chk["vs_async_tokens_equal"] = other["tokens"] == fast["tokens"]
                chk["vs_async_max_abs_diff"] = self.compare_files(fast["files"], other["files"], self.T)
            else:
                chk["vs_async"] = "no async rows (harness engine did not run)"
        chk["check_s"] = time.perf_counter() - t0
        chk["batch"] = B
        self.res["checks"]["fast_rows"] = chk
        _log(f"{self.cfg['engine']} V={self.V} check B={B}: {json.dumps({k: v for k, v in chk.items()})}")


def worker_main(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    bench = Bench(cfg)
    code = 0
    try:
        bench.run()
    except BaseException as exc:  # noqa: BLE001 - recorded, then this process ends at once
        import traceback

        traceback.print_exc()
        bench.res["error"] = f"{type(exc).__name__}: {exc}"
        code = 1
    bench.save()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # vLLM's engine does not always shut down cleanly; the results are saved


# ---------------------------------------------------------------------------------------------------
# micro-benchmark: the parts of a capture step
# ---------------------------------------------------------------------------------------------------
def _pwrite_steps(work: Path, V: int, B: int, T: int, data, threads: int, key: str, row_file) -> dict[str, float]:
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for i in range(B):
        p = work / f"m-{V}-{B}-{i}.npy"
        np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=(T, V)).flush()
        paths.append(p)
    files = [row_file(str(p)) for p in paths]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    t0 = time.perf_counter()
    for t in range(T):
        if pool is None:
            for j, f in enumerate(files):
                f.write(t, data[j])
        else:
            list(pool.map(lambda jf, t=t: jf[1].write(t, data[jf[0]]), enumerate(files)))
    dt = time.perf_counter() - t0
    if pool is not None:
        pool.shutdown()
    for f in files:
        f.close()
    for p in paths:
        p.unlink()
    return {f"{key}_call_s": dt, f"{key}_GBps": B * V * 4 * T / dt / 1e9, f"{key}_ms_per_step": dt / T * 1e3}


def micro_main(cfg_path: str) -> None:
    import torch

    from vllm_rbln_exec.engines.vllm_logits import _RowFile

    cfg = json.loads(Path(cfg_path).read_text())
    T = int(cfg["tokens"])
    cuda = cfg["device"] == "cuda"
    work = Path(cfg["work"]) / "micro"
    work.mkdir(parents=True, exist_ok=True)
    out: list[dict[str, Any]] = []
    for V in cfg["vocabs"]:
        for B in cfg["batches"]:
            row: dict[str, Any] = {"vocab": V, "batch": B, "bytes_per_step": B * V * 4}
            if cuda:
                x = torch.randn(B, V, device="cuda", dtype=torch.float32)
                n = 50
                for _ in range(3):
                    y = torch.log_softmax(x, dim=-1)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(n):
                    y = torch.log_softmax(x, dim=-1)
                torch.cuda.synchronize()
                row["log_softmax_ms"] = (time.perf_counter() - t0) / n * 1e3
                host = torch.empty(B, V, dtype=torch.float32, pin_memory=True)
                host.copy_(y, non_blocking=True)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(n):
                    host.copy_(y, non_blocking=True)
                torch.cuda.synchronize()
                dt = (time.perf_counter() - t0) / n
                row["d2h_pinned_ms"] = dt * 1e3
                row["d2h_pinned_GBps"] = B * V * 4 / dt / 1e9
                y.cpu()
                t0 = time.perf_counter()
                for _ in range(n // 5):
                    y.cpu()
                dt = (time.perf_counter() - t0) / (n // 5)
                row["d2h_pageable_ms"] = dt * 1e3
                row["d2h_pageable_GBps"] = B * V * 4 / dt / 1e9
                data = host.numpy()
            else:
                data = np.random.default_rng(0).standard_normal((B, V)).astype(np.float32)
            # T steps of B rows into B fresh files through the harness's _RowFile (pwrite), page cache only,
            # by one thread and by the writer's default pool (a step's rows spread over its threads)
            for threads, key in ((1, "pwrite"), (4, "pwrite4")):
                row.update(_pwrite_steps(work, V, B, T, data, threads, key, _RowFile))
            out.append(row)
            _log("micro " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    _write_json(Path(cfg["result"]), out)
    os._exit(0)


# ---------------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------------
def versions() -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "cpus": os.cpu_count()}
    for name in ("vllm", "torch", "triton", "transformers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        out["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                     "--format=csv,noheader"], capture_output=True, text=True,
                                    timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["gpu"] = None
    try:
        out["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    return out


def run_child(mode: str, cfg: dict[str, Any], env_extra: dict[str, str], timeout: float) -> int:
    cfg_path = Path(cfg["result"]).with_suffix(".cfg.json")
    _write_json(cfg_path, cfg)
    env = {**os.environ, **env_extra}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, str(cfg_path)], env=env,
                            start_new_session=True)
    try:
        return proc.wait(timeout=max(5.0, timeout))
    except subprocess.TimeoutExpired:
        _log(f"{mode} {cfg.get('engine', '')} {cfg.get('vocab', '')}: timed out after {timeout:.0f} s, stopping it")
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return -9
    finally:
        try:  # the engine core and other children of this run, if any outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _get(e: dict, engine: str, B: int, path: str) -> dict:
    return e.get(engine, {}).get("batches", {}).get(str(B), {}).get(path, {}) or {}


def table(engines: dict[str, dict[str, dict]], vocabs: list[int], batches: list[int], T: int) -> str:
    lines = ["| vocab | B | plain s | fast (async) s | x plain | x idle | fast (sync) s | x plain "
             "| api s (generate + convert) | x plain | idle-processor plain s | x plain | plain V1 runner s "
             "| fast, 1 writer thread s | x plain | fast, 4 writer threads s | x plain | tok/s plain | tok/s fast |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for V in vocabs:
        e = engines.get(str(V), {})
        for B in batches:
            plain = _get(e, "plain", B, "plain").get("median")
            fast = _get(e, "harness", B, "fast").get("median")
            sync = _get(e, "sync", B, "fast").get("median")
            api = _get(e, "harness", B, "api")
            idle = _get(e, "harness", B, "idle").get("median")
            v1 = _get(e, "plain-v1", B, "plain").get("median")
            w1 = _get(e, "harness-w1", B, "fast").get("median")
            w4 = _get(e, "harness-w4", B, "fast").get("median")
            if api.get("median") is not None:
                api_s = f"{api['median']:.3f} ({api['generate_median']:.2f} + {api['convert_median']:.2f})"
                if api.get("reps", 3) == 1:
                    api_s += ", 1 run"
            else:
                api_s = f"not run ({api['skipped']})" if api.get("skipped") else "-"
            lines.append(
                f"| {V} | {B} | {fmt(plain)} | {fmt(fast)} | {ratio(fast, plain)} | {ratio(fast, idle)} "
                f"| {fmt(sync)} | {ratio(sync, plain)} "
                f"| {api_s} | {ratio(api.get('median'), plain)} | {fmt(idle)} | {ratio(idle, plain)} | {fmt(v1)} "
                f"| {fmt(w1)} | {ratio(w1, plain)} | {fmt(w4)} | {ratio(w4, plain)} | {fmt(B * T / plain if plain else None, 0)} | {fmt(B * T / fast if fast else None, 0)} |")
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> None:
    from vllm_rbln_exec.setup.tiny import make_tiny_model

    t_start = time.time()
    deadline = t_start + args.deadline_s
    vocabs = [int(v) for v in args.vocabs.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    engines = [e for e in args.engines.split(",") if e]
    extra = [e for e in args.extra_engines.split(",") if e]
    for e in engines + extra:
        if e not in ENGINES:
            raise SystemExit(f"unknown engine {e!r}: one of {', '.join(ENGINES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cuda = args.device == "cuda"
    base_env = dict(OFFLINE_ENV)
    base_env["VLLM_LOGGING_LEVEL"] = args.vllm_log_level
    if not cuda:
        base_env.update(CPU_ENV)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    results: dict[str, Any] = {
        "settings": {"device": args.device, "dtype": dtype, "vocabs": vocabs, "batches": batches,
                     "tokens": args.tokens, "reps": args.reps, "max_num_seqs": args.max_num_seqs,
                     "max_model_len": args.max_model_len, "gpu_memory_utilization": args.gpu_memory_utilization,
                     "api_max_s": args.api_max_s, "api_full_s": args.api_full_s, "argv": sys.argv,
                     "env": base_env},
        "versions": versions(), "micro": None, "engines": {}}
    _log(f"versions {json.dumps(results['versions'])}")

    def save() -> None:
        results["elapsed_s"] = time.time() - t_start
        _write_json(out / "results.json", results)

    models = {}
    for V in vocabs:
        t0 = time.perf_counter()
        models[V] = str(make_tiny_model(work / "models" / f"tiny-{V}", vocab_size=V))
        _log(f"tiny model V={V} made in {time.perf_counter() - t0:.1f} s")

    common = dict(device=args.device, tokens=args.tokens, batches=batches, reps=args.reps, work=str(work),
                  dtype=dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  gpu_memory_utilization=args.gpu_memory_utilization, api_max_s=args.api_max_s,
                  api_full_s=args.api_full_s, min_batch_s=args.min_batch_s, deadline=deadline)
    if not args.no_micro:
        t0 = time.perf_counter()
        cfg = {**common, "vocabs": vocabs, "result": str(work / "micro.json")}
        rc = run_child("--micro", cfg, base_env, min(120.0, deadline - time.time()))
        if (work / "micro.json").is_file():
            results["micro"] = json.loads((work / "micro.json").read_text())
        _log(f"micro-benchmark: exit {rc} after {time.perf_counter() - t0:.1f} s")
        save()

    plan = [(V, e) for V in vocabs for e in engines] + [(V, e) for V in vocabs for e in extra]
    for V, name in plan:
        left = deadline - time.time()
        if left < args.min_engine_s:
            _log(f"{name} V={V}: not started ({left:.0f} s left, --min-engine-s {args.min_engine_s})")
            results["engines"].setdefault(str(V), {})[name] = {"skipped": f"deadline ({left:.0f} s left)"}
            save()
            continue
        res_path = work / f"engine-{V}-{name}.json"
        cfg = {**common, "engine": name, "vocab": V, "model": models[V], "result": str(res_path),
               "env": ENGINES[name]["env"]}
        t0 = time.perf_counter()
        _log(f"{name} V={V}: starting ({left:.0f} s left)")
        rc = run_child("--worker", cfg, {**base_env, **ENGINES[name]["env"]}, min(left - 5, args.engine_timeout_s))
        res = json.loads(res_path.read_text()) if res_path.is_file() else {"error": "no result written"}
        res["exit_code"] = rc
        res["wall_s"] = time.perf_counter() - t0
        results["engines"].setdefault(str(V), {})[name] = res
        _log(f"{name} V={V}: exit {rc} after {res['wall_s']:.1f} s" + (f", error {res['error']}" if res.get("error") else ""))
        save()
    for V in vocabs:  # token agreement with plain (same prompts, the check batch)
        e = results["engines"].get(str(V), {})
        check_b = str(8 if 8 in batches else batches[-1])
        ref = e.get("plain", {}).get("batches", {}).get(check_b, {}).get("plain", {}).get("tokens")
        agree = {}
        for name, path in (("harness", "idle"), ("harness", "fast"), ("sync", "fast"), ("plain-v1", "plain")):
            toks = e.get(name, {}).get("batches", {}).get(check_b, {}).get(path, {}).get("tokens")
            if ref is not None and toks is not None:
                agree[f"{name}/{path}"] = sum(a == b for a, b in zip(ref, toks))
        if agree:
            results.setdefault("tokens_equal_plain", {})[str(V)] = {"batch": int(check_b), "of": len(ref), **agree}
    md = table(results["engines"], vocabs, batches, args.tokens)
    results["table"] = md
    save()
    (out / "table.md").write_text(md + "\n")
    print()
    print(f"{args.tokens} tokens per prompt, median of {args.reps} timed generate calls after one warm-up; "
          f"device {args.device}, dtype {dtype}")
    print(md)
    print(f"\ntotal {time.time() - t_start:.0f} s")


def main() -> None:
    _src_on_path()
    if len(sys.argv) == 3 and sys.argv[1] in ("--worker", "--micro"):
        (worker_main if sys.argv[1] == "--worker" else micro_main)(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--vocabs", default="128256,49152", help="comma-separated, run in this order")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="timed calls per measurement (after one warm-up)")
    ap.add_argument("--engines", default="plain,harness,sync")
    ap.add_argument("--extra-engines", default="plain-v1", help="run after all vocabularies' --engines, if time is left")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    ap.add_argument("--api-max-s", type=float, default=25.0, help="skip an api batch predicted to take longer")
    ap.add_argument("--api-full-s", type=float, default=4.0,
                    help="an api batch predicted above this is timed once, without its own warm-up")
    ap.add_argument("--deadline-s", type=float, default=500.0, help="start no engine and no batch after this")
    ap.add_argument("--min-engine-s", type=float, default=80.0, help="time an engine needs to be worth starting")
    ap.add_argument("--engine-timeout-s", type=float, default=240.0, help="stop an engine's process after this")
    ap.add_argument("--min-batch-s", type=float, default=15.0, help="time a batch size needs to be worth starting")
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--vllm-log-level", default="WARNING")
    ap.add_argument("--work", default="/tmp/gpu-capture-bench", help="models, row files (removed first)")
    ap.add_argument("--out", default="gpu-capture-bench-out")
    ap.add_argument("--table-from", metavar="RESULTS_JSON", help="only print the table of an earlier run's results.json")
    args = ap.parse_args()
    if args.table_from:
        r = json.loads(Path(args.table_from).read_text())
        st = r["settings"]
        print(table(r["engines"], st["vocabs"], st["batches"], st["tokens"]))
        return
    parent_main(args)


if __name__ == "__main__":
    main()
