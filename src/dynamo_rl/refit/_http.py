"""Tiny JSON-over-HTTP helpers (stdlib only) for the publisher's manifest server."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from dynamo_rl.refit.errors import PublisherGoneError


class HTTPStatus(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(body.get("error", str(body)))
        self.status, self.body = status, body


class JSONServer:
    """``routes[(method, path)] = fn(query: dict, body: dict | None) -> dict``; raise
    :class:`HTTPStatus` for non-200 answers. Runs in a daemon thread."""

    POLL_S = 0.2  # the serving thread checks for close() at least this often (seconds)

    def __init__(self, host: str, port: int, routes: dict):
        routes_ = routes

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _do(self, method):
                u = urlparse(self.path)
                fn = routes_.get((method, u.path))
                q = {k: v[-1] for k, v in parse_qs(u.query).items()}
                body = None
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    body = json.loads(self.rfile.read(n))
                try:
                    if fn is None:
                        raise HTTPStatus(404, {"error": f"no route {method} {u.path}"})
                    status, out = 200, fn(q, body)
                except HTTPStatus as e:
                    status, out = e.status, e.body
                except Exception as e:  # noqa: BLE001 - report, never kill the server
                    status, out = 500, {"error": f"{type(e).__name__}: {e}"}
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._do("GET")

            def do_POST(self):
                self._do("POST")

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.timeout = self.POLL_S  # handle_request() returns at least this often
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="refit-http", daemon=True)
        self.thread.start()
        h, p = self.httpd.server_address[:2]
        self.url = f"http://{h}:{p}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.httpd.handle_request()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving and close the socket (idempotent). Waits at most ``timeout_s`` for the
        serving thread, unlike ``BaseServer.shutdown()``, which waits without a bound (a daemon
        thread that has not stopped by then goes with the process)."""
        self._stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout_s)
        self.httpd.server_close()


def request(url: str, body: dict | None = None, *, timeout: float = 30.0) -> tuple[int, dict]:
    """GET (body None) or POST JSON. Returns ``(status, json)``.

    Raises:
        PublisherGoneError: connection refused / reset / timed out (the message names the URL).
    """
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {"error": str(e)}
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        raise PublisherGoneError(
            f"publisher at {url} is unreachable ({e}); it closed or died — restart/re-publish and retry"
        ) from None
