"""The control plane of our worker: Dynamo 1.6.1's RL admin routes around one engine.

:class:`AdminRoutes` is the half of :class:`dynamo_rl.serving.worker.Worker` that the
system server's ``/engine/<route>`` calls reach (``rt.register_engine_route``); the other
half is the data plane (``Worker.generate``). With the engine in a process of its own
(:mod:`dynamo_rl.serving.engine_process`), these routes run there, beside the engine and
the refit receiver, and the worker forwards every call.

Pause (drain)
    After ``pause_generation`` returns, no request is mid-stream: in-flight requests ran to
    their end on the current weights, or, with ``{"timeout_s": t}``, those still running
    after ``t`` s were ended at the next step (engine finish_reason ``abort``). Requests
    arriving while paused wait at the worker, without tokens, until ``resume_generation``.
    updates are serialized and the engine drains before it swaps, so a response
    never mixes two weights versions. ``flush_cache`` while requests run answers 409.

Control routes (``rt.register_engine_route``): Dynamo 1.6.1's RL admin contract
    The names, bodies and answers of ``dynamo.vllm --enable-rl`` (``dynamo/vllm/handlers.py``),
    so one orchestrator drives both kinds of worker (:mod:`dynamo_rl.refit.control`). Every
    answer is ``{"status": "ok", ...}`` or ``{"status": "error", "message": msg}`` with HTTP
    200 (1.6.1 sends a callback's dict with 200; a raised exception would be a bare 500);
    our additions: ``"code"`` on errors (400 bad body, 404 checkpoint dir missing / version
    never published, 408 past ``deadline_unix_s``, 409 not paused / stale version / requests
    running, 422 tensors do not match the engine, 501 not implemented, 502 publisher gone,
    503 refit receiver or transport unavailable, 500 anything else).

    ``pause_generation {mode, clear_cache}``: ``wait`` drains (our ``timeout_s`` bounds the
    drain: requests still running then end with finish_reason ``abort``), ``abort`` ends
    in-flight requests at the next step, ``keep`` is answered as ``wait`` (``"mode": "wait",
    "requested_mode": "keep"``): this engine cannot hold a request across a weight swap
    without mixing two versions in its response. ``resume_generation``, ``flush_cache``
    (409 while requests run), ``abort_request {request_id}``, ``liveness_probe``,
    ``get_weight_version`` (``{"version", "version_declared": true}`` plus our ``paused``),
    ``set_weight_version {weight_version}`` (integers only, never backwards).
    ``update_weights_from_disk {model_path, weight_version}`` (a safetensors checkpoint
    dir; ``engine_rpc`` absent, ``reload_weights`` or ``dynamo_rl_reload_weights``) and
    ``update_weights_from_distributed {engine_rpc: "dynamo_rl_update_weights",
    weight_version, publisher, transport, in_place, timeout_s}`` (a refit pull, the rpc our
    vLLM extension serves; ``in_place: true`` pulls straight into the live parameters after
    the first pull, see ``Engine.load_weights_in_place``: fastest on a GPU, but a pull
    failing part-way leaves the worker refusing requests, ``info.weights_partial`` set,
    until a complete update). Both are refused unless paused (Dynamo's rule and message;
    ``allow_unpaused: true`` with ``reset_prefix_cache: false`` lifts it), take integer
    versions, refuse a version older than the served one, and answer the served version
    again with ``noop`` (unless the weights are partial). ``update_weights_from_tensor``,
    ``init_weights_update_group``, ``destroy_weights_update_group``: 501 (no update group
    is needed: every update names the publisher). ``pause_generation`` and the updates
    accept ``deadline_unix_s`` (wall clock, seconds): arriving later (say the worker was
    stopped while the caller timed out) they do nothing and answer 408, so a request the
    caller gave up on is never applied behind its back. ``GET /engine/info`` (ours):
    instance id, model, weights version, partial, ready, paused, layout, stats, pid.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("dynamo_rl.serving.worker")


class RouteError(Exception):
    """A control-route failure with an HTTP-ish status; becomes ``{"error", "status"}``."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class AdminRoutes:
    """Dynamo's RL admin routes (module docstring) of one engine, and the health watch.

    Args:
        engine: a started :class:`~dynamo_rl.serving.engine.Engine`.
        served_model_name: the model name the frontend lists (reported by ``info``).
        model_path: the checkpoint directory (reported by ``info``).
        device: where updates put loaded tensors.
    """

    def __init__(self, engine, *, served_model_name: str, model_path: str, device: str = "cpu"):
        self.engine = engine
        self.served_model_name = served_model_name
        self.model_path = model_path
        self.device = device
        self.instance_id: int | None = None
        self.ready: bool | None = None  # what watch_health last reported (None: not watching)
        self._weights_lock = asyncio.Lock()
        self._receiver = None

    def close(self) -> None:
        """Close the refit receiver (its transports), if one was made."""
        if self._receiver is not None:
            try:
                self._receiver.close()
            except Exception:  # noqa: BLE001
                log.exception("receiver close failed")

    def routes(self) -> dict[str, Any]:
        """``{route_name: async fn(body) -> dict}`` for ``rt.register_engine_route``: Dynamo
        1.6.1's RL admin routes (the names and bodies ``dynamo.vllm --enable-rl`` serves) plus
        our ``info``."""
        return {name: self._guard(fn) for name, fn in {
            "info": self.info,
            "liveness_probe": self.liveness_probe,
            "pause_generation": self.pause_generation,
            "resume_generation": self.resume_generation,
            "flush_cache": self.flush_cache,
            "abort_request": self.abort_request,
            "get_weight_version": self.get_weight_version,
            "set_weight_version": self.set_weight_version,
            "update_weights_from_disk": self.update_weights_from_disk,
            "update_weights_from_distributed": self.update_weights_from_distributed,
            "update_weights_from_tensor": self.update_weights_from_tensor,
            "init_weights_update_group": self.init_weights_update_group,
            "destroy_weights_update_group": self.destroy_weights_update_group,
        }.items()}

    @staticmethod
    def _guard(fn):
        """Dynamo's answer shape: ``{"status": "ok", ...}`` or ``{"status": "error", "message":
        msg}``, plus our ``"code"`` (HTTP-like status) on errors. A route never raises."""
        async def route(body: dict | None) -> dict:
            if body is not None and not isinstance(body, dict):
                return {"status": "error", "message": "request body must be a JSON object", "code": 400}
            try:
                out = await fn(body or {})
                return {"status": "ok", **out}
            except RouteError as e:
                return {"status": "error", "message": str(e), "code": e.status}
            except Exception as e:  # noqa: BLE001 - a route must answer, never raise
                log.exception("route %s failed", fn.__name__)
                return {"status": "error", "message": f"{type(e).__name__}: {e}", "code": 500}

        route.__name__ = fn.__name__
        return route

    async def info(self, body: dict) -> dict:
        e = self.engine
        return {
            "instance_id": self.instance_id,
            "model": self.served_model_name,
            "model_path": self.model_path,
            "weights_version": e.weights_version,
            "weights_partial": e.weights_partial,
            "ready": self.ready,
            "unhealthy": e.unhealthy,
            "paused": e.paused,
            "layout": dict(e.layout),
            "stats": dict(e.stats),
            "pid": os.getpid(),
        }

    async def watch_health(self, set_ready: Callable[[bool], None], on_fatal: Callable[[str], None], *,
                           interval_s: float = 0.5) -> None:
        """Mirror the engine's health until cancelled (run it as a task).

        Calls ``set_ready(True)`` at once if the engine is healthy, then ``set_ready(x)``
        whenever :attr:`Engine.unhealthy <dynamo_rl.serving.engine.Engine.unhealthy>` turns
        set (``False``) or clear (``True``); checked every ``interval_s`` seconds. If the
        engine's scheduling loop dies (``stats["loop_deaths"]`` grows: counted, so a loop
        restarted by the next request before a check is not missed), calls
        ``set_ready(False)`` and ``on_fatal(reason)`` once and returns.
        """
        if not (interval_s > 0 and math.isfinite(interval_s)):
            raise ValueError(f"interval_s must be a positive, finite number of seconds, got {interval_s!r}")
        try:
            await self._watch(set_ready, interval_s)
        except Exception as e:  # noqa: BLE001 - a broken watch must not leave a worker that nobody checks
            log.exception("the health watch failed")
            why = f"the health watch failed: {type(e).__name__}: {e}"
        else:
            why = self.engine.loop_died or "the scheduling loop died (restarted since)"
            log.error("engine failed: %s; this worker stops so that it is restarted", why)
        self.ready = False
        set_ready(False)
        on_fatal(why)

    async def _watch(self, set_ready, interval_s: float) -> None:
        """Mirror readiness until the engine's scheduling loop has died (then return)."""
        deaths = self.engine.stats["loop_deaths"]
        while True:
            if self.engine.stats["loop_deaths"] > deaths:
                return
            reason = self.engine.unhealthy
            if (reason is None) is not self.ready:
                self.ready = reason is None
                if self.ready:
                    log.info("health: ready")
                else:
                    log.warning("health: not ready (%s)", reason)
                set_ready(self.ready)
            await asyncio.sleep(interval_s)

    @staticmethod
    def _check_deadline(body: dict, what: str) -> None:
        """Refuse a control request that arrives after ``body["deadline_unix_s"]`` (408).

        A client that timed out (e.g. the worker was stopped) must not have its request
        applied later, when the worker reads it from its socket buffer.
        """
        deadline = body.get("deadline_unix_s")
        if deadline is None:
            return
        late = time.time() - float(deadline)
        if late > 0:
            raise RouteError(f"{what} arrived {late:.2f} s after its deadline_unix_s; nothing was done "
                             "(the caller has given up on it)", 408)

    async def liveness_probe(self, body: dict) -> dict:
        why = self.engine.unhealthy
        return {"alive": why is None, **({"message": why} if why else {})}

    async def pause_generation(self, body: dict) -> dict:
        """Dynamo's ``pause_generation {mode, clear_cache}``. ``wait`` drains (our ``timeout_s``
        bounds it: requests still running then are ended), ``abort`` ends in-flight requests
        at the next step, ``keep`` is answered as ``wait``: this engine cannot hold a request
        mid-stream across a weight swap without mixing versions in its response."""
        self._check_deadline(body, "pause_generation")
        mode = body.get("mode", "keep")
        if mode not in ("keep", "wait", "abort"):
            raise RouteError(f"Invalid mode '{mode}'; expected keep|wait|abort", 400)
        timeout = body.get("timeout_s")
        timeout = 0.0 if mode == "abort" else (None if timeout is None else float(timeout))
        res = await self.engine.pause(timeout_s=timeout)
        if body.get("clear_cache"):
            res = {**(res or {}), **self.engine.flush_cache()}
        return {"message": "Engine paused", "mode": "wait" if mode == "keep" else mode, "requested_mode": mode,
                "clear_cache": bool(body.get("clear_cache", False)), "weights_version": self.engine.weights_version,
                **(res or {})}

    async def resume_generation(self, body: dict) -> dict:
        res = await self.engine.resume()
        return {"message": "Engine resumed", "weights_version": self.engine.weights_version, **(res or {})}

    async def flush_cache(self, body: dict) -> dict:
        try:
            res = self.engine.flush_cache()
        except RuntimeError as e:  # requests are running: pause first
            raise RouteError(str(e), 409) from None
        return {"message": "Cache flushed", **(res or {})}

    async def abort_request(self, body: dict) -> dict:
        request_id = body.get("request_id")
        if not request_id:
            raise RouteError("Missing 'request_id' in body", 400)
        return {"request_id": request_id, "aborted": self.engine.abort(str(request_id))}

    async def get_weight_version(self, body: dict) -> dict:
        """Dynamo's answer plus our ``paused`` (stock workers do not say)."""
        return {"version": self.engine.weights_version, "version_declared": True, "paused": self.engine.paused}

    async def set_weight_version(self, body: dict) -> dict:
        if "weight_version" not in body:
            raise RouteError("Missing 'weight_version' in body", 400)
        version = self._version(body["weight_version"], "set_weight_version")
        async with self._weights_lock:
            if version < self.engine.weights_version:
                raise RouteError(f"weight_version {version} is older than the served version "
                                 f"{self.engine.weights_version}; versions only move forward", 409)
            self.engine.weights_version = version
        return {"version": version}

    async def update_weights_from_tensor(self, body: dict) -> dict:
        raise RouteError("update_weights_from_tensor is not implemented", 501)

    async def init_weights_update_group(self, body: dict) -> dict:
        raise RouteError("this worker needs no weight-update group: update_weights_from_distributed names the "
                         "trainer's refit publisher in every call", 501)

    async def destroy_weights_update_group(self, body: dict) -> dict:
        return await self.init_weights_update_group(body)

    @staticmethod
    def _version(v: Any, route: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise RouteError(f"{route}: this worker's weight versions are integers >= 0, got {v!r}", 400)
        return v

    def _require_paused(self, body: dict, route: str) -> None:
        """Dynamo's rule: an update is refused unless paused (or ``allow_unpaused`` without a
        prefix-cache reset). Our engine would drain itself; the rule is kept so that both
        kinds of worker behave alike."""
        allow = body.get("allow_unpaused", False)
        reset = body.get("reset_prefix_cache", True)
        if not isinstance(allow, bool) or not isinstance(reset, bool):
            raise RouteError("'allow_unpaused' and 'reset_prefix_cache' must be booleans", 400)
        if allow and reset:
            raise RouteError("Unpaused weight updates cannot reset the prefix cache. Set 'reset_prefix_cache' "
                             "to false or pause generation first.", 400)
        if not self.engine.paused and not allow:
            raise RouteError("Worker must be paused via pause_generation() before updating weights. Call "
                             "pause_generation() first, then update, then resume_generation().", 409)

    async def update_weights_from_disk(self, body: dict) -> dict:
        """Dynamo's ``update_weights_from_disk {model_path, weight_version}``: load the
        safetensors checkpoint directory ``model_path`` as weights version ``weight_version``."""
        self._require_paused(body, "update_weights_from_disk")
        path = body.get("model_path")
        if not path:
            raise RouteError("Missing 'model_path' in body", 400)
        from dynamo_rl.refit.control import DISK_RPC

        rpc = body.get("engine_rpc", "reload_weights")
        if rpc not in ("reload_weights", DISK_RPC):
            raise RouteError(f"update_weights_from_disk: engine_rpc {rpc!r} is not served here; omit it "
                             f"or send {DISK_RPC!r}", 400)
        return await self._update(body, self._declared_version(body, "update_weights_from_disk"),
                                  {"path": str(path)})

    async def update_weights_from_distributed(self, body: dict) -> dict:
        """Dynamo's ``update_weights_from_distributed`` with ``engine_rpc`` =
        ``dynamo_rl_update_weights`` (the rpc of our vLLM worker extension, served here by the
        worker itself): pull ``weight_version`` from the refit ``publisher``."""
        from dynamo_rl.refit.control import UPDATE_RPC

        self._require_paused(body, "update_weights_from_distributed")
        rpc = body.get("engine_rpc", "update_weights_from_path")
        if rpc != UPDATE_RPC:
            raise RouteError(f"update_weights_from_distributed: engine_rpc {rpc!r} is not served by this worker; "
                             f"send engine_rpc={UPDATE_RPC!r} with 'publisher' (and 'transport')", 400)
        version = self._declared_version(body, "update_weights_from_distributed")
        if body.get("version") is not None and body["version"] != version:
            raise RouteError(f"'version' {body['version']!r} and 'weight_version' {version!r} differ; send one "
                             "number", 400)
        if not body.get("publisher"):
            raise RouteError(f"{UPDATE_RPC} needs 'publisher' (the trainer's refit publisher URL)", 400)
        return await self._update(body, version, {k: body[k] for k in ("publisher", "transport", "in_place",
                                                                       "timeout_s") if k in body})

    def _declared_version(self, body: dict, route: str) -> int:
        if "weight_version" not in body:
            raise RouteError(f"{route}: this worker needs 'weight_version' (an integer >= 0)", 400)
        return self._version(body["weight_version"], route)

    async def _update(self, body: dict, version: int, source: dict) -> dict:
        """Load weights ``version`` from ``source`` ``{"path"}`` or ``{"publisher", "transport", "in_place"}``."""
        self._check_deadline(body, "update")
        async with self._weights_lock:
            self._check_deadline(body, "update")
            current = self.engine.weights_version
            if version < current:
                raise RouteError(
                    f"weights version {version} is older than the served version {current}; "
                    "send a version >= the current one (versions only move forward)", 409)
            if version == current and self.engine.weights_partial is None:
                return {"noop": True, "version": version, "version_declared": True, "bytes": 0, "tensors": 0,
                        "seconds": 0.0}
            # (the served version again while the weights are partial: a reload, which recovers)
            t0 = time.perf_counter()
            in_place = bool(source.get("in_place", False))
            has_path = "path" in source
            if in_place and self._receiver is not None and self._receiver.last_version is not None:
                res = await self._load_in_place(source, version)
                report = {"source": "publisher", "in_place": True, **dict(res.pop("fill"))}
            else:
                if has_path:
                    tensors = await asyncio.to_thread(self._load_checkpoint, source["path"])
                    report: dict[str, Any] = {"source": "path"}
                else:
                    tensors, report = await self._pull(source, version)
                    report = {"source": "publisher", "in_place": False, **dict(report)}
                self._check_deadline(body, "update")
                # in_place, first time: adopt the staged pull, so the parameters become the
                # views of the receiver's one buffer and later in-place pulls coalesce
                res = await self._load(tensors, version, adopt=True if in_place else None)
            res = {**report, **res, "version": version, "version_declared": True,
                   "seconds": res.get("seconds", time.perf_counter() - t0), "total_seconds": time.perf_counter() - t0}
            log.info("weights version %s loaded: %s", version, res)
            return res

    async def _load(self, tensors, version: int, adopt: bool | None = None) -> dict:
        from dynamo_rl.serving.engine_types import WeightsError

        # CPU: adopt the received storage (no copy). CUDA: copy into the existing parameters,
        # whose addresses the engine's captured decode graphs hold (adopting would force a
        # re-capture, seconds, after every refit; the copy of a 0.6B model is ~5 ms on an H200).
        if adopt is None:
            adopt = self.engine.device.type != "cuda"
        try:  # the engine drains in-flight requests, swaps, and drops stale KV entries
            return dict(await self.engine.load_weights(tensors, version, adopt=adopt))
        except WeightsError as e:
            raise RouteError(f"weights version {version} rejected, served weights unchanged: {e}",
                             409 if version < self.engine.weights_version else 422) from None

    async def _load_in_place(self, body: dict, version: int) -> dict:
        """Pull straight into the engine's live parameters (drained first). On failure the
        engine refuses requests until a complete update succeeds."""
        from dynamo_rl.serving.engine_types import WeightsError

        url, transport = str(body["publisher"]), body.get("transport")
        timeout_s = float(body.get("timeout_s", 120.0))

        def fill(params):
            return self._receiver.pull(url, version, transport, timeout_s, into=params)[1]

        # on a GPU, when the version is already in shared memory, the pull cannot wait on
        # anything: a few ms of copies run on this thread, saving two thread hand-offs
        inline = self.engine.device.type == "cuda" and self._receiver.ready(url, version)
        try:
            return dict(await self.engine.load_weights_in_place(fill, version, inline=inline))
        except WeightsError as e:
            raise RouteError(f"weights version {version} rejected, served weights unchanged: {e}",
                             409 if version < self.engine.weights_version else 422) from None
        except Exception as e:  # noqa: BLE001
            status, what = self._refit_status(e)
            if getattr(e, "untouched", False):
                raise RouteError(f"in-place refit of version {version} from {url} failed ({what}) before "
                                 f"any weight was written: {e}; served weights unchanged", status) from None
            raise RouteError(f"in-place refit of version {version} from {url} failed ({what}): {e}; the "
                             "parameters are partial and this worker refuses requests until a complete "
                             "update_weights", status) from None

    def _load_checkpoint(self, path: str):
        """All tensors of the ``*.safetensors`` files in ``path``, cast to the engine's dtypes."""
        from safetensors.torch import load_file

        p = Path(path)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
        if not files:
            raise RouteError(
                f"update_weights path {path!r} is not a directory holding *.safetensors files; "
                "point it at a checkpoint written by save_pretrained/save_checkpoint", 404)
        specs = self.engine.param_specs()
        tensors = {}
        for f in files:
            try:
                part = load_file(str(f), device=self.device)
            except Exception as e:  # noqa: BLE001 - corrupt file
                raise RouteError(f"cannot read {f}: {type(e).__name__}: {e}", 422) from None
            tensors.update(part)
        if "lm_head.weight" in tensors and "lm_head.weight" not in specs:
            tensors.pop("lm_head.weight")  # tied to embed_tokens in this engine
        for name, t in tensors.items():
            spec = specs.get(name)
            if spec is not None and t.dtype != spec[1]:
                tensors[name] = t.to(spec[1])
        return tensors

    async def _pull(self, body: dict, version: int):
        try:
            from dynamo_rl.refit import errors as rerr
            from dynamo_rl.refit.receiver import Receiver
        except ImportError as e:
            raise RouteError(f"refit receiver is not available in this build ({e}); "
                             "use {'version', 'path'} or install dynamo_rl.refit", 503) from None
        if self._receiver is None:  # one per worker: it remembers the last version it pulled
            layout = self.engine.layout
            self._receiver = Receiver(tp_rank=int(layout.get("tp_rank", 0)), tp_size=int(layout.get("tp_size", 1)),
                                      param_specs=self.engine.param_specs(), device=self.device)
        url = str(body["publisher"])
        try:
            return await asyncio.to_thread(self._receiver.pull, url, version, body.get("transport"),
                                           float(body.get("timeout_s", 120.0)))
        except (rerr.RefitError, ConnectionError, TimeoutError, OSError) as e:
            status, what = self._refit_status(e)
            raise RouteError(f"refit pull of version {version} from {url} failed ({what}): {e}; "
                             "served weights unchanged", status) from None

    @staticmethod
    def _refit_status(e: BaseException) -> tuple[int, str]:
        """HTTP status and name for a failed pull: 409 stale, 404 not published, 422
        mismatch, 502 publisher gone / unreachable, 503 transport unavailable, else 500."""
        from dynamo_rl.refit import errors as rerr

        for cls, code in ((rerr.StaleVersionError, 409), (rerr.VersionNotFoundError, 404),
                          (rerr.MismatchError, 422), (rerr.PublisherGoneError, 502),
                          (rerr.TransportError, 503), (ConnectionError, 502), (TimeoutError, 502),
                          (OSError, 502)):
            if isinstance(e, cls):
                return code, type(e).__name__
        return 500, type(e).__name__

