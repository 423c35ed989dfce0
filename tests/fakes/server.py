"""A fake OpenAI-compatible completions server for the unit tests of the HTTP client (``remote``), as an
``httpx.MockTransport`` handler: no socket, no process.

It answers the way vLLM 0.32's server does (read from its entrypoints/openai sources and checked against a
real one): ``/v1/models`` with ``owned_by: vllm``, ``/version``, completions with ``prompt_logprobs`` as
``{"<id>": {"logprob", "rank", "decoded_token"}}`` (the first position ``null``), ``logprobs.top_logprobs``
keyed ``token_id:<id>`` (``return_tokens_as_token_ids``), ``-9999.0`` for -inf, ``token_ids`` and
``prompt_token_ids`` (``return_token_ids``), and a 400 "... greater than max allowed: N" past its
``max_logprobs``. Its "model" is a small numpy function of the context, so a test can compute the exact rows.
Knobs make it misbehave: a cap it applies silently, failures before it answers, a required API key, numbers
that are not log-probabilities (``bad_value``: +5.0, NaN or +Infinity in place of each row's top logprob), and
llama-cpp-python's refusals (``llama_cpp``): its server (0.3, ``--logits_all true``) answers ``logprobs: -1``
and token-id prompts with HTTP 500 "validation error" bodies, ignores vLLM's ``prompt_logprobs`` and names
tokens by their text.
"""

from __future__ import annotations

import json

import httpx
import numpy as np

MODEL = "fake/model"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


class FakeServer:
    def __init__(self, vocab: int = 40, max_logprobs: int = -1, *, silent_cap: int | None = None,
                 failures: list[int] | None = None, api_key: str | None = None, prompt_logprobs: bool = True,
                 retry_after: str | None = None, echo: bool = True, bad_value: float | None = None,
                 llama_cpp: bool = False, bad_from: int = 0):
        self.vocab = vocab
        self.max_logprobs = max_logprobs
        self.silent_cap = silent_cap  # answer with only this many entries, no error (a silently capped server)
        self.failures = list(failures or [])  # status codes answered before the real answer, one per request
        self.api_key = api_key
        self.prompt_logprobs = prompt_logprobs  # False: a server that ignores vLLM's extra parameter
        self.retry_after = retry_after
        self.echo = echo  # False: echo ignored, logprobs of generated tokens only (llama.cpp's server)
        self.bad_value = bad_value
        self.bad_from = bad_from  # the first completion request (0-based) whose rows hold bad_value
        self.llama_cpp = llama_cpp
        self.requests: list[dict] = []
        self.headers_seen: list[dict] = []
        self._embed = np.random.default_rng(7).normal(size=(vocab, vocab)) * 2.0

    # -- the "model" ---------------------------------------------------------------------------------
    def row(self, context: list[int]) -> np.ndarray:
        """Logprobs of the token after ``context`` (float32 values, as a server returns them)."""
        logits = self._embed[context[-1] % self.vocab] + 0.05 * len(context)
        logits = logits + 0.3 * self._embed[context[0] % self.vocab] if len(context) > 1 else logits
        return log_softmax(logits).astype(np.float32).astype(np.float64)

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) % self.vocab for c in text][:6] or [1]

    # -- HTTP ----------------------------------------------------------------------------------------
    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.headers_seen.append(dict(request.headers))
        if self.failures:
            code = self.failures.pop(0)
            headers = {"retry-after": self.retry_after} if self.retry_after else {}
            return httpx.Response(code, json={"error": {"message": f"busy ({code})"}}, headers=headers)
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return httpx.Response(401, json={"error": {"message": "Unauthorized"}})
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": MODEL, "object": "model", "owned_by": "vllm", "root": "/models/fake", "max_model_len": 512}]},
                headers={"server": "uvicorn"})
        if path == "/version":
            return httpx.Response(200, json={"version": "0.32.0"})
        if path == "/v1/completions":
            body = json.loads(request.content)
            self.requests.append(body)
            return self.complete(body)
        return httpx.Response(404, json={"detail": "Not Found"})

    def complete(self, body: dict) -> httpx.Response:
        if self.llama_cpp:
            refusal = llama_cpp_refusal(body)
            if refusal is not None:
                return httpx.Response(500, json={"error": {"message": refusal, "type": "internal_server_error",
                                                           "param": None, "code": None}})
            body = {k: v for k, v in body.items() if k != "prompt_logprobs"}  # not a parameter it knows
        prompt = body["prompt"]
        ids = list(prompt) if isinstance(prompt, list) else self.tokenize(prompt)
        for name in ("prompt_logprobs", "logprobs"):
            n = body.get(name)
            asked = self.vocab if n == -1 else n
            cap = self.vocab if self.max_logprobs == -1 else self.max_logprobs
            if asked is not None and asked > cap:
                return httpx.Response(400, json={"error": {"message": f"Requested {name} of {asked}, which is "
                                                           f"greater than max allowed: {cap}", "code": 400}})
        generated, rows = [], []
        context = list(ids)
        for _ in range(int(body.get("max_tokens", 16))):
            row = self.row(context)
            token = int(np.argmax(row))
            generated.append(token)
            rows.append((row, token))
            context.append(token)
        choice = {"index": 0, "text": "".join(chr(97 + t % 26) for t in generated), "finish_reason": "length",
                  "token_ids": generated, "prompt_token_ids": ids, "logprobs": None, "prompt_logprobs": None}
        if body.get("prompt_logprobs") is not None and self.prompt_logprobs:
            n = body["prompt_logprobs"]
            choice["prompt_logprobs"] = [None] + [self._ranked(self.row(ids[:j]), ids[j], n) for j in range(1, len(ids))]
        if body.get("logprobs") is not None:
            n, echo = body["logprobs"], body.get("echo") and self.echo
            positions = [(self.row(ids[:j]), ids[j]) for j in range(1, len(ids))] if echo else []
            tops = ([None] if echo else []) + [self._keyed(r, t, n) for r, t in positions + rows]
            tokens = (ids if echo else []) + generated
            choice["logprobs"] = {"tokens": [f"token_id:{t}" for t in tokens], "top_logprobs": tops,
                                  "token_logprobs": [None] * len(tokens), "text_offset": [0] * len(tokens)}
        answer = {"id": "cmpl-1", "object": "text_completion", "model": MODEL, "choices": [choice], "usage": {}}
        # NaN and Infinity written as Python's json writes them (httpx's json= refuses them)
        return httpx.Response(200, content=json.dumps(answer).encode(), headers={"content-type": "application/json"})

    def _entries(self, row: np.ndarray, token: int, n: int) -> list[tuple[int, float, int]]:
        order = np.lexsort((np.arange(row.size), -row))
        ranks = np.empty(row.size, dtype=int)
        ranks[order] = np.arange(1, row.size + 1)
        keep = row.size if n == -1 else n
        if self.silent_cap is not None:
            keep = min(keep, self.silent_cap)
        chosen = [int(i) for i in order[:keep]]
        picked = [token] + [i for i in chosen if i != token]  # vLLM lists the row's own token first
        top = int(order[0]) if self.bad_value is not None and len(self.requests) > self.bad_from else -1
        return [(i, self.bad_value if i == top else max(float(row[i]), -9999.0),
                 int(ranks[i])) for i in picked]

    def _ranked(self, row, token, n):
        return {str(i): {"logprob": lp, "rank": r, "decoded_token": chr(0x1F600 + i)}
                for i, lp, r in self._entries(row, token, n)}

    def _keyed(self, row, token, n):
        name = (lambda i: f"tok{i}") if self.llama_cpp else (lambda i: f"token_id:{i}")
        return {name(i): lp for i, lp, _ in self._entries(row, token, n)}


def llama_cpp_refusal(body: dict) -> str | None:
    """llama-cpp-python 0.3's HTTP 500 text for a request its pydantic model refuses (None: it takes it)."""
    errors = []
    if isinstance(body.get("prompt"), list):
        errors.append("prompt\n  Input should be a valid string [type=string_type, input_value=[9, 10], "
                      "input_type=list]")
    if isinstance(body.get("logprobs"), int) and body["logprobs"] < 0:
        errors.append("logprobs\n  Input should be greater than or equal to 0 [type=greater_than_equal, "
                      "input_value=-1, input_type=int]")
    if not errors:
        return None
    return f"{len(errors)} validation error{'s' if len(errors) > 1 else ''} for CreateCompletionRequest\n" + \
        "\n".join(errors)


def transport(server: FakeServer) -> httpx.MockTransport:
    return httpx.MockTransport(server)
