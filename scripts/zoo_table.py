#!/usr/bin/env python
"""The zoo table: is the default verdict right on every family the zoo holds and on the real models?

Per model (the zoo's families, ``smollm2-135m``, and ``gemma3-270m`` where that alias exists), against the
vLLM CPU float32 reference, with the built-in defaults only, through the library call the CLI makes
(``pipeline.check.check_parity``, ``--use-cache``: the reference and the yardstick are made once per model):

* the float32 floor: transformers CPU float32 as the target (KL mean; the verdict must pass);
* honest bfloat16: vLLM CPU bfloat16 and transformers CPU bfloat16 as targets with the automatic yardstick
  (vLLM CPU bfloat16): KL mean, the ratio to the yardstick, the verdict (must pass);
* the mean entropy (nats) of the reference's next-token distributions;
* every planted fault the architecture can see (``setup.faults.faults_for``), run as ``--target-model`` on
  transformers CPU at float32 and (the gross ones) at bfloat16: flagged or not, and at float32 whether ``--localize``
  (with sub-modules) names the planted layer.

It writes ``docs/zoo.md`` (``--doc``) from the results, which are kept in ``OUT/results.json`` so an
interrupted run resumes where it stopped and ``--only-doc`` rewrites the page without running anything.

    python scripts/zoo_table.py                                  # every model (long: run it through heavy)
    python scripts/zoo_table.py --models zoo-qwen3 zoo-gemma3    # some
    python scripts/zoo_table.py --only-doc                       # the page again from saved results
    python scripts/zoo_table.py --rejudge                        # today's verdict defaults on the saved runs

The main process never imports torch or vLLM (the engines run in workers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from zoo_doc import write_doc  # noqa: E402

from vllm_rbln_exec.compare.catalogue import metric_value  # noqa: E402
from vllm_rbln_exec.core.errors import HarnessError  # noqa: E402
from vllm_rbln_exec.pipeline.check import check_parity, rejudge  # noqa: E402
from vllm_rbln_exec.pipeline.context import RunContext  # noqa: E402
from vllm_rbln_exec.pipeline.models import prepare_model  # noqa: E402
from vllm_rbln_exec.setup.faults import faults_for, parse_fault, plant, planted  # noqa: E402
from vllm_rbln_exec.setup.models import MODEL_ALIASES, read_config, text_config  # noqa: E402
from vllm_rbln_exec.setup.options import GateOptions, build_options  # noqa: E402
from vllm_rbln_exec.setup.zoo_families import FAMILIES  # noqa: E402

REAL = ("smollm2-135m", "gemma3-270m")


def relative(spec: str, config: dict) -> str:
    """``rope-theta:x0.1`` -> the absolute value from the config (the first rope of a per-layer-type table)."""
    kind, _, value = spec.partition(":")
    if kind != "rope-theta" or not value.startswith("x"):
        return spec
    rope = config.get("rope_parameters") or {}
    nested = [v for v in rope.values() if isinstance(v, dict)]
    base = float((nested[0] if nested else rope).get("rope_theta") or config.get("rope_theta") or 10000.0)
    return f"{kind}:{base * float(value[1:]):.6g}"


def run_case(args, model: str, out: Path, key: str, **target) -> dict:
    flat = dict(model=model, target="cpu", use_cache=True, cache_dir=args.cache_dir, max_tokens=args.max_tokens,
                num_prompts=args.num_prompts, run_dir=str(out / key.replace(":", "_").replace("@", "-")),
                num_hidden_layers=args.layers.get(model), inspect_logits=False, **target)
    shutil.rmtree(flat["run_dir"], ignore_errors=True)  # a case run again (it errored) starts afresh
    t0 = time.monotonic()
    try:
        outcome = check_parity(build_options(**{k: v for k, v in flat.items() if v is not None}))
    except HarnessError as exc:  # a family an engine cannot run is a row that says so, not the end of the table
        print(f"  {model} {key}: ERROR {exc}", file=sys.stderr, flush=True)
        return {"error": str(exc)[:300], "seconds": round(time.monotonic() - t0)}
    run, verdict = outcome.run, outcome.verdict.to_json()
    summary = run.get("summary") or {}
    yard = (run.get("yardstick") or {}).get("summary")
    loc = run.get("localization") or {}
    rec = {"passed": verdict["passed"], "kl": metric_value(summary, "distribution.kl_mean"),
           "yardstick_kl": None if yard is None else metric_value(yard, "distribution.kl_mean"),
           "failed_by": sorted({v["gate"] for v in verdict["violations"]}),
           "localized": loc.get("layer"), "module": loc.get("module"), "seconds": round(time.monotonic() - t0),
           "reference_capture": ((run.get("sides") or {}).get("reference") or {}).get("capture_dir")}
    print(f"  {model} {key}: {'pass' if rec['passed'] else 'FAIL'} kl={rec['kl']} loc={rec['localized']} "
          f"({rec['seconds']} s)", file=sys.stderr, flush=True)
    return rec


def entropy(capture_dir: str) -> float:
    """Mean entropy (nats) of the reference's next-token distributions, in a child process (numpy only)."""
    code = ("import sys,numpy as np;sys.path.insert(0,sys.argv[2]);"
            "from vllm_rbln_exec.capture.store import load_capture;c=load_capture(sys.argv[1]);h=[]\n"
            "for i in range(len(c.prompts)):\n lp=c.logprobs(i).astype(np.float64);h+=list(-(np.exp(lp)*lp).sum(1))\n"
            "print(float(np.mean(h)))")
    done = subprocess.run([sys.executable, "-c", code, capture_dir, str(ROOT / "src")], capture_output=True,
                          text=True, check=True)
    return float(done.stdout.strip())


def model_cases(args, model: str) -> list[tuple[str, dict, dict]]:
    """(key, target options, what is expected) of one model."""
    ctx = RunContext.create(args.cache_dir, None, 900)
    _, path = prepare_model(ctx, model, args.layers.get(model))
    config = text_config(read_config(path))
    layers = int(config.get("num_hidden_layers") or 1)
    cases = [("floor@float32", {"target_engine": "transformers", "target_dtype": "float32"}, {"honest": True}),
             ("vllm@bfloat16", {"target_dtype": "bfloat16"}, {"honest": True}),
             ("transformers@bfloat16", {"target_engine": "transformers", "target_dtype": "bfloat16"},
              {"honest": True})]
    planned, blind = faults_for(config, layers)
    for f in planned:
        fault = parse_fault(relative(f.spec, config))
        folder = Path(args.cache_dir) / "faults" / path.name / fault.slug
        if not planted(folder, fault):
            plant(path, folder, fault)
        # a subtle fault need not show at bfloat16 (it may sit below rounding): run there only the gross ones
        for dtype in ("float32", "bfloat16") if f.gross else ("float32",):
            target = {"target_model": str(folder), "target_engine": "transformers", "target_dtype": dtype}
            if dtype == "float32" and f.layer is not None:
                target["localize_modules"] = True
            cases.append((f"{f.spec}@{dtype}", target, {"honest": False, "gross": f.gross, "layer": f.layer,
                                                        "why": f.why}))
    args.blind[model] = blind
    return cases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", help="default: every zoo family, then the real models")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--real-layers", type=int, default=None, help="cut the real models to this many layers")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--out", default="runs/zoo")
    p.add_argument("--doc", default="docs/zoo.md")
    p.add_argument("--only-doc", action="store_true", help="write the page from the saved results only")
    p.add_argument("--rejudge", action="store_true", help="judge the saved run folders again with today's "
                   "defaults (no model runs), then write the page")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {"models": {}}
    models = args.models or [*FAMILIES, *(m for m in REAL if m in MODEL_ALIASES)]
    args.layers = {m: args.real_layers for m in REAL}
    args.blind = {}
    if args.rejudge:
        for model, entry in saved["models"].items():
            for key, case in entry["cases"].items():
                folder = out / model / key.replace(":", "_").replace("@", "-")
                if not case.get("error") and (folder / "parity.json").is_file():
                    verdict = rejudge(folder, GateOptions()).verdict.to_json()
                    case["passed"] = verdict["passed"]
                    case["failed_by"] = sorted({v["gate"] for v in verdict["violations"]})
        results_path.write_text(json.dumps(saved, indent=1))
    elif not args.only_doc:
        for model in models:
            entry = saved["models"].setdefault(model, {"cases": {}})
            for key, target, expect in model_cases(args, model):
                if key not in entry["cases"] or entry["cases"][key].get("error"):
                    rec = run_case(args, model, out / model, key, **target)
                    entry["cases"][key] = {**rec, "expect": expect}
                    if entry.get("entropy") is None and rec.get("reference_capture"):
                        entry["entropy"] = entropy(rec["reference_capture"])
                    results_path.write_text(json.dumps(saved, indent=1))
            entry["blind"] = args.blind.get(model, [])
            entry["settings"] = {"max_tokens": args.max_tokens, "num_prompts": args.num_prompts,
                                 "layers": args.layers.get(model)}
            results_path.write_text(json.dumps(saved, indent=1))
    write_doc(Path(args.doc), saved, command="python scripts/zoo_table.py",
              expected=[*FAMILIES, *(m for m in REAL if m in MODEL_ALIASES)])
    print(f"wrote {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
