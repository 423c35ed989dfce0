"""A server's logprobs as capture rows: parsing responses, one position at a time, and catching capped rows.

An OpenAI-compatible server gives each position's logprobs as a JSON object: vLLM's ``prompt_logprobs``
as ``{"<id>": {"logprob": x, "rank": r, "decoded_token": s}}``, the ``logprobs.top_logprobs`` of
``echo`` or of a generation as ``{"token_id:<id>": x}`` (with ``return_tokens_as_token_ids``). This module
turns them into the capture store's rows (``capture.store``): a dense float32 row over the vocabulary when
the whole vocabulary came back, else the top N in rank order plus the row's own token (``topn_row``). A
full-vocabulary response is ~3.7 MB of JSON per position (SmolLM2's 49152 tokens, measured on vLLM 0.32),
so a response's big array is never decoded whole: ``read_array`` decodes it one element at a time
(``json.loads`` of a 149 MB response took 1.3 GB). A row that holds fewer entries than were asked, or
whose entries past some rank are all padding, is a capped row (``CappedRows``): the server limits logprobs
(vLLM's ``--max-logprobs``, 20 by default) without saying so, and such rows must never be compared as if
they were what was asked. Values that cannot be log-probabilities (positive, NaN, +inf, rows whose
probabilities sum above 1) are ``ImpossibleRows``, found first. Pure logic: no network, no engines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from ..compare.sanity import impossible_entries
from .client import load_json

# OpenAI's JSON has no infinity: vLLM writes -inf logprobs as this (clamp_prompt_logprobs, max(lp, -9999.0))
NEG_INF_SENTINEL = -9999.0
_TOKEN_ID = re.compile(r"token_id:(-?\d+)$")
_DECODER = json.JSONDecoder()
_SPACE = " \t\r\n"


class RowError(ValueError):
    """A response whose logprobs cannot be read as rows (unknown shape, token ids missing)."""


class ImpossibleRows(RowError):
    """Values that cannot be log-probabilities: NaN, +inf, above 0, or a row whose probabilities do not sum to 1."""


class CappedRows(RowError):
    """The server returned fewer logprobs per position than were asked (or padded the rest)."""

    def __init__(self, message: str, returned: int, asked: int):
        super().__init__(message)
        self.returned = returned
        self.asked = asked


Entries = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]  # (ids, logprobs, ranks) of one position


def read_array(body: bytes, key: str, reader: Callable[[Any], Entries],
               keep: Callable[[int], bool] = lambda i: True) -> tuple[dict[str, Any], list[Entries | None] | None]:
    """(the response with ``null`` where the array under ``key`` was, each kept element read by ``reader``).

    Elements are decoded one at a time and turned into arrays at once, so only one position's Python
    objects are alive; elements that are ``null`` or not kept come back as None. ``key`` must occur once;
    ``"key":`` cannot occur inside a JSON string (its quotes would be escaped), so finding it as text is
    safe. The list is None when the response has no such array (the server did not send it).

    The body is read as Latin-1, one character per byte: JSON's structure is ASCII and no byte of a
    multi-byte UTF-8 character is, so ids, numbers and brackets read the same, while the token texts
    (which are not used) come out garbled. As UTF-8, one emoji among the decoded tokens made Python hold
    the 149 MB body as 595 MB (4 bytes per character); the rest of the response is decoded as UTF-8."""
    text = body.decode("latin-1")
    marker = f'"{key}":'
    at = text.find(marker)
    if at < 0:
        return _loads(text), None
    if text.find(marker, at + len(marker)) >= 0:
        raise RowError(f"the response holds {key!r} more than once (one prompt per request was sent)")
    start = _skip_space(text, at + len(marker))
    if text.startswith("null", start):
        return _loads(text), None
    if text[start:start + 1] != "[":
        raise RowError(f"{key!r} is not a list in the response")
    out: list[Entries | None] = []
    i = _skip_space(text, start + 1)
    closed = text[i:i + 1] == "]"
    while not closed:
        try:
            value, i = _DECODER.raw_decode(text, i)
        except RecursionError:
            raise RowError(f"the {key!r} list in the response is nested too deeply to be logprobs") from None
        except ValueError as exc:
            raise RowError(f"the {key!r} list in the response is malformed: {exc}") from None
        out.append(reader(value) if value is not None and keep(len(out)) else None)
        i = _skip_space(text, i)
        closed = text[i:i + 1] == "]"
        if not closed and text[i:i + 1] != ",":
            raise RowError(f"the {key!r} list in the response is malformed (no ',' between entries)")
        i = _skip_space(text, i + (0 if closed else 1))
    return _loads(text[:start] + "null" + text[i + 1:]), out


def _loads(latin: str) -> dict[str, Any]:
    try:
        data = load_json(latin.encode("latin-1"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RowError(f"the response is not JSON within the limits: {exc}") from None
    if not isinstance(data, dict):
        raise RowError("the response is not a JSON object")
    return data


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def prompt_logprob_entries(position: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids, logprobs, ranks) of one position of vLLM's ``prompt_logprobs`` (``{"<id>": {"logprob", "rank"}}``)."""
    if not isinstance(position, dict) or not position:
        raise RowError("a prompt_logprobs position is not an object of token ids")
    try:
        ids = np.fromiter((int(k) for k in position), dtype=np.int64, count=len(position))
        vals = np.fromiter((float(v["logprob"]) for v in position.values()), dtype=np.float64, count=len(position))
        ranks = [v.get("rank") for v in position.values()]
        rank_arr = None if any(r is None for r in ranks) else np.asarray(ranks, dtype=np.int64)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise RowError(f"a prompt_logprobs entry is not {{id: {{logprob, rank}}}}: {exc}") from None
    return ids, vals, rank_arr


def top_logprob_entries(position: Any) -> tuple[np.ndarray, np.ndarray, None]:
    """(ids, logprobs, None) of one ``top_logprobs`` position keyed ``token_id:<id>``."""
    if not isinstance(position, dict) or not position:
        raise RowError("a top_logprobs position is not an object")
    ids = np.empty(len(position), dtype=np.int64)
    vals = np.empty(len(position), dtype=np.float64)
    for n, (key, value) in enumerate(position.items()):
        match = _TOKEN_ID.match(key)
        if match is None:
            raise RowError(f"the server names tokens by their text ({key[:40]!r}), not by id: the harness needs "
                           "token ids (vLLM's return_tokens_as_token_ids; another server must support it)")
        try:
            ids[n] = int(match.group(1))
            vals[n] = float(value)
        except (ValueError, TypeError, OverflowError):
            raise RowError(f"a top_logprobs entry is not {{'token_id:N': logprob}}: {key[:40]!r}") from None
    return ids, vals, None


def token_id(text: str) -> int:
    """The id in a ``token_id:<id>`` token string."""
    match = _TOKEN_ID.match(str(text))
    if match is None:
        raise RowError(f"token {str(text)[:40]!r} is not of the form token_id:<id>")
    return int(match.group(1))


def full_row(ids: np.ndarray, vals: np.ndarray, vocab: int) -> np.ndarray:
    """A dense float32 row over ``vocab`` tokens; CappedRows when the entries do not cover the vocabulary."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise RowError(f"token id {int(ids.max())} is outside the reference's vocabulary of {vocab}: the server "
                       "serves another model or tokenizer")
    row = np.full(vocab, np.nan, dtype=np.float32)
    row[ids] = _unclamp(vals)
    missing = int(np.isnan(row).sum())
    if missing:
        returned = vocab - missing
        raise CappedRows(f"the server returned {returned} logprobs for a position, the full vocabulary is "
                         f"{vocab}", returned, vocab)
    return row


def topn_row(ids: np.ndarray, vals: np.ndarray, ranks: np.ndarray | None, token: int, n: int,
             vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, ids) of width ``n + 1``: the top ``n`` in rank order, then ``token``'s own entry (repeated when
    it is in the top ``n``; a forced token outside them is known exactly this way, so Δp and perplexity of
    the reference's token stay exact). Servers list the row's token besides the top N, so N+1 entries are
    normal; fewer than N real ones (or the rest padded with -inf) is a cap."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise RowError(f"token id {int(ids.max())} is outside the reference's vocabulary of {vocab}: the server "
                       "serves another model or tokenizer")
    vals = _unclamp(vals)
    if ranks is not None:  # vLLM's own ranks (1 = top); the token's entry may carry a rank past n
        order = np.lexsort((ids, ranks))
        top = order[ranks[order] <= n][:n]
    else:
        order = np.lexsort((ids, -vals))
        top = order[:n]
    real = int(np.isfinite(vals[top]).sum())
    want = min(n, vocab)
    if top.size < want or real < want:
        returned = min(int(top.size), real)
        raise CappedRows(f"the server returned {returned} logprobs for a position where {want} were asked"
                         + (" (the rest padded with -inf)" if top.size >= want else ""), returned, want)
    where = np.flatnonzero(ids == token)
    if where.size == 0:
        raise RowError(f"the server's logprobs for a position leave out its own token {token}")
    pick = np.append(top, where[0])
    return vals[pick].astype(np.float32), ids[pick].astype(np.int32)


def _unclamp(vals: np.ndarray) -> np.ndarray:
    out = np.asarray(vals, dtype=np.float64).copy()
    out[out <= NEG_INF_SENTINEL] = -np.inf
    return out


def rows_of(entries: list[Entries | None], tokens: list[int], width: int,
            vocab: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of consecutive positions (``tokens[t]``: the token that follows position ``t``): [T, V] when
    ``width`` is -1, else ([T, N+1] values, [T, N+1] ids) (``topn_row``). Values that cannot be
    log-probabilities (``compare.sanity``) are an ``ImpossibleRows`` naming the position, checked before
    anything else (a NaN once read as -inf padding, and +5.0 as a probability)."""
    if len(entries) != len(tokens):
        raise RowError(f"{len(entries)} logprob positions for {len(tokens)} tokens")
    if any(e is None for e in entries):
        raise RowError("the server sent no logprobs for a position that needs them")
    for t, (_, vals, _) in enumerate(entries):
        problem = impossible_entries(_unclamp(vals), full=False)
        if problem:
            raise ImpossibleRows(f"position {t}: {problem}")
    if width == -1:
        rows = np.empty((len(tokens), vocab), dtype=np.float32)
        for t, (ids, vals, _) in enumerate(entries):
            rows[t] = full_row(ids, vals, vocab)
            problem = impossible_entries(rows[t], full=True)
            if problem:
                raise ImpossibleRows(f"position {t}: {problem}")
        return rows, None
    vals_out = np.empty((len(tokens), width + 1), dtype=np.float32)
    ids_out = np.empty((len(tokens), width + 1), dtype=np.int32)
    for t, (ids, vals, ranks) in enumerate(entries):
        vals_out[t], ids_out[t] = topn_row(ids, vals, ranks, tokens[t], width, vocab)
    return vals_out, ids_out
