"""Per-layer error of hidden states and the rule that names the layer where a difference is created.

Pure numpy on rows already in memory: ``errors`` (relative L2 and cosine per
position), ``judge_chain`` (the created / inherited rule along the model's
residual stream) and ``localize_prompt`` (one prompt's positions, judged and
summarised). It must not read files, run engines or render.

The chain is ``embed, layers.0, ..., layers.{L-1}, norm, logits``. At each entry
and position, ``err`` is ||target - reference|| / ||reference|| and the *ratio* is
``err / max(yardstick err, floor)``: the target's error in units of an honest
implementation's error at that entry (the yardstick: the reference engine at the
target's precision), or of ``floor`` (the honest error of the precision) when
there is no yardstick. An entry *departs* when its ratio exceeds ``K``. A departing
entry *creates* the difference when its ratio jumped by at least ``G`` over the
previous entry's (its input was still close, its output is far); otherwise it
*inherits* it. The first departing entry names the verdict: ``created`` there, or
``drift`` when it departs without a jump (error that grows a little at every layer).
This is the rule of Megatron's and msprobe's debuggers: the root cause is the first
operation whose output differs while its inputs matched.

The numbers (SmolLM2-135M, CPU, docs/localize.md has the runs): see the constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Measured on SmolLM2-135M (30 layers), CPU, 2 prompts x 3 positions each (docs/localize.md):
#   honest, vLLM vs transformers float32 (no yardstick): err <= 2.1e-6 per layer, 4.4e-6 at the logits,
#     so ratio <= 0.044 against the float32 floor;
#   honest, transformers bfloat16 against the vLLM bfloat16 yardstick: ratio <= 1.98 at every entry
#     (exactly 1.0 when target and yardstick are the same engine);
#   planted, layer 12 o_proj x1.02, vLLM vs vLLM float32: ratio 27..77 at layer 12 (from exactly 0 before);
#   planted, layer 20 down_proj x1.01, transformers vs vLLM float32: ratio 28.5..39.5 at layer 20 (<= 0.012 before);
#   planted, layer 12 head 3 zeroed, vLLM bfloat16 against its yardstick: ratio 3.36..7.31 at layer 12.
# K sits between the honest 1.98 and the faulty 3.36.
K = 3.0
# A created difference: the ratio jumped by G or more over the previous entry. At the edited layer the
# jump equals the ratio (the entry before sits at ratio ~1 with a yardstick, ~0 without); after it, the
# largest jump of an already departed stream was 3.01 (final norm -> logits, float32 o_proj fault), the
# next largest 1.38. G = 3.5 keeps that logits step "inherited"; a bf16 position whose fault ratio is
# between K and G (3.36 above) reads "drift" at the edited layer, which still names it.
G = 3.5
# The honest relative error of a precision, used when there is no yardstick. float32: vLLM against
# transformers stays below 4.4e-6 over SmolLM2's 30 layers and logits, so 1e-4 leaves a 20x margin.
# bfloat16: honest bfloat16 against float32 reached 4.0e-2 (logits) and 2.3e-2 (layers); without a
# yardstick a half-precision run can only catch faults above these (float16 is assumed ~8x better).
# A layer's sub-modules in the order its forward pass runs them (engines.hidden_hooks.SUBMODULES): norms,
# QK-norms, attention, the sandwich norms, an MoE block's router and experts, the MLP. The first to depart
# names the module inside the culprit layer.
SUBMODULE_ORDER = ("input_layernorm", "q_norm", "k_norm", "attn", "post_attention_layernorm",
                   "pre_feedforward_layernorm", "router", "experts", "mlp", "post_feedforward_layernorm")
FLOOR = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
TINY = 1e-12


def errors(ref: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(relative L2, cosine) per row of two [positions, width] arrays, in float64."""
    r = np.asarray(ref, dtype=np.float64)
    t = np.asarray(tgt, dtype=np.float64)
    if r.shape != t.shape:
        raise ValueError(f"rows of different shapes: {r.shape} and {t.shape}")
    nr, nt = np.linalg.norm(r, axis=1), np.linalg.norm(t, axis=1)
    rel = np.linalg.norm(t - r, axis=1) / np.maximum(nr, TINY)
    cos = np.einsum("ij,ij->i", r, t) / np.maximum(nr * nt, TINY)
    rel = np.where((nr == 0) & (nt == 0), 0.0, rel)
    cos = np.where((nr == 0) & (nt == 0), 1.0, cos)
    return rel, cos


def chain_names(names: list[str]) -> list[str]:
    """The residual-stream entries of a capture's names, in model order (sub-modules left out)."""
    return [n for n in names if n in ("embed", "norm", "logits") or (n.startswith("layers.") and n.count(".") == 1)]


def floor_of(*dtypes: str) -> float:
    """The honest error floor of the least precise dtype named (float32 when none is known)."""
    return max([FLOOR.get(str(d), 0.0) for d in dtypes] + [FLOOR["float32"]])


@dataclass
class Judged:
    status: list[str]  # per entry: ok | created | inherited
    ratio: list[float]
    verdict: str  # none | created | drift
    first: int | None  # index of the first departing entry


def judge_chain(err_t: list[float], err_y: list[float] | None, floor: float, k: float = K,
                g: float = G) -> Judged:
    """The rule along one chain (one position): see the module's docstring."""
    status, ratios, first = [], [], None
    prev = 0.0
    for i, e in enumerate(err_t):
        honest = max(err_y[i], 0.0) if err_y is not None else 0.0
        ratio = e / max(honest, floor, TINY)
        jump = ratio / max(prev, TINY)
        st = "ok" if not ratio > k else ("created" if jump >= g else "inherited")
        if st != "ok" and first is None:
            first = i
        status.append(st)
        ratios.append(float(ratio))
        prev = ratio
    verdict = "none" if first is None else ("created" if status[first] == "created" else "drift")
    return Judged(status, ratios, verdict, first)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def localize_prompt(names: list[str], positions: list[int], ref: dict[str, np.ndarray],
                    tgt: dict[str, np.ndarray], yard: dict[str, np.ndarray] | None, floor: float) -> dict[str, Any]:
    """One prompt: per position, each chain entry's error, ratio and status, the verdict, and (with
    sub-modules captured) which of the culprit layer's attention and MLP departs first."""
    chain = chain_names(names)
    rel_t = {n: errors(ref[n], tgt[n]) for n in names}
    rel_y = {n: errors(ref[n], yard[n])[0] for n in names} if yard is not None else None
    out = []
    for j, pos in enumerate(positions):
        e_t = [float(rel_t[n][0][j]) for n in chain]
        e_y = [float(rel_y[n][j]) for n in chain] if rel_y is not None else None
        judged = judge_chain(e_t, e_y, floor)
        culprit = chain[judged.first] if judged.first is not None else None
        entry = {"position": int(pos), "phase": "prefill" if pos == 0 else "decode", "verdict": judged.verdict,
                 "first": culprit, "created": [chain[i] for i, s in enumerate(judged.status) if s == "created"],
                 "entries": [{"name": n, "rel_l2": e_t[i], "cosine": float(rel_t[n][1][j]),
                              "yardstick_rel_l2": e_y[i] if e_y is not None else None,
                              "ratio": _finite(judged.ratio[i]), "status": judged.status[i]}
                             for i, n in enumerate(chain)]}
        if culprit and culprit.startswith("layers.") and any(f"{culprit}.{s}" in rel_t for s in SUBMODULE_ORDER):
            entry["module"] = _sub_module(culprit, j, rel_t, rel_y, floor)
        out.append(entry)
    return {"positions": out}


def _sub_module(layer: str, j: int, rel_t: dict, rel_y: dict | None, floor: float) -> str | None:
    """Inside the culprit layer: the first of its sub-modules, in forward order, whose ratio exceeds K."""
    for sub in SUBMODULE_ORDER:
        name = f"{layer}.{sub}"
        if name not in rel_t:
            continue
        honest = float(rel_y[name][j]) if rel_y is not None else 0.0
        if float(rel_t[name][0][j]) / max(honest, floor, TINY) > K:
            return sub
    return None


def summarize_layers(prompts: list[dict[str, Any]]) -> dict[str, Any]:
    """Across prompts and positions: per chain entry the largest error, ratio and smallest cosine; the
    earliest created entry (the verdict), and the phases (prefill, decode) whose positions show it."""
    rows: dict[str, dict[str, Any]] = {}
    verdicts = []
    for p in prompts:
        for pos in p["positions"]:
            verdicts.append(pos)
            for e in pos["entries"]:
                r = rows.setdefault(e["name"], {"name": e["name"], "rel_l2": 0.0, "cosine": 1.0,
                                                "yardstick_rel_l2": None, "ratio": 0.0})
                r["rel_l2"] = max(r["rel_l2"], e["rel_l2"])
                r["cosine"] = min(r["cosine"], e["cosine"])
                if e["yardstick_rel_l2"] is not None:
                    r["yardstick_rel_l2"] = max(r["yardstick_rel_l2"] or 0.0, e["yardstick_rel_l2"])
                r["ratio"] = max(r["ratio"], e["ratio"] if e["ratio"] is not None else math.inf)
    order = list(rows)
    named = [v for v in verdicts if v["verdict"] != "none"]
    if not named:
        return {"verdict": "none", "layer": None, "module": None, "shows_at": [], "layers": list(rows.values())}
    created = [v for v in named if v["verdict"] == "created"]
    pick = min(created or named, key=lambda v: order.index(v["first"]))
    same = [v for v in named if v["first"] == pick["first"]]
    modules = sorted({v.get("module") for v in same if v.get("module")})
    return {"verdict": pick["verdict"], "layer": pick["first"], "module": modules[0] if len(modules) == 1 else
            (modules or None), "shows_at": [p for p in ("prefill", "decode") if any(v["phase"] == p for v in same)],
            "positions": sorted({(v["position"]) for v in same}),
            "layers": [{**r, "ratio": _finite(r["ratio"])} for r in rows.values()]}
