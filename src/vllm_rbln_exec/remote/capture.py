"""A server side's capture: one completion request per prompt, sent concurrently, written as a capture folder.

Teacher-forced (the target of ``--align forced``): the prompt's token ids followed by the reference's
tokens go out as the prompt, with ``prompt_logprobs`` (or ``echo`` and ``logprobs``); the rows at the
reference's positions come back from one forward pass over the whole sequence, so every position has the
reference's context. Free-running (the reference, or ``--align free``): the server generates greedily with
``logprobs`` per generated token, its own tokens and its own decode path. Either way the rows go through
``capture.store`` exactly as a worker's do (q16 for full rows), so comparing, judging and every report
read them unchanged; top-N rows keep N+1 columns (``rows.topn_row``). Requests go out ``--batch`` at a time
(the server batches them as it batches any traffic), their responses are parsed on a thread so that the
others keep streaming in, and progress is reported per prompt. It must not start processes or import
torch or vLLM.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..capture.store import FULL, TOPN, Capture, CaptureWriter, SideInfo
from .client import Endpoint, ServerClient, ServerError, status_error
from .probe import ECHO, GENERATE, PROBE_TEXT_TOKENS, PROMPT_LOGPROBS, ServerInfo, request_body, response_cap
from .rows import (
    CappedRows,
    ImpossibleRows,
    RowError,
    prompt_logprob_entries,
    read_array,
    rows_of,
    token_id,
    top_logprob_entries,
)

Progress = Callable[[str, str, dict[str, Any]], None]
BAR_WIDTH = 20


@dataclass(frozen=True)
class ServedPrompt:
    """One prompt to capture. ``force``: the tokens to score (teacher forcing), with ``prompt_ids`` (the
    reference's prompt tokens) and ``text`` (the reference's text of them); without ``force`` the server
    generates, from ``prompt_ids`` when known (the same context as the reference) else from ``prompt``."""

    index: int
    prompt: str
    prompt_ids: tuple[int, ...] | None = None
    force: tuple[int, ...] | None = None
    text: str = ""


@dataclass
class _Parsed:
    prompt_ids: list[int]
    tokens: list[int]
    text: str
    rows: Any
    ids: Any


def capture_server(endpoint: Endpoint, info: ServerInfo, prompts: list[ServedPrompt], *, max_tokens: int,
                   vocab: int, store: str, settings: dict[str, Any], side: SideInfo, folder: Path,
                   progress: Progress, transport: httpx.AsyncBaseTransport | None = None) -> Capture:
    """Capture ``prompts`` from the server into ``folder``; ServerError (exit 3) on anything unusable."""
    settings = {**settings, "tokenizer_vocab_size": vocab, "logprobs": info.logprobs, "server": info.to_json(),
                "effective": effective_settings(info)}
    writer = CaptureWriter(folder, side, settings, FULL if info.logprobs == -1 else TOPN)
    t0 = time.perf_counter()
    traffic = asyncio.run(_capture_all(endpoint, info, prompts, max_tokens, vocab, writer, progress, transport))
    writer.add_time("capture_total_s", time.perf_counter() - t0)
    for key, value in (("requests", traffic.requests), ("retries", traffic.retries),
                       ("response_mb", traffic.bytes / 1e6), ("server_wait_s", traffic.wait_s),
                       ("generated_tokens", sum(len(r.token_ids) for r in writer.records.values()))):
        writer.add_time(key, float(value))
    return writer.finish(vocab_size=vocab if info.logprobs == -1 else None, store=store)


def effective_settings(info: ServerInfo) -> dict[str, Any]:
    """What the report shows as the server side's settings in force."""
    record = info.model_record
    return {"url": info.base, "model": info.model, "software": info.software, "scoring": info.scoring,
            "logprobs": "full vocabulary" if info.logprobs == -1 else f"top {info.logprobs}",
            "root": record.get("root"), "max_model_len": record.get("max_model_len"),
            "server_header": info.headers.get("server")}


def side_info(label: str, info: ServerInfo, dtype: str) -> SideInfo:
    return SideInfo(side=label, device="server", engine="openai", engine_version=info.software,
                    platform="remote", dtype=dtype, model=info.model, hostname=urlsplit(info.base).netloc)


async def _capture_all(endpoint: Endpoint, info: ServerInfo, prompts: list[ServedPrompt], max_tokens: int,
                       vocab: int, writer: CaptureWriter, progress: Progress, transport):
    gate = asyncio.Semaphore(max(1, endpoint.concurrency))
    done = 0
    label = writer.info.side
    progress(label, f"{bar(0, len(prompts))} 0/{len(prompts)} prompts", {"stage": "generate", "done": 0,
                                                                         "total": len(prompts)})
    async with ServerClient(endpoint, transport) as client:
        async def one(p: ServedPrompt) -> None:
            nonlocal done
            async with gate:
                parsed = await _one_prompt(client, info, p, max_tokens, vocab, label)
            writer.add(p.index, p.prompt, parsed.prompt_ids, parsed.tokens, parsed.text, logprobs=parsed.rows,
                       ids=parsed.ids)
            done += 1
            mb = client.traffic.bytes / 1e6
            progress(label, f"{bar(done, len(prompts))} {done}/{len(prompts)} prompts, {mb:.0f} MB received",
                     {"stage": "generate", "done": done, "total": len(prompts)})

        try:
            async with asyncio.TaskGroup() as group:
                for p in prompts:
                    group.create_task(one(p))
        except* Exception as errors:  # the first failure, as itself: a ServerError is exit 3 with its message
            raise errors.exceptions[0] from None
        return client.traffic


async def _one_prompt(client: ServerClient, info: ServerInfo, p: ServedPrompt, max_tokens: int,
                      vocab: int, label: str) -> _Parsed:
    if p.force is not None:
        sequence = list(p.prompt_ids or ()) + list(p.force)
        body = request_body(info.model, info.scoring, sequence, info.logprobs, max_tokens=1)
        positions = len(sequence) + 1
    else:
        prompt = list(p.prompt_ids) if p.prompt_ids is not None else p.prompt
        body = request_body(info.model, GENERATE, prompt, info.logprobs, max_tokens=max_tokens)
        positions = (len(prompt) if isinstance(prompt, list) else PROBE_TEXT_TOKENS + len(prompt)) + max_tokens
    response = await client.post("completions", body, cap=response_cap(positions, info.logprobs, vocab))
    if response.status_code != 200:
        raise status_error(f"prompt {p.index} ({info.scoring})", response)
    try:
        return await asyncio.to_thread(_parse, response.content, info, p, vocab)
    except ImpossibleRows as exc:
        raise ServerError(f"the {label} server's logprobs at prompt {p.index}, {exc}: these are not "
                          "log-probabilities, and the run stops rather than score them") from None
    except CappedRows as exc:
        raise ServerError(f"prompt {p.index}: {exc}: the server caps logprobs without an error. Start it with a "
                          f"higher limit (vLLM: --max-logprobs -1) or ask for what it gives (--server-logprobs "
                          f"{exc.returned})") from None
    except RowError as exc:
        raise ServerError(f"prompt {p.index}: {exc}") from None


def _parse(body: bytes, info: ServerInfo, p: ServedPrompt, vocab: int) -> _Parsed:
    try:
        return _parse_any(body, info, p, vocab)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        if isinstance(exc, RowError):
            raise
        raise RowError(f"the response is not an OpenAI completion the harness can read ({type(exc).__name__})") from None


def _parse_any(body: bytes, info: ServerInfo, p: ServedPrompt, vocab: int) -> _Parsed:
    if p.force is None:
        return _parse_generated(body, info, p, vocab)
    start, tokens = len(p.prompt_ids or ()), list(p.force)

    def keep(j: int) -> bool:
        return start <= j < start + len(tokens)

    if info.scoring == PROMPT_LOGPROBS:
        skeleton, entries = read_array(body, "prompt_logprobs", prompt_logprob_entries, keep)
    elif info.scoring == ECHO:
        skeleton, entries = read_array(body, "top_logprobs", top_logprob_entries, keep)
    else:
        raise RowError(f"cannot score given tokens with {info.scoring!r}")
    if entries is None or len(entries) < start + len(tokens):
        raise RowError(f"the server returned {0 if entries is None else len(entries)} prompt logprob positions "
                       f"for a prompt of {start + len(tokens)} tokens")
    choice = _choice(skeleton)
    sent = list(p.prompt_ids or ()) + tokens
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and list(echoed)[: len(sent)] != sent:
        raise RowError("the server did not score the token ids it was sent (it re-tokenized or added tokens)")
    rows, ids = rows_of(entries[start:start + len(tokens)], tokens, info.logprobs, vocab)
    return _Parsed(list(p.prompt_ids or ()), tokens, p.text, rows, ids)


def _parse_generated(body: bytes, info: ServerInfo, p: ServedPrompt, vocab: int) -> _Parsed:
    skeleton, entries = read_array(body, "top_logprobs", top_logprob_entries)
    choice = _choice(skeleton)
    tokens = choice.get("token_ids")
    if tokens is None:
        names = (choice.get("logprobs") or {}).get("tokens")
        if names is None:
            raise RowError("the server returned neither token_ids nor token_id:N tokens")
        tokens = [token_id(t) for t in names]
    prompt_ids = choice.get("prompt_token_ids")
    if prompt_ids is None:
        if p.prompt_ids is None:
            raise RowError("the server did not return the prompt's token ids (vLLM's return_token_ids)")
        prompt_ids = p.prompt_ids
    if entries is None:
        raise RowError("the server returned no logprobs for the generated tokens")
    rows, ids = rows_of(entries[: len(tokens)], [int(t) for t in tokens], info.logprobs, vocab)
    return _Parsed([int(t) for t in prompt_ids], [int(t) for t in tokens], str(choice.get("text") or ""), rows,
                   ids)


def _choice(skeleton: dict[str, Any]) -> dict[str, Any]:
    choices = skeleton.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise RowError("the response does not hold exactly one choice")
    return choices[0]


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """A text progress bar, ``[######--------------]``."""
    filled = width if total <= 0 else round(width * done / total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"
