"""Refit control plane: pause → update → verify → resume on every serving worker.

Speaks Dynamo 1.6.1's RL admin contract (:mod:`dynamo_rl.refit.control`), which Dynamo's
stock engine workers (``python -m dynamo.vllm --enable-rl``) and our own worker both serve,
so one cycle drives a mixed fleet. Owns: discovery of the instances the Dynamo frontend
routes to, mapping each to its worker's system URL (``DYN_SYSTEM_PORT``), the per-worker
cycle, scale-up passes, failure semantics and the final verification. HTTP only; must NOT
import ``serving``, ``k8s``, ``rl`` or ``integrations``: how instances map to system URLs
is injected as a *resolver*.

Cycle (:func:`refit_all`)::

    pass 1..max_passes:
        discover: GET frontend /health → instances (endpoint "generate")
                  resolver() → system URLs; GET <url>/metrics → the instance id it serves
        for each instance not yet handled (in parallel, at most `concurrency` at once):
            POST get_weight_version                         (a worker already past N is named,
                                                             not paused: versions only move forward)
            POST pause_generation {"mode": pause_mode}      (wait: in-flight requests finish)
            POST update_weights_from_distributed {engine_rpc: dynamo_rl_update_weights,
                 weight_version: N, publisher, transport, ...}          (retried once on a
              or update_weights_from_disk {model_path, weight_version: N} transport / 5xx error)
                 (both reset the prefix cache: KV entries of the old weights are dropped)
            POST get_weight_version → must be N
            POST resume_generation                          (in a ``finally``; skipped for a failed worker)
        re-discover; stop when no new instance appeared (scale-up during a refit)
    verify: get_weight_version of every refitted instance is N

The guarantees, and for which worker:

* **No silently stale worker** (every kind): every instance the frontend lists must be
  refitted and verified by ``get_weight_version``, or the cycle raises
  :class:`RefitCycleError` naming it. A worker whose update or verification failed, or
  that was interrupted (cancelled) during its update, stays PAUSED (requests to it wait):
  it cannot serve old or unknown weights next to version N. A worker that already declares
  a newer version is named but not touched. Every ``source`` value is checked before any
  worker is paused. Our worker and the vLLM extension apply a set all or nothing (vLLM's
  reload runs layer by layer, so the extension checks names and shapes first).
* **No response mixes two weights versions** (every kind, with ``pause_mode`` ``wait`` or
  ``abort``): a request either finished before the pause (old weights), or was ended by an
  ``abort`` pause, or waits at the paused worker and runs after the resume (new weights).
  Our worker's engine also never applies a partial set and stamps every response's
  ``nvext.engine_data.weights_version``; a stock worker sends no version per response, so
  there the guarantee rests on this barrier alone. ``keep`` freezes in-flight requests and
  lets them go on after the resume on the new weights: those responses DO mix versions
  (our worker answers ``keep`` by draining, as ``wait``).

Resolver (pluggable; called once per discovery, so it sees workers that appeared meanwhile)::

    Resolver = Callable[[], ControlUrls | Awaitable[ControlUrls]]
    ControlUrls = Mapping[instance_id, url]   # hints, e.g. LocalStack.control_urls
                | Iterable[url]               # candidates, e.g. http://<podIP>:<DYN_SYSTEM_PORT>
                                              # of every pod of a DGD (label selector)

Mapping form: each URL's ``/metrics`` must name that instance (else :class:`DiscoveryError`);
a hinted URL that does not answer makes its instance a failed worker; a ``None`` key (id not
known yet: a worker still starting) is probed like a candidate. Candidate form: every URL
is probed and mapped by the instance id its metrics name; unreachable candidates and URLs
that are no worker's system server (the frontend pod's) are ignored. A URL is
``scheme://host:port`` without a trailing path. Instances that the resolver confirms but
/health does not list are refitted too: a worker about to register, or one whose Dynamo
discovery lease expired while its process stalled (seen with 1.6.1's file backend after a
~4 s SIGSTOP: the live worker is never routed to again, yet would still hold old weights).

On Kubernetes the resolver is :func:`dynamo_rl.refit.discovery.dgd_pod_resolver` (the DGD's
running pods as ``http://<podIP>:<DYN_SYSTEM_PORT>`` candidates; RBAC: list pods). Dynamo's
``rl`` request-plane endpoint also describes each worker's ``system_url``, but reaching it
needs the discovery plane (etcd or the operator's Kubernetes discovery: more RBAC), which
``/metrics`` does not.

Instance ids are compared after normalisation: ints, decimal strings and ``0x`` hex strings
become ``int``; other strings stay strings.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from dynamo_rl.refit.control import (
    PAUSE_MODES,
    ControlCallError,
    RefitTimeouts,
    call,
    disk_update_body,
    distributed_update_body,
)
from dynamo_rl.refit.discovery import (
    ControlUrls,
    DiscoveryError,
    Instance,
    InstanceId,
    Resolver,
    StaticResolver,
    _discover,
    discover_instances,
)
from dynamo_rl.refit.errors import RefitError

__all__ = [
    "ControlUrls",
    "DiscoveryError",
    "Instance",
    "RefitCycleError",
    "RefitEvent",
    "RefitReport",
    "RefitTimeouts",
    "Resolver",
    "StaticResolver",
    "WorkerRefit",
    "discover_instances",
    "refit_all",
    "refit_all_sync",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- errors


class RefitCycleError(RefitError):
    """One or more workers could not be refitted; every other worker was refitted and resumed.

    Attributes:
        failed: ``{instance_id: reason}`` of the workers that failed (left paused when they
            were reachable, so they cannot serve stale weights).
        report: the :class:`RefitReport` of the workers that succeeded.
    """

    def __init__(self, message: str, *, failed: Mapping[InstanceId, str], report: "RefitReport"):
        self.failed = dict(failed)
        self.report = report
        super().__init__(message)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class RefitEvent:
    """Progress of one worker (or of a pass when ``instance_id`` is None).

    ``stage`` ∈ {"paused", "updated", "retry", "verified", "resumed", "failed", "pass_done"}.
    """

    stage: str
    pass_index: int
    instance_id: InstanceId | None = None
    url: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class WorkerRefit:
    """Result for one worker.

    Attributes:
        bytes: bytes loaded as the worker reported them; ``None`` when it does not say
            (stock workers: Dynamo passes no rpc result back); 0 for a no-op.
        seconds: wall time of the update call(s), as seen by the orchestrator.
        paused_seconds: wall time from pause to resume (the worker's serving gap).
        attempts: update calls made (2 means the retry was used).
        pass_index: 1 for the first pass; >1 for instances found by re-discovery.
        noop: the worker already held ``version`` (our worker says so; stock ones reload).
        aborted_requests: in-flight requests the pause ended (our worker says so).
    """

    instance_id: InstanceId
    url: str
    version: int
    bytes: int | None
    tensors: int | None
    seconds: float
    paused_seconds: float
    attempts: int
    pass_index: int
    noop: bool = False
    aborted_requests: int = 0


@dataclass
class RefitReport:
    """Outcome of one refit cycle.

    Attributes:
        seconds: wall time of the whole cycle (discovery → verification).
        skipped: instances without a system URL skipped under ``missing="warn"``.
    """

    version: int
    workers: list[WorkerRefit] = field(default_factory=list)
    skipped: list[InstanceId] = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        """Bytes the workers reported loading (workers that report none count 0)."""
        return sum(w.bytes or 0 for w in self.workers)

    @property
    def gbps(self) -> float:
        """Aggregate throughput: ``total_bytes / seconds / 1e9`` (GB/s, decimal)."""
        return self.total_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def by_instance(self) -> dict[InstanceId, WorkerRefit]:
        return {w.instance_id: w for w in self.workers}

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "passes": self.passes,
            "seconds": self.seconds,
            "total_bytes": self.total_bytes,
            "gbps": self.gbps,
            "skipped": list(self.skipped),
            "workers": [w.__dict__.copy() for w in self.workers],
        }


# ----------------------------------------------------------------------------- cycle


class _WorkerFailed(Exception):
    def __init__(self, instance_id: InstanceId, reason: str):
        self.instance_id, self.reason = instance_id, reason
        super().__init__(f"instance {instance_id!r}: {reason}")


def _check_source(source: Mapping[str, Any]) -> dict:
    if not isinstance(source, Mapping):
        raise TypeError(f"source must be a dict like {{'path': DIR}} or {{'publisher': URL, 'transport': ...}}, "
                        f"got {type(source).__name__}")
    src = dict(source)
    if "version" in src:
        raise ValueError("source must not carry 'version'; pass version= to refit_all")
    kinds = [k for k in ("path", "publisher") if src.get(k) is not None]
    if len(kinds) != 1:
        raise ValueError(f"source needs exactly one of 'path' (checkpoint dir) or 'publisher' (manifest URL), "
                         f"got keys {sorted(src)}")
    unknown = set(src) - {"path", "publisher", "transport", "in_place", "timeout_s"}
    if unknown:
        raise ValueError(f"source has unknown keys {sorted(unknown)}; allowed: path | publisher, transport, "
                         "in_place, timeout_s")
    # every value checked here, before any worker is paused
    if "publisher" in src and not isinstance(src["publisher"], str):
        raise TypeError(f"source['publisher'] must be the publisher's URL (str), got {src['publisher']!r}")
    if src.get("transport") not in (None, "shm", "dist", "nixl"):
        raise ValueError(f"source['transport'] must be 'shm', 'dist', 'nixl' or None, got {src['transport']!r}")
    if "in_place" in src and not isinstance(src["in_place"], bool):
        raise TypeError(f"source['in_place'] must be true or false, got {src['in_place']!r}")
    if "timeout_s" in src:
        t = src["timeout_s"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < float("inf")):
            raise ValueError(f"source['timeout_s'] must be a positive number of seconds, got {t!r}")
    if "path" in src:
        if set(src) != {"path"}:
            raise ValueError(f"a 'path' source takes no other keys, got {sorted(src)}")
        src["path"] = str(src["path"])
    return src


def _update_call(src: dict, version: int, t: RefitTimeouts) -> tuple[str, dict]:
    """The update route and its body for ``src``. A publisher pull gets a worker-side timeout
    shorter than our HTTP timeout, so a stuck pull comes back as the worker's error (naming
    the publisher) rather than as our timeout."""
    if "path" in src:
        return "update_weights_from_disk", disk_update_body(version=version, path=src["path"],
                                                            deadline_unix_s=time.time() + t.update_s)
    return "update_weights_from_distributed", distributed_update_body(
        version=version, publisher=str(src["publisher"]), transport=src.get("transport"),
        timeout_s=float(src.get("timeout_s", 0.9 * t.update_s)), in_place=bool(src.get("in_place", False)),
        deadline_unix_s=time.time() + t.update_s)


async def _weight_version(client, url: str, t: RefitTimeouts) -> Any:
    return (await call(client, url, "get_weight_version", {}, t.info_s)).get("version")


async def refit_all(frontend_url: str, resolver: Resolver, version: int, source: Mapping[str, Any], *,
                    concurrency: int = 8, max_passes: int = 3, retries: int = 1,
                    missing: Literal["error", "warn"] = "error", pause_mode: str = "wait",
                    timeouts: RefitTimeouts | None = None, endpoint: str | None = "generate",
                    component: str | None = None, namespace: str | None = None,
                    client: httpx.AsyncClient | None = None,
                    on_event: Callable[[RefitEvent], Awaitable[None] | None] | None = None) -> RefitReport:
    """Refit every serving instance to weights ``version``; return when all serve it.

    Run one refit at a time per fleet (the trainer's loop is the single caller): two
    overlapping cycles would resume workers under each other's feet.

    Args:
        frontend_url: the Dynamo frontend, e.g. ``http://127.0.0.1:8000``; its ``/health``
            lists the instances to refit (filtered by ``endpoint``/``component``/``namespace``).
        resolver: callable → system URLs (see the module docstring), asked at every discovery.
        version: the new weights version N (int ≥ 0), declared as Dynamo's ``weight_version``.
        source: ``{"path": DIR}`` (a safetensors checkpoint dir readable by the workers:
            ``update_weights_from_disk``) or ``{"publisher": URL, "transport": "shm"|"dist"|
            "nixl"|None, "in_place": bool, "timeout_s": s}`` (``update_weights_from_distributed``
            running the refit pull in the worker).
        concurrency: workers refitted at once.
        max_passes: bound on refit passes (pass 2+ handles instances that appeared meanwhile).
        retries: extra update attempts after a transport error / timeout / 5xx (an error the
            worker answered, e.g. an older version or a bad path, is not retried).
        missing: ``"error"`` (default): an instance without a system URL raises
            :class:`DiscoveryError` before any worker is touched; ``"warn"``: it is skipped
            with a logged warning and a ``RuntimeWarning``, listed in ``report.skipped`` —
            it keeps serving its old weights.
        pause_mode: ``pause_generation``'s mode: ``"wait"`` (default: in-flight requests
            finish on the old weights), ``"abort"`` (they end now), ``"keep"`` (they go on after
            the resume on the new weights: their responses mix versions).
        timeouts: per-call timeouts (:class:`RefitTimeouts`).
        client: an ``httpx.AsyncClient`` to reuse (else one is created and closed).
        on_event: called (and awaited if it returns an awaitable) at each step, see
            :class:`RefitEvent`; its exceptions are logged and ignored.

    Returns:
        :class:`RefitReport` (per worker bytes/seconds/attempts; totals).

    Raises:
        DiscoveryError: /health or the resolver cannot be trusted (nothing touched in pass 1).
        RefitCycleError: some workers failed (named in ``.failed``; left paused when reachable);
            all the others were refitted, resumed and verified. Also raised when instances
            keep appearing after ``max_passes`` or verification finds an instance not at ``version``.
        ValueError / TypeError: bad ``version`` / ``source`` / ``missing`` / ``pause_mode``.
    """
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"version must be an int >= 0, got {version!r}")
    if missing not in ("error", "warn"):
        raise ValueError(f"missing must be 'error' or 'warn', got {missing!r}")
    if pause_mode not in PAUSE_MODES:
        raise ValueError(f"pause_mode must be one of {list(PAUSE_MODES)}, got {pause_mode!r}")
    if concurrency < 1 or max_passes < 1 or retries < 0:
        raise ValueError(f"need concurrency >= 1, max_passes >= 1, retries >= 0; got "
                         f"{concurrency}, {max_passes}, {retries}")
    t = timeouts or RefitTimeouts()
    src = _check_source(source)
    filters = dict(endpoint=endpoint, component=component, namespace=namespace)
    t0 = time.monotonic()
    report = RefitReport(version=version)
    failed: dict[InstanceId, str] = {}
    handled: set[InstanceId] = set()     # refitted, failed or skipped
    sem = asyncio.Semaphore(concurrency)
    own = client is None
    if own:
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=max(2 * concurrency, 16)))

    async def emit(ev: RefitEvent) -> None:
        if on_event is None:
            return
        try:
            out = on_event(ev)
            if inspect.isawaitable(out):
                await out
        except Exception:  # noqa: BLE001 - a progress hook must not break a refit
            log.exception("refit: on_event hook raised at %s", ev)

    async def one(iid: InstanceId, url: str, pass_index: int) -> WorkerRefit:
        async with sem:
            return await _refit_worker(client, iid, url, version, src, pause_mode, pass_index, retries, t, emit)

    try:
        d = await _discover(client, frontend_url, resolver, t, filters)
        pass_index = 0
        while True:
            # skip / fail instances without a usable system URL
            new_missing = [i for i in d.missing if i not in handled]
            if new_missing:
                msg = (f"instance(s) {new_missing} listed by the frontend at {frontend_url} have no control URL "
                       f"from resolver {resolver!r}")
                if missing == "error":
                    if pass_index == 0:
                        raise DiscoveryError(msg + "; nothing was refitted. Fix the resolver, or pass "
                                             "missing='warn' to skip them (they would keep serving old weights)")
                    failed.update({i: "no control URL" for i in new_missing})
                else:
                    log.warning("refit v%d: SKIPPING %s — they keep serving their old weights", version, msg)
                    warnings.warn(f"refit v{version}: skipping {msg}", RuntimeWarning, stacklevel=2)
                    report.skipped.extend(new_missing)
                handled.update(new_missing)
            for iid, why in d.unreachable.items():
                if iid not in handled:
                    failed[iid] = f"control URL unreachable: {why}"
                    handled.add(iid)
                    await emit(RefitEvent("failed", pass_index + 1, iid, None, failed[iid]))
            todo = sorted((i for i in d.targets() if i not in handled and i in d.urls), key=str)
            if not todo:
                break
            if pass_index >= max_passes:
                failed.update({i: f"appeared after the last of max_passes={max_passes} passes; "
                                  "not refitted (raise max_passes or refit again)" for i in todo})
                break
            pass_index += 1
            log.info("refit v%d pass %d: %d worker(s) %s", version, pass_index, len(todo), todo)
            results = await asyncio.gather(*(one(i, d.urls[i], pass_index) for i in todo),
                                           return_exceptions=True)
            for iid, res in zip(todo, results):
                handled.add(iid)
                if isinstance(res, WorkerRefit):
                    report.workers.append(res)
                elif isinstance(res, _WorkerFailed):
                    failed[iid] = res.reason
                elif isinstance(res, BaseException):
                    failed[iid] = f"{type(res).__name__}: {res}"
                    if not isinstance(res, Exception):
                        raise res
            report.passes = pass_index
            await emit(RefitEvent("pass_done", pass_index))
            try:
                d = await _discover(client, frontend_url, resolver, t, filters, known=handled)
            except DiscoveryError as e:
                report.seconds = time.monotonic() - t0
                done = sorted((w.instance_id for w in report.workers), key=str)
                raise RefitCycleError(
                    f"re-discovery after pass {pass_index} of the refit to version {version} failed, so "
                    f"the fleet cannot be verified: {e}. Refitted and resumed so far: {done}; failed: "
                    f"{failed or 'none'}. Fix discovery and refit again",
                    failed=failed, report=report) from e

        # verification: every refitted instance still answers and declares `version`
        async def check(w: WorkerRefit) -> str | None:
            url = d.urls.get(w.instance_id)
            if url is None:
                return f"not reachable at verification ({d.unreachable.get(w.instance_id, 'no longer listed')})"
            try:
                got = await _weight_version(client, url, t)
            except ControlCallError as e:
                return f"verification failed: {e}"
            return None if got == version else f"verification: get_weight_version says {got!r}, expected {version}"

        for w, why in zip(report.workers, await asyncio.gather(*(check(w) for w in report.workers))):
            if why is not None:
                failed[w.instance_id] = why
        report.workers = [w for w in report.workers if w.instance_id not in failed]
        report.seconds = time.monotonic() - t0
        if failed:
            names = "; ".join(f"instance {i!r}: {why}" for i, why in failed.items())
            raise RefitCycleError(
                f"refit to version {version} failed for {len(failed)} worker(s): {names}. "
                f"{len(report.workers)} other worker(s) serve version {version}. A worker whose update "
                "or verification failed is left paused (it must not serve stale weights next to the new "
                "ones; those marked 'not paused' were not touched): fix the cause and refit again, or "
                "restart it", failed=failed, report=report)
        log.info("refit v%d: %d worker(s), %d bytes reported, %.3f s, %d pass(es)", version,
                 len(report.workers), report.total_bytes, report.seconds, report.passes)
        return report
    finally:
        if own:
            await client.aclose()


async def _refit_worker(client: httpx.AsyncClient, iid: InstanceId, url: str, version: int, src: dict,
                        pause_mode: str, pass_index: int, retries: int, t: RefitTimeouts,
                        emit) -> WorkerRefit:
    """pause → update (retried) → verify → resume for one worker. Raises _WorkerFailed.

    A worker that already declares a newer version is left alone (not paused): versions
    only move forward, and pausing it would take a worker with newer weights out of service."""
    stage = "start"
    keep_paused = False
    t_pause = time.monotonic()
    attempts, result, upd_s, paused = 0, {}, 0.0, {}
    try:
        try:
            declared = await _weight_version(client, url, t)
        except ControlCallError as e:
            raise _WorkerFailed(iid, f"get_weight_version failed before the refit: {e}; not paused") from e
        if isinstance(declared, int) and not isinstance(declared, bool) and declared > version:
            raise _WorkerFailed(iid, f"declares weight version {declared}, newer than {version}: versions only "
                                     "move forward; nothing was done (not paused)")
        try:
            pause_timeout = max(t.pause_s, t.drain_s + 5.0)
            # timeout_s / deadline_unix_s are our worker's additions (a stock worker ignores
            # them): it ends requests still running after drain_s, and refuses a pause it
            # reads after we gave up (e.g. it was SIGSTOPped) instead of applying it late
            paused = await call(client, url, "pause_generation",
                                {"mode": pause_mode, "timeout_s": t.drain_s,
                                 "deadline_unix_s": time.time() + pause_timeout}, pause_timeout)
        except ControlCallError as e:
            # unknown state: do not resume (if the pause lands late the worker stays paused: safe)
            stage = "pause_failed"
            raise _WorkerFailed(iid, f"pause failed: {e}") from e
        stage = "paused"
        t_pause = time.monotonic()
        await emit(RefitEvent("paused", pass_index, iid, url, f"mode {pause_mode}"))
        route, body = _update_call(src, version, t)
        t_upd = time.monotonic()
        stage = "updating"   # from here an interruption leaves unknown weights: the worker stays paused
        while True:
            attempts += 1
            try:
                result = await call(client, url, route, body, t.update_s)
                break
            except ControlCallError as e:
                if attempts > retries or not e.retryable:
                    keep_paused = True
                    raise _WorkerFailed(iid, f"{route} failed after {attempts} attempt(s): {e}") from e
                log.warning("refit v%d: update of instance %r failed (%s); retrying", version, iid, e)
                await emit(RefitEvent("retry", pass_index, iid, url, str(e)))
                await asyncio.sleep(0.2)
                route, body = _update_call(src, version, t)   # a fresh deadline
        upd_s = time.monotonic() - t_upd
        stage = "updated"
        await emit(RefitEvent("updated", pass_index, iid, url))
        try:
            got = await _weight_version(client, url, t)
        except ControlCallError as e:
            keep_paused = True
            raise _WorkerFailed(iid, f"get_weight_version failed after the update: {e}") from e
        if got != version:
            keep_paused = True
            raise _WorkerFailed(iid, f"after {route} the worker declares weight version {got!r}, not {version}")
        stage = "verified"
        await emit(RefitEvent("verified", pass_index, iid, url))
    except _WorkerFailed as e:
        await emit(RefitEvent("failed", pass_index, iid, url, e.reason))
        raise
    finally:
        # interrupted (cancelled) during the update or before its verification: unknown
        # weights, so the worker stays paused; after a verified update (or none at all) it resumes
        if stage in ("paused", "verified") and not keep_paused:
            try:
                await call(client, url, "resume_generation", {}, t.resume_s)
            except ControlCallError as e:
                reason = f"resume failed (worker may hold version {version} but is paused): {e}"
                await emit(RefitEvent("failed", pass_index, iid, url, reason))
                raise _WorkerFailed(iid, reason) from e
            await emit(RefitEvent("resumed", pass_index, iid, url))
    nbytes = result.get("bytes")
    ntensors = result.get("tensors")
    return WorkerRefit(
        instance_id=iid, url=url, version=version,
        bytes=int(nbytes) if isinstance(nbytes, int) else None,
        tensors=int(ntensors) if isinstance(ntensors, int) else None,
        seconds=upd_s, paused_seconds=time.monotonic() - t_pause, attempts=attempts,
        pass_index=pass_index, noop=bool(result.get("noop", False)),
        aborted_requests=int(paused.get("aborted", 0) or 0))


def refit_all_sync(frontend_url: str, resolver: Resolver, version: int, source: Mapping[str, Any],
                   **kwargs: Any) -> RefitReport:
    """Blocking :func:`refit_all` for a synchronous trainer (same arguments, errors and result).

    Runs its own event loop; called from inside a running loop (a notebook, an async actor) it
    runs that loop in a helper thread instead of failing.
    """
    coro_fn = lambda: refit_all(frontend_url, resolver, version, source, **kwargs)  # noqa: E731
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="refit") as ex:
        return ex.submit(lambda: asyncio.run(coro_fn())).result()
