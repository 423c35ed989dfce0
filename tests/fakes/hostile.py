"""A hostile OpenAI-compatible server on loopback, for the plumbing tests of a server side (``--target-url``).

A real socket (``http.server`` in a daemon thread of the test process) in front of ``FakeServer``'s answers,
with behaviours a transport mock cannot show: a server that drips one byte every ``drip_s`` on one path, a
``/v1/models`` body of hundreds of MB streamed without a length, an error body nested 100000 deep, Rich
markup in an error's text. It is bounded: every handler gives up after ``lifetime_s`` and ``stop()`` (or the
context manager) closes it, so a test that fails leaves nothing running.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

import httpx
from tests.fakes.server import FakeServer

CHUNK = b" " * (1 << 20)


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client that hung up is the point of a test
        pass


class HostileServer:
    """``with HostileServer(behaviour=..., path=...) as url:``; ``behaviour``: None (FakeServer's answers),
    ``drip`` (headers and body one byte every ``drip_s``), ``huge`` (``size`` bytes of JSON, chunked),
    ``nested`` (HTTP 500 whose body nests ``depth`` levels), ``markup`` (HTTP 400 whose message holds Rich
    markup), on ``path`` only (other paths answer as FakeServer)."""

    def __init__(self, fake: FakeServer | None = None, behaviour: str | None = None, path: str = "/v1/models",
                 drip_s: float = 2.0, size: int = 300 << 20, depth: int = 100_000, lifetime_s: float = 60.0):
        self.fake = fake or FakeServer(vocab=257)
        self.behaviour, self.path, self.drip_s, self.size, self.depth = behaviour, path, drip_s, size, depth
        self.deadline = time.monotonic() + lifetime_s
        self.sent = 0  # bytes written by the hostile behaviour, to show that reading stopped early
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                owner.handle(self, "GET")

            def do_POST(self) -> None:
                owner.handle(self, "POST")

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.deadline = 0.0
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    # -- answers --------------------------------------------------------------------------------------
    def handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else b""
        try:
            if self.behaviour is not None and h.path == self.path:
                getattr(self, f"_{self.behaviour}")(h)
            else:
                self._fake(h, method, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def _fake(self, h, method: str, body: bytes) -> None:
        request = httpx.Request(method, f"http://fake{h.path}", headers=dict(h.headers), content=body)
        response = self.fake(request)
        self._send(h, response.status_code, response.content, response.headers.get("content-type"))

    def _send(self, h, status: int, content: bytes, ctype: str | None = "application/json") -> None:
        h.send_response(status)
        h.send_header("content-type", ctype or "application/json")
        h.send_header("content-length", str(len(content)))
        h.end_headers()
        h.wfile.write(content)

    def _drip(self, h) -> None:
        payload = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n" + b" " * 99999
        for byte in payload:
            if time.monotonic() > self.deadline:
                return
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            self.sent += 1
            time.sleep(self.drip_s)

    def _huge(self, h) -> None:
        h.send_response(200)
        h.send_header("content-type", "application/json")
        h.send_header("transfer-encoding", "chunked")
        h.end_headers()
        h.wfile.write(b'6\r\n{"a": \r\n')
        while self.sent < self.size and time.monotonic() < self.deadline:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
            self.sent += len(CHUNK)
        h.wfile.write(b"1\r\n1\r\n0\r\n\r\n")

    def _nested(self, h) -> None:
        content = b'{"error": {"message": ' + b"[" * self.depth + b"]" * self.depth + b"}}"
        self._send(h, 500, content)

    def _markup(self, h) -> None:
        message = "model [/] not [bold red]found[/bold red] [link=file:///etc/passwd]here[/link] [/"
        self._send(h, 400, json.dumps({"error": {"message": message, "code": 400}}).encode())
