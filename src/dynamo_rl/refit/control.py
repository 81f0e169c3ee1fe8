"""Client side of Dynamo 1.6.1's RL admin contract: one worker's system server, over HTTP.

Every Dynamo engine worker started with ``--enable-rl`` (``python -m dynamo.vllm``,
``dynamo.sglang``, ``dynamo.trtllm``) and our own worker serve the same routes on their
system server (``DYN_SYSTEM_PORT``); the reference is the installed package's
``dynamo/vllm/worker_factory.py`` (``register_engine_routes``) and ``dynamo/vllm/handlers.py``::

    POST <system_url>/engine/<route>   JSON body in, JSON out, always HTTP 200:
         {"status": "ok", ...}  |  {"status": "error", "message": "..."}

    pause_generation {"mode": "keep"|"wait"|"abort", "clear_cache": bool}
    resume_generation {}
    update_weights_from_distributed {"engine_rpc", "weight_version", "reset_prefix_cache",
                                     "allow_unpaused", **rpc kwargs}   refused unless paused
    update_weights_from_disk {"model_path", "weight_version"}         refused unless paused
    get_weight_version {} -> {"version", "version_declared"}
    flush_cache, abort_request {"request_id"}, set_weight_version, liveness_probe, ...

Identity: a system URL does not say which instance the frontend routes to, and a stock
worker has no route that does. Its Prometheus ``/metrics`` do: every ``dynamo_component_*``
series carries ``worker_id="<hex>"``, the instance id of that endpoint (the same number
the frontend's ``/health`` lists in decimal). :func:`identify` reads it — no Kubernetes
RBAC and no discovery-plane access needed.

Our worker's additions (``/engine/info``, ``bytes``/``tensors``/``seconds`` in the update
answer, ``"code"`` in an error answer: an HTTP-like status) are used when present and
never required.

Must not import ``serving``, ``rl``, ``k8s`` or ``integrations``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Literal, Union

import httpx

__all__ = [
    "DISK_RPC",
    "PAUSE_MODES",
    "UPDATE_RPC",
    "ControlCallError",
    "RefitTimeouts",
    "call",
    "disk_update_body",
    "distributed_update_body",
    "identify",
    "norm_instance_id",
    "worker_id_from_metrics",
]

InstanceId = Union[int, str]
PauseMode = Literal["wait", "keep", "abort"]
#: ``pause_generation`` modes (vLLM's ``pause_generation(mode=...)``): ``wait`` lets
#: in-flight requests finish first, ``abort`` ends them, ``keep`` freezes them and lets them
#: go on after the resume, on the NEW weights.
PAUSE_MODES: tuple[str, ...] = ("wait", "keep", "abort")
#: the ``engine_rpc`` that runs a refit pull: a method of
#: ``dynamo_rl.integrations.vllm.RefitWorkerExtension`` in a vLLM worker; our worker
#: serves the same name itself.
UPDATE_RPC = "dynamo_rl_update_weights"
#: the ``engine_rpc`` of ``update_weights_from_disk`` that loads a checkpoint directory and
#: keeps a tied ``lm_head`` tied (vLLM's default ``reload_weights`` does not, on CPU)
DISK_RPC = "dynamo_rl_reload_weights"


@dataclass(frozen=True)
class RefitTimeouts:
    """Per-call timeouts in seconds. Every HTTP call of a cycle has one."""

    health_s: float = 10.0        # GET frontend /health
    info_s: float = 10.0          # GET /metrics (identity) and get_weight_version
    drain_s: float = 120.0        # our worker: in-flight requests still running this long after a
                                  # "wait" pause are ended (finish_reason "abort"); stock workers wait
    pause_s: float = 150.0        # HTTP timeout of pause_generation (longer than drain_s)
    update_s: float = 300.0       # update_weights_*: transfer + load
    resume_s: float = 30.0
    resolve_grace_s: float = 10.0  # re-ask the resolver this long for instances without a URL



class ControlCallError(Exception):
    """One control call failed.

    Attributes:
        route: the route called (``"pause_generation"``...).
        url: the worker's system URL.
        status: the worker's ``code`` (our worker), the HTTP status (>= 400), or ``None``
            (no answer, or a stock worker's ``{"status": "error"}``).
        retryable: no answer / timeout / 5xx: the same call may succeed later.
    """

    def __init__(self, route: str, url: str, message: str, *, status: int | None, retryable: bool):
        self.route, self.url, self.status, self.retryable = route, url, status, retryable
        self.message = message
        super().__init__(f"{route} at {url}: {message}")


def norm_instance_id(x: Any) -> InstanceId:
    """Ints, decimal strings and ``0x`` hex strings → ``int``; other strings stay strings.

    Raises:
        TypeError: not an int or a str (a bool is refused too).
    """
    if isinstance(x, bool):
        raise TypeError(f"instance_id must be int or str, got {x!r}")
    if isinstance(x, int):
        return x
    if isinstance(x, str):
        s = x.strip()
        if s.isdigit():
            return int(s)
        if s.lower().startswith("0x"):
            try:
                return int(s, 16)
            except ValueError:
                pass
        return s
    raise TypeError(f"instance_id must be int or str, got {type(x).__name__} {x!r}")


async def call(client: httpx.AsyncClient, url: str, route: str, body: dict | None, timeout: float) -> dict:
    """``POST <url>/engine/<route>`` with ``body``; the answer's dict when ``status`` is not ``"error"``.

    Args:
        url: the worker's system URL (``http://host:port``, no trailing slash).
        timeout: seconds for the whole call.
    Raises:
        ControlCallError: no answer, a timeout, HTTP >= 400 (e.g. 404: the worker serves no
            such route — started without ``--enable-rl``?), a body that is not a JSON
            object, or ``{"status": "error", "message": ...}``.
    """
    full = f"{url}/engine/{route}"
    try:
        r = await client.post(full, json=body or {}, timeout=timeout)
    except httpx.TimeoutException as e:
        raise ControlCallError(route, url, f"timed out after {timeout:g} s ({type(e).__name__})",
                               status=None, retryable=True) from e
    except httpx.TransportError as e:
        raise ControlCallError(route, url, f"unreachable ({type(e).__name__}: {e})", status=None,
                               retryable=True) from e
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code == 404:
        raise ControlCallError(route, url, f"HTTP 404: the worker serves no /engine/{route} (was it started "
                                           "with --enable-rl? Dynamo 1.6.1 or newer?)", status=404, retryable=False)
    if r.status_code >= 400 or not isinstance(data, dict):
        text = data.get("message") if isinstance(data, dict) else None
        raise ControlCallError(route, url, f"HTTP {r.status_code}: {text or repr(r.text[:500])}",
                               status=r.status_code, retryable=r.status_code >= 500)
    if data.get("status") == "error":
        code = data.get("code")
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        msg = str(data.get("message") or data.get("error") or data)
        raise ControlCallError(route, url, msg if code is None else f"error {code}: {msg}", status=code,
                               retryable=code is not None and code >= 500)
    return data


_SERIES = re.compile(r'^dynamo_component_\w+\{([^}]*)\}', re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def worker_id_from_metrics(text: str, endpoint: str = "generate") -> InstanceId | None:
    """The instance id (``int``) serving ``endpoint`` in a worker's Prometheus text, or ``None``
    when it holds no such series yet.

    Raises:
        ValueError: not a Dynamo worker's metrics (no ``dynamo_`` series at all), or several
            worker ids serve ``endpoint``.
    """
    ids: set[str] = set()
    for m in _SERIES.finditer(text):
        labels = dict(_LABEL.findall(m.group(1)))
        if labels.get("dynamo_endpoint") == endpoint and labels.get("worker_id"):
            ids.add(labels["worker_id"])
    if not ids and "dynamo_" not in text:
        raise ValueError("no Dynamo worker metrics here (not a worker's system server)")
    if len(ids) > 1:
        raise ValueError(f"several worker_ids serve {endpoint!r}: {sorted(ids)}")
    return int(ids.pop(), 16) if ids else None


async def identify(client: httpx.AsyncClient, url: str, timeout: float, *,
                   endpoint: str = "generate") -> InstanceId | None:
    """The instance id that the worker at ``url`` serves ``endpoint`` as, from its ``/metrics``.

    Returns ``None`` when the metrics hold no series for ``endpoint`` yet (a worker still
    starting). Raises :class:`ControlCallError` when ``url`` does not answer (retryable) or
    is not a Dynamo worker's system server (e.g. the frontend: not retryable).
    """
    try:
        r = await client.get(f"{url}/metrics", timeout=timeout)
    except httpx.HTTPError as e:
        raise ControlCallError("metrics", url, f"unreachable ({type(e).__name__}: {e})", status=None,
                               retryable=True) from e
    if r.status_code != 200:
        raise ControlCallError("metrics", url, f"HTTP {r.status_code}", status=r.status_code, retryable=False)
    try:
        return worker_id_from_metrics(r.text, endpoint)
    except ValueError as e:
        raise ControlCallError("metrics", url, str(e), status=None, retryable=False) from None


def distributed_update_body(*, version: int, publisher: str, transport: str | None, timeout_s: float,
                            in_place: bool = False, deadline_unix_s: float | None = None) -> dict:
    """``update_weights_from_distributed`` body that runs a refit pull of ``version``.

    ``weight_version`` is Dynamo's (declared once the rpc returns); Dynamo passes every
    other key but ``engine_rpc``/``weight_version``/``allow_unpaused``/``reset_prefix_cache``
    to the rpc as keyword arguments, so the version goes there once more as ``version``.
    ``deadline_unix_s`` (wall clock, defaults to now + ``timeout_s``): an rpc that starts
    later does nothing (the caller gave up).
    """
    return {"engine_rpc": UPDATE_RPC, "weight_version": version, "reset_prefix_cache": True,
            "version": version, "publisher": publisher, "transport": transport, "timeout_s": timeout_s,
            "in_place": bool(in_place),
            "deadline_unix_s": time.time() + timeout_s if deadline_unix_s is None else deadline_unix_s}


def disk_update_body(*, version: int, path: str, deadline_unix_s: float | None = None) -> dict:
    """``update_weights_from_disk`` body: the safetensors checkpoint directory ``path``
    (readable by the worker) becomes weights ``version``, loaded by :data:`DISK_RPC`.
    With ``deadline_unix_s`` (wall clock, seconds; our worker's addition, which a stock
    worker ignores) a request that reaches our worker later does nothing and answers 408:
    a worker that hung and wakes up never applies an update its caller gave up on."""
    body = {"model_path": str(path), "weight_version": version, "engine_rpc": DISK_RPC}
    if deadline_unix_s is not None:
        body["deadline_unix_s"] = deadline_unix_s
    return body
