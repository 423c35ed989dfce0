"""A side that is a running OpenAI-compatible server: its URL, its API key and the options it refuses.

``--target-url`` / ``--reference-url`` make a side whose capture an HTTP client
does (``remote``) instead of a worker process. This module owns what can be
decided from the option values alone, before anything starts: the URL's form
(``http(s)://host[:port][/prefix]/v1``, no credentials in it), where the API key
comes from (an environment variable or a file, never an option value, so it is
never printed, stored in a report or seen in ``ps``), and which options make no
sense for a side that the harness does not run (engine, device, engine
arguments, parallelism, profiling, localisation). Every refusal is a
``UsageError`` (exit 2). It must not open a connection, start workers or import
torch or vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..core.errors import UsageError

SCORING_MODES = ("auto", "prompt_logprobs", "echo")
SCORING_HELP = ("How a teacher-forced server side is scored: prompt_logprobs (vLLM's extra parameter), echo "
                "(echo with logprobs, the legacy OpenAI way), or auto (prompt_logprobs when the server returns "
                "them, else echo).")

# Options of a side the harness runs itself, with their defaults: given for a server side, they would be
# silently ignored, so they are refused instead.
_TARGET_ONLY = {"target_engine": "vllm", "target_args": None, "target_model": None, "target_device": None,
                "tp": 1, "pp": 1, "dp": 1, "ep": False, "block": None}
_REFERENCE_ONLY = {"reference_engine": "vllm", "reference_args": None, "reference_device": None,
                   "reference_file": None, "save_reference": None, "use_cache": False, "require_cache": False}
_NEEDS_A_URL = ("served_model", "api_key_env", "api_key_file", "server_logprobs")


def normalize_url(value: str, option: str) -> str:
    """The API's base (``.../v1``) from what the user gave: a base, its ``/completions`` or the server's root."""
    text = str(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{option} {value!r} is not an http(s) URL such as http://127.0.0.1:8000/v1", option=option)
    if parts.username or parts.password:
        raise UsageError(f"{option}: the URL holds credentials; pass the API key through --api-key-env or "
                         "--api-key-file, which the report never records", option=option)
    if parts.query or parts.fragment:
        raise UsageError(f"{option} {value!r}: a query or fragment has no place in the API's base URL", option=option)
    try:
        parts.port  # noqa: B018 - raises ValueError on a port out of range or not a number
    except ValueError as exc:
        raise UsageError(f"{option} {value!r}: {exc}", option=option) from exc
    path = parts.path.rstrip("/")
    for suffix in ("/completions", "/models"):
        path = path.removesuffix(suffix)
    if not path.endswith("/v1"):
        path = f"{path}/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


def server_root(base: str) -> str:
    """The server's root (where vLLM serves ``/health`` and ``/version``) from the API's base."""
    return base.removesuffix("/v1")


def read_api_key(env_name: str | None, file: str | None) -> str | None:
    """The API key, from the environment variable named ``env_name`` or the first line of ``file``; None when
    neither is given. A named source that holds nothing, or a key an HTTP header cannot carry, is a UsageError
    that never shows the key (a CI secret that did not arrive, or one pasted with a newline inside)."""
    if env_name:
        key = os.environ.get(env_name, "").strip()
        source = f"--api-key-env {env_name}"
        if not key:
            raise UsageError(f"{source}: that environment variable is not set or empty", option="--api-key-env")
    elif file:
        path = Path(file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip().splitlines()[0].strip() if path.is_file() else ""
        except (OSError, UnicodeDecodeError, IndexError):
            key = ""
        source = f"--api-key-file {file}"
        if not key:
            raise UsageError(f"{source}: not a readable file with the key on its first line",
                             option="--api-key-file")
    else:
        return None
    if not header_safe(key):
        raise UsageError(f"{source}: the API key holds a character an HTTP header cannot carry (a space, newline, "
                         "control or non-ASCII character; the key is not shown)", option=source.split()[0])
    return key


def header_safe(key: str) -> bool:
    """Whether an HTTP header can carry ``key`` as it is: visible ASCII only (no space, newline or control
    character; httpx raises on them with the whole header value, the key, in its message)."""
    return bool(key) and all(0x21 <= ord(c) <= 0x7E for c in key)


def check_server_flat(v: dict[str, Any]) -> None:
    """The server options among the flat option values (``setup.options.FLAT_DEFAULTS``); UsageError on bad ones."""
    urls = {role: v[f"{role}_url"] for role in ("target", "reference")}
    for role, url in urls.items():
        if url is not None:
            normalize_url(url, f"--{role}-url")
    if not any(urls.values()):
        given = [name for name in _NEEDS_A_URL if v[name] is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} is for a server side: give --target-url or "
                             "--reference-url", option=f"--{given[0].replace('_', '-')}")
        return
    if v["api_key_env"] and v["api_key_file"]:
        raise UsageError("give the API key one way: --api-key-env or --api-key-file", option="--api-key-file")
    read_api_key(v["api_key_env"], v["api_key_file"])  # found now, not after the reference's engine ran
    if v["server_scoring"] not in SCORING_MODES:
        raise UsageError(f"--server-scoring must be one of {', '.join(SCORING_MODES)}, got {v['server_scoring']!r}",
                         option="--server-scoring")
    n = v["server_logprobs"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n == 0 or n < -1):
        raise UsageError(f"--server-logprobs must be -1 (full vocabulary) or a positive N, got {n}",
                         option="--server-logprobs")
    retries = v["server_retries"]
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
        raise UsageError(f"--server-retries must be 0..20, got {retries}", option="--server-retries")
    _check_combinations(v, urls)


def _check_combinations(v: dict[str, Any], urls: dict[str, str | None]) -> None:
    if urls["target"]:
        if v["target"] != "auto":
            raise UsageError(f"--target {v['target']} names a device profile; with --target-url the target is "
                             "the server", option="--target")
        _refuse_given(v, _TARGET_ONLY, "--target-url", "the server runs the target with its own settings")
    if urls["reference"]:
        _refuse_given(v, _REFERENCE_ONLY, "--reference-url", "the server is the reference")
        if v["yardstick"] not in ("auto", "none", None):
            raise UsageError("--yardstick: a yardstick runs where the reference runs, and --reference-url has "
                             "none here", option="--yardstick")
    served_roles = [role for role, url in urls.items() if url]
    profiled = {"reference", "target"} if v["profile"] else set()
    if v["profile_side"]:
        profiled = {v["profile_side"]}
    if profiled & set(served_roles):
        raise UsageError(f"--profile: the {'/'.join(sorted(profiled & set(served_roles)))} is a server, which the "
                         "harness cannot profile; use --profile-side for the side it runs", option="--profile")
    for name, why in (("localize", "hidden states"), ("localize_modules", "hidden states"), ("ab", "two engines")):
        if v[name]:
            flag = f"--{name.replace('_', '-')}"
            raise UsageError(f"{flag} needs {why} of sides the harness runs; a server side gives only logprobs",
                             option=flag)


def _refuse_given(v: dict[str, Any], defaults: dict[str, Any], url_option: str, why: str) -> None:
    for name, default in defaults.items():
        if v[name] != default and v[name] not in (None, "", {}):
            flag = {"reference_file": "--reference"}.get(name, f"--{name.replace('_', '-')}")
            raise UsageError(f"{flag} cannot be combined with {url_option}: {why}", option=flag)
