"""Drawing the report's plots with matplotlib: inline SVG for the HTML report, PNG/SVG files for ``--plots``.

This module owns the figures: it draws what ``plotdata`` (one run) and ``trend``
(several runs) prepared, and writes them as SVG text or files. It must not read
reports itself beyond those prepared values, compute metrics, or be imported
where no plot is made: matplotlib is imported inside the functions that draw
(Agg backend), so a run without ``--html``/``--plots`` never loads it.

Two themes: ``inline`` draws text and axes in a sentinel colour that becomes
``currentColor`` in the SVG, on a transparent background, so the page's light or
dark colour scheme decides them; ``file`` draws on white for pasting into a PR or
a paper. Data colours are mid-tones that read on both.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

from ..core.jsonio import write_bytes_atomic
from .plotdata import Plot

INK = "#010203"  # sentinel text/axes colour of the inline theme, replaced by currentColor
BLUE, ORANGE, RED, GREEN, PURPLE, GREY = "#4c8bf5", "#e8710a", "#d93025", "#1e8e3e", "#9b59d0", "#8a8f98"
WIDTH_IN = 9.0
KL_FLOOR = 1e-12  # where KL = 0 is drawn on a log colour scale (said under the plot)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _style(theme: str) -> dict[str, Any]:
    ink = INK if theme == "inline" else "#222222"
    return {"text.color": ink, "axes.labelcolor": ink, "axes.edgecolor": ink, "xtick.color": ink,
            "ytick.color": ink, "axes.facecolor": "none", "figure.facecolor": "none" if theme == "inline" else "white",
            "savefig.facecolor": "none" if theme == "inline" else "white", "legend.frameon": False,
            "grid.color": GREY, "grid.alpha": 0.35, "svg.fonttype": "none", "svg.hashsalt": "vllm-rbln-exec",
            "font.size": 10, "axes.spines.top": False, "axes.spines.right": False}


def draw(plot: Plot, theme: str = "inline"):
    """The matplotlib Figure of one prepared plot; None when the plot is missing."""
    if plot.data is None:
        return None
    plt = _pyplot()
    with plt.rc_context(_style(theme)):
        return DRAWERS[plot.name](plt, plot.data)


def _kl_positions(plt, data: dict[str, Any]):
    import numpy as np
    from matplotlib.colors import LogNorm

    rows = data["rows"]
    width = max(len(r["kl"]) for r in rows) or 1
    grid = np.full((len(rows), width), np.nan)
    bad = np.zeros_like(grid, dtype=bool)
    for i, r in enumerate(rows):
        for t, v in enumerate(r["kl"]):
            if v is None:
                bad[i, t] = True
            else:
                grid[i, t] = max(v, KL_FLOOR)
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (KL_FLOOR, 1.0)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 1.4 + 0.32 * len(rows)), layout="constrained")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest",
                      norm=LogNorm(vmin=lo, vmax=max(hi, lo * 10)))
    for i, t in zip(*np.nonzero(bad)):
        ax.add_patch(plt.Rectangle((t - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx", edgecolor=RED, lw=0))
    for i, r in enumerate(rows):
        real = [t for t in r["flips"] if t not in r["near_ties"]]
        ax.scatter(real, [i] * len(real), marker="x", s=40, c=RED, linewidths=2, label="flip" if i == 0 else None)
        ax.scatter(r["near_ties"], [i] * len(r["near_ties"]), marker="o", s=40, facecolors="none",
                   edgecolors=ORANGE, linewidths=1.8, label="flip at a near-tie" if i == 0 else None)
    ax.set_yticks(range(len(rows)), [f"prompt {r['index']}" for r in rows])
    ax.set_xlabel("position (generated token)")
    fig.colorbar(image, ax=ax, label="KL (nats)", pad=0.01)
    _legend_if_any(ax, loc="upper left", bbox_to_anchor=(0, -0.35 if len(rows) < 4 else -0.12), ncols=2)
    return fig


def _legend_if_any(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, **kw)


def _log_bins(values: list[float], lines: list[tuple[str, float]]) -> Any:
    import numpy as np

    everything = [v for v in values if v > 0] + [v for _, v in lines if v and v > 0]
    lo, hi = min(everything), max(everything)
    if lo == hi:
        lo, hi = lo / 10, hi * 10
    return np.logspace(math.log10(lo) - 0.1, math.log10(hi) + 0.1, 40)


def _kl_distribution(plt, data: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.4), layout="constrained")
    lines = data.get("lines") or []
    if "values" in data:
        others = data.get("others") or {}
        pool = data["values"] + [v for vals in others.values() for v in vals]
        bins = _log_bins(pool or [KL_FLOOR], lines)
        ax.hist(data["values"], bins=bins, color=BLUE, alpha=0.8, label="target vs reference")
        for (label, vals), colour in zip(others.items(), (GREY, PURPLE)):
            ax.hist(vals, bins=bins, histtype="step", lw=2, color=colour, label=label)
        ax.set_ylabel("positions")
    else:
        quantiles = data.get("quantiles") or []
        ax.scatter([v for _, v in quantiles if v > 0], [0] * sum(v > 0 for _, v in quantiles), s=60, c=BLUE,
                   zorder=3, label="summary quantiles")
        for q, v in quantiles:
            if v > 0:
                ax.annotate(q, (v, 0), textcoords="offset points", xytext=(0, 10), ha="center")
        ax.set_yticks([])
    for (label, value), colour in zip(lines, (GREEN, ORANGE, GREY, PURPLE)):
        ax.axvline(value, color=colour, lw=1.8, ls="--", label=f"{label} {value:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("KL(reference ‖ target) per position (nats)")
    _legend_if_any(ax, loc="upper left", fontsize=9)
    return fig


def _kl_confidence(plt, data: dict[str, Any]):
    buckets = data["buckets"]
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.2), layout="constrained")
    xs = range(len(buckets))
    means = [b["kl_mean"] if b["count"] and b["kl_mean"] else math.nan for b in buckets]
    maxes = [b["kl_max"] if b["count"] and b["kl_max"] else math.nan for b in buckets]
    ax.bar(xs, means, color=BLUE, alpha=0.85, label="KL mean")
    ax.scatter(xs, maxes, marker="_", s=400, c=RED, linewidths=2.5, label="KL max", zorder=3)
    for x, b in zip(xs, buckets):
        rate = "" if b["top1_rate"] is None else f", top-1 {b['top1_rate']:.3f}"
        text = f"{b['count']} pos.{rate}" if b["count"] else "no positions"
        ax.annotate(text, (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 4), textcoords="offset points",
                    ha="center", fontsize=8)
    ax.set_xticks(list(xs), [b["range"] for b in buckets])
    if any(v > 0 for v in means + maxes if not math.isnan(v)):
        ax.set_yscale("log")
    ax.set_xlabel("reference's top-1 probability")
    ax.set_ylabel("KL (nats)")
    _legend_if_any(ax, loc="upper right", fontsize=9)
    return fig


def _delta_p(plt, data: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.2), layout="constrained")
    colours = (BLUE, ORANGE, GREEN, PURPLE, RED, GREY)
    for n, row in enumerate(data["rows"][:12]):
        pts = [(t, v) for t, v in enumerate(row["dp"]) if v is not None]
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker=".", lw=1, color=colours[n % len(colours)],
                label=f"prompt {row['index']}")
    ax.axhline(0, color=GREY, lw=1)
    for label in ("p01", "p99"):
        if isinstance(data.get(label), (int, float)):
            ax.axhline(data[label], color=GREY, lw=1, ls=":")
    ax.set_xlabel("position")
    ax.set_ylabel("Δp of the reference token")
    if len(data["rows"]) > 12:
        ax.set_title(f"first 12 of {len(data['rows'])} prompts", fontsize=9)
    _legend_if_any(ax, loc="upper left", fontsize=8, ncols=4)
    return fig


def _flips(plt, data: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.4), layout="constrained")
    pts = data["points"]
    agree = [(m, max(k, KL_FLOOR)) for m, k, ok in pts if ok and math.isfinite(m)]
    flip = [(m, max(k, KL_FLOOR)) for m, k, ok in pts if not ok and math.isfinite(m)]
    ax.scatter([m for m, _ in agree], [k for _, k in agree], s=10, c=BLUE, alpha=0.6, label="same argmax",
               rasterized=len(agree) > 2000)
    ax.scatter([m for m, _ in flip], [k for _, k in flip], s=50, marker="x", c=RED, linewidths=2, label="argmax flip")
    ax.axvline(data["tie_margin"], color=ORANGE, ls="--", lw=1.5, label=f"near-tie margin {data['tie_margin']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("reference's top-1 minus top-2 logprob (nats)")
    ax.set_ylabel("KL (nats)")
    _legend_if_any(ax, loc="upper right", fontsize=9)
    return fig


def _layers(plt, data: dict[str, Any]):
    rows = data["layers"]
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.4), layout="constrained")
    xs = [i for i, (_, v, _) in enumerate(rows) if v is not None]
    ax.plot(xs, [max(rows[i][1], 1e-12) for i in xs], marker="o", color=BLUE, label="target vs reference")
    yard = [i for i, (_, _, y) in enumerate(rows) if y is not None]
    if yard:
        ax.plot(yard, [max(rows[i][2], 1e-12) for i in yard], marker="s", ls="--", color=ORANGE,
                label="yardstick vs reference")
    if isinstance(data.get("threshold"), (int, float)):
        ax.axhline(data["threshold"], color=RED, ls="--", lw=1.5, label=f"K x floor {data['threshold']:g}")
    names = [name for name, _, _ in rows]
    if data.get("first_over") in names:
        ax.axvline(names.index(data["first_over"]), color=RED, alpha=0.4,
                   label=f"{data.get('verdict') or 'departs'}: {data['first_over']}")
    step = max(1, len(rows) // 24)
    ax.set_xticks(range(0, len(rows), step), [rows[i][0] for i in range(0, len(rows), step)], rotation=45,
                  ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("relative L2 error (max over positions)")
    _legend_if_any(ax, loc="upper left", fontsize=9)
    return fig


def _speed(plt, data: dict[str, Any]):
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 0.9 + 0.5 * len(rows)), layout="constrained")
    ax.barh(range(len(rows)), [ms for _, ms, _ in rows], color=[ORANGE if p else BLUE for _, _, p in rows])
    ax.set_yticks(range(len(rows)), [f"{label}{' (profiled)' if p else ''}" for label, _, p in rows])
    for y, (_, ms, _) in enumerate(rows):
        ax.annotate(f"{ms:.2f} ms", (ms, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=9)
    ax.set_xlabel("ms per generated token (wall time of the measured generation)")
    ax.invert_yaxis()
    return fig


def _label_groups(points: list[dict[str, Any]], x: str, key: str, log: bool) -> list[tuple[str, float, float]]:
    """One label per cluster of points that would print over each other (x within 5 %, y within 25 % on a log
    axis or 4 % of the span on a linear one): their names joined, at the cluster's highest point."""
    ys = [p[key] for p in points]
    span = (max(ys) - min(ys)) or 1.0
    groups: list[list[dict[str, Any]]] = []
    for p in sorted(points, key=lambda q: q[key]):
        for group in groups:
            last = group[-1]
            near_x = abs(p[x] - last[x]) <= 0.05 * max(abs(last[x]), 1e-12)
            near_y = (p[key] <= last[key] * 1.25) if log else (p[key] - last[key] <= 0.04 * span)
            if near_x and near_y:
                group.append(p)
                break
        else:
            groups.append([p])
    return [(", ".join(q["label"] for q in reversed(g)), g[-1][x], g[-1][key]) for g in groups]


def _corpus(plt, data: dict[str, Any]):
    """Two panels over the same x (bits per weight, or MiB): KL mean ± s.e. (log) and perplexity."""
    points, x = data["points"], data["x"]
    fig, (kl_ax, ppl_ax) = plt.subplots(1, 2, figsize=(WIDTH_IN, 3.8), layout="constrained")
    reference = next((p for p in points if p["role"] == "reference"), None)
    yardstick = next((p for p in points if p["role"] == "yardstick"), None)
    targets = [p for p in points if p["role"] not in ("reference", "yardstick")]
    for ax, key in ((kl_ax, "kl_mean"), (ppl_ax, "ppl")):
        pts = [p for p in targets if isinstance(p[key], (int, float)) and p[key] > 0]
        errs = [p["kl_sem"] or 0 for p in pts] if key == "kl_mean" else None
        ax.errorbar([p[x] for p in pts], [p[key] for p in pts], yerr=errs, fmt="o", color=BLUE, capsize=3,
                    label="targets")
        for label, px, py in _label_groups(pts, x, key, log=key == "kl_mean"):
            ax.annotate(label, (px, py), xytext=(5, 4), textcoords="offset points", fontsize=8)
        if yardstick is not None and isinstance(yardstick[key], (int, float)) and yardstick[key] > 0:
            ax.axhline(yardstick[key], color=ORANGE, ls="--", lw=1.2, label=f"yardstick: {yardstick['what']}")
            ax.plot([yardstick[x]], [yardstick[key]], marker="D", color=ORANGE, ls="none")
        if reference is not None:
            ax.axvline(reference[x], color=GREEN, ls=":", lw=1.5, label="reference")
            if key == "ppl" and isinstance(reference["ppl"], (int, float)):
                ax.plot([reference[x]], [reference["ppl"]], marker="*", ms=12, color=GREEN, ls="none")
                ax.axhline(reference["ppl"], color=GREEN, ls=":", lw=1)
        ax.set_xlabel(data["xlabel"], fontsize=9)
        ax.grid(True, which="major")
    if any(isinstance(p["kl_mean"], (int, float)) and p["kl_mean"] > 0 for p in targets):
        kl_ax.set_yscale("log")
    if x == "bpw":  # each halving of the bits is one step along x
        lo, hi = min(p[x] for p in points), max(p[x] for p in points)
        ticks = [2.0 ** k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
        for ax in (kl_ax, ppl_ax):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
    kl_ax.set_ylabel("KL(reference ‖ side), mean (nats)")
    ppl_ax.set_ylabel("perplexity of the corpus")
    _legend_if_any(kl_ax, loc="best", fontsize=8)
    fig.suptitle(data["heading"], fontsize=9)
    return fig


def trend_figure(series: list[dict[str, Any]], names: list[str], theme: str = "inline"):
    """Small multiples: one panel per key metric, the runs in the order given along x."""
    plt = _pyplot()
    with plt.rc_context(_style(theme)):
        cols = 3
        nrows = max(1, math.ceil(len(series) / cols))
        fig, axes = plt.subplots(nrows, cols, figsize=(WIDTH_IN, 2.4 * nrows), layout="constrained", squeeze=False)
        for ax, s in zip(axes.flat, series):
            pts = [(i, v) for i, v in enumerate(s["values"]) if v is not None]
            ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o", color=BLUE)
            gaps = [i for i, v in enumerate(s["values"]) if v is None]
            for i in gaps:
                ax.axvline(i, color=GREY, ls=":", lw=1)
            if s.get("log") and pts and all(v > 0 for _, v in pts):
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_title(s["label"] + (" (dotted: not in that run)" if gaps else ""), fontsize=9)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        for ax in list(axes.flat)[len(series):]:
            ax.set_visible(False)
        return fig


DRAWERS = {"kl-positions": _kl_positions, "kl-distribution": _kl_distribution, "kl-confidence": _kl_confidence,
           "delta-p": _delta_p, "flips": _flips, "layers": _layers, "speed": _speed, "corpus-bits": _corpus,
           "corpus-memory": _corpus}


def svg_text(fig, prefix: str) -> str:
    """The figure as inline ``<svg>``: sentinel ink -> currentColor, ids made unique, scaling with its box."""
    buffer = io.StringIO()
    with _pyplot().rc_context(_style("inline")):  # svg.* settings are read when saving
        fig.savefig(buffer, format="svg", transparent=True, metadata={"Date": None})  # the same run, the same page
    _close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = text.replace(INK, "currentColor")
    ids = set(re.findall(r'id="([^"]+)"', text))
    for name in sorted(ids, key=len, reverse=True):
        text = re.sub(rf'(id="|#){re.escape(name)}(?=["\)])', rf"\g<1>{prefix}-{name}", text)
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 role="img"', text, count=1)


def write_files(fig, folder: Path, stem: str, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    out = []
    with _pyplot().rc_context(_style("file")):
        for ext in formats:
            path = folder / f"{stem}.{ext}"
            buffer = io.BytesIO()  # drawn first: savefig(path) would open a FIFO there and block
            fig.savefig(buffer, format=ext, dpi=110, metadata={"Date": None} if ext == "svg" else None)
            out.append(write_bytes_atomic(path, buffer.getvalue()))
    _close(fig)
    return out


def _close(fig) -> None:
    _pyplot().close(fig)
