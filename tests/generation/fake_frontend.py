"""A scripted stand-in for the Dynamo *frontend* (not our code) on 127.0.0.1.

Built on ``http.server.ThreadingHTTPServer``. It answers ``/v1/models``,
``/v1/completions`` and ``/v1/chat/completions`` in the frontend's response shapes
(``nvext.completion_token_ids``, ``nvext.worker_id``, ``nvext.engine_data``), and a test
can script any response (``handler``), stop listening (``stop``: connection refused) and
listen again on the same port (``start``). Used only for what the real stack cannot be
made to do on purpose: float ids, empty ids, 4xx/5xx, refused connections.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Handler = Callable[[str, dict], "tuple[int, Any]"]


def default_generation(prompt_ids: list[int], body: dict) -> tuple[list[int], list[float]]:
    """Deterministic 'engine': ids from the prompt and seed, logprobs -0.5 * (j + 1)."""
    seed = body.get("seed") or 0
    n = body.get("max_tokens", 4)
    ids = [(sum(prompt_ids) + seed * 7 + j) % 50 for j in range(n)]
    return ids, [-0.5 * (j + 1) for j in range(n)]


def ok_response(path: str, body: dict, prompt_ids: list[int], ids: list[Any], logprobs: list[Any],
                *, finish_reason: str = "length", weights_version: Any = 7, worker_id: Any = 1234) -> dict:
    """A 200 body in the frontend's shape for ``path``."""
    chat = path.endswith("chat/completions")
    nvext = {"worker_id": {"decode_worker_id": worker_id, "prefill_worker_id": worker_id},
             "completion_token_ids": ids,
             "engine_data": {"prompt_token_ids": prompt_ids, "weights_version": weights_version}}
    if chat:
        choice = {"index": 0, "finish_reason": finish_reason,
                  "message": {"role": "assistant", "content": "x" * len(ids)},
                  "logprobs": {"content": [{"token": "x", "logprob": lp, "bytes": None, "top_logprobs": []}
                                           for lp in logprobs]}}
    else:
        choice = {"index": 0, "finish_reason": finish_reason, "text": "x" * len(ids),
                  "logprobs": {"tokens": ["x"] * len(ids), "token_logprobs": logprobs,
                               "top_logprobs": None, "text_offset": list(range(len(ids)))}}
    return {"id": "cmpl-1", "object": "text_completion", "model": body.get("model"),
            "choices": [choice], "nvext": nvext}


def default_handler(path: str, body: dict) -> tuple[int, Any]:
    prompt = body.get("prompt") if "prompt" in body else [1, 2, 3]
    ids, lps = default_generation(prompt, body)
    return 200, ok_response(path, body, prompt, ids, lps)


class FakeFrontend:
    """``FakeFrontend(models=["tiny"])``; ``.url``; ``.requests`` (path, body) received;
    ``.handler(path, body) -> (status, json_body)`` replaceable at any time."""

    def __init__(self, models: list[str] | None = None, handler: Handler | None = None):
        self.models = ["tiny"] if models is None else models
        self.handler: Handler = handler or default_handler
        self.requests: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.port = 0
        self._conns: list[socket.socket] = []
        self._stop_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeFrontend":
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def setup(self):
                super().setup()
                with fake.lock:
                    fake._conns.append(self.connection)

            def _send(self, status: int, body: Any) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                with fake.lock:
                    fake.requests.append((self.path, body))
                status, out = fake.handler(self.path, body)
                self._send(status, out)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, client_address: None  # a dropped connection is the point
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection: new connections are refused.
        May be called from a handler (that request then gets no response)."""
        with self._stop_lock:
            self._stop()

    def _stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None
            with self.lock:
                conns, self._conns = self._conns, []
            for c in conns:  # also drop kept-alive connections, as a stopped process would
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
