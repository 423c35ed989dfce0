"""The HTTP client of a server side: one ``httpx.AsyncClient`` with timeouts, retries and the API key.

Owns how a request goes out and what comes back as an error: a short connect timeout (an unreachable
server is reported in seconds, not after ``--timeout``), a read timeout of ``--timeout`` (a full-vocabulary
response can take a minute to build), retries with exponential backoff and jitter on 429 and 5xx (honouring
``Retry-After``) and on dropped connections, and ``ServerError`` (exit 3) with the server's own message for
everything else. The API key goes into the ``Authorization`` header and nowhere else: it is not in any
message, record or ``repr``. Plain HTTP, run by the main process directly (no worker); it must not parse
logprobs (``rows``) or know about captures.
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

CONNECT_TIMEOUT_S = 5.0  # a refused or unroutable address fails within this; loopback refuses in milliseconds
PROBE_TIMEOUT_S = 20.0  # /v1/models and /version answer at once on a live server
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
_CAP_PATTERNS = (
    re.compile(r"max(?:imum)? allowed:?\s*(\d+)", re.I),  # vLLM: "... which is greater than max allowed: 20"
    re.compile(r"logprobs\D{0,40}(?:at most|<=|less than or equal to|maximum(?: value)?(?: of| is)?)\s*(\d+)", re.I),
)


class ServerError(HarnessError):
    """The server could not be reached, refused a request, or answered with something unusable (exit 3)."""


@dataclass(frozen=True)
class Endpoint:
    """Where a server side is and how to talk to it. ``api_key`` never leaves this record except as a header."""

    base: str  # the API's base, .../v1
    api_key: str | None = field(default=None, repr=False)
    retries: int = 3
    read_timeout: float = 1800.0
    concurrency: int = 4


@dataclass
class Traffic:
    """What the requests of one side cost: counts, bytes and time spent waiting for the server."""

    requests: int = 0
    retries: int = 0
    bytes: int = 0
    wait_s: float = 0.0


class ServerClient:
    """One connection pool to one server; use as ``async with ServerClient(endpoint) as client``."""

    def __init__(self, endpoint: Endpoint, transport: httpx.AsyncBaseTransport | None = None,
                 sleep=asyncio.sleep):
        self.endpoint = endpoint
        self.traffic = Traffic()
        self._sleep = sleep
        headers = {"Accept": "application/json"}
        if endpoint.api_key:
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

    async def get(self, path: str, *, root: bool = False, retries: int | None = None,
                  timeout: float | None = PROBE_TIMEOUT_S) -> httpx.Response:
        return await self.send("GET", self.url(path, root), retries=retries, timeout=timeout)

    async def post(self, path: str, body: dict[str, Any], *, retries: int | None = None) -> httpx.Response:
        return await self.send("POST", self.url(path), json_body=body, retries=retries)

    async def send(self, method: str, url: str, *, json_body: dict[str, Any] | None = None,
                   retries: int | None = None, timeout: float | None = None) -> httpx.Response:
        """The response (any status but a retried one); ServerError when no response came back."""
        retries = self.endpoint.retries if retries is None else retries
        attempt = 0
        while True:
            t0 = time.monotonic()
            try:
                kwargs: dict[str, Any] = {"json": json_body} if json_body is not None else {}
                if timeout is not None:
                    kwargs["timeout"] = httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S)
                response = await self._http.request(method, url, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise ServerError(f"cannot reach the server at {url}: {_reason(exc)}. Is it running, and is the "
                                  "URL right (scheme, host, port, the /v1 prefix)?") from exc
            except httpx.TimeoutException as exc:
                raise ServerError(f"the server at {url} did not answer within {self._timeout(timeout):.0f} s "
                                  f"({type(exc).__name__}); raise --timeout for slow full-vocabulary answers") from exc
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if attempt >= retries:
                    raise ServerError(f"the connection to {url} broke: {_reason(exc)} "
                                      f"(after {attempt + 1} attempt(s))") from exc
                response = None
            finally:
                self.traffic.wait_s += time.monotonic() - t0
            self.traffic.requests += 1
            if response is not None:
                self.traffic.bytes += len(response.content)
                if response.status_code not in RETRY_STATUSES or attempt >= retries:
                    return response
            await self._sleep(backoff_s(attempt, None if response is None else response.headers.get("retry-after")))
            attempt += 1
            self.traffic.retries += 1

    def _timeout(self, timeout: float | None) -> float:
        return self.endpoint.read_timeout if timeout is None else timeout


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


def error_text(response: httpx.Response, limit: int = 300) -> str:
    """The server's own message in an error response (OpenAI's ``error.message``, FastAPI's ``detail``)."""
    try:
        data = response.json()
    except (ValueError, json.JSONDecodeError):
        data = None
    message = None
    if isinstance(data, dict):
        err = data.get("error")
        message = err.get("message") if isinstance(err, dict) else err
        message = message or data.get("detail") or data.get("message")
    text = str(message if message is not None else response.text).strip().replace("\n", " ")
    return text[:limit] + ("…" if len(text) > limit else "")


def logprobs_cap(message: str) -> int | None:
    """The largest number of logprobs a refusal says the server allows (vLLM: ``max allowed: 20``), or None."""
    for pattern in _CAP_PATTERNS:
        match = pattern.search(message)
        if match:
            return int(match.group(1))
    return None


def status_error(what: str, response: httpx.Response) -> ServerError:
    """A ServerError naming what was asked, the status and the server's message, with a hint where one helps."""
    hint = {401: " (the server wants an API key: --api-key-env NAME or --api-key-file FILE)",
            403: " (the API key was refused)",
            404: " (no such endpoint: the URL should be the API's base, e.g. http://HOST:PORT/v1)"}
    return ServerError(f"{what}: HTTP {response.status_code}: {error_text(response)}"
                       f"{hint.get(response.status_code, '')}")


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
