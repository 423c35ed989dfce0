"""The listing commands: ``devices``, ``models`` and ``profile-summary`` (from saved traces)."""

from __future__ import annotations

import typer

from ..core.errors import HarnessError, UsageError
from .common import report_error


def devices_cmd(devices_file: str | None = typer.Option(None, "--devices")) -> None:
    """List the device profiles (shipped and from --devices FILE)."""
    from ..outputs.terminal import make_console
    from ..setup.devices import load_profiles

    try:
        profiles = load_profiles(devices_file)
    except HarnessError as exc:
        raise typer.Exit(report_error(exc))
    console = make_console()
    for p in profiles.values():
        console.print(f"[bold]{p.name}[/]  platform={p.platform}  parallel={','.join(p.parallel) or '-'}  {p.description}")
        console.print(f"    env: {p.env}  scrub: {p.scrub}  engine: {p.engine}", markup=False)


def models_cmd() -> None:
    """List the model aliases."""
    from ..setup.models import MODEL_ALIASES

    for a in MODEL_ALIASES.values():
        extra = " (needs --ep)" if a.needs_ep else ""
        extra += f" (--max-model-len {a.max_model_len} unless given)" if a.max_model_len else ""
        print(f"{a.name:<18} {a.hub_id}{extra}{'  ' + a.note if a.note else ''}")



def profile_summary_cmd(
    directory: str = typer.Argument(..., metavar="DIR", help="A trace folder, the profile/ folder, or a run folder."),
    top: int = typer.Option(15, "--top", help="Rows per table."),
    no_color: bool = typer.Option(False, "--no-color"),
) -> None:
    """Top operators by self time and the speed of each side, from saved traces."""
    from ..outputs.profile_tables import render_profile_summary
    from ..outputs.terminal import make_console
    from ..profiling.traces import load_summaries

    try:
        if top < 1:
            raise UsageError(f"--top must be a positive number, got {top}", option="--top")
        summaries = load_summaries(directory)
    except HarnessError as exc:
        raise typer.Exit(report_error(exc, no_color))
    render_profile_summary(make_console(no_color=no_color), summaries, top)
