"""Exceptions that carry the process exit code; nothing else lives here.

0 parity holds, 1 parity fails, 2 bad usage, 3 the harness could not run.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_PARITY_FAILED = 1
EXIT_USAGE = 2
EXIT_HARNESS = 3


class HarnessError(Exception):
    """The run could not be carried out (worker crash, timeout, missing model)."""

    exit_code = EXIT_HARNESS

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail


class UsageError(HarnessError):
    """Bad input from the user: an option value, a file, an unknown name."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, option: str | None = None, detail: str | None = None):
        super().__init__(message, detail)
        self.option = option


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: the reason and the file, also for ``shutil.Error``, whose text is
    the list of every file a copy failed on (a full disk gave one entry per array of a capture)."""
    args = exc.args[0] if exc.args and isinstance(exc.args[0], list) else None
    if args:  # shutil.Error([(src, dst, why), ...])
        first = args[0]
        if isinstance(first, tuple) and len(first) == 3:
            # why is str(OSError): "[Errno 28] No space left on device: 'src' -> 'dst'"; the place is the folder
            why = f"{str(first[2]).split(': ', 1)[0]} while copying into {Path(str(first[1])).parent.parent}"
        else:
            why = str(first)
        more = f" ({len(args)} files failed)" if len(args) > 1 else ""
        return f"{why}{more}"
    reason = exc.strerror or str(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


class WorkerError(HarnessError):
    """A worker crashed, hung, or reported a failure; names the side."""

    def __init__(self, side: str, message: str, log_tail: str = "", log_path: str | None = None):
        super().__init__(f"{side} worker: {message}", detail=log_tail)
        self.side = side
        self.log_path = log_path
