#!/usr/bin/env python
"""Every field of a saved report replaced by a wrong value: does ``compare`` ever end in a traceback?

    PYTHONPATH=.:src python scripts/hostile_reports.py RUN/parity.json [--values '"[/]x"' 7 '[]' '{}' null]

For each field of the report (one per generalised path: list items stand for their list), and each value,
the report is saved with that field replaced and goes through what ``compare RUN`` does: load and check
(``pipeline.check.rejudge``), the JSON, JUnit and Markdown writers, and the terminal report with every
section (``outputs.terminal``). A usage error is the right answer; anything else is printed with the field,
the value and where it was raised. The figures of docs/robustness.md's "Saved reports" block come from it.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import tempfile
import traceback
from pathlib import Path
from typing import Any

SKIPPED = ("options", "resolved", "env", "effective", "engine_args", "timings", "series", "checked", "findings",
           "warnings")  # free-form records that nothing judges or prints field by field


def paths(node: Any, prefix: tuple = ()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list) and node:
        yield from paths(node[0], prefix + (0,))


def fields(report: dict) -> list[tuple]:
    return [p for p in paths(report) if p and not any(k in SKIPPED for k in p if isinstance(k, str))]


def replaced(report: dict, path: tuple, value: Any) -> dict:
    out = copy.deepcopy(report)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def try_one(data: dict, folder: Path) -> str | None:
    """None when compare's steps end in a result or a usage error; else the exception and where it arose."""
    from rich.console import Console

    from vllm_rbln_exec.core.errors import HarnessError
    from vllm_rbln_exec.outputs.terminal import render_noise, render_run, render_verdict
    from vllm_rbln_exec.pipeline.check import rejudge, write_reports
    from vllm_rbln_exec.setup.options import DisplayOptions, GateOptions

    report = folder / "parity.json"
    report.write_text(json.dumps(data))
    try:
        outcome = rejudge(report, GateOptions(fail_on=("kl_max>1e-9",)))
        write_reports(outcome, str(folder / "o.json"), str(folder / "o.xml"), str(folder / "o.md"))
        console = Console(file=io.StringIO(), width=200)
        render_run(console, outcome.run, DisplayOptions(no_color=True, inspect_logits=True, snippet=True))
        render_noise(console, outcome.noise)
        render_verdict(console, outcome.verdict, outcome.files)
    except HarnessError:
        return None
    except Exception as exc:  # what this script looks for
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}: {str(exc)[:80]}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report")
    parser.add_argument("--values", nargs="+", default=['"[/]x"', "7", "[]", "{}", "null"])
    args = parser.parse_args()
    report = json.loads(Path(args.report).read_text())
    values = [json.loads(v) for v in args.values]
    found, tried = 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in fields(report):
            for value in values:
                tried += 1
                problem = try_one(replaced(report, path, value), Path(tmp))
                if problem:
                    found += 1
                    print(".".join(map(str, path)), "<-", json.dumps(value), ":", problem, flush=True)
    print(f"{found} of {tried} hostile reports ended in a traceback ({len(fields(report))} fields x {len(values)} "
          "values)")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
