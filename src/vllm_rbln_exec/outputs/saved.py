"""A saved report read back: a bounded read and a schema check, before anything judges or renders it.

A ``parity.json`` (or a schema-1 ``report.json``, or a ``--json`` report) travels: CI artifacts, a
colleague's run folder. The verdict and every writer read it through many ``.get`` chains that trust its
types, so this module checks, once on load, what they read: the size of the file, the nesting depth,
the schema versions this harness knows, the type of every field the verdict and the reports read (every
metric of the catalogue in the summary and in each prompt's record, and the records around them), and
the range of the agreement rates. A violation is a ``ReportError`` (a ``ValueError``) of one sentence
naming the field; callers turn it into a usage error (exit 2). NaN and ±Infinity, which no writer of this
harness emits (``files`` writes them as null), are read as null, so a tolerance on such a number fails
as "not measured" instead of comparing false against every limit.

It reads and checks only: it must not judge, render, write, or import anything heavy. Fields it does not
name keep the types the writers gave them; a report that breaks one of those is caught by the caller
(``cli.saved``) as a damaged report, never shown as a traceback.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ..compare.catalogue import OVERALL, PROMPT, report_paths
from ..verdict.noise import MODES

PARITY_REPORT_KIND = "vllm-rbln-exec/parity-report"
PARITY_REPORT_SCHEMA_VERSION = 1  # the combined document ``files`` writes
REPORT_SCHEMAS = (PARITY_REPORT_SCHEMA_VERSION,)
RUN_SCHEMAS = (1, 2)  # the run inside it (pipeline.result.REPORT_SCHEMA_VERSION), or a plain report.json
# A parity.json grows by ~220 bytes per compared position (its plot series and worst positions; the fake
# engine's 16 prompts x 64 tokens: 255 KB, 2 x 6: 30 KB; docs/robustness.md has the command), so 256 MiB is
# over a million positions, far beyond any run, and json.loads of that much costs a few GB: reading stops there.
MAX_REPORT_BYTES = 256 * 2**20
MAX_DEPTH = 32  # a run's own report nests 8 deep; repeats, the yardstick and a localisation add a few
MAX_TEXT = 4 * 2**20  # characters of one string (a long prompt of a long-context run)
RATES = ("top1_rate", "top1_match", "topk_overlap", "topk_order_match", "jaccard_mean", "rank_agreement_mean",
         "finite_overlap")  # shares: outside [0, 1] they are not what their name says

NUMBER = (int, float)
INT = (int,)
TEXT = (str,)
OBJECT = (dict,)
LIST = (list,)
OPTIONAL = (type(None),)
TYPE_NAMES = {int: "a number", float: "a number", str: "a string", dict: "an object", list: "a list",
              bool: "true or false", type(None): "null"}

# field -> allowed types, for the records around the metrics that the verdict and the writers read
RUN_FIELDS = {
    "model": TEXT, "target": TEXT, "run_dir": TEXT + OPTIONAL, "model_path": TEXT + OPTIONAL,
    "settings": OBJECT, "options": OBJECT, "resolved": OBJECT, "prompts": LIST, "sides": OBJECT,
    "comparisons": LIST, "summary": OBJECT, "notes": LIST + OPTIONAL, "cache": OBJECT + OPTIONAL,
    "reference_tokens": LIST + OPTIONAL, "repeats": LIST + OPTIONAL, "reference_self": OBJECT + OPTIONAL,
    "yardstick": OBJECT + OPTIONAL, "localization": OBJECT + OPTIONAL, "harness_version": TEXT + OPTIONAL,
}
SIDE_FIELDS = {"device": TEXT + OPTIONAL, "engine": TEXT + OPTIONAL, "engine_version": TEXT + OPTIONAL,
               "dtype": TEXT + OPTIONAL, "platform": TEXT + OPTIONAL, "source": TEXT + OPTIONAL,
               "elapsed_s": NUMBER + OPTIONAL, "env": OBJECT + OPTIONAL, "engine_args": OBJECT + OPTIONAL,
               "effective": OBJECT + OPTIONAL, "timings": OBJECT + OPTIONAL, "profile": OBJECT + OPTIONAL}
COMPARISON_FIELDS = {
    "index": (int,), "prompt": TEXT, "reference_text": TEXT + OPTIONAL, "target_text": TEXT + OPTIONAL,
    "distribution": OBJECT + OPTIONAL, "argmax_divergence": OBJECT + OPTIONAL, "worst_positions": LIST + OPTIONAL,
    "notes": LIST + OPTIONAL, "snippet": OBJECT + OPTIONAL, "first_position_topk": OBJECT + OPTIONAL,
    "series": OBJECT + OPTIONAL, "worst_position": (int,) + OPTIONAL, "first_divergence": (int,) + OPTIONAL,
    "vocab_size": INT, "eps": NUMBER + OPTIONAL, "topk": INT + OPTIONAL,
}
SETTINGS_FIELDS = {name: INT + OPTIONAL for name in ("max_model_len", "num_hidden_layers", "tp", "pp", "dp", "batch",
                                                     "max_tokens", "max_batched", "logprobs", "max_logprobs_cap",
                                                     "topk", "block", "repeat")}
SETTINGS_FIELDS.update({name: NUMBER + OPTIONAL for name in ("eps", "tie_margin")})
SETTINGS_FIELDS.update({name: TEXT + OPTIONAL for name in ("align", "capture", "store", "model", "target",
                                                           "reference_dtype", "target_dtype")})
TOPK_FIELDS = {"position": INT + OPTIONAL, "target_ids": LIST, "target_vals": LIST, "reference_ids": LIST,
               "reference_vals": LIST}
SNIPPET_FIELDS = {"reference": LIST, "target": LIST}
DISTRIBUTION_FIELDS = {"kl_buckets": LIST, "tie_margin": NUMBER + OPTIONAL, "topk": (int,) + OPTIONAL}
DIVERGENCE_FIELDS = {"position": (int,) + OPTIONAL, "kind": TEXT + OPTIONAL, "margin": NUMBER + OPTIONAL}
WORST_FIELDS = {"position": INT, "reference_token": INT, "target_argmax": INT, "kl": NUMBER + OPTIONAL,
                "reference_topk": LIST, "target_topk": LIST, "reference_top1_prob": NUMBER + OPTIONAL}
BUCKET_FIELDS = {"range": TEXT, "count": NUMBER + OPTIONAL, "kl_mean": NUMBER + OPTIONAL,
                 "kl_max": NUMBER + OPTIONAL, "top1_rate": NUMBER + OPTIONAL}
VERDICT_FIELDS = {"passed": (bool,), "violations": LIST, "checked": LIST, "skipped": LIST, "notes": LIST,
                  "warnings": LIST, "findings": LIST}
NOISE_FIELDS = {"mode": TEXT, "runs": (int,), "sources": LIST + OPTIONAL, "overall": OBJECT + OPTIONAL,
                "prompts": LIST + OPTIONAL, "estimator": TEXT + OPTIONAL}
NOISE_MODES = set(MODES)  # merged floors join them with "+"
SPREAD_FIELDS = {"values": LIST + OPTIONAL, "mean": NUMBER + OPTIONAL, "std": NUMBER + OPTIONAL,
                 "noise": NUMBER + OPTIONAL}


class ReportError(ValueError):
    """A saved report that this harness cannot read as one: the message names the field."""


def read_report(path: str | Path) -> dict[str, Any]:
    """The parsed document of a saved report, within the limits above; ReportError (or OSError) otherwise.

    The path must be a regular file (checked without opening it: a FIFO would block the open)."""
    path = Path(path)
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ReportError("it is not a regular file")
    if info.st_size > MAX_REPORT_BYTES:
        raise ReportError(f"it holds {info.st_size / 2**20:.0f} MiB, above the {MAX_REPORT_BYTES >> 20} MiB "
                          "a saved report may hold")
    with open(path, "rb") as f:
        raw = f.read(MAX_REPORT_BYTES + 1)
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=lambda _name: None)
    except RecursionError:
        raise ReportError(f"it nests deeper than the {MAX_DEPTH} levels a saved report may") from None
    except UnicodeDecodeError:
        raise ReportError("it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"it is not JSON ({exc.msg} at line {exc.lineno})") from None
    _check_depth(data)
    return data


def split_report(data: Any) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """(run, verdict, noise) of a checked document: a combined report, or a plain run report."""
    if not isinstance(data, dict):
        raise ReportError(f"it holds {_kind(data)}, not a report object")
    if data.get("kind") == PARITY_REPORT_KIND:
        _check_version(data.get("schema_version"), REPORT_SCHEMAS, "report")
        run, verdict, noise = data.get("run"), data.get("verdict"), data.get("noise")
        _check_fields(data, {"run": OBJECT, "verdict": OBJECT + OPTIONAL, "noise": OBJECT + OPTIONAL,
                             "passed": (bool,) + OPTIONAL}, "")
        if verdict is not None:
            _check_fields(verdict, VERDICT_FIELDS, "verdict.")
        if noise is not None:
            check_noise(noise)
    else:
        run, verdict, noise = data, None, None
    check_run(run)
    return run, verdict, noise


def check_run(run: dict[str, Any], where: str = "") -> None:
    """The run record: its schema version, the records around the metrics, every metric's type and range."""
    if "schema_version" in run:
        _check_version(run.get("schema_version"), RUN_SCHEMAS, f"{where or 'run '}")
    _check_fields(run, RUN_FIELDS, where)
    _check_fields(run.get("settings") or {}, SETTINGS_FIELDS, f"{where}settings.")
    if isinstance(run.get("yardstick"), dict):
        _check_fields(run["yardstick"], {"side": OBJECT + OPTIONAL, "why": TEXT + OPTIONAL}, f"{where}yardstick.")
        _check_fields(run["yardstick"].get("side") or {}, SIDE_FIELDS, f"{where}yardstick.side.")
    _check_items(run.get("prompts") or [], TEXT, f"{where}prompts")
    _check_items(run.get("notes") or [], TEXT, f"{where}notes")
    for i, tokens in enumerate(run.get("reference_tokens") or []):
        _check_type(tokens, LIST, f"{where}reference_tokens[{i}]")
        _check_items(tokens, INT, f"{where}reference_tokens[{i}]")
    for name, side in (run.get("sides") or {}).items():
        _check_fields(side, SIDE_FIELDS, f"{where}sides.{name}.", OBJECT)
    _check_results(run, where)
    for i, repeat in enumerate(run.get("repeats") or []):
        _check_type(repeat, OBJECT, f"{where}repeats[{i}]")
        _check_results(repeat, f"{where}repeats[{i}].")
    for key in ("reference_self", "yardstick"):
        if isinstance(run.get(key), dict):
            _check_results(run[key], f"{where}{key}.", required=False)


def check_noise(noise: dict[str, Any]) -> None:
    """The noise floor beside the run (``verdict.noise.noise_to_json``): its mode, and numbers where numbers go."""
    _check_fields(noise, NOISE_FIELDS, "noise.")
    if not set(str(noise.get("mode", "repeats")).split("+")) <= NOISE_MODES:
        raise ReportError(f"noise.mode is {_kind(noise.get('mode'))}, not one of {', '.join(sorted(NOISE_MODES))}")
    _check_items(noise.get("sources") or [], TEXT, "noise.sources")
    tables = [("noise.overall", noise.get("overall") or {})]
    tables += [(f"noise.prompts[{i}]", t) for i, t in enumerate(noise.get("prompts") or [])]
    for where, table in tables:
        _check_type(table, OBJECT, where)
        for path, spread in table.items():
            _check_fields(spread, SPREAD_FIELDS, f"{where}.{path}.", OBJECT)
            _check_items(spread.get("values") or [], NUMBER + OPTIONAL, f"{where}.{path}.values")


def _check_results(record: dict[str, Any], where: str, required: bool = True) -> None:
    """``summary`` and ``comparisons`` of a run (or of a repeat, the reference's self-check, the yardstick)."""
    summary, comparisons = record.get("summary"), record.get("comparisons")
    if required and ("summary" not in record or "comparisons" not in record):
        raise ReportError(f"it has no {where}summary or {where}comparisons")
    _check_type(summary, OBJECT + OPTIONAL, f"{where}summary")
    _check_type(comparisons, LIST + OPTIONAL, f"{where}comparisons")
    _check_metrics(summary or {}, OVERALL, f"{where}summary.")
    for i, comp in enumerate(comparisons or []):
        at = f"{where}comparisons[{i}]."
        _check_fields(comp, COMPARISON_FIELDS, at, OBJECT)
        _check_required(comp, ("index", "prompt"), at.rstrip("."))
        _check_metrics(comp, PROMPT, at)
        if isinstance(comp.get("argmax_divergence"), dict):
            _check_fields(comp["argmax_divergence"], DIVERGENCE_FIELDS, f"{at}argmax_divergence.")
            _check_required(comp["argmax_divergence"], ("kind", "position"), f"{at}argmax_divergence")
        for j, entry in enumerate(comp.get("worst_positions") or []):
            _check_fields(entry, WORST_FIELDS, f"{at}worst_positions[{j}].", OBJECT)
            _check_required(entry, ("position", "kl", "reference_token", "target_argmax"), f"{at}worst_positions[{j}]")
            for name in ("reference_topk", "target_topk"):
                for k, pair in enumerate(entry.get(name) or []):
                    _check_pair(pair, f"{at}worst_positions[{j}].{name}[{k}]")
        _check_numbers_in(comp, at)


def _check_numbers_in(comp: dict[str, Any], at: str) -> None:
    """The lists of numbers the per-prompt details print: the top-K at position 0 and the logprob snippet."""
    topk, snippet = comp.get("first_position_topk"), comp.get("snippet")
    if isinstance(topk, dict):
        _check_fields(topk, TOPK_FIELDS, f"{at}first_position_topk.")
        for name in TOPK_FIELDS:
            if name != "position":
                _check_items(topk.get(name) or [], INT if name.endswith("ids") else NUMBER + OPTIONAL,
                             f"{at}first_position_topk.{name}")
    if isinstance(snippet, dict):
        _check_fields(snippet, SNIPPET_FIELDS, f"{at}snippet.")
        for name in SNIPPET_FIELDS:
            _check_items(snippet.get(name) or [], NUMBER + OPTIONAL, f"{at}snippet.{name}")


def _check_metrics(record: dict[str, Any], scope: str, where: str) -> None:
    """Every metric path of the catalogue present in ``record``: objects on the way, a number or null at the end."""
    dist = record.get("distribution")
    _check_type(dist, OBJECT + OPTIONAL, f"{where}distribution")
    if isinstance(dist, dict):
        _check_fields(dist, DISTRIBUTION_FIELDS, f"{where}distribution.")
        for j, bucket in enumerate(dist.get("kl_buckets") or []):
            _check_fields(bucket, BUCKET_FIELDS, f"{where}distribution.kl_buckets[{j}].", OBJECT)
            _check_required(bucket, ("range",), f"{where}distribution.kl_buckets[{j}]")
    for path in report_paths(scope):
        node: Any = record
        for part in path.split("."):
            if not isinstance(node, dict):
                break
            node = node.get(part)
        else:
            _check_type(node, NUMBER + (bool,) + OPTIONAL, where + path)
            name = path.rsplit(".", 1)[-1]
            if name in RATES and node is not None and not 0.0 <= node <= 1.0:
                raise ReportError(f"{where}{path} is {node!r}, but a share lies between 0 and 1")


def _check_pair(pair: Any, where: str) -> None:
    """A ``[token id, logprob]`` entry of a top-K list."""
    if not isinstance(pair, list) or len(pair) != 2:
        raise ReportError(f"{where} is {_kind(pair)}, where a [token id, logprob] pair belongs")
    _check_type(pair[0], INT, f"{where}[0]")
    _check_type(pair[1], NUMBER + OPTIONAL, f"{where}[1]")


def _check_required(record: dict[str, Any], names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if n not in record]
    if missing:
        raise ReportError(f"{where} has no {', '.join(missing)}")


def _check_fields(record: Any, fields: dict[str, tuple], where: str, itself: tuple = OBJECT) -> None:
    _check_type(record, itself, where.rstrip(".") or "the report")
    if not isinstance(record, dict):
        return
    for name, allowed in fields.items():
        if name in record:
            _check_type(record[name], allowed, where + name)


def _check_items(items: list, allowed: tuple, where: str) -> None:
    for i, item in enumerate(items):
        _check_type(item, allowed, f"{where}[{i}]")


def _check_type(value: Any, allowed: tuple, where: str) -> None:
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        wanted = " or ".join(dict.fromkeys(TYPE_NAMES[t] for t in allowed))
        raise ReportError(f"{where} is {_kind(value)}, where {wanted} belongs")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise ReportError(f"{where} is a string of {len(value)} characters, above the {MAX_TEXT} a report may hold")


def _check_version(version: Any, known: tuple[int, ...], what: str) -> None:
    if isinstance(version, bool) or version not in known:
        raise ReportError(f"its {what.strip()} schema version is {version!r}, and this harness reads "
                          f"{' and '.join(map(str, known))} (a newer vllm-rbln-exec wrote it, or it is not a report)")


def _check_depth(data: Any) -> None:
    """Iteratively: a report nested deeper than MAX_DEPTH is refused before any reader recurses into it."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ReportError(f"it nests deeper than the {MAX_DEPTH} levels a saved report may")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("…" if len(value) > 40 else "")
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return TYPE_NAMES.get(type(value), type(value).__name__)
