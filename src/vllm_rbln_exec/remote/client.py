"""The HTTP client of a server side: one ``httpx.AsyncClient`` with deadlines, size caps, retries and the API key.

Owns how a request goes out and what comes back: a short connect timeout (an unreachable server is reported in
seconds, not after ``--timeout``), a total deadline per request of ``--timeout`` (connect, headers and the
whole body: a server that drips one byte every 2 s is cut off at the deadline, not held open by each byte),
a cap on the bytes a response may hold (read as a stream and stopped at the cap, never read whole first),
retries with exponential backoff and jitter on 429 and 5xx (honouring ``Retry-After``) and on dropped
connections, but never on a deterministic refusal (a 500 whose body is a validation error), and
``ServerError`` (exit 3) with the server's own message for everything else. The API key goes into the
``Authorization`` header and nowhere else: it is not in any message, record or ``repr``, and a key that an
HTTP header cannot carry is refused without being shown. Plain HTTP, run by the main process directly (no
worker); it must not parse logprobs (``rows``) or know about captures.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..core.errors import HarnessError
from ..setup.server import header_safe

CONNECT_TIMEOUT_S = 5.0  # a refused or unroutable address fails within this; loopback refuses in milliseconds
PROBE_TIMEOUT_S = 20.0  # /v1/models and /version answer at once on a live server: their total deadline
SMALL_BODY_CAP = 4 << 20  # /v1/models, /version: vLLM's list is ~0.5 kB a model; 4 MiB is thousands of models
ERROR_BODY_CAP = 64 << 10  # an error's body: only its message is shown; the rest is not read
MAX_JSON_DEPTH = 64  # an OpenAI response nests 6 levels at most; deeper is hostile (json recursion: traceback)
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
_CAP_PATTERNS = (
    re.compile(r"max(?:imum)? allowed:?\s*(\d+)", re.I),  # vLLM: "... which is greater than max allowed: 20"
    re.compile(r"logprobs\D{0,40}(?:at most|<=|less than or equal to|maximum(?: value)?(?: of| is)?)\s*(\d+)", re.I),
)
# A 500 that is a refusal of the request, not a failure of the server: retrying gives the same answer.
# llama-cpp-python answers a request its pydantic model refuses with HTTP 500 "N validation error(s) for ...".
_DETERMINISTIC = re.compile(r"validation error|input should be|field required|value_error|type_error|"
                            r"invalid_request_error|unprocessable", re.I)
_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class ServerError(HarnessError):
    """The server could not be reached, refused a request, or answered with something unusable (exit 3)."""


@dataclass(frozen=True)
class Endpoint:
    """Where a server side is and how to talk to it. ``api_key`` never leaves this record except as a header."""

    base: str  # the API's base, .../v1
    api_key: str | None = field(default=None, repr=False)
    retries: int = 3
    read_timeout: float = 1800.0  # the total deadline of one request (--timeout)
    concurrency: int = 4


@dataclass
class Traffic:
    """What the requests of one side cost: counts, bytes and time spent waiting for the server."""

    requests: int = 0
    retries: int = 0
    bytes: int = 0
    wait_s: float = 0.0


@dataclass(frozen=True)
class Reply:
    """A whole response, read within its deadline and cap: status, headers and body."""

    status_code: int
    headers: httpx.Headers
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return load_json(self.content)


def load_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses nesting deeper than ``max_depth`` (ValueError) instead of recursing; the
    scan for depth runs only when the text holds more brackets than the limit (bytes.count is ~1 GB/s)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") > max_depth:
        depth = 0
        for match in _STRUCTURE.finditer(raw):
            token = match.group()
            if token in (b"[", b"{"):
                depth += 1
                if depth > max_depth:
                    raise ValueError(f"JSON nested deeper than {max_depth} levels")
            elif token in (b"]", b"}"):
                depth -= 1
    try:
        return json.loads(raw)
    except RecursionError as exc:  # not reached after the scan; kept so no traceback can come of it
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from exc


class ServerClient:
    """One connection pool to one server; use as ``async with ServerClient(endpoint) as client``."""

    def __init__(self, endpoint: Endpoint, transport: httpx.AsyncBaseTransport | None = None,
                 sleep=asyncio.sleep):
        self.endpoint = endpoint
        self.traffic = Traffic()
        self._sleep = sleep
        headers = {"Accept": "application/json"}
        if endpoint.api_key:
            if not header_safe(endpoint.api_key):
                raise ServerError("the API key holds characters an HTTP header cannot carry (a space, newline, "
                                  "control or non-ASCII character); it is not shown")
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(endpoint.read_timeout, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=max(1, endpoint.concurrency)),
            # trust_env: HTTP(S)_PROXY, NO_PROXY and SSL_CERT_FILE apply, as in any HTTP client
            headers=headers, transport=transport, follow_redirects=False, trust_env=True,
        )

    async def __aenter__(self) -> ServerClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()

    def url(self, path: str, root: bool = False) -> str:
        base = self.endpoint.base.removesuffix("/v1") if root else self.endpoint.base
        return f"{base}/{path.lstrip('/')}"

    async def get(self, path: str, *, root: bool = False, retries: int | None = None) -> Reply:
        """A probe's GET: the deadline is the shorter of PROBE_TIMEOUT_S and --timeout, the cap SMALL_BODY_CAP."""
        return await self.send("GET", self.url(path, root), retries=retries,
                               timeout=min(PROBE_TIMEOUT_S, self.endpoint.read_timeout), cap=SMALL_BODY_CAP)

    async def post(self, path: str, body: dict[str, Any], *, cap: int, retries: int | None = None) -> Reply:
        return await self.send("POST", self.url(path), json_body=body, retries=retries, cap=cap)

    async def send(self, method: str, url: str, *, json_body: dict[str, Any] | None = None,
                   retries: int | None = None, timeout: float | None = None, cap: int = SMALL_BODY_CAP) -> Reply:
        """The response (any status but a retried one); ServerError when no whole response came back within
        the deadline (``timeout``, else --timeout) and the cap."""
        retries = self.endpoint.retries if retries is None else retries
        deadline = self.endpoint.read_timeout if timeout is None else timeout
        attempt = 0
        while True:
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(deadline):
                    reply = await self._exchange(method, url, json_body, deadline, cap)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise ServerError(f"cannot reach the server at {url}: {_reason(exc)}. Is it running, and is the "
                                  "URL right (scheme, host, port, the /v1 prefix)?") from None
            except (TimeoutError, httpx.TimeoutException):
                which = ("a probe's deadline: the shorter of --timeout and 20 s" if timeout is not None else
                         "the deadline of one request, --timeout; raise it for slow full-vocabulary answers")
                raise ServerError(f"the server at {url} did not send its whole answer within {deadline:g} s "
                                  f"({which})") from None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if attempt >= retries:
                    raise ServerError(f"the connection to {url} broke: {_reason(exc)} "
                                      f"(after {attempt + 1} attempt(s))") from None
                reply = None
            except httpx.HTTPError as exc:  # anything else httpx raises (a bad header, a decoding error)
                raise ServerError(f"the request to {url} failed: {type(exc).__name__}") from None
            finally:
                self.traffic.wait_s += time.monotonic() - t0
            self.traffic.requests += 1
            if reply is not None and (attempt >= retries or not retryable(reply)):
                return reply
            await self._sleep(backoff_s(attempt, None if reply is None else reply.headers.get("retry-after")))
            attempt += 1
            self.traffic.retries += 1

    async def _exchange(self, method: str, url: str, json_body: dict[str, Any] | None, deadline: float,
                        cap: int) -> Reply:
        """One request read as a stream: refused past ``cap`` bytes (declared or received), an error's body
        cut at ERROR_BODY_CAP."""
        kwargs: dict[str, Any] = {"json": json_body} if json_body is not None else {}
        timeout = httpx.Timeout(deadline, connect=min(CONNECT_TIMEOUT_S, deadline))
        async with self._http.stream(method, url, timeout=timeout, **kwargs) as response:
            ok = response.status_code < 400
            limit = cap if ok else min(cap, ERROR_BODY_CAP)
            declared = response.headers.get("content-length", "")
            if ok and declared.isdigit() and int(declared) > limit:
                raise ServerError(f"{method} {url}: the server announces a {_mb(int(declared))} answer, more than "
                                  f"the {_mb(limit)} such an answer may hold; it was not read")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                self.traffic.bytes += len(chunk)
                if size > limit:
                    if not ok:  # the message is at the start; the rest of an error is not needed
                        chunks.append(chunk[: len(chunk) - (size - limit)])
                        break
                    raise ServerError(f"{method} {url}: the answer grew past {_mb(limit)}, more than such an "
                                      "answer may hold; reading stopped there")
                chunks.append(chunk)
            return Reply(response.status_code, response.headers, b"".join(chunks))


def retryable(reply: Reply) -> bool:
    """429 and 5xx, except a 500 whose message is a validation error (the same request fails the same way)."""
    if reply.status_code not in RETRY_STATUSES:
        return False
    return not (reply.status_code == 500 and _DETERMINISTIC.search(error_text(reply, limit=2000)))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def backoff_s(attempt: int, retry_after: str | None = None) -> float:
    """Seconds before retry ``attempt + 1``: the server's ``Retry-After`` (seconds) when it gives one, else
    0.5 s doubling per attempt with up to 50 % jitter, at most 30 s."""
    if retry_after is not None:
        try:
            return min(BACKOFF_MAX_S, max(0.0, float(retry_after)))
        except ValueError:
            pass  # an HTTP date: fall back to our own schedule
    base = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** attempt)
    return base * (1.0 + 0.5 * random.random())


def error_text(response: Reply, limit: int = 300) -> str:
    """The server's own message in an error response (OpenAI's ``error.message``, FastAPI's ``detail``), on one
    line of printable text: control characters become spaces; nesting past MAX_JSON_DEPTH is not parsed.
    (Markup in it is escaped where it is printed: ``cli.common.report_error``.)"""
    try:
        data = response.json()
    except (ValueError, UnicodeDecodeError) as exc:
        if "nested deeper" in str(exc):
            return f"an error body nested deeper than {MAX_JSON_DEPTH} levels (not shown)"
        data = None
    message = None
    if isinstance(data, dict):
        err = data.get("error")
        message = err.get("message") if isinstance(err, dict) else err
        message = message or data.get("detail") or data.get("message")
    raw = message if message is not None else response.text
    text = " ".join("".join(c if c.isprintable() else " " for c in str(raw)[: limit * 4]).split())
    return text[:limit] + ("…" if len(text) > limit else "")


def logprobs_cap(message: str) -> int | None:
    """The largest number of logprobs a refusal says the server allows (vLLM: ``max allowed: 20``), or None."""
    for pattern in _CAP_PATTERNS:
        match = pattern.search(message)
        if match:
            return int(match.group(1))
    return None


def status_error(what: str, response: Reply) -> ServerError:
    """A ServerError naming what was asked, the status and the server's message, with a hint where one helps."""
    hint = {401: " (the server wants an API key: --api-key-env NAME or --api-key-file FILE)",
            403: " (the API key was refused)",
            404: " (no such endpoint: the URL should be the API's base, e.g. http://HOST:PORT/v1)"}
    return ServerError(f"{what}: HTTP {response.status_code}: {error_text(response)}"
                       f"{hint.get(response.status_code, '')}")


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
