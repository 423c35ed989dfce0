"""What to tell the user when a server refuses the probe's request: what it does take, found by asking it.

The probe sends exactly what the capture will send (token ids, the logprobs width, the way of scoring). When
the server refuses without naming a limit, a refusal alone says little ("HTTP 500: 1 validation error"), so
``diagnose`` asks up to three variants of the same tiny request (a smaller width, a text prompt, both) and
turns what succeeded into advice: "try --server-logprobs 20", or "this server takes only text prompts".
llama-cpp-python's server (0.3) refuses both ``logprobs: -1`` and token-id prompts with HTTP 500 validation
errors, and a run that learned this only at the first capture request died minutes later, after the
reference was captured. It owns no request format (the probe passes how to ask) and no parsing of rows.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .client import Reply, ServerError, error_text

PROBE_TEXT = "The capital of France is"  # a text prompt, to learn whether token-id prompts are what was refused
FALLBACK_WIDTH = 20  # vLLM's default --max-logprobs, and what most servers allow

Ask = Callable[[list[int] | str, int], Awaitable[Reply]]


async def diagnose(ask: Ask, kind: str, prompt: list[int] | str, width: int, refusal: Reply) -> ServerError:
    """A ServerError for the server's ``refusal`` of (``prompt``, ``width``), with advice from variants it takes."""
    said = f"HTTP {refusal.status_code}: {error_text(refusal)}"
    ids = isinstance(prompt, list)
    variants = []
    if width == -1 or width > FALLBACK_WIDTH:
        variants.append((prompt, FALLBACK_WIDTH))
    if ids:
        variants.append((PROBE_TEXT, width))
        if width == -1 or width > FALLBACK_WIDTH:
            variants.append((PROBE_TEXT, FALLBACK_WIDTH))
    for variant_prompt, variant_width in variants:
        try:
            reply = await ask(variant_prompt, variant_width)
        except ServerError:
            continue
        if reply.status_code != 200:
            continue
        return ServerError(_advice(kind, said, text_only=ids and isinstance(variant_prompt, str), asked=width,
                                   width=variant_width if variant_width != width else None))
    return ServerError(f"the server refused the probe's {kind} request ({_what(prompt, width)}): {said}")


def _advice(kind: str, said: str, *, text_only: bool, asked: int, width: int | None) -> str:
    parts = []
    if text_only:
        parts.append("this server takes only text prompts, and the harness sends token ids so that both sides "
                     "score the same tokens: serve the model with a server that accepts token-id prompts (vLLM "
                     "does) or put a shim in front of it that takes them")
    if width is not None:
        shown = "-1 (the full vocabulary)" if asked == -1 else str(asked)
        parts.append(f"it refuses logprobs {shown} but gives {width} per position: try --server-logprobs {width} "
                     "(top-N rows: KL becomes a lower bound)")
    return f"the server refused the probe's {kind} request ({said}); " + "; ".join(parts)


def _what(prompt: list[int] | str, width: int) -> str:
    shown = f"{len(prompt)} token ids" if isinstance(prompt, list) else "a text prompt"
    return f"{shown}, logprobs {'-1 (the full vocabulary)' if width == -1 else width}"
