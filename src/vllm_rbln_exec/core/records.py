"""Frozen dataclass records to and from plain JSON data, strictly.

What crosses a process boundary or lands in a file is a typed record; this
module turns one into JSON-ready data and reads it back through the same type,
refusing unknown or missing fields (a request written by another version of
the harness fails loudly instead of being half-understood). It knows nothing
about what the records mean.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any


class RecordError(ValueError):
    """Data that does not fit the record type it is read as."""


def to_data(record: Any) -> Any:
    """A record (nested dataclasses, tuples, dicts) as plain JSON-ready data."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: to_data(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, (list, tuple)):
        return [to_data(x) for x in record]
    if isinstance(record, dict):
        return {str(k): to_data(v) for k, v in record.items()}
    return record


def from_data(cls: type, data: Any, where: str = "") -> Any:
    """Read ``data`` as an instance of the dataclass ``cls``; RecordError names the first field that does not fit."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecordError(f"{where}: unknown field(s) {', '.join(unknown)}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}: missing field {f.name}")
            continue
        values[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
    return cls(**values)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_data(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        return dict(value)
    if tp in (int, float, str, bool) and not _fits(tp, value):
        raise RecordError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is frozenset:
        return frozenset(value)
    return float(value) if tp is float and isinstance(value, int) else value


def _fits(tp: type, value: Any) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)
