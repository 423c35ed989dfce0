#!/usr/bin/env python
"""Why is vLLM CUDA "float32" 10^4 further from the CPU than transformers CUDA float32?

A self-contained probe (issue 12), no reference file needed. On one GPU it

1. makes the project's tiny model (``tiny-llama3``, seeded) and tokenises a few
   built-in prompts;
2. decodes them greedily with transformers in **float64** (the ground truth, and
   the token sequences every other side is teacher-forced along);
3. captures full-vocabulary logprob rows at every generated position with
   transformers float32 (eager attention, step by step with the KV cache, as the
   project's transformers engine), and with a few transformers variants that
   switch TF32 on in one place (all cuBLAS matmuls; or only attention's two
   products, emulated by rounding their fp32 inputs to TF32's 10-bit mantissa);
4. runs vLLM float32 in one subprocess per variant (a few at a time), each
   toggling one suspect: Triton's ``tl.dot`` input precision
   (``TRITON_F32_DEFAULT``), torch.compile + CUDA graphs (``enforce_eager``), the
   attention backend (``TRITON_ATTN`` vs ``FLEX_ATTENTION``), cuBLAS TF32
   (``VLLM_FLOAT32_MATMUL_PRECISION``), vLLM's own CUDA custom ops. vLLM's rows
   come from the project's capture logits processor, teacher-forced along the
   float64 tokens, so every side scores the same token sequences;
5. prints one table: per variant KL(ref||variant) mean / max and max |Δlogprob|
   against transformers fp32 and against the fp64 ground truth (rows
   renormalised exactly, in float64), KL at the prefill position (t=0) and at
   decode positions apart, and top-1 agreement; writes it all as JSON.

    PYTHONPATH=/tmp/site:$PWD/src python scripts/gpu_fp32_probe.py --out $OUT
    python scripts/gpu_fp32_probe.py --device cpu --variants vllm-eager --max-tokens 4   # debug on a CPU

Each vLLM variant gets its own VLLM_CACHE_ROOT, TRITON_CACHE_DIR and
TORCHINDUCTOR_CACHE_DIR, so no compiled kernel is shared between variants.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if (REPO / "src").is_dir() and str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

# the harness's own built-in prompts (the first eight; repeated as needed)
N_BUILTIN = 8

IEEE = {"TRITON_F32_DEFAULT": "ieee"}
# name -> (environment, engine kwargs, what it toggles); run in this order (most telling first)
VLLM_VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any], str]] = {
    "vllm-default": ({}, {}, "as shipped: torch.compile + CUDA graphs, attention backend chosen by vLLM"),
    "vllm-default+ieee": (IEEE, {}, "as shipped, Triton tl.dot fp32 inputs in IEEE fp32 instead of TF32"),
    "vllm-flex": ({}, {"attention_config": {"backend": "FLEX_ATTENTION"}},
                  "FLEX_ATTENTION backend (inductor template, precision from torch's matmul setting)"),
    "vllm-eager": ({}, {"enforce_eager": True}, "no torch.compile, no CUDA graphs (vLLM CUDA custom ops)"),
    "vllm-eager+ieee": (IEEE, {"enforce_eager": True}, "eager and Triton tl.dot in IEEE fp32"),
    "vllm-eager+ieee+cublas-tf32": ({**IEEE, "VLLM_FLOAT32_MATMUL_PRECISION": "high"}, {"enforce_eager": True},
                                    "eager, Triton IEEE, but cuBLAS matmuls in TF32 (torch 'high')"),
    "vllm-default+ieee+custom-ops": (IEEE, {"compilation_config": {"custom_ops": ["all"]}},
                                     "compiled, Triton IEEE, vLLM CUDA kernels for RMSNorm/rotary/SiLU-and-mul"),
    "vllm-eager+tf32x3": ({"TRITON_F32_DEFAULT": "tf32x3"}, {"enforce_eager": True},
                          "eager, Triton tl.dot in 3xTF32 (split-precision emulation of fp32)"),
}
HF_VARIANTS = {
    "hf32": "transformers fp32, eager attention, cuBLAS highest precision",
    "hf32-attn-tf32-rz": "transformers fp32, attention's QK^T and PV inputs truncated to TF32 (emulation)",
    "hf32-attn-tf32-rn": "transformers fp32, attention's QK^T and PV inputs rounded to nearest TF32 (emulation)",
    "hf32-cublas-tf32": "transformers fp32 with torch.set_float32_matmul_precision('high') (all matmuls TF32)",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- vLLM side
def _probe_state() -> dict[str, Any]:
    """Precision settings as this process sees them."""
    import torch

    state: dict[str, Any] = {"pid": os.getpid(), "float32_matmul_precision": torch.get_float32_matmul_precision()}
    for key, get in (
        ("cuda_matmul_fp32_precision", lambda: torch.backends.cuda.matmul.fp32_precision),
        ("cuda_matmul_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
        ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
    ):
        try:
            state[key] = get()
        except Exception as exc:  # noqa: BLE001 - a report, not a check
            state[key] = f"error: {exc}"
    try:
        import triton

        state["triton_version"] = triton.__version__
        state["triton_fp32_default"] = triton.knobs.language.fp32_default
    except Exception as exc:  # noqa: BLE001
        state["triton_fp32_default"] = f"error: {exc}"
    state["env"] = {k: os.environ.get(k) for k in ("TRITON_F32_DEFAULT", "VLLM_FLOAT32_MATMUL_PRECISION")}
    return state


def _make_processor_class():
    from vllm_rbln_exec.engines.vllm_logits import CaptureLogitsProcessor

    class ProbeLogitsProcessor(CaptureLogitsProcessor):
        """The project's capture processor, plus a record of the engine core's settings."""

        def __init__(self, vllm_config, device, is_pin_memory):
            super().__init__(vllm_config, device, is_pin_memory)
            self._meta_path = os.environ.get("PROBE_ENGINE_META")
            self._applied = False
            info: dict[str, Any] = {"at_init": _probe_state()}
            try:
                cc = vllm_config.compilation_config
                info["compilation"] = {
                    "mode": str(getattr(cc, "mode", None)),
                    "cudagraph_mode": str(getattr(cc, "cudagraph_mode", None)),
                    "custom_ops": list(getattr(cc, "custom_ops", []) or []),
                    "enabled_custom_ops": sorted(map(str, getattr(cc, "enabled_custom_ops", {}) or {})),
                    "disabled_custom_ops": sorted(map(str, getattr(cc, "disabled_custom_ops", {}) or {})),
                }
                info["attention_config_backend"] = str(vllm_config.attention_config.backend)
                info["enforce_eager"] = bool(vllm_config.model_config.enforce_eager)
                info["model_dtype"] = str(vllm_config.model_config.dtype)
            except Exception as exc:  # noqa: BLE001
                info["config_error"] = repr(exc)
            self._info = info
            self._dump()

        def _dump(self) -> None:
            if self._meta_path:
                Path(self._meta_path).write_text(json.dumps(self._info, indent=1, default=str))

        def apply(self, logits):
            if not self._applied:
                self._applied = True
                self._info["at_first_apply"] = _probe_state()
                self._info["logits_dtype"] = str(logits.dtype)
                self._dump()
            return super().apply(logits)

    return ProbeLogitsProcessor


def __getattr__(name: str):  # vLLM imports "gpu_fp32_probe:ProbeLogitsProcessor" in its engine core
    if name == "ProbeLogitsProcessor":
        cls = _make_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def worker(args: argparse.Namespace) -> int:
    """One vLLM variant: teacher-forced greedy decode, full-vocabulary rows to .npy files."""
    t0 = time.perf_counter()
    job = json.loads(Path(args.worker).read_text())
    name, device = job["name"], job["device"]
    _env, engine_kwargs, _what = VLLM_VARIANTS[name]
    work = Path(job["dir"])
    meta: dict[str, Any] = {"name": name, "engine_kwargs": engine_kwargs, "frontend": _probe_state()}
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    meta["vllm_version"] = vllm.__version__
    meta["torch_version"] = torch.__version__
    meta["import_s"] = round(time.perf_counter() - t0, 1)
    prompts: list[list[int]] = job["prompt_ids"]
    forced: list[list[int]] = job["forced"]
    steps, vocab = job["steps"], job["vocab"]
    kwargs: dict[str, Any] = dict(
        model=job["model"],
        dtype="float32",
        max_model_len=job["max_model_len"],
        max_num_seqs=len(prompts),
        seed=0,
        logits_processors=["gpu_fp32_probe:ProbeLogitsProcessor"],
    )
    if device == "cuda":
        # several variants share the GPU: a small fixed KV cache, no memory profiling
        kwargs.update(gpu_memory_utilization=0.04, kv_cache_memory_bytes=256 << 20)
    else:  # vLLM CPU (a debug run of this script): the flag is the share of host memory
        kwargs.update(gpu_memory_utilization=0.15)
    kwargs.update(engine_kwargs)
    t1 = time.perf_counter()
    llm = LLM(**kwargs)
    meta["engine_start_s"] = round(time.perf_counter() - t1, 1)
    files = []
    params = []
    for i in range(len(prompts)):
        path = work / f"rows_{i}.npy"
        rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(steps, vocab))
        rows[:] = np.nan
        rows.flush()
        del rows
        files.append(path)
        params.append(SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, detokenize=False,
                                     extra_args={"vre": {"file": str(path), "force": forced[i]}}))
    t2 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    meta["generate_s"] = round(time.perf_counter() - t2, 1)
    meta["tokens_follow_forced"] = all(list(o.outputs[0].token_ids) == forced[i] for i, o in enumerate(outs))
    try:
        llm.llm_engine.shutdown()
    except Exception:  # noqa: BLE001
        pass
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    (work / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    log(f"{name}: done in {meta['total_s']} s")
    return 0


# ----------------------------------------------------------------------------- transformers side
def tf32_round(x, mode: str):
    """fp32 -> the nearest (rn: ties away, as cvt.rna.tf32.f32) or truncated (rz) TF32 value, as fp32."""
    import torch

    bits = x.contiguous().view(torch.int32)
    if mode == "rn":
        bits = bits + 0x1000
    return (bits & ~0x1FFF).view(torch.float32)


def patch_attention(mode: str | None) -> None:
    """Swap transformers' Llama eager attention for one whose two products see TF32 inputs."""
    import torch
    from torch import nn
    from transformers.models.llama import modeling_llama as ml

    if not hasattr(ml, "_probe_eager"):
        ml._probe_eager = ml.eager_attention_forward
    if mode is None:
        ml.eager_attention_forward = ml._probe_eager
        return

    def eager_tf32(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key_states = ml.repeat_kv(key, module.num_key_value_groups)
        value_states = ml.repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(tf32_round(query, mode), tf32_round(key_states, mode).transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(tf32_round(probs, mode), tf32_round(value_states, mode))
        return out.transpose(1, 2).contiguous(), probs

    ml.eager_attention_forward = eager_tf32


def hf_load(model_dir: Path, dtype, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="eager",
                                                 local_files_only=True)
    return model.to(device).eval()


def hf_greedy(model, prompt: list[int], steps: int, device: str) -> list[int]:
    import torch

    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    tokens: list[int] = []
    for t in range(steps):
        tok = int(torch.argmax(out.logits[0, -1]))
        tokens.append(tok)
        if t + 1 < steps:
            out = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=out.past_key_values,
                        use_cache=True)
    return tokens


def hf_full_rows(model, prompt: list[int], forced: list[int], device: str):
    """One forward over prompt + forced[:-1]: log_softmax rows of the generated positions, model dtype."""
    import torch

    ids = prompt + forced[:-1]
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, len(prompt) - 1:]
    return torch.log_softmax(logits, dim=-1)


def hf_forced_rows(model, prompt: list[int], forced: list[int], device: str):
    """Step by step with the KV cache (the project's transformers engine), fp32 log_softmax rows."""
    import torch

    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    rows = []
    for t, tok in enumerate(forced):
        rows.append(torch.log_softmax(out.logits[0, -1].to(torch.float32), dim=-1))
        if t + 1 < len(forced):
            out = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=out.past_key_values,
                        use_cache=True, logits_to_keep=1)
    return torch.stack(rows)


# ----------------------------------------------------------------------------- metrics
def compare(ref, rows) -> dict[str, Any]:
    """KL(ref || rows) per position and |Δlogprob|, both renormalised exactly in float64.

    ``ref`` and ``rows`` are [prompts, steps, vocab] tensors on one device."""
    import torch

    a = ref.to(torch.float64)
    b = rows.to(torch.float64)
    a = a - torch.logsumexp(a, dim=-1, keepdim=True)
    b = b - torch.logsumexp(b, dim=-1, keepdim=True)
    p = a.exp()
    diff = a - b
    kl = (p * diff).sum(-1)  # [prompts, steps]
    ad = diff.abs()
    likely = p >= 1e-4
    return {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "kl_mean_prefill": float(kl[:, 0].mean()),
        "kl_mean_decode": float(kl[:, 1:].mean()) if kl.shape[1] > 1 else None,
        "max_abs_dlogprob": float(ad.max()),
        "max_abs_dlogprob_p_ge_1e-4": float(ad[likely].max()),
        "top1_agree": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
        "kl_per_step_mean": [float(x) for x in kl.mean(0)],
    }


# ----------------------------------------------------------------------------- main
def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
                           "host": platform.node()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception as exc:  # noqa: BLE001
            env["nvidia_smi"] = repr(exc)
    return env


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def table(results: dict[str, dict[str, Any]]) -> str:
    head = ("variant", "KL mean vs hf32", "KL max vs hf32", "max|Δ| vs hf32", "KL mean vs fp64", "KL max vs fp64",
            "max|Δ| vs fp64", "max|Δ| p≥1e-4 vs fp64", "KL t=0 vs fp64", "KL t≥1 vs fp64", "top-1 vs fp64")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} |" + " |" * (len(head) - 2))
            continue
        h, f = r.get("vs_hf32") or {}, r["vs_fp64"]
        lines.append("| " + " | ".join([
            name, fmt(h.get("kl_mean")), fmt(h.get("kl_max")), fmt(h.get("max_abs_dlogprob")),
            fmt(f["kl_mean"]), fmt(f["kl_max"]), fmt(f["max_abs_dlogprob"]), fmt(f["max_abs_dlogprob_p_ge_1e-4"]),
            fmt(f["kl_mean_prefill"]), fmt(f["kl_mean_decode"]), f"{f['top1_agree']:.3f}",
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-fp32-probe"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-fp32-probe"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VLLM_VARIANTS), help="vLLM variants, comma-separated ('' for none)")
    ap.add_argument("--hf-variants", default=",".join(HF_VARIANTS))
    ap.add_argument("--parallel", type=int, default=5, help="vLLM variants running at once")
    ap.add_argument("--worker-timeout", type=float, default=330.0)
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds after start: stop waiting for workers")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    start = time.monotonic()
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer

    from vllm_rbln_exec.setup.prompts import BUILTIN_PROMPTS
    from vllm_rbln_exec.setup.tiny import make_tiny_model

    model_dir = make_tiny_model(args.work / "tiny-llama3", vocab_size=128256, seed=0)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompts = [tok.encode(p).ids for p in (list(BUILTIN_PROMPTS[:N_BUILTIN]) * 4)[: args.num_prompts]]
    steps = args.max_tokens
    max_model_len = max(map(len, prompts)) + steps + 16
    log(f"tiny model at {model_dir}; prompt lengths {[len(p) for p in prompts]}")

    import torch

    device = args.device
    torch.set_float32_matmul_precision("highest")
    report: dict[str, Any] = {"environment": environment(device), "prompts": prompts, "steps": steps,
                              "command": " ".join([sys.executable, *sys.argv]), "variants": {}, "results": {}}
    log(f"environment: {json.dumps(report['environment'])}")

    # 1. fp64 ground truth and the forced tokens
    with torch.inference_mode():
        m64 = hf_load(model_dir, torch.float64, device)
        forced = [hf_greedy(m64, p, steps, device) for p in prompts]
        ref64 = torch.stack([hf_full_rows(m64, p, f, device) for p, f in zip(prompts, forced)])  # float64
        del m64
    vocab = int(ref64.shape[-1])
    report["forced"] = forced
    log(f"fp64 greedy + rows done ({time.monotonic() - start:.0f} s)")

    # 2. vLLM workers, started now, so they import and compile while transformers runs
    names = [n for n in args.variants.split(",") if n]
    for n in names:
        if n not in VLLM_VARIANTS:
            raise SystemExit(f"unknown vLLM variant {n}; known: {', '.join(VLLM_VARIANTS)}")
    pending = list(names)
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    done: list[str] = []
    retried: set[str] = set()

    def launch(name: str) -> None:
        env_add, engine_kwargs, what = VLLM_VARIANTS[name]
        wdir = args.work / name
        wdir.mkdir(parents=True, exist_ok=True)
        for f in wdir.glob("rows_*.npy"):
            f.unlink()
        for f in ("meta.json", "engine.json"):
            (wdir / f).unlink(missing_ok=True)
        job = {"name": name, "device": device, "dir": str(wdir), "model": str(model_dir), "prompt_ids": prompts,
               "forced": forced, "steps": steps, "vocab": vocab, "max_model_len": max_model_len}
        (wdir / "job.json").write_text(json.dumps(job))
        env = dict(os.environ)
        env.update(env_add)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO / "src"), env.get("PYTHONPATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        env["PROBE_ENGINE_META"] = str(wdir / "engine.json")
        env["VLLM_CACHE_ROOT"] = str(wdir / "vllm-cache")
        env["TRITON_CACHE_DIR"] = str(wdir / "triton-cache")
        env["TORCHINDUCTOR_CACHE_DIR"] = str(wdir / "inductor-cache")
        logf = open(wdir / "worker.log", "w")
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(wdir / "job.json")],
                                env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=str(wdir))
        running[name] = (proc, time.monotonic(), logf)
        report["variants"][name] = {"env": env_add, "engine_kwargs": engine_kwargs, "what": what}
        log(f"started {name} (pid {proc.pid}): {what}")

    def fill() -> None:
        while pending and len(running) < args.parallel:
            launch(pending.pop(0))

    fill()

    def write() -> None:
        report["table"] = table(report["results"])
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        (args.out / "probe.json").write_text(json.dumps(report, indent=1, default=str))

    # 3. transformers variants (in this process, while the workers start)
    hf_names = [n for n in args.hf_variants.split(",") if n]
    hf32 = None
    with torch.inference_mode():
        for name in ["hf32"] + [n for n in hf_names if n != "hf32"]:
            if name == "hf32-cublas-tf32" and device != "cuda":
                continue
            t0 = time.monotonic()
            mode = {"hf32-attn-tf32-rz": "rz", "hf32-attn-tf32-rn": "rn"}.get(name)
            patch_attention(mode)
            if name == "hf32-cublas-tf32":
                torch.set_float32_matmul_precision("high")
            try:
                m32 = hf_load(model_dir, torch.float32, device)
                rows = torch.stack([hf_forced_rows(m32, p, f, device) for p, f in zip(prompts, forced)])
                del m32
            finally:
                torch.set_float32_matmul_precision("highest")
                patch_attention(None)
            if name == "hf32":
                hf32 = rows
            res = {"vs_fp64": compare(ref64, rows), "vs_hf32": compare(hf32, rows) if name != "hf32" else None,
                   "what": HF_VARIANTS[name], "seconds": round(time.monotonic() - t0, 1)}
            report["results"][name] = res
            log(f"{name}: KL mean vs fp64 {res['vs_fp64']['kl_mean']:.3e} max {res['vs_fp64']['kl_max']:.3e}")
            write()

    # 4. collect vLLM variants as they finish
    def collect(name: str, proc: subprocess.Popen, note: str | None = None) -> None:
        wdir = args.work / name
        res: dict[str, Any] = {"what": VLLM_VARIANTS[name][2], "returncode": proc.returncode}
        for key, fname in (("worker", "meta.json"), ("engine", "engine.json")):
            try:
                res[key] = json.loads((wdir / fname).read_text())
            except (OSError, ValueError):
                pass
        text = (wdir / "worker.log").read_text(errors="replace") if (wdir / "worker.log").exists() else ""
        res["log_highlights"] = [
            line.strip()[:300] for line in text.splitlines()
            if re.search(r"backend|custom op|[Cc]uda ?graph|compil|TF32|tf32|precision|Error|error", line)
        ][:40]
        try:
            if note:
                raise RuntimeError(note)
            if proc.returncode != 0:
                raise RuntimeError(f"exit {proc.returncode}: " + " / ".join(text.strip().splitlines()[-3:]))
            rows = torch.stack([torch.from_numpy(np.load(wdir / f"rows_{i}.npy")) for i in range(len(prompts))])
            if not torch.isfinite(rows).any(-1).all():
                raise RuntimeError("some rows were never written")
            rows = rows.to(device)
            res["vs_fp64"] = compare(ref64, rows)
            res["vs_hf32"] = compare(hf32, rows)
            log(f"{name}: KL mean vs fp64 {res['vs_fp64']['kl_mean']:.3e} max {res['vs_fp64']['kl_max']:.3e}; "
                f"vs hf32 {res['vs_hf32']['kl_mean']:.3e}")
        except Exception as exc:  # noqa: BLE001
            res["error"] = str(exc)[:2000]
            log(f"{name}: FAILED: {res['error'][:500]}")
        report["results"][name] = res
        write()

    while running:
        for name, (proc, t_start, logf) in list(running.items()):
            over = time.monotonic() - t_start > args.worker_timeout or time.monotonic() - start > args.deadline
            if proc.poll() is None and not over:
                continue
            note = None
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                note = "killed: over its time"
            logf.close()
            del running[name]
            if (proc.returncode != 0 and note is None and name not in retried
                    and time.monotonic() - start < args.deadline - 200):
                # one more try: concurrent engine starts can race (ports, IPC names)
                retried.add(name)
                log(f"{name}: exit {proc.returncode}, trying once more")
                (args.work / name / "worker.log").rename(args.work / name / "worker.first-try.log")
                pending.insert(0, name)
                continue
            done.append(name)
            collect(name, proc, note)
        if time.monotonic() - start > args.deadline:
            pending.clear()
        fill()
        time.sleep(1.0)
    for name in pending:
        report["results"][name] = {"error": "not run (deadline)"}

    # worker logs, cut to what fits, in one file
    with open(args.out / "workers.log", "w") as out:
        for name in done:
            for fname in ("worker.first-try.log", "worker.log"):
                f = args.work / name / fname
                if not f.exists():
                    continue
                text = f.read_text(errors="replace")
                if len(text) > 60000:
                    text = text[:20000] + "\n[... cut ...]\n" + text[-40000:]
                out.write(f"\n===== {name} ({fname}) =====\n{text}")
    write()
    print()
    print(report["table"])
    log(f"all done in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
