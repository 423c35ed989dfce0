"""The ``cache`` commands: list, show, clear, export and import cached references."""

from __future__ import annotations

from pathlib import Path

import typer

from ..core.errors import HarnessError, UsageError
from .common import report_error

cache_app = typer.Typer(help="Manage cached references (ls, show, clear, export, import).", no_args_is_help=True)
CACHE_DIR_OPTION = typer.Option("cache", "--cache-dir", help="The harness's cache folder.")


def _with_cache(cache_dir: str, action) -> None:
    """Open the reference cache, run ``action(cache)``, map failures to exit codes: a bad key or file is a
    usage error (2), a cache folder that cannot be used (an unreadable old database) exit 3."""
    import sys

    from ..capture.cache import ReferenceCache
    from ..capture.store import CaptureError

    root = Path(cache_dir) / "references"
    try:
        with ReferenceCache(root) as cache:
            for note in cache.notes:
                print(f"note: {note}", file=sys.stderr)
            action(cache)
    except KeyError as exc:
        raise typer.Exit(report_error(UsageError(str(exc.args[0]))))
    except (CaptureError, OSError) as exc:
        raise typer.Exit(report_error(UsageError(getattr(exc, "message", None) or str(exc))))
    except HarnessError as exc:
        raise typer.Exit(report_error(exc))


@cache_app.command("ls")
def cache_ls(cache_dir: str = CACHE_DIR_OPTION) -> None:
    """List cached references."""
    from ..outputs.terminal import make_console, render_cache_entries

    _with_cache(cache_dir, lambda cache: render_cache_entries(make_console(), cache.entries()))


@cache_app.command("show")
def cache_show(key: str = typer.Argument(..., help="A key or a unique prefix of one."),
               cache_dir: str = CACHE_DIR_OPTION) -> None:
    """Print the fields that make up one entry's key."""
    import json

    def show(cache) -> None:
        full = cache.resolve(key)
        entry = next(e for e in cache.entries() if e["key"] == full)
        print(json.dumps(entry, indent=2, sort_keys=True))

    _with_cache(cache_dir, show)


@cache_app.command("clear")
def cache_clear(keys: list[str] = typer.Argument(None, help="Keys (or prefixes) to delete; none: every entry."),
                yes: bool = typer.Option(False, "--yes", "-y", help="Really delete (required)."),
                cache_dir: str = CACHE_DIR_OPTION) -> None:
    """Delete cached references (all, or the given keys). Needs --yes."""

    def clear(cache) -> None:
        if not yes:
            what = f"{len(keys)} entries" if keys else f"all {len(cache.entries())} entries"
            raise typer.Exit(report_error(UsageError(f"this deletes {what} of {cache.root}; add --yes")))
        if keys:
            full = [cache.resolve(k) for k in keys]  # resolve all first: nothing is deleted on a typo
            for k in full:
                cache.delete(k)
            print(f"deleted {len(full)} reference(s)")
        else:
            print(f"deleted {cache.clear()} reference(s)")

    _with_cache(cache_dir, clear)


@cache_app.command("export")
def cache_export(key: str = typer.Argument(..., help="A key or a unique prefix of one."),
                 dest: str = typer.Argument(..., help="The reference file to write."),
                 cache_dir: str = CACHE_DIR_OPTION) -> None:
    """Write one entry as a portable reference file (use it with --reference or `cache import`)."""
    from ..setup.checks import check_outputs

    try:  # before the cache opens: DEST must be a new or regular file, never a link, FIFO, device or folder
        check_outputs({"DEST": dest})
    except UsageError as exc:
        raise typer.Exit(report_error(exc))

    def export(cache) -> None:
        full = cache.resolve(key)
        size = cache.export(full, Path(dest))
        print(f"{full[:12]} -> {dest} ({size / 2**20:.1f} MiB)")

    _with_cache(cache_dir, export)


@cache_app.command("import")
def cache_import(files: list[str] = typer.Argument(..., help="Reference files (from --save-reference or export)."),
                 cache_dir: str = CACHE_DIR_OPTION) -> None:
    """Store reference files in the cache under the key their own metadata gives."""

    from ..capture.store import CaptureError
    from ..core.paths import not_a_file

    def do_import(cache) -> None:
        for f in files:
            if (what := not_a_file(f)) is not None:
                raise typer.Exit(report_error(UsageError(f"{f} {what}")))
        for f in files:
            try:
                key = cache.import_file(Path(f))
            except CaptureError as exc:
                raise typer.Exit(report_error(UsageError(f"{f} is not a reference file: {exc.message}")))
            print(f"{f} -> {key[:12]}")

    _with_cache(cache_dir, do_import)
