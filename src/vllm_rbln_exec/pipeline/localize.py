"""Pipeline step: localise a parity failure to the first layer (and module) whose output departs.

From a saved run (its ``parity.json``: model, sides, prompts, the reference's tokens,
which prompts and positions failed) it chooses the positions (``choose_positions``),
rebuilds each side (``sides_from_run``; a yardstick when the target runs at a lower
precision than the reference), captures hidden states at those positions only, one
worker per side (``worker.main.task_hidden``), judges them layer by layer
(``compare.layers``), and writes the report under ``localization`` in the run's
``parity.json`` with a plot beside it. It must not render to the terminal and never
imports torch or vLLM.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..capture.hidden import HiddenError, load_hidden
from ..compare.layers import FLOOR, G, K, chain_names, floor_of, localize_prompt, summarize_layers
from ..core.errors import UsageError
from ..setup.devices import get_profile
from ..setup.options import Parallel
from ..setup.request import CaptureRequest, HiddenRequest, hidden_task
from ..setup.sides import Side, YardstickSpec, yardstick_options
from ..worker.spawn import WorkerJob, start_worker, wait_workers
from .captures import side_env
from .context import Progress, RunContext

RULE = (f"an entry departs when its error exceeds K={K:g} times the yardstick's error at that entry (or the "
        f"precision's honest floor without a yardstick); it creates the difference when that ratio also jumped "
        f"by G={G:g} or more over the previous entry's (its input was still close), else it inherits it")


def choose_positions(run: dict[str, Any], verdict: dict[str, Any] | None, max_prompts: int = 2,
                     max_decode: int = 2) -> tuple[dict[int, list[int]], str]:
    """Prompt index -> generated positions to localise, and why those: position 0 (the prefill) and the
    first failing decode positions of the failing prompts; the worst (by KL) when nothing failed."""
    comps = {int(c.get("index", i)): c for i, c in enumerate(run.get("comparisons") or [])}
    n_tokens = {i: len(t) for i, t in enumerate(run.get("reference_tokens") or [])}
    violations = [v for v in (verdict or {}).get("violations") or [] if v.get("prompt_index") is not None]
    failing = sorted({int(v["prompt_index"]) for v in violations} & set(comps))
    why = "the failing prompts and positions"
    if not failing:
        why = ("no prompt failed on its own" if violations or (verdict or {}).get("violations") else
               "nothing failed") + ": the prompts and positions of largest KL"
        failing = sorted(comps, key=lambda i: -float((comps[i].get("distribution") or {}).get("kl_max") or 0.0))
    out: dict[int, list[int]] = {}
    for i in failing[:max_prompts]:
        told = [int(v["position"]) for v in violations if v.get("prompt_index") == i and v.get("position")]
        worst = [int(w["position"]) for w in comps[i].get("worst_positions") or []
                 if w.get("position") and (w.get("kl") or 0) > 0]
        div = (comps[i].get("argmax_divergence") or {}).get("position")
        decode = sorted({p for p in told + worst + ([int(div)] if div else []) if 0 < p < n_tokens.get(i, 0)})
        out[i] = [0, *decode[:max_decode]]
    if not out:
        raise UsageError("the run compares no prompt: there is nothing to localise")
    return out, why


def sides_from_run(run: dict[str, Any]) -> tuple[Side, Side]:
    """The reference and target ``Side`` as the run resolved them (``resolved.sides`` of schema 2)."""
    resolved = (run.get("resolved") or {}).get("sides") or {}
    if not all(isinstance(resolved.get(r), dict) for r in ("reference", "target")):
        raise UsageError("the run was saved by an older version (no resolved sides): it cannot be localised; "
                         "run it again")
    out = []
    for role in ("reference", "target"):
        s = resolved[role]
        out.append(Side(role=role, device=s["device"], platform=s["platform"], engine=s["engine"],
                        dtype=str(s["dtype"]), checkpoint=str(s["checkpoint"]), model_name=str(run.get("model")),
                        torch_device=str(s.get("torch_device") or "cpu"), parallel=Parallel(**(s.get("parallel") or {})),
                        block_size=s.get("block_size"), engine_args=dict(s.get("engine_args") or {})))
    return out[0], out[1]


def auto_yardstick(reference: Side, target: Side) -> Side | None:
    """The reference rerun at the target's precision (an honest implementation at that precision), by the
    run's own ``--yardstick auto`` rule (``setup.sides.yardstick_options``: a device's ``auto`` dtype counts);
    None when the target's dtype is not coarser than the reference's."""
    asked, _ = yardstick_options(YardstickSpec("auto"), reference, target)
    return None if asked is None else replace(reference, role=asked.role, dtype=asked.dtype)


def localize_saved(run: dict[str, Any], verdict: dict[str, Any] | None, folder: Path, *,
                   modules: bool = False, yardstick: Side | None = None, use_yardstick: bool = True,
                   max_prompts: int = 2, max_decode: int = 2, cache_dir: str | None = None,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Capture hidden states of every side at the chosen positions and judge them; the report."""
    chosen, why = choose_positions(run, verdict, max_prompts, max_decode)
    reference, target = sides_from_run(run)
    if use_yardstick and yardstick is None:
        yardstick = auto_yardstick(reference, target)
    options = run.get("options") or {}
    ctx = RunContext.create(cache_dir or str(folder / "cache"), options.get("devices_file"),
                            float((options.get("capture") or {}).get("timeout") or 1800.0), progress)
    sides = [s for s in (reference, target, yardstick) if s is not None]
    labels = ["reference", "target"] + (["yardstick"] if yardstick is not None else [])
    jobs = [_job(ctx, run, side, label, folder / label, chosen, modules, options)
            for side, label in zip(sides, labels)]
    results = wait_workers([start_worker(j) for j in jobs], ctx.on_event())
    try:
        caps = {label: load_hidden(Path(r["hidden"])) for label, r in zip(labels, results)}
    except HiddenError as exc:
        raise UsageError(str(exc)) from exc
    return build_report(caps, chosen, why, modules)


def _job(ctx: RunContext, run: dict[str, Any], side: Side, label: str, folder: Path, chosen: dict[int, list[int]],
         modules: bool, options: dict[str, Any]) -> WorkerJob:
    prompts, tokens = run.get("prompts") or [], run.get("reference_tokens") or []
    order = sorted(chosen)
    settings = run.get("settings") or {}
    request = CaptureRequest(
        side=side, prompts=tuple(prompts[i] for i in order), max_tokens=max(max(chosen[i]) for i in order) + 1,
        batch=1, max_model_len=int(settings.get("max_model_len") or 2048), logprobs=-1, capture="fast",
        store="fp32", trust_remote_code=bool((options.get("capture") or {}).get("trust_remote_code")),
        force=tuple(tuple(int(t) for t in tokens[i]) for i in order),
    )
    hidden = HiddenRequest(capture=request, positions=tuple(tuple(chosen[i]) for i in order), modules=modules)
    profile = get_profile(side.device, ctx.profiles, option="--devices")
    env, _ = side_env(ctx, side, profile, (options.get("capture") or {}).get("kv_cache_gib"))
    env = {**env, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # the hooks travel to vLLM's engine core pickled
    return WorkerJob(task=hidden_task(label, folder, hidden), env=env, timeout=ctx.timeout)


def _dtype(cap) -> str:
    eff = cap.meta.get("effective") or {}
    return str(eff.get("model_dtype") or eff.get("torch_dtype") or cap.meta.get("dtype"))


def build_report(caps: dict[str, Any], chosen: dict[int, list[int]], why: str, modules: bool) -> dict[str, Any]:
    """The localisation report from loaded hidden captures (``reference``, ``target``, maybe ``yardstick``)."""
    ref, tgt, yard = caps["reference"], caps["target"], caps.get("yardstick")
    # the residual stream must be the same on every side; a sub-module one engine never calls as a module
    # (a router fused into another's expert kernel) is left out of the comparison
    names = [n for n in ref.names if n in tgt.names and (yard is None or n in yard.names)]
    if any(chain_names(c.names) != chain_names(ref.names) for c in caps.values()):
        raise UsageError(f"the sides' modules do not map onto each other: {ref.names[:4]}... vs {tgt.names[:4]}...")
    floor = floor_of(_dtype(ref), _dtype(tgt)) if yard is None else FLOOR["float32"]
    order = sorted(chosen)
    prompts = []
    for k, index in enumerate(order):
        rows = {label: {n: c.rows(k, n) for n in names} for label, c in caps.items()}
        judged = localize_prompt(names, chosen[index], rows["reference"], rows["target"], rows.get("yardstick"),
                                 floor)
        prompts.append({"index": index, **judged})
    summary = summarize_layers(prompts)
    sides = {label: {"engine": c.meta.get("engine"), "device": c.meta.get("device"), "dtype": _dtype(c),
                     "platform": c.meta.get("platform"), "engine_version": c.meta.get("engine_version"),
                     "pass": c.meta.get("pass"), "hidden_dir": str(c.root),
                     "hidden_s": (c.meta.get("timings") or {}).get("hidden_s")} for label, c in caps.items()}
    notes = ["decode positions are localised through the decode path (the prompt prefilled, then one forced token "
             "per step, as in the run); position 0 is the prefill's last token",
             "each prompt runs alone (batch 1) and vLLM runs eager (no torch.compile, no CUDA graphs) for this "
             "pass: a difference that needs batching or a compiled graph to appear does not show here"]
    return {"schema_version": 1, "verdict": summary["verdict"], "layer": summary["layer"],
            "module": summary["module"], "shows_at": summary["shows_at"], "positions_named": summary.get("positions"),
            "rule": {"k": K, "g": G, "floor": floor, "text": RULE}, "chosen": why, "modules": modules,
            "yardstick": sides.get("yardstick"), "sides": sides, "layers": summary["layers"], "prompts": prompts,
            "notes": notes}


def localize_folder(run_dir: str | Path, run: dict[str, Any] | None = None, verdict: dict[str, Any] | None = None,
                    *, modules: bool = False, use_yardstick: bool = True, max_prompts: int = 2, max_decode: int = 2,
                    cache_dir: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Localise a run folder: the report goes under ``localization`` in its ``parity.json`` and a plot beside it
    (``localize/error_by_layer.png``). ``run``/``verdict``: the run's saved form when the caller holds it."""
    from ..outputs.files import add_to_report, load_report
    from ..outputs.html import write_layer_plot

    folder = Path(run_dir)
    parity = folder / "parity.json"
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a run folder (it does not exist)")
    if run is None:
        saved = next((p for p in (parity, folder / "report.json") if p.is_file()), None)
        if saved is None:
            raise UsageError(f"{folder} holds no parity.json: not a run folder (or the run did not finish)")
        try:
            run, verdict, _ = load_report(saved)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{parity} is not a vllm-rbln-exec report: {exc}") from exc
        if not isinstance(run, dict) or not isinstance(run.get("comparisons"), list):
            raise UsageError(f"{parity} is not a vllm-rbln-exec report (no comparisons)")
    out = folder / "localize"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    report = localize_saved(run, verdict, out, modules=modules, use_yardstick=use_yardstick, max_prompts=max_prompts,
                            max_decode=max_decode, cache_dir=cache_dir, progress=progress)
    plot = write_layer_plot(report, out / "error_by_layer.png")
    report["plot"] = str(plot) if plot else None
    if parity.is_file():
        add_to_report(parity, "localization", report)
    return report
