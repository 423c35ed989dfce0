"""Pipeline step: the server sides (``--target-url``, ``--reference-url``), probed first and captured over HTTP.

``probe_servers`` runs right after the options are read, before any model is prepared or engine started: an
unreachable server, a wrong URL, a missing API key, a model the server does not serve, or a server that
refuses what the capture will ask (token-id prompts, the logprobs width, the way of scoring; asked of it on a
short prompt) ends the run in seconds (exit 3). ``capture_plan`` is how the run captures any side: a worker for the sides the harness
runs, the HTTP client (``remote``) for a server, in the main process (it is plain HTTP; no torch, no
vLLM), writing the same capture folder. It owns no parsing and no comparison.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

from ..capture.store import FULL, Capture, load_capture
from ..remote.advice import PROBE_TEXT
from ..remote.capture import ServedPrompt, capture_server, side_info
from ..remote.client import Endpoint, ServerClient, ServerError
from ..remote.probe import ServerInfo, probe_logprobs, probe_server
from ..setup.options import REFERENCE, TARGET, RunOptions
from ..setup.request import CaptureRequest
from ..setup.server import read_api_key
from .captures import Captured, SidePlan, run_side, side_job
from .context import RunContext

# The probe's prompt is what the capture will send, shortened: token ids for a target (it is fed the reference's
# prompt ids), text for a reference server (it generates from the prompt's text). Small ids exist in every
# vocabulary (special tokens in some, which a server scores like any other).
PROBE_IDS = [9, 10, 11, 12, 13]


def endpoint_of(options: RunOptions, url: str) -> Endpoint:
    """How to reach one server: the key is read here, from its environment variable or file, at each use."""
    s = options.server
    return Endpoint(base=url, api_key=read_api_key(s.api_key_env, s.api_key_file), retries=s.retries,
                    read_timeout=options.capture.timeout, concurrency=options.capture.batch)


def probe_servers(ctx: RunContext, options: RunOptions) -> dict[str, ServerInfo]:
    """Each server side's ``ServerInfo``: what it serves, its version, how its logprobs are asked for and how
    many it gives (``remote.probe``), keyed by role; empty when no side is a server."""
    found = {}
    for role in (REFERENCE, TARGET):
        url = options.side(role).url
        if not url:
            continue
        # the reference and a free-running target generate; a teacher-forced target is scored
        how = "forced" if role == TARGET and options.capture.align == "forced" else "free"
        asked = options.server.logprobs if options.server.logprobs is not None else options.capture.logprobs
        ctx.progress(role, f"asking the server at {url} what it serves", {"stage": "probe"})
        t0 = time.monotonic()
        prompt = PROBE_TEXT if role == REFERENCE else list(PROBE_IDS)
        try:
            info = asyncio.run(_probe(endpoint_of(options, url), options.server.served_model, prompt, asked,
                                      options.server.scoring, how))
        except ServerError as exc:  # which side, when both are servers
            raise ServerError(f"the {role} server: {exc.message}") from None
        for note in info.notes:
            ctx.note(f"{role} server: {note}")
        ctx.progress(role, f"{info.software} serves {info.model} ({info.scoring}, "
                           f"{'full vocabulary' if info.logprobs == -1 else f'top {info.logprobs}'}; "
                           f"{time.monotonic() - t0:.1f} s)", {"stage": "engine_ready"})
        found[role] = info
    return found


async def _probe(endpoint: Endpoint, served_model: str | None, prompt: list[int] | str, asked: int, scoring: str,
                 how: str) -> ServerInfo:
    async with ServerClient(endpoint) as client:
        info = await probe_server(client, served_model)
        await probe_logprobs(client, info, prompt, asked, scoring, how)
        return info


def capture_plan(ctx: RunContext, options: RunOptions, run_dir: Path, label: str, plan: SidePlan,
                 request: CaptureRequest | None = None, reference: Capture | None = None,
                 progress_label: str | None = None) -> Captured:
    """One side's capture under ``run_dir/label``: by a worker, or by the HTTP client for a server side
    (teacher-forced on ``reference``'s tokens when the request says ``force``)."""
    request = request or plan.request
    if plan.server is None:
        return run_side(ctx, side_job(ctx, run_dir, label, plan, request), progress_label)
    t0 = time.monotonic()
    folder = run_dir / label / "capture"
    vocab = reference.vocab_size if reference is not None and reference.mode == FULL else plan.vocab
    capture = capture_server(
        endpoint_of(options, plan.side.url), plan.server, served_prompts(request, reference),
        max_tokens=request.max_tokens, vocab=int(vocab), store=request.store, settings=dict(request.settings),
        side=side_info(label, plan.server, plan.side.dtype), folder=folder,
        progress=lambda _side, message, data: ctx.progress(progress_label or label, message, data))
    elapsed = time.monotonic() - t0
    return Captured(load_capture(capture.root, verify_arrays=True), elapsed, {"capture": str(folder),
                                                                             "elapsed_s": elapsed})


def served_prompts(request: CaptureRequest, reference: Capture | None) -> list[ServedPrompt]:
    """What to send for each prompt: the reference's prompt ids and tokens to score (teacher forcing), or
    the reference's prompt ids to generate from (free), or the prompt's text (no reference yet)."""
    out = []
    for i, prompt in enumerate(request.prompts):
        record = reference.prompts[i] if reference is not None else None
        ids = tuple(record.prompt_token_ids) if record is not None else None
        force = tuple(request.force[i]) if request.force is not None else None
        out.append(ServedPrompt(index=i, prompt=prompt, prompt_ids=ids, force=force,
                                text=record.text if record is not None and force is not None else ""))
    return out


def check_prompt_tokens(ctx: RunContext, reference: Capture, target: Capture) -> None:
    """A note per prompt whose prompt tokens differ between the sides: a server tokenizes text prompts itself
    (a server reference) and may add or drop a BOS token, so the target was fed another context there."""
    for i, (r, t) in enumerate(zip(reference.prompts, target.prompts)):
        if list(r.prompt_token_ids) != list(t.prompt_token_ids):
            ctx.note(f"prompt {i}: the sides' prompt tokens differ ({len(r.prompt_token_ids)} vs "
                     f"{len(t.prompt_token_ids)} tokens): the server tokenizes differently, so the contexts "
                     "of this prompt are not the same")


def with_server(plan: SidePlan, server: ServerInfo | None, vocab: int) -> SidePlan:
    return replace(plan, server=server, vocab=vocab)
