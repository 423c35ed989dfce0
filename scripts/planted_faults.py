#!/usr/bin/env python
"""Planted faults: does the harness's default verdict catch the bugs real devices have, and pass honest runs?

From any Llama-style model folder (or alias), this script makes edited copies
of the checkpoint, one per fault of the kinds real device bugs produce
(``setup.faults``: a scale error of 0.5-2 % in one layer's projection or in a
norm weight, a zeroed attention head, a wrong rope theta, a wrong norm epsilon,
bf16-scale noise on every weight), runs each as ``--target-model`` against the
honest folder at float32 and at bfloat16 through the same library call the CLI
makes (``pipeline.check.check_parity``, built-in defaults, ``--yardstick auto``),
adds the honest cases (identical sides, transformers against vLLM at float32,
honest bfloat16 from vLLM and from transformers), and prints one table: case,
dtype, KL mean, the yardstick's KL mean, their ratio, the fault's own KL at
float32 (what the fault alone adds), the verdict and whether that is what a
good verdict does.

    python scripts/planted_faults.py                              # smollm2-135m, 4 prompts x 32 tokens
    python scripts/planted_faults.py --model tiny-llama3 --max-tokens 16
    python scripts/planted_faults.py --faults scale:3:o_proj:1.01 --dtypes float32
    python scripts/planted_faults.py --rejudge runs/faults-smollm2-135m   # judge saved runs again, no model

The reference and the yardstick are cached (``--use-cache``), so each case
costs one target engine start. This script runs in the main process and never
imports torch or vLLM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from vllm_rbln_exec.compare.catalogue import metric_value  # noqa: E402
from vllm_rbln_exec.compare.yardstick import ratio  # noqa: E402
from vllm_rbln_exec.pipeline.check import check_parity, rejudge  # noqa: E402
from vllm_rbln_exec.setup.faults import parse_fault, plant, planted  # noqa: E402
from vllm_rbln_exec.setup.models import read_config, resolve_model, text_config  # noqa: E402
from vllm_rbln_exec.setup.options import GateOptions, build_options  # noqa: E402

HONEST = ("identical", "transformers")  # honest cases; at bfloat16 the target is honest arithmetic too


def default_faults(layers: int) -> list[str]:
    """The planted set, placed by the model's depth (early, middle, late layers)."""
    early, mid, late = max(0, layers // 6), layers // 2, max(0, (5 * layers) // 6)
    return [
        f"scale:{mid}:o_proj:1.01",  # 1 %: a wrong scale in a fused attention-output kernel
        f"scale:{early}:down_proj:0.995",  # 0.5 % in the MLP
        f"scale:{late}:q_proj:1.02",  # 2 % on the queries: a softmax temperature error
        f"scale:{mid}:post_attention_layernorm:1.01",  # 1 % in a norm weight
        "scale:final-norm:0.995",  # 0.5 % in the final norm
        f"zero-head:{mid}:0",  # one attention head's output lost
        "rope-theta:x0.1",  # a rope theta off by 10x (filled from the config)
        "norm-eps:x10",  # a norm epsilon off by 10x (filled from the config)
        "weight-noise:bf16",  # every weight off by bf16-scale noise (2^-9 relative)
    ]


def resolve_relative(spec: str, config: dict) -> str:
    """``rope-theta:x0.1`` / ``norm-eps:x10`` -> the absolute value from the model's config."""
    kind, _, value = spec.partition(":")
    if not value.startswith("x"):
        return spec
    factor = float(value[1:])
    if kind == "rope-theta":
        rope = config.get("rope_parameters") or {}
        base = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
    else:
        base = float(config.get("rms_norm_eps") or 1e-6)
    return f"{kind}:{base * factor:.6g}"


def cases(args, model_path: Path, config: dict) -> list[tuple[str, dict]]:
    """(case name, flat options of the target) for every case."""
    layers = args.num_hidden_layers or int(config.get("num_hidden_layers") or 1)
    specs = args.faults or default_faults(layers)
    out: list[tuple[str, dict]] = [] if args.faults_only else [("identical", {}),
                                                                ("transformers", {"target_engine": "transformers"})]
    for raw in specs:
        fault = parse_fault(resolve_relative(raw, config))
        folder = Path(args.cache_dir) / "faults" / model_path.name / fault.slug
        if not planted(folder, fault):
            plant(model_path, folder, fault)
        out.append((fault.spec, {"target_model": str(folder)}))
    return out


def run_case(args, name: str, target: dict, dtype: str, run_dir: Path) -> dict:
    flat = dict(model=args.model, target="cpu", target_dtype=dtype, use_cache=True, cache_dir=args.cache_dir,
                max_tokens=args.max_tokens, num_prompts=args.num_prompts, run_dir=str(run_dir),
                num_hidden_layers=args.num_hidden_layers, max_model_len=args.max_model_len, inspect_logits=False,
                **target)
    t0 = time.monotonic()
    outcome = check_parity(build_options(**{k: v for k, v in flat.items() if v is not None}))
    print(f"  {name} {dtype}: {'pass' if outcome.passed else 'FAIL'} ({time.monotonic() - t0:.0f} s)",
          file=sys.stderr)
    return {"run": outcome.run, "verdict": outcome.verdict.to_json()}


def row(name: str, dtype: str, record: dict, fault_kl: float | None) -> dict:
    run = record["run"]
    kl = metric_value(run.get("summary") or {}, "distribution.kl_mean")
    yard = (run.get("yardstick") or {}).get("summary")
    ykl = None if yard is None else metric_value(yard, "distribution.kl_mean")
    passed = record["verdict"]["passed"]
    honest = name in HONEST
    # a fault below the yardstick's own KL cannot be told from rounding at that precision
    below = (not honest and dtype != "float32" and fault_kl is not None and ykl is not None and fault_kl < ykl)
    expected = "pass" if honest else ("either (below the noise)" if below else "fail")
    good = (passed if honest else (True if below else not passed))
    failed_by = sorted({v["gate"] for v in record["verdict"]["violations"]})
    return {"case": name, "dtype": dtype, "kl": kl, "yardstick_kl": ykl,
            "ratio": ratio(kl, ykl, "distribution.kl_mean"), "fault_kl_fp32": fault_kl,
            "verdict": "pass" if passed else "FAIL", "expected": expected, "ok": good, "failed_by": failed_by}


def table(rows: list[dict]) -> str:
    def num(v):
        return "–" if v is None else f"{v:.3g}"

    lines = ["| case | dtype | KL mean | yardstick KL | ratio | fault's KL at fp32 | verdict | expected | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['case']}` | {r['dtype']} | {num(r['kl'])} | {num(r['yardstick_kl'])} | "
                     f"{num(r['ratio'])} | {num(r['fault_kl_fp32'])} | {r['verdict']} | {r['expected']} | "
                     f"{'✅' if r['ok'] else '❌'} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--faults", nargs="*", help="fault specs (setup.faults.parse_fault); default: the planted set")
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--faults-only", action="store_true", help="leave out the honest cases")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--num-hidden-layers", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None, help="e.g. 1024 for gemma3-270m (262k vocabulary)")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--out", default=None, help="folder of the run folders and results.json (default runs/faults-MODEL)")
    p.add_argument("--rejudge", metavar="OUT", help="judge the run folders under OUT again with today's defaults")
    args = p.parse_args()

    out = Path(args.rejudge or args.out or f"runs/faults-{Path(args.model).name}")
    results_path = out / "results.json"
    if args.rejudge:
        saved = json.loads(results_path.read_text())
        records = {}
        for key, entry in saved["records"].items():
            judged = rejudge(entry["run_dir"], GateOptions())
            records[key] = {"run": judged.run, "verdict": judged.verdict.to_json()}
        order = saved["order"]
    else:
        model_path = resolve_model(args.model, Path(args.cache_dir).resolve() / "models").path
        config = text_config(read_config(model_path))
        out.mkdir(parents=True, exist_ok=True)
        records, order = {}, []
        for name, target in cases(args, model_path, config):
            for dtype in args.dtypes:
                key = f"{name}@{dtype}"
                run_dir = out / key.replace(":", "_").replace("@", "-")
                records[key] = run_case(args, name, target, dtype, run_dir)
                order.append(key)
                results_path.write_text(json.dumps({"order": order, "records": {
                    k: {"run_dir": v["run"]["run_dir"]} for k, v in records.items()}}, indent=1))
    rows = []
    for key in order:
        name, dtype = key.rsplit("@", 1)
        fp32 = records.get(f"{name}@float32")
        fault_kl = None if fp32 is None else metric_value(fp32["run"]["summary"], "distribution.kl_mean")
        rows.append(row(name, dtype, records[key], fault_kl if name not in HONEST else None))
    text = table(rows)
    print(text)
    (out / "table.md").write_text(text + "\n")
    for r in rows:
        if r["failed_by"]:
            print(f"  {r['case']} @ {r['dtype']}: failed by {', '.join(r['failed_by'])}", file=sys.stderr)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
