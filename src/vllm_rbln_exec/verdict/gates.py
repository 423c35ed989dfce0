"""Gates: the checks a report is judged by, and the argmax near-tie rule.

This module owns :class:`Gate` and its two kinds: :class:`MetricGate` (one
tolerance, ``[scope:]metric op value``, checked against the run's summary or
each prompt, with the violating prompt and position named) and
:class:`ArgmaxGate` (a target argmax that leaves the reference's token where the
reference was confident). Parsing the expression text is ``expressions``'s,
metric paths and values are :mod:`~vllm_rbln_exec.compare.catalogue`'s, the
outcome records and the verdict over all gates are ``judge``'s, the built-in
tolerances are ``defaults``'. It must not compute metrics, read spec files,
write reports, or import torch or vLLM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..compare.catalogue import (
    OVERALL,
    PROMPT,
    metric_position,
    metric_value,
    null_means_never,
    prompt_counterpart,
)
from ..compare.yardstick import confident_flips, yardstick_record, yardstick_value
from .counts import COUNT_ALPHA, COUNT_PATHS, confident_flip_test, critical_count, excess_p_value
from .expressions import parse_tolerance
from .judge import GateOutcome, Violation

SOURCE_CLI = "cli"
SOURCE_DEFAULT = "default"


class Gate:
    """One check of a run report. Subclasses fill ``evaluate``."""

    # declared without values: a class default here would become the dataclass default of subclasses
    text: str
    source: str
    requires_full_vocab = False  # meaningless on top-N captures (skipped there)

    @property
    def key(self) -> tuple:
        """Gates with the same key replace each other across precedence layers (see ``spec``)."""
        raise NotImplementedError

    def evaluate(self, run_json: dict[str, Any], noise: Any = None) -> GateOutcome:
        raise NotImplementedError

    def check(self, run_json: dict[str, Any], noise: Any = None) -> list[Violation]:
        return self.evaluate(run_json, noise).violations

    def with_source(self, source: str) -> Gate:
        raise NotImplementedError


@dataclass(frozen=True)
class MetricGate(Gate):
    """``[scope:]metric op value``: fail where the metric satisfies the comparison."""

    text: str
    scope: str
    metric: str
    path: str
    op: str
    base: float
    noise_k: float | None = None  # the tolerance is base + noise_k * noise (sign folded into noise_k)
    source: str = SOURCE_CLI
    requires_full_vocab: bool = False
    yardstick_k: float | None = None  # the tolerance is base + yardstick_k * max(yardstick, floor)

    @property
    def key(self) -> tuple:
        return ("metric", self.scope, self.path, "upper" if self.op in (">", ">=") else "lower")

    def with_source(self, source: str) -> MetricGate:
        return MetricGate(**{**asdict(self), "source": source})

    def threshold(self, noise: float | None) -> float:
        """The limit, given the noise (or, for a yardstick tolerance, the floored yardstick value)."""
        k = self.yardstick_k if self.yardstick_k is not None else self.noise_k
        if k is None:
            return self.base
        return self.base + k * (noise or 0.0)

    def _reference_value(self, run_json: dict[str, Any], noise: Any, index: int | None) -> float | None:
        if self.yardstick_k is not None:
            return yardstick_value(run_json, self.path, index)
        return noise.value(self.path, index)

    def _skip_reason(self, run_json: dict[str, Any], noise: Any, records: list) -> str | None:
        if self.yardstick_k is not None:
            if yardstick_record(run_json) is None:
                missing = (run_json.get("resolved") or {}).get("yardstick_missing")
                if missing:
                    return f"{self.text} is relative to the yardstick, and this run's is missing: {missing}"
                return (f"{self.text} is relative to the yardstick, and this run has none (--yardstick auto "
                        "adds one when the target's dtype is coarser than the reference's; or name one)")
            if records and all(yardstick_value(run_json, self.path, i) is None for i, _ in records):
                return f"the yardstick has no value of {self.path}"
            return None
        if self.noise_k is None:
            return None
        if noise is None:
            return (f"{self.text} is relative to the noise floor, and no noise floor was measured "
                    "(repeat the target capture to measure one)")
        if records and all(noise.value(self.path, i) is None for i, _ in records):
            where = "the whole run" if self.scope == OVERALL else "any prompt"
            return f"the noise floor has no value of {self.path} for {where}"
        return None

    def evaluate(self, run_json: dict[str, Any], noise: Any = None) -> GateOutcome:
        out = GateOutcome()
        if self.scope == OVERALL:
            records = [(None, run_json.get("summary") or {})]
        else:
            records = [(c.get("index", i), c) for i, c in enumerate(run_json.get("comparisons") or [])]
        out.skipped = self._skip_reason(run_json, noise, records)
        if out.skipped:
            return out
        relative = "yardstick" if self.yardstick_k is not None else "noise"
        measured = null_means_never(self.path)
        for index, record in records:
            value = metric_value(record, self.path)
            where = "overall" if index is None else f"prompt {index}"
            spread = None
            if self.noise_k is not None or self.yardstick_k is not None:
                spread = self._reference_value(run_json, noise, index)
                if spread is None:
                    out.notes.append(f"{where}: no {relative} value of {self.path}; {self.text} not checked there")
                    continue
            measured = measured or value is not None
            if value is None:
                if not null_means_never(self.path):
                    out.notes.append(f"{where}: {self.metric} is null (nothing to compute it from); "
                                     f"{self.text} not checked there")
                continue
            if self.counts_tested:
                violation = self._count_violation(run_json, index, record, value)
                if violation is not None:
                    out.violations.append(violation)
                continue
            limit = self.threshold(spread)
            if _holds(value, self.op, limit):
                out.violations.append(self._violation(run_json, index, record, value, limit, spread))
        if not measured:  # no record holds the number: nothing shows that the tolerance holds, so it fails
            relative_k = self.noise_k is not None or self.yardstick_k is not None
            out.violations.append(not_measured(self, self.path, self.op, None if relative_k else self.base))
        return out

    @property
    def counts_tested(self) -> bool:
        """``count>K*yardstick`` on argmax flips: judged by the exact test of two counts (``counts``), not as a
        ratio of small numbers."""
        return self.yardstick_k is not None and self.op in (">", ">=") and self.path in COUNT_PATHS

    def _count_violation(self, run_json: dict[str, Any], index: int | None, record: dict[str, Any],
                         value: float) -> Violation | None:
        yard = yardstick_record(run_json, index) or {}
        y = metric_value(yard, self.path) or 0.0
        n_t, n_y = record.get("positions_compared"), yard.get("positions_compared")
        t = max(0.0, value - self.base)
        k = max(self.yardstick_k or 0.0, 1e-9)
        p = excess_p_value(t, y, k, n_t, n_y)
        if p >= COUNT_ALPHA:
            return None
        critical = critical_count(y, k, n_t, n_y) + self.base
        violation = self._violation(run_json, index, record, value, critical - 1, y)
        violation.message = violation.message.replace(
            f"(tolerance {self.text}, yardstick {_fmt(y)})",
            f"(tolerance {self.text}: the target's rate is more than {_fmt(k)}x the yardstick's {_fmt(y)} over "
            f"{_fmt(n_y)} positions, one-sided exact test p = {p:.2g} < {COUNT_ALPHA:g})")
        return violation

    def _violation(self, run_json: dict[str, Any], index: int | None, record: dict[str, Any], value: float,
                   limit: float, spread: float | None) -> Violation:
        """The violation of one record (the summary when ``index`` is None), naming where it is worst."""
        prompt = None if index is None else _short(record.get("prompt", ""))
        tail = ""
        if index is None:
            head = "overall"
            worst_index, position = _worst_prompt(run_json, self.path, self.op)
            if worst_index is not None:
                tail = f"; worst: prompt {worst_index}" + _at(position)
        else:
            position = metric_position(record, self.path)
            head = f'prompt {index} "{prompt}"' + _at(position)
        noise_text = ""
        if spread is not None:
            noise_text = f", {'yardstick' if self.yardstick_k is not None else 'noise'} {_fmt(spread)}"
        message = (f"{head}: {self.metric} = {_fmt(value)} {self.op} {_fmt(limit)} "
                   f"(tolerance {self.text}{noise_text}){tail}")
        return Violation(
            gate=self.text, source=self.source, scope=self.scope, metric=self.metric, path=self.path,
            value=value, op=self.op, threshold=limit, message=message, prompt_index=index, prompt=prompt,
            position=position, noise=spread if self.yardstick_k is None else None,
            yardstick=spread if self.yardstick_k is not None else None,
        )  # fmt: skip


def not_measured(gate: Gate, path: str, op: str, threshold: float | None) -> Violation:
    """The violation of a tolerance whose number the report does not hold (null, NaN or absent wherever it
    is read): a saved report stripped of its metrics fails, instead of passing every tolerance it cannot
    show. Scoped to the whole run, since no prompt holds the number either."""
    where = "the run's summary" if getattr(gate, "scope", PROMPT) == OVERALL else "any prompt"
    return Violation(gate=gate.text, source=gate.source, scope=OVERALL, metric=getattr(gate, "metric", "argmax"),
                     path=path, value=None, op=op, threshold=threshold,
                     message=f"{gate.text}: not measured ({path} has no value in {where}, so it cannot hold)")


def parse_gate(expr: str, source: str = SOURCE_CLI) -> MetricGate:
    """Parse one tolerance expression (see ``expressions``); UsageError quoting it when malformed or unknown."""
    return MetricGate(**asdict(parse_tolerance(expr)), source=source)


def parse_gates(exprs: list[str] | tuple[str, ...], source: str = SOURCE_CLI) -> list[MetricGate]:
    return [parse_gate(e, source) for e in exprs]


@dataclass(frozen=True)
class ArgmaxGate(Gate):
    """The near-tie rule: a target argmax that leaves the reference's token fails the run
    where the reference was confident (top-2 margin >= tie margin); near-ties fail only
    with ``near_ties_fail``.

    Per prompt it looks at the first argmax divergence (``argmax_divergence``) and at
    the mismatch counts of the distribution summary, so a confident mismatch after a
    near-tie one is caught too. In free-running mode a token divergence without a
    logprob row to classify it is a note, or a violation with ``near_ties_fail``.

    Where the run's yardstick flips confident argmaxes itself (honest rounding at the
    target's precision does, in an MoE router's top-k at a near-tie), the target's
    confident flips over the run are judged against the yardstick's by the exact test
    of two counts (``counts.confident_flip_test``): one violation when the target has
    significantly more, else a note. A yardstick without confident flips, or a report
    without the counts, leaves the rule as above: any confident flip fails.
    """

    near_ties_fail: bool = False
    source: str = SOURCE_DEFAULT

    @property
    def text(self) -> str:  # type: ignore[override]
        return "argmax:any" if self.near_ties_fail else "argmax:confident"

    @property
    def key(self) -> tuple:
        return ("argmax",)

    def with_source(self, source: str) -> ArgmaxGate:
        return ArgmaxGate(near_ties_fail=self.near_ties_fail, source=source)

    def evaluate(self, run_json: dict[str, Any], noise: Any = None) -> GateOutcome:
        out = GateOutcome()
        comparisons = run_json.get("comparisons") or []
        flips = None if self.near_ties_fail else confident_flips(run_json)
        against = flips is not None and flips["yardstick"] > 0
        held: list[Violation] = []  # the prompts' confident flips, judged together against the yardstick's
        for i, comp in enumerate(comparisons):
            violation, note = self._judge_prompt(comp, comp.get("index", i))
            if violation is not None:
                (held if against else out.violations).append(violation)
            if note:
                out.notes.append(note)
        if against and held:
            failed, sentence = confident_flip_test(max(flips["target"], float(len(held))), flips["yardstick"],
                                                   flips["target_positions"], flips["yardstick_positions"])
            if failed:
                first = held[0]
                first.message = f"{sentence} (rule {self.text}); first: {first.message}"
                first.value, first.yardstick = flips["target"], flips["yardstick"]
                out.violations.append(first)
            else:
                out.notes.append(f"{sentence}: allowed (rule {self.text})")
        # the rule reads each prompt's argmax counts: a report without any shows nothing about the argmax
        if not any(metric_value(c, "distribution.top1_mismatches") is not None for c in comparisons):
            out.violations.append(not_measured(self, "distribution.top1_mismatches", ">", 0.0))
        return out

    def _judge_prompt(self, comp: dict[str, Any], index: int) -> tuple[Violation | None, str | None]:
        prompt = _short(comp.get("prompt", ""))
        head = f'prompt {index} "{prompt}"'
        dist = comp.get("distribution") or {}
        tie = dist.get("tie_margin")
        div = comp.get("argmax_divergence")

        def violation(position: int | None, count: float, detail: str) -> Violation:
            return Violation(
                gate=self.text, source=self.source, scope=PROMPT, metric="argmax", path="argmax_divergence",
                value=count, op=">", threshold=0.0, message=f"{head}{_at(position)}: {detail} (rule {self.text})",
                prompt_index=index, prompt=prompt, position=position,
            )  # fmt: skip

        note = None
        if div is not None:
            what = (f"target argmax {div.get('target_token')} != reference token {div.get('reference_token')}, "
                    f"reference top-2 margin {_fmt(div.get('margin'))} nats")
            if div.get("kind") == "disagreement":
                bound = f" >= tie margin {_fmt(tie)}" if tie is not None else ""
                return violation(div.get("position"), 1.0, f"confident argmax disagreement: {what}{bound}"), None
            if self.near_ties_fail:
                bound = f" < tie margin {_fmt(tie)}" if tie is not None else ""
                return violation(div.get("position"), 1.0, f"near-tie argmax divergence: {what}{bound}"), None
            note = f"{head}{_at(div.get('position'))}: near-tie argmax divergence ({what}), allowed"

        # the first divergence may be a near-tie while a later position disagrees confidently
        if self.near_ties_fail:
            later, kind = int(dist.get("top1_mismatches") or 0), "argmax mismatches"
        else:
            later, kind = int(metric_value(comp, "confident_mismatches") or 0), "confident argmax mismatches"
        if later > 0:
            position = _mismatch_position(comp, None if self.near_ties_fail else tie)
            return violation(position, float(later), f"{later} {kind} among the compared positions"), note

        first = comp.get("first_divergence")
        if div is None and first is not None and not comp.get("tokens_equal", True):
            detail = (f"generated tokens diverge at position {first} and no logprob row there tells a near-tie "
                      "from a disagreement")
            if self.near_ties_fail:
                return violation(first, 1.0, detail), note
            return None, f"{head}: {detail}; allowed"
        return None, note


def _mismatch_position(comp: dict[str, Any], tie_margin: float | None) -> int | None:
    """A mismatched position from the worst-KL list, confident ones only when a tie margin is given."""
    for entry in comp.get("worst_positions") or []:
        if entry.get("reference_token") == entry.get("target_argmax"):
            continue
        ref_top = entry.get("reference_topk") or []
        if tie_margin is not None and len(ref_top) >= 2:
            a, b = ref_top[0][1], ref_top[1][1]
            if a is None or b is None or a - b < tie_margin:
                continue
        return entry.get("position")
    return None


# -- helpers ----------------------------------------------------------------------
def _holds(value: float, op: str, limit: float) -> bool:
    return {">": value > limit, ">=": value >= limit, "<": value < limit, "<=": value <= limit}[op]


def _worst_prompt(run_json: dict[str, Any], path: str, op: str) -> tuple[int | None, int | None]:
    """(prompt index, position) of the prompt that pushes an overall metric furthest past its bound."""
    prompt_path = prompt_counterpart(path)
    if prompt_path is None:
        return None, None
    best = None
    for i, comp in enumerate(run_json.get("comparisons") or []):
        value = metric_value(comp, prompt_path)
        if value is None:
            continue
        score = value if op in (">", ">=") else -value
        if best is None or score > best[0]:
            best = (score, comp.get("index", i), metric_position(comp, prompt_path))
    return (None, None) if best is None else (best[1], best[2])


def _at(position: int | None) -> str:
    return "" if position is None else f" position {position}"


def _short(text: str, width: int = 20) -> str:
    # one printable line: the text lands in terminals, XML and markdown
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in str(text)).split()).replace('"', "'")
    if len(text) <= width:
        return text
    cut = text[:width]
    if " " in cut.strip():
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip() + "..."


def _fmt(value: float | None) -> str:
    if value is None:
        return "null"
    return f"{value:.4g}"
