"""What a server is and what it allows, asked before anything else of the run starts.

``probe_server`` reads ``/v1/models`` (which model; vLLM adds its ``root`` and ``max_model_len``), ``/version``
(vLLM's version; other servers may have none) and the response headers (``server``, and others that name
the software), then ``probe_logprobs`` sends one tiny completion to learn how logprobs come back: whether
the server returns vLLM's ``prompt_logprobs`` or only ``echo`` with logprobs, and how many it allows (vLLM
refuses more than ``--max-logprobs``, 20 by default, with "max allowed: 20"). All of it goes into the
report. It owns no capture and no parsing of logprobs rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..compare.sanity import impossible_entries
from .advice import diagnose
from .client import Reply, ServerClient, ServerError, error_text, logprobs_cap, status_error
from .rows import CappedRows, RowError, prompt_logprob_entries, read_array, top_logprob_entries

PROMPT_LOGPROBS, ECHO, GENERATE = "prompt_logprobs", "echo", "generate"
PROBE_TEXT_TOKENS = 64  # a text probe prompt's tokens, at most, for its answer's cap
# A probe asks before the model is read, so the vocabulary is unknown: its full-vocabulary answer may hold up to
# this many entries a position (Gemma 3's 262144 tokens are the largest vocabulary among common models)
PROBE_MAX_VOCAB = 262144
ENTRY_BYTES = 256  # one logprob entry as JSON at most; vLLM's prompt_logprobs measured ~75 B (id, logprob, rank, text)
BASE_CAP = 1 << 20  # the rest of a completion: ids, text, usage
# Response headers worth a line in the report: they name the software. Never cookies or auth.
_HEADERS = ("server", "x-powered-by", "x-vllm-version", "openai-version", "x-request-id-prefix")
_MODEL_FIELDS = ("id", "owned_by", "root", "parent", "max_model_len", "created")


@dataclass
class ServerInfo:
    """A server side as probed: what it serves and how its logprobs are asked for (recorded in the report)."""

    base: str
    model: str
    model_record: dict[str, Any] = field(default_factory=dict)  # its /v1/models entry (selected fields)
    other_models: list[str] = field(default_factory=list)
    version: str | None = None  # /version, when the server has one
    headers: dict[str, str] = field(default_factory=dict)
    scoring: str = PROMPT_LOGPROBS  # how rows are asked for: prompt_logprobs | echo (teacher-forced) | generate
    asked_logprobs: int = -1
    logprobs: int = -1  # what the server gives: -1 the full vocabulary, else the top N
    notes: list[str] = field(default_factory=list)

    @property
    def software(self) -> str:
        """What serves the model, as far as the server says (vLLM lists itself as the models' owner)."""
        owner = str(self.model_record.get("owned_by") or "")
        name = "vLLM" if owner == "vllm" else owner or self.headers.get("server") or "server"
        return f"{name} {self.version or ''}".strip()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def probe_server(client: ServerClient, served_model: str | None) -> ServerInfo:
    """The model to ask for and what the server says about itself; ServerError (exit 3) within seconds when
    the server is unreachable, and a clear one when it lists no model or not the one named."""
    response = await client.get("models")
    if response.status_code != 200:
        raise status_error(f"GET {client.url('models')}", response)
    try:
        data = response.json().get("data", [])
        entries = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]
    except (ValueError, AttributeError, TypeError) as exc:
        raise ServerError(f"GET {client.url('models')} did not return an OpenAI model list: {exc}") from None
    ids = [str(m["id"]) for m in entries]
    if served_model is None:
        if len(ids) != 1:
            raise ServerError(f"the server lists {len(ids)} models ({', '.join(ids) or 'none'}): name one with "
                              "--served-model")
        served_model = ids[0]
    elif served_model not in ids:
        raise ServerError(f"the server does not serve {served_model!r}; it lists: {', '.join(ids) or 'nothing'}")
    record = next(m for m in entries if str(m["id"]) == served_model)
    info = ServerInfo(base=client.endpoint.base, model=served_model,
                      model_record={k: record[k] for k in _MODEL_FIELDS
                                    if isinstance(record.get(k), (str, int, float)) and not isinstance(record[k], bool)},
                      other_models=[i for i in ids if i != served_model],
                      headers={k: v for k, v in response.headers.items() if k.lower() in _HEADERS})
    info.version = await _version(client)
    return info


async def _version(client: ServerClient) -> str | None:
    try:
        response = await client.get("version", root=True, retries=0)
    except ServerError:
        return None
    if response.status_code != 200:
        return None
    try:
        version = response.json().get("version")
    except (ValueError, AttributeError):
        return None
    return str(version) if version else None


async def probe_logprobs(client: ServerClient, info: ServerInfo, prompt: list[int] | str, asked: int,
                         scoring: str, how: str) -> None:
    """Fill ``info.scoring`` and ``info.logprobs`` with a tiny request of exactly the kind the capture will send
    (``prompt``: token ids, or text where the capture sends text; the logprobs width; prompt_logprobs, echo or
    generation; token-id keys), its answer read as the capture reads it.

    ``how``: ``forced`` (teacher-forced scoring of given tokens) or ``free`` (generation with logprobs).
    ``scoring``: auto | prompt_logprobs | echo (``--server-scoring``). A refusal that names the server's limit
    ("max allowed: 20") turns a full-vocabulary request into top-N at that limit, with a note; any other
    refusal is a ServerError with advice for what the server does take (``advice.diagnose``)."""
    info.asked_logprobs = asked
    kinds = [GENERATE] if how == "free" else ([PROMPT_LOGPROBS, ECHO] if scoring == "auto" else [scoring])
    for kind in kinds:
        width = await _allowed_width(client, info, kind, prompt, asked)
        if width is None:  # the server ignored this way of asking
            continue
        info.scoring = kind
        info.logprobs = width
        if width != asked:
            info.notes.append(f"the server allows at most {width} logprobs per position (asked {_n(asked)}): "
                              f"top-{width} rows, so KL and Δp are bounds (vLLM: start it with --max-logprobs -1 "
                              "for the full vocabulary)")
        return
    raise ServerError("the server returned no prompt logprobs, neither with vLLM's prompt_logprobs nor with echo "
                      "and logprobs (it returns the generated tokens' only): it cannot score given tokens; use "
                      "--align free (generation with logprobs)")


async def _allowed_width(client: ServerClient, info: ServerInfo, kind: str, prompt: list[int] | str,
                         asked: int) -> int | None:
    """The width the server gives for ``kind`` (``asked``, or its stated limit), None when it ignored the ask."""
    n = asked
    for _ in range(2):  # asked, then the limit the refusal named
        response = await ask(client, info.model, kind, prompt, n)
        if response.status_code == 200:
            return n if check_answer(response, kind, prompt, n) else None
        message = error_text(response)
        cap = logprobs_cap(message) if response.status_code in (400, 422) else None
        if cap is None or cap < 1 or (n != -1 and cap >= n):
            raise await diagnose(lambda p, w: ask(client, info.model, kind, p, w), kind, prompt, n, response)
        n = cap
    raise ServerError(f"the server refused {kind} logprobs at its own stated limit ({n})")


async def ask(client: ServerClient, model: str, kind: str, prompt: list[int] | str, n: int) -> Reply:
    """One probe completion (``max_tokens`` 1), its answer capped as a capture's of the same width."""
    # generation returns the generated token's logprobs only; prompt_logprobs and echo the prompt's too
    positions = 1 if kind == GENERATE else (len(prompt) if isinstance(prompt, list) else PROBE_TEXT_TOKENS) + 1
    return await client.post("completions", request_body(model, kind, prompt, n, max_tokens=1),
                             cap=response_cap(positions, n, PROBE_MAX_VOCAB))


def check_answer(response: Reply, kind: str, prompt: list[int] | str, n: int) -> bool:
    """Whether the answer holds logprobs of ``kind`` (False: the server ignored the ask), read as the capture
    reads them: token-id keys, enough entries per position, numbers that are log-probabilities, the token ids
    it was sent; ServerError naming what is wrong otherwise."""
    key = "prompt_logprobs" if kind == PROMPT_LOGPROBS else "top_logprobs"
    reader = prompt_logprob_entries if kind == PROMPT_LOGPROBS else top_logprob_entries
    try:
        skeleton, entries = read_array(response.content, key, reader)
        choices = skeleton.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            raise RowError("the answer does not hold exactly one choice")
        found = [e for e in entries or [] if e is not None]
        # echo honoured: the prompt's positions too (the probe's prompt has several tokens); a server that ignores
        # echo returns the generated token's only (llama.cpp's server: loglikelihoods then score at chance)
        if entries is None or not found or (kind == ECHO and len(entries) < 2):
            return False
        for position, (ids, vals, _) in enumerate(found):
            if n != -1 and ids.size < n:
                raise CappedRows(f"the server returned {ids.size} logprobs for a position where {n} were asked",
                                 int(ids.size), n)
            problem = impossible_entries(vals, full=False)
            if problem:
                raise RowError(f"position {position}: {problem}")
        echoed = choices[0].get("prompt_token_ids")
        if isinstance(prompt, list) and isinstance(echoed, list) and echoed[: len(prompt)] != prompt:
            raise RowError("the server did not score the token ids it was sent (it re-tokenized or added tokens)")
    except CappedRows as exc:
        raise ServerError(f"the probe's {kind} answer: {exc}: the server caps logprobs without an error; start it "
                          f"with a higher limit or try --server-logprobs {exc.returned}") from None
    except RowError as exc:
        raise ServerError(f"the probe's {kind} answer cannot be read as the capture needs it: {exc}") from None
    return True


def request_body(model: str, kind: str, prompt: list[int] | str, logprobs: int, max_tokens: int) -> dict[str, Any]:
    """One completion request. Greedy (temperature 0), EOS ignored (as the harness generates), token ids
    named as ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``) and returned (``return_token_ids``)."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": False, "return_token_ids": True}
    if kind == PROMPT_LOGPROBS:
        body["prompt_logprobs"] = logprobs
    else:
        body.update(logprobs=logprobs, return_tokens_as_token_ids=True)
        if kind == ECHO:
            body["echo"] = True
    if kind == GENERATE:
        body["ignore_eos"] = True
    return body


def response_cap(positions: int, width: int, vocab: int) -> int:
    """The most bytes a completion answer with ``positions`` logprob positions of ``width`` entries (-1: all
    ``vocab``) may hold: ENTRY_BYTES per entry (3.4x vLLM's measured size) plus BASE_CAP."""
    entries = vocab if width == -1 else width + 1
    return BASE_CAP + positions * entries * ENTRY_BYTES


def _n(asked: int) -> str:
    return "the full vocabulary" if asked == -1 else str(asked)
