"""The shape of ``capture.json`` as read from outside: types, names and sizes, checked before use.

A capture folder or reference file may come from another machine (a colleague's golden file, a CI
artifact), so its metadata is checked here before any field is used: every value of the expected type
and range, and every array file a plain name inside the capture (no ``/``, no ``..``, no leading dot), so
a ``logprobs_file`` of ``/dev/zero`` or ``../../etc/passwd`` is refused before anything is opened. It
owns these checks only: the format itself lives in ``store``, and nothing here reads files.
"""

from __future__ import annotations

import re
from typing import Any

# An array file or archive member: what CaptureWriter names (p0000.logprobs.npy, capture.json), with room.
MEMBER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MAX_PROMPTS = 100_000
MAX_TOKEN_ID = 2**31 - 1
_SIDE_TEXT = ("side", "device", "engine", "engine_version", "torch_version", "platform", "dtype", "model",
              "model_fingerprint", "tokenizer_fingerprint", "hostname")
_KEY_INTS = {"max_tokens": (1, 10**7), "logprobs": (-1, 10**7)}


class SchemaError(ValueError):
    """capture.json has a value of the wrong type or range (the message names the field)."""


def check_member_name(name: Any, what: str) -> str:
    """``name`` if it is a plain file name inside the capture; else SchemaError naming ``what``."""
    if not isinstance(name, str) or not MEMBER_NAME.fullmatch(name):
        raise SchemaError(f"{what} {_shown(name)} is not a plain file name inside the capture")
    return name


def check_capture_json(data: Any, modes: tuple[str, ...]) -> None:
    """SchemaError unless ``data`` has the shape of a capture's metadata (schema 3)."""
    _need(isinstance(data, dict), "the metadata is not a JSON object")
    info = data.get("info")
    _need(isinstance(info, dict), "info is not an object")
    for name in _SIDE_TEXT:
        _need(isinstance(info.get(name, ""), str), f"info.{name} is not a string")
    for name in ("timings", "env"):
        _need(isinstance(info.get(name, {}), dict), f"info.{name} is not an object")
    _need(all(_number(v) for v in info.get("timings", {}).values()), "info.timings holds a value that is no number")
    settings = data.get("settings")
    _need(isinstance(settings, dict), "settings is not an object")
    _check_key_fields(settings.get("key_fields"))
    _need(data.get("mode") in modes, f"mode {_shown(data.get('mode'))} is none of {', '.join(modes)}")
    _need(_int(data.get("vocab_size"), 0, 10**8), f"vocab_size {_shown(data.get('vocab_size'))} is no count")
    prompts = data.get("prompts")
    _need(isinstance(prompts, list) and len(prompts) <= MAX_PROMPTS,
          f"prompts is not a list of at most {MAX_PROMPTS} records")
    for i, record in enumerate(prompts):
        _check_record(i, record)


def _check_key_fields(fields: Any) -> None:
    if fields is None:
        return
    _need(isinstance(fields, dict), "settings.key_fields is not an object")
    for name, (low, high) in _KEY_INTS.items():
        if fields.get(name) is not None:
            _need(_int(fields[name], low, high), f"settings.key_fields.{name} {_shown(fields[name])} is out of range")
    _need(fields.get("store") is None or isinstance(fields["store"], str), "settings.key_fields.store is no string")
    prompts = fields.get("prompts")
    _need(prompts is None or (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)),
          "settings.key_fields.prompts is not a list of strings")


def _check_record(i: int, record: Any) -> None:
    where = f"prompts[{i}]"
    _need(isinstance(record, dict), f"{where} is not an object")
    _need(record.get("index") == i and _int(record.get("index"), 0, MAX_PROMPTS), f"{where}.index is not {i}")
    for name in ("prompt", "text"):
        _need(isinstance(record.get(name), str), f"{where}.{name} is not a string")
    for name in ("prompt_token_ids", "token_ids"):
        ids = record.get(name)
        _need(isinstance(ids, list) and all(_int(t, 0, MAX_TOKEN_ID) for t in ids),
              f"{where}.{name} is not a list of token ids")
    for name in ("logprobs_file", "ids_file", "floor_file"):
        if record.get(name) is not None:
            check_member_name(record[name], f"{where}.{name}")
    # q16_range is checked where it is used (store._q16_span), with the levels it decodes
    digests = record.get("digests", {})
    _need(isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values()),
          f"{where}.digests is not an object of strings")
    for name in digests:
        check_member_name(name, f"{where}.digests key")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise SchemaError(message)


def _int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
