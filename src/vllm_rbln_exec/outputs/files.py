"""Machine-readable reports of a judged run: combined JSON, JUnit XML, a markdown summary.

This module owns the three CI-facing files written from a report dict
(``RunResult.to_json()``), its :class:`~vllm_rbln_exec.verdict.judge.Verdict` and an
optional noise floor. It formats only: it must not compute metrics, judge gates
(``gate``), render the terminal report (``report``), or import torch or vLLM.

JSON numbers: NaN and ±inf have no JSON spelling; every non-finite float is
written as ``null``, the convention ``metrics`` already uses for report.json (a
KL of +inf shows up as ``kl_nonfinite`` > 0, never as a number). The files are
written with ``allow_nan=False``, so nothing non-standard can slip through.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..compare.catalogue import OVERALL, PROMPT, key_metrics, label, metric_value
from ..compare.yardstick import ratio_table
from ..core.jsonio import strict_json, write_text_atomic
from ..verdict.judge import Verdict
from ..verdict.noise import NoiseFloor, noise_from_json, noise_to_json
from .saved import PARITY_REPORT_KIND, PARITY_REPORT_SCHEMA_VERSION, read_report, split_report

SUITE_NAME = "vllm-rbln-exec"
MAX_MARKDOWN_PROMPTS = 20
MAX_MARKDOWN_VIOLATIONS = 25
MAX_MARKDOWN_WORST = 5


# -- combined JSON ------------------------------------------------------------------
def combined_report(run_json: dict[str, Any], verdict: Verdict, noise: NoiseFloor | dict | None = None) -> dict:
    """The combined document: the run report untouched under ``run``, the verdict and noise beside it."""
    noise_json = noise if isinstance(noise, dict) or noise is None else noise_to_json(noise)
    return strict_json({
        "schema_version": PARITY_REPORT_SCHEMA_VERSION,
        "kind": PARITY_REPORT_KIND,
        "passed": verdict.passed,
        "verdict": verdict.to_json(),
        "noise": noise_json,
        "run": run_json,
    })  # fmt: skip


def write_json(path: str | Path, run_json: dict[str, Any], verdict: Verdict,
               noise: NoiseFloor | dict | None = None) -> Path:
    """Write the combined report atomically (a temporary file in the same folder, then a rename)."""
    text = json.dumps(combined_report(run_json, verdict, noise), indent=2, allow_nan=False)
    return write_text_atomic(Path(path), text + "\n")


def load_report(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """(run_json, verdict or None, noise or None) from a combined report or a plain report.json, read within
    the limits of ``saved`` and checked against its schema (``saved.ReportError``, a ValueError, naming the field)."""
    return split_report(read_report(path))


def add_to_report(path: str | Path, key: str, value: Any) -> Path:
    """Put ``value`` under ``key`` of the run in a saved report (combined or plain), everything else untouched."""
    data = read_report(path)
    split_report(data)
    run = data["run"] if isinstance(data, dict) and data.get("kind") == PARITY_REPORT_KIND else data
    run[key] = value
    return write_text_atomic(Path(path), json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n")


# -- JUnit XML ----------------------------------------------------------------------
def write_junit(path: str | Path, run_json: dict[str, Any], verdict: Verdict) -> Path:
    """One ``<testsuite>``: an ``overall`` testcase, then ``prompt_<i>`` per prompt."""
    comparisons = run_json.get("comparisons") or []
    classname = f"vllm_rbln_exec.{_ident(run_json.get('model', 'model'))}.{_ident(run_json.get('target', 'target'))}"
    elapsed = sum(float((s or {}).get("elapsed_s") or 0.0) for s in (run_json.get("sides") or {}).values())

    cases: list[tuple[str, float, list[str], str]] = []
    overall = [v.message for v in verdict.violations if v.scope == OVERALL]
    cases.append(("overall", elapsed, overall, _overall_text(run_json, verdict)))
    for i, comp in enumerate(comparisons):
        index = comp.get("index", i)
        messages = [v.message for v in verdict.violations if v.scope == PROMPT and v.prompt_index == index]
        cases.append((f"prompt_{index}", 0.0, messages, "\n".join([_prompt_text(comp),
                                                                      *_yardstick_lines(run_json, i)])))
    failures = sum(1 for _, _, messages, _ in cases if messages)

    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": "0", "skipped": "0",
              "time": f"{elapsed:.3f}"}
    root = ET.Element("testsuites", {"name": SUITE_NAME, **{k: counts[k] for k in ("tests", "failures", "errors", "time")}})
    suite = ET.SubElement(root, "testsuite", {
        "name": SUITE_NAME, **counts, "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
    })  # fmt: skip
    props = ET.SubElement(suite, "properties")
    for name, value in _properties(run_json, verdict):
        ET.SubElement(props, "property", {"name": name, "value": _xml_text(value)})
    for name, seconds, messages, text in cases:
        case = ET.SubElement(suite, "testcase", {"classname": classname, "name": name, "time": f"{seconds:.3f}"})
        if messages:
            failure = ET.SubElement(case, "failure", {"message": _xml_text(messages[0]), "type": "ParityViolation"})
            failure.text = _xml_text("\n".join(messages))
        out = ET.SubElement(case, "system-out")
        out.text = _xml_text(text)
    ET.indent(root)
    data = ET.tostring(root, encoding="unicode", xml_declaration=False)
    return write_text_atomic(Path(path), '<?xml version="1.0" encoding="UTF-8"?>\n' + data + "\n")


def _properties(run_json: dict[str, Any], verdict: Verdict) -> list[tuple[str, str]]:
    sides = run_json.get("sides") or {}
    out = [("model", str(run_json.get("model", ""))), ("target", str(run_json.get("target", "")))]
    for side in ("reference", "target"):
        s = sides.get(side) or {}
        out.append((f"{side}_side", f"{s.get('device', '?')} {s.get('engine', '?')} {s.get('engine_version', '')} "
                               f"{s.get('dtype', '?')}".replace("  ", " ")))
    yard = run_json.get("yardstick")
    if isinstance(yard, dict):
        y = yard.get("side") or {}
        out.append(("yardstick_side", f"{y.get('device', '?')} {y.get('engine', '?')} {y.get('engine_version', '')} "
                                      f"{y.get('dtype', '?')} ({y.get('source', '?')})".replace("  ", " ")))
    out.append(("passed", str(verdict.passed).lower()))
    out.append(("gates", ", ".join(c["gate"] for c in verdict.checked)))
    for s in verdict.skipped:
        out.append(("skipped", f"{s['gate']}: {s['reason']}"))
    return out


def _overall_text(run_json: dict[str, Any], verdict: Verdict) -> str:
    summary = run_json.get("summary") or {}
    lines = [f"{label}: {_num(metric_value(summary, path))}" for label, path, _ in KEY_METRICS]
    lines += _yardstick_lines(run_json, None)
    lines += list(getattr(verdict, "findings", None) or [])
    lines += [f"note: {n}" for n in verdict.notes]
    lines += [f"warning: {w}" for w in verdict.warnings]
    return "\n".join(lines)


def _yardstick_lines(run_json: dict[str, Any], index: int | None) -> list[str]:
    """``yardstick <metric>: target T, yardstick Y, ratio R`` for the run (``index`` None) or one prompt."""
    if not isinstance(run_json.get("yardstick"), dict):
        return []
    table = ratio_table(run_json)
    rows = table["overall"] if index is None else (table["prompts"][index] if index < len(table["prompts"]) else {})
    return [f"yardstick {label(path)}: target {_num(r['target'])}, yardstick {_num(r['yardstick'])}, "
            f"ratio {_num(r['ratio'])}" for path, r in rows.items()]


def _prompt_text(comp: dict[str, Any]) -> str:
    lines = [f"prompt: {comp.get('prompt', '')}"]
    lines += [f"{label}: {_num(metric_value(comp, path))}" for label, path in PROMPT_METRICS]
    div = comp.get("argmax_divergence")
    if div:
        lines.append(f"first argmax divergence: position {div.get('position')} ({div.get('kind')}, "
                     f"margin {_num(div.get('margin'))} nats)")
    return "\n".join(lines)


# -- markdown -----------------------------------------------------------------------
# (label, dotted path, scope of the tolerance that applies); labels and order come from the catalogue
KEY_METRICS = [(label, path, OVERALL) for label, path in key_metrics(OVERALL)]
PROMPT_METRICS = key_metrics(PROMPT)  # (label, dotted path)


def write_markdown(path: str | Path, run_json: dict[str, Any], verdict: Verdict,
                   noise: NoiseFloor | dict | None = None) -> Path:
    return write_text_atomic(Path(path), markdown_summary(run_json, verdict, noise))


def markdown_summary(run_json: dict[str, Any], verdict: Verdict, noise: NoiseFloor | dict | None = None) -> str:
    """A short PR comment: verdict, setup, key metrics, prompts, violations, worst positions."""
    if isinstance(noise, dict):
        noise = noise_from_json(noise)
    n_gates = len(verdict.checked)
    if verdict.passed:
        lines = [f"### ✅ Parity holds ({n_gates} tolerances checked)"]
    else:
        n = len(verdict.violations)
        lines = [f"### ❌ Parity fails: {n} violation{'s' if n != 1 else ''} ({n_gates} tolerances checked)"]
    lines += ["", _setup_line(run_json), ""]
    lines += _md_key_metrics(run_json.get("summary") or {}, verdict, noise)
    lines += _md_yardstick(run_json)
    lines += _md_findings(verdict)
    lines += _md_prompts(run_json.get("comparisons") or [], verdict)
    lines += _md_violations_and_worst(run_json.get("comparisons") or [], verdict)
    return "\n".join(lines) + "\n"


def _md_key_metrics(summary: dict[str, Any], verdict: Verdict, noise: NoiseFloor | None) -> list[str]:
    tolerances: dict[tuple[str, str], list[str]] = {}
    for c in verdict.checked:
        # the argmax rule is judged per prompt but reads best next to the mismatch count
        key = (OVERALL, "confident_mismatches") if c.get("path") == "argmax_divergence" else (c.get("scope"), c.get("path"))
        tolerances.setdefault(key, []).append(c["gate"])
    header = "| metric | value | tolerance |" if noise is None else "| metric | value | noise | tolerance |"
    lines = [header, "|---|---|---|" + ("---|" if noise is not None else "")]
    failed_paths = {v.path for v in verdict.violations if v.scope == OVERALL}
    for name, path, scope in KEY_METRICS:
        shown = _num(metric_value(summary, path))
        if path == "distribution.kl_mean" and metric_value(summary, "distribution.kl_sem") is not None:
            shown += f" ± {_num(metric_value(summary, 'distribution.kl_sem'))}"
        if path == "distribution.top1_rate" and metric_value(summary, "distribution.top1_se") is not None:
            shown += f" ± {_num(metric_value(summary, 'distribution.top1_se'))}"
        mark = " ❌" if path in failed_paths else ""
        tol = ", ".join(f"`{t}`" for t in tolerances.get((scope, path), [])) or "–"
        cells = [_md_cell(name), shown + mark]
        if noise is not None:
            cells.append(_num(noise.value(path)))
        lines.append("| " + " | ".join([*cells, tol]) + " |")
    return lines


def _md_findings(verdict: Verdict) -> list[str]:
    """The verdict's warnings (a top-N run's bounds, a float32 side that ran TF32) and findings, as a list."""
    found = [f"⚠️ {w}" for w in verdict.warnings] + list(getattr(verdict, "findings", None) or [])
    return ["", *[f"- {_md_inline(f)}" for f in found]] if found else []


def _md_yardstick(run_json: dict[str, Any]) -> list[str]:
    """The yardstick table: the target's value, the yardstick's and their ratio, overall and per prompt."""
    yard = run_json.get("yardstick")
    if not isinstance(yard, dict):
        return []
    side = yard.get("side") or {}
    table = ratio_table(run_json)
    paths = list(table["overall"])
    lines = ["", f"**Yardstick**: {side.get('engine', '?')} {side.get('dtype', '?')} on `{side.get('device', '?')}` "
             f"({_md_inline(str(yard.get('why', '')))}); ratio = target / max(yardstick, floor)", "",
             "| | " + " | ".join(f"{_md_cell(label(p))}: target / yardstick / ratio" for p in paths) + " |",
             "|---" * (len(paths) + 1) + "|"]
    rows = [("overall", table["overall"])] + [(f"prompt {i}", r) for i, r in enumerate(table["prompts"])]
    for name, row in rows[:MAX_MARKDOWN_PROMPTS + 1]:
        cells = [f"{_num(row[p]['target'])} / {_num(row[p]['yardstick'])} / **{_num(row[p]['ratio'])}**"
                 for p in paths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _md_prompts(comparisons: list[dict[str, Any]], verdict: Verdict) -> list[str]:
    if not comparisons:
        return []
    lines = ["", "| # | prompt | " + " | ".join(_md_cell(label) for label, _ in PROMPT_METRICS)
             + " | argmax divergence | |", "|---" * (len(PROMPT_METRICS) + 4) + "|"]
    failing = {v.prompt_index for v in verdict.violations if v.scope == PROMPT}
    for i, comp in enumerate(comparisons[:MAX_MARKDOWN_PROMPTS]):
        index = comp.get("index", i)
        div = comp.get("argmax_divergence")
        div_text = f"{div.get('kind')} @ {div.get('position')}" if div else "–"
        cells = [str(index), _md_cell(_shorten(comp.get("prompt", ""), 40))]
        cells += [_num(metric_value(comp, path)) for _, path in PROMPT_METRICS]
        cells += [div_text, "❌" if index in failing else "✅"]
        lines.append("| " + " | ".join(cells) + " |")
    if len(comparisons) > MAX_MARKDOWN_PROMPTS:
        lines.append(f"\n… and {len(comparisons) - MAX_MARKDOWN_PROMPTS} more prompts (see the JSON report)")
    return lines


def _md_violations_and_worst(comparisons: list[dict[str, Any]], verdict: Verdict) -> list[str]:
    lines: list[str] = []
    if verdict.violations:
        lines += ["", "**Violations**", ""]
        for v in verdict.violations[:MAX_MARKDOWN_VIOLATIONS]:
            lines.append(f"- {_md_inline(v.message)} — _{_md_inline(v.source)}_")
        if len(verdict.violations) > MAX_MARKDOWN_VIOLATIONS:
            lines.append(f"- … and {len(verdict.violations) - MAX_MARKDOWN_VIOLATIONS} more")
    worst = _worst_positions(comparisons)
    if worst:
        lines += ["", "**Worst positions by KL**", "",
                  "| prompt | position | KL | reference token | target argmax | reference top-1 p |",
                  "|---|---|---|---|---|---|"]
        for index, entry in worst:
            lines.append(f"| {index} | {entry.get('position')} | {_num(entry.get('kl'))} | "
                         f"{entry.get('reference_token')} | {entry.get('target_argmax')} | "
                         f"{_num(entry.get('reference_top1_prob'))} |")
    extra = [f"- skipped `{s['gate']}`: {_md_inline(s['reason'])}" for s in verdict.skipped]
    if extra:
        lines += ["", "**Not checked**", "", *extra]
    return lines


def _setup_line(run_json: dict[str, Any]) -> str:
    sides = run_json.get("sides") or {}
    settings = run_json.get("settings") or {}

    def side(name: str) -> str:
        s = sides.get(name) or {}
        engine = " ".join(x for x in (s.get("engine"), s.get("engine_version")) if x)
        return f"`{s.get('device', '?')}` ({engine or '?'}, {s.get('dtype') or 'auto'})"

    summary = run_json.get("summary") or {}
    return (f"**{_md_inline(str(run_json.get('model', '?')))}** · target {side('target')} vs reference "
            f"{side('reference')} · align {settings.get('align', '?')} · {summary.get('prompts', 0)} prompts, "
            f"{summary.get('positions_compared', 0)} positions")


def _worst_positions(comparisons: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Largest-KL positions over all prompts; a null KL (inf or NaN) ranks first, a zero KL is left out."""
    entries = [(c.get("index", i), e) for i, c in enumerate(comparisons) for e in c.get("worst_positions") or []
               if e.get("kl") is None or e.get("kl") > 0]
    ranked = sorted(entries, key=lambda item: -(item[1].get("kl") if item[1].get("kl") is not None else math.inf))
    return ranked[:MAX_MARKDOWN_WORST]


# -- helpers ------------------------------------------------------------------------
def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() and abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def _ident(name: Any) -> str:
    """A classname component that CI tools do not split into packages (no dots or slashes)."""
    text = str(name).rstrip("/")
    if text.startswith(("/", "./", "../", "~")):  # a model folder: its name says enough
        text = Path(text).name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text) or "unnamed"


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _XML_INVALID.sub("\ufffd", str(text))


def _shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _md_cell(text: str) -> str:
    return _md_inline(text).replace("|", "\\|")


def _md_inline(text: str) -> str:
    """One line, no HTML: a prompt could otherwise open a tag in the rendered comment."""
    return " ".join(_XML_INVALID.sub("\ufffd", str(text)).split()).replace("<", "&lt;")
