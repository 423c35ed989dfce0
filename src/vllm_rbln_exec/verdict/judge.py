"""Judging a report: what a check returns, and the verdict over every check.

This module owns the outcome records (:class:`Violation`, :class:`GateOutcome`),
the :class:`Verdict` and :func:`judge`, which runs checks against the plain dict
of ``RunResult.to_json()`` (so a saved ``report.json`` can be re-judged without
any model) and collects every violation, note and skipped check. What a check
is comes from the :class:`Check` protocol; the checks themselves are in
``gates`` (which imports this module, never the reverse). It must not parse
tolerances, compute metrics, read spec files, write reports, or import torch or
vLLM.

A value that is null in the report (NaN: nothing to compute it from) cannot
hold any comparison, so it is not a violation; the verdict lists it in
``notes``. A tolerance relative to the noise floor without a measured floor is
skipped with a warning, never silently passed as checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ..compare.catalogue import PROMPT
from ..core.errors import EXIT_OK, EXIT_PARITY_FAILED
from ..core.jsonio import strict_json
from .findings import findings
from .noise import NoiseFloor, noise_from_json
from .precision import precision_warnings

VERDICT_SCHEMA_VERSION = 1


@dataclass
class Violation:
    gate: str  # the tolerance as written (spaces removed), or the rule's name
    source: str  # cli, default (...), spec FILE [table]
    scope: str  # overall | prompt
    metric: str  # the name as the user wrote it
    path: str  # the dotted path it resolved to
    value: float | None
    op: str
    threshold: float | None
    message: str
    prompt_index: int | None = None
    prompt: str | None = None  # shortened
    position: int | None = None
    noise: float | None = None
    yardstick: float | None = None  # the yardstick's value the limit was relative to (floored)

    def to_json(self) -> dict[str, Any]:
        return strict_json(asdict(self))


@dataclass
class GateOutcome:
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the whole gate could not be checked


class Check(Protocol):
    """What ``judge`` needs of a gate (see ``gates.Gate``); ``scope`` and ``path`` are read when present."""

    text: str
    source: str
    requires_full_vocab: bool

    def evaluate(self, run_json: dict[str, Any], noise: Any = None) -> GateOutcome: ...


@dataclass
class Verdict:
    passed: bool
    violations: list[Violation]
    checked: list[dict[str, Any]]  # {"gate", "source", "scope", "path", "violations"}
    skipped: list[dict[str, Any]]  # {"gate", "source", "reason"}
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # prefill or decode; the yardstick's reading
    schema_version: int = VERDICT_SCHEMA_VERSION

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_PARITY_FAILED

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "passed": self.passed,
            "violations": [v.to_json() for v in self.violations],
            "checked": [dict(c) for c in self.checked],
            "skipped": [dict(s) for s in self.skipped],
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "findings": list(self.findings),
        }


def topn_warning(run_json: dict[str, Any]) -> str:
    """What a top-N comparison's figures are worth (``compare.partial``): bounds, not measurements."""
    n = (run_json.get("settings") or {}).get("logprobs")
    return (f"top-{n} rows: KL compares the entries both sides gave and the rest of the mass as one bucket, so "
            "KL figures are lower bounds on the full distributions' KL (and Δp of a token outside the top N a "
            "bound): a pass does not prove the full rows agree; compare full vocabularies where the side allows "
            "it (vLLM: --max-logprobs -1)")


def judge(run_json: dict[str, Any], gates: list[Check], noise: NoiseFloor | dict[str, Any] | None = None) -> Verdict:
    """Check every gate against a report dict; all violations are collected."""
    if isinstance(noise, dict):
        noise = noise_from_json(noise)
    full_vocab = (run_json.get("settings") or {}).get("logprobs", -1) == -1
    violations: list[Violation] = []
    checked: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    notes: list[str] = []
    warnings: list[str] = []
    for gate in gates:
        if gate.requires_full_vocab and not full_vocab:
            skipped.append({"gate": gate.text, "source": gate.source,
                            "reason": "needs a full-vocabulary capture (this run kept the top-N logprobs)"})
            continue
        outcome = gate.evaluate(run_json, noise)
        if outcome.skipped:
            skipped.append({"gate": gate.text, "source": gate.source, "reason": outcome.skipped})
            warnings.append(f"tolerance {gate.text} ({gate.source}) not checked: {outcome.skipped}")
            continue
        violations.extend(outcome.violations)
        notes.extend(outcome.notes)
        checked.append({"gate": gate.text, "source": gate.source, "scope": getattr(gate, "scope", PROMPT),
                        "path": getattr(gate, "path", "argmax_divergence"), "violations": len(outcome.violations)})
    if not full_vocab:
        warnings.append(topn_warning(run_json))
    warnings += precision_warnings(run_json)
    return Verdict(passed=not violations, violations=violations, checked=checked, skipped=skipped, notes=notes,
                   warnings=warnings, findings=findings(run_json))
