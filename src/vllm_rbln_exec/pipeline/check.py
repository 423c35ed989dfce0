"""A parity check: one run, judged, written out. The library entry of the CLI and the pytest plugin.

``check_parity(options)`` runs the comparison (``run``), measures the noise floor
from repeats when asked (``noise``), resolves the tolerances of the run's model
and dtype pair (``spec``: built-in defaults, spec file, command line), judges
the report (``gate``) and writes the requested report files and pictures (``outputs``).
``rejudge(path)`` does the same for a saved run without running any model.
This module decides the order of those steps and nothing else: no metrics, no
rendering, no engine code, and it never imports torch or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UsageError
from ..outputs.files import load_report, write_json, write_junit, write_markdown
from ..setup.options import GateOptions, RunOptions
from ..verdict.gates import parse_gates
from ..verdict.judge import Verdict, judge
from ..verdict.noise import NoiseFloor, measure_noise, merge_noise, noise_from_json
from ..verdict.spec import ParitySpec, gates_for_run, load_spec
from .run import run_parity

PARITY_FILE = "parity.json"  # the combined report every run folder gets


def load_gates(options: GateOptions) -> ParitySpec:
    """Check the tolerances and read the spec up front, so a typo costs no engine start."""
    parse_gates(list(options.fail_on))
    return load_spec(options.spec)


@dataclass
class ParityOutcome:
    run: dict[str, Any]  # RunResult.to_json()
    verdict: Verdict
    noise: NoiseFloor | None = None
    files: dict[str, str] = field(default_factory=dict)
    result: Any = None  # the RunResult, when the run happened in this process

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code

    def failure_message(self) -> str:
        """Every violation on its own line, each naming prompt, position, metric, value and tolerance."""
        model, target = self.run.get("model"), self.run.get("target")
        lines = [f"parity fails for {model} on {target}: {len(self.verdict.violations)} violation(s)"]
        lines += [f"  - {v.message}  [{v.source}]" for v in self.verdict.violations]
        lines += [f"  ! {w}" for w in self.verdict.warnings]
        if self.run.get("run_dir"):
            lines.append(f"  run folder: {self.run['run_dir']}")
        return "\n".join(lines)

    def assert_ok(self) -> ParityOutcome:
        if not self.passed:
            raise AssertionError(self.failure_message())
        return self


def noise_floor(run: dict[str, Any]) -> NoiseFloor | None:
    """The spread measured by ``--repeat``: target repeats, and the reference against itself."""
    floors = []
    repeats = run.get("repeats") or []
    if repeats:
        floors.append(measure_noise([run, *repeats], mode="repeats"))
    if run.get("reference_self"):
        floors.append(measure_noise([run["reference_self"]], mode="self"))
    if not floors:
        return None
    return floors[0] if len(floors) == 1 else merge_noise(*floors)


def judge_run(run: dict[str, Any], options: GateOptions, spec: ParitySpec | None = None,
              noise: NoiseFloor | None = None) -> Verdict:
    spec = spec if spec is not None else load_gates(options)
    gates = gates_for_run(run, spec, list(options.fail_on), use_defaults=options.use_defaults,
                          near_ties_fail=options.near_ties_fail)
    return judge(run, gates, noise)


def write_reports(outcome: ParityOutcome, json_out: str | None = None, junit_out: str | None = None,
                  markdown_out: str | None = None, run_folder: Path | None = None, html_out: str | None = None,
                  plots_dir: str | None = None) -> dict[str, str]:
    files: dict[str, str] = {}
    if run_folder is not None and run_folder.is_dir():
        files["parity"] = str(write_json(run_folder / PARITY_FILE, outcome.run, outcome.verdict, outcome.noise))
    for name, path, writer in (("json", json_out, write_json), ("junit", junit_out, write_junit),
                               ("markdown", markdown_out, write_markdown)):
        if not path:
            continue
        args = (path, outcome.run, outcome.verdict) + ((outcome.noise,) if writer is not write_junit else ())
        try:
            files[name] = str(writer(*args))
        except OSError as exc:
            raise UsageError(f"cannot write --{name} {path}: {exc}", option=f"--{name}") from exc
    files.update(write_pictures(outcome, html_out, plots_dir))
    outcome.files.update(files)
    return files


def write_pictures(outcome: ParityOutcome, html_out: str | None, plots_dir: str | None) -> dict[str, str]:
    """--html and --plots; ``outputs.html`` (and matplotlib) are imported only when one is asked for."""
    files: dict[str, str] = {}
    if not html_out and not plots_dir:
        return files
    from ..outputs.html import write_html, write_plots

    try:
        if html_out:
            files["html"] = str(write_html(html_out, outcome.run, outcome.verdict, outcome.noise))
        if plots_dir:
            written = write_plots(plots_dir, outcome.run, outcome.noise)
            files["plots"] = f"{plots_dir} ({len(written)} files)"
    except OSError as exc:
        option = "--html" if html_out and "html" not in files else "--plots"
        raise UsageError(f"cannot write {option}: {exc}", option=option) from exc
    return files


def check_parity(options: RunOptions, progress=None) -> ParityOutcome:
    """Run, judge and write: what `vllm-rbln-exec` does. The run folder gets one ``parity.json``."""
    spec = load_gates(options.gates)
    result = run_parity(options, progress)
    run = result.to_json()
    noise = noise_floor(run)
    outcome = ParityOutcome(run=run, verdict=judge_run(run, options.gates, spec, noise), noise=noise, result=result)
    out = options.outputs
    localizing = options.localize.enabled  # the pictures wait for the per-layer errors
    write_reports(outcome, out.json, out.junit, out.markdown, Path(result.run_dir),
                  None if localizing else out.html, None if localizing else out.plots)
    if localizing:
        from .localize import localize_folder

        outcome.run["localization"] = localize_folder(
            result.run_dir, run, outcome.verdict.to_json(), modules=options.localize.modules,
            cache_dir=options.cache_dir, progress=progress)
        # parity.json and --json carry it, and the HTML report and plots draw it
        write_reports(outcome, out.json, None, None, Path(result.run_dir), out.html, out.plots)
    return outcome


def saved_report_files(paths: list[str]) -> dict[str, str]:
    """{"the saved run X": file} for every report file ``load_saved`` may read from the given paths."""
    files = {}
    for path in map(Path, paths):
        for found in ([path / PARITY_FILE, path / "report.json"] if path.is_dir() else [path]):
            files[f"the saved run {found}"] = str(found)
    return files


def load_saved(path: str | Path) -> tuple[dict[str, Any], NoiseFloor | None]:
    """A saved run from a run folder (its parity.json or report.json) or a JSON report file, checked against
    the saved report's schema (``outputs.saved``): anything else is one sentence and a usage error."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / PARITY_FILE, path / "report.json"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UsageError(f"{path} holds no {PARITY_FILE} or report.json: not a run folder")
        path = found
    elif not path.exists():
        raise UsageError(f"{path} does not exist")
    try:
        run, _, noise = load_report(path)
        positions = run["summary"].get("positions_compared")
        if not isinstance(positions, int) or isinstance(positions, bool) or positions < 1 or not run["comparisons"]:
            raise UsageError(f"{path} compares no positions ({positions!r}): there is nothing to judge")
        floor = noise_from_json(noise) if noise else noise_floor(run)
    except (OSError, ValueError, TypeError, AttributeError) as exc:  # ReportError is a ValueError
        raise UsageError(f"{path} is not a vllm-rbln-exec report: {exc}") from exc
    return run, floor


def rejudge(path: str | Path, options: GateOptions) -> ParityOutcome:
    """Judge a saved run again with other tolerances; no model runs."""
    run, noise = load_saved(path)
    return ParityOutcome(run=run, verdict=judge_run(run, options, noise=noise), noise=noise)
