"""What every command of the command line shares: the exit-code text, printing an error, the given options.

Nothing heavy is imported here (the console loads inside the function); no command lives here.
"""

from __future__ import annotations

import typer

from ..core.errors import HarnessError, UsageError, WorkerError

EXIT_CODES_HELP = """Exit codes: 0 the run finished (parity holds), 1 parity fails, 2 bad usage,
3 the harness could not run (worker crash or timeout, missing model); 130 / 143 stopped by
Ctrl-C / SIGTERM, with every worker ended."""


def explicit_options(ctx: typer.Context) -> list[str]:
    """Names of the options the user gave on the command line (not defaults)."""
    # compared by name: typer may bring its own copy of click's ParameterSource
    return [name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")]


def report_error(exc: HarnessError, no_color: bool = False) -> int:
    from rich.markup import escape

    from ..outputs.terminal import make_console

    console = make_console(no_color=no_color, stderr=True)
    label = "usage error" if isinstance(exc, UsageError) else "error"
    # escaped: a message quotes what came from outside (a server's error text, a file name), where "[/]" is
    # Rich markup and raised MarkupError, a traceback with exit 1
    console.print(f"[bold red]{label}:[/] {escape(exc.message)}", highlight=False, markup=True)
    if isinstance(exc, WorkerError):
        if exc.detail:
            console.rule(f"last lines of the {escape(str(exc.side))} worker's log")
            console.print(exc.detail, markup=False, highlight=False)
        if exc.log_path:
            console.print(f"full log: {exc.log_path}", markup=False)
    elif exc.detail:
        console.print(exc.detail, markup=False)
    return exc.exit_code



def render_localization_of(console, run: dict) -> None:
    if isinstance(run.get("localization"), dict):
        from ..outputs.localize_view import render_localization

        render_localization(console, run["localization"])
