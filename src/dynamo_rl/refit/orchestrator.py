"""Refit control plane: pause → update_weights → flush_cache → resume on every serving worker.

Owns: discovery of the instances the Dynamo frontend routes to, mapping each to its worker's
control URL (the Dynamo system server, ``DYN_SYSTEM_PORT``), the per-worker refit cycle,
scale-up passes, failure semantics and the final verification. It speaks HTTP only
(``/health`` on the frontend, ``/engine/*`` on each worker; routes in
``docs/contracts.md``) and must NOT import ``dynamo_rl.serving``, ``dynamo_rl.k8s`` or
``dynamo_rl.rl``: how instances map to control URLs is injected as a *resolver*.

Cycle (:func:`refit_all`)::

    pass 1..max_passes:
        discover: GET frontend /health → instances (endpoint "generate")
                  resolver() → control URLs; GET <url>/engine/info confirms instance_id
        for each instance not yet handled (in parallel, at most `concurrency` at once):
            POST pause_generation           (drain: in-flight requests finish first; those
                                             still running after drain_s are aborted)
            POST update_weights {version N, **source}   (retried once on a transport / 5xx error)
            POST flush_cache
            POST resume_generation          (in a ``finally``; skipped for a failed worker)
        re-discover; stop when no new instance appeared (scale-up during a refit)
    verify: every instance reports weights_version N and is not paused

Failure semantics: a worker whose update (after the retry) or flush fails stays PAUSED — it
holds consistent but stale weights and must not serve them next to version N — and the cycle
raises :class:`RefitCycleError` naming it, after every other worker was refitted and resumed.
Because the engine's pause drains in-flight requests and ``load_weights`` never applies
partially, no response ever mixes two weights versions.

Resolver (pluggable; called once per discovery, so it sees workers that appeared meanwhile)::

    Resolver = Callable[[], ControlUrls | Awaitable[ControlUrls]]
    ControlUrls = Mapping[instance_id, url]   # hints, e.g. LocalStack.control_urls
                | Iterable[url]               # candidates, e.g. http://<podIP>:<DYN_SYSTEM_PORT>
                                              # of every worker pod of a DGD (label selector)

Mapping form: each URL must answer ``/engine/info`` with that instance_id (else
:class:`DiscoveryError`); a hinted URL that does not answer makes its instance a failed
worker; a ``None`` key (id not known yet: a worker still starting) is probed like a
candidate. Candidate form: every URL is probed and mapped by the instance_id it reports;
unreachable candidates are ignored (pods starting or gone). A URL is
``scheme://host:port`` without a trailing path. Instances that the resolver confirms but
/health does not list are refitted too: a worker about to register, or one whose Dynamo
discovery lease expired while its process stalled (seen with 1.6.1's file backend after a
~4 s SIGSTOP: the live worker is never routed to again, yet would still hold old weights).

On Kubernetes the resolver is :func:`dynamo_rl.refit.discovery.dgd_pod_resolver` (the DGD's
running pods as ``http://<podIP>:<DYN_SYSTEM_PORT>`` candidates); any callable with no
arguments returning candidate URLs works (async callables work too). Pods that serve no ``/engine/info`` (the frontend's) are ignored
as unreachable candidates, so the selector need not single out the workers.

Instance ids are compared after normalisation: ints, decimal strings and ``0x`` hex strings
become ``int``; other strings stay strings.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import httpx

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

InstanceId = Union[int, str]
ControlUrls = Union[Mapping[Any, str], Iterable[str]]
Resolver = Callable[[], Union[ControlUrls, Awaitable[ControlUrls]]]


# ----------------------------------------------------------------------------- errors


class DiscoveryError(RefitError):
    """Discovery could not build a trustworthy instance → control-URL map (nothing was touched).

    Raised for: /health unreachable or malformed, a control URL that answers as another
    instance, two URLs answering as one instance, instances without a control URL under
    ``missing="error"``.
    """


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
class Instance:
    """One serving instance as the frontend's ``/health`` lists it."""

    instance_id: InstanceId
    namespace: str | None = None
    component: str | None = None
    endpoint: str | None = None


@dataclass(frozen=True)
class RefitTimeouts:
    """Per-call timeouts in seconds. Every HTTP call of a cycle has one."""

    health_s: float = 10.0        # GET frontend /health
    info_s: float = 10.0          # GET /engine/info (discovery, verification)
    drain_s: float = 120.0        # sent with pause_generation: the worker waits this long for in-flight
                                  # requests to finish, then aborts the rest (finish_reason "abort")
    pause_s: float = 150.0        # HTTP timeout of pause_generation (longer than drain_s)
    update_s: float = 300.0       # POST update_weights: transfer + load
    flush_s: float = 30.0
    resume_s: float = 30.0
    resolve_grace_s: float = 10.0  # re-ask the resolver this long for instances without a URL


@dataclass(frozen=True)
class RefitEvent:
    """Progress of one worker (or of a pass when ``instance_id`` is None).

    ``stage`` ∈ {"paused", "updated", "retry", "flushed", "resumed", "failed", "pass_done"}.
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
        bytes: bytes loaded as the worker reported them (0 when the version was already loaded).
        seconds: wall time of the update_weights call(s), as seen by the orchestrator.
        paused_seconds: wall time from pause to resume (the worker's serving gap).
        attempts: update_weights calls made (2 means the retry was used).
        pass_index: 1 for the first pass; >1 for instances found by re-discovery.
        noop: the worker already held ``version``.
        aborted_requests: in-flight requests the worker aborted because they outlived
            ``RefitTimeouts.drain_s`` (they end with finish_reason "abort", on the old weights).
    """

    instance_id: InstanceId
    url: str
    version: int
    bytes: int
    tensors: int
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
        skipped: instances without a control URL skipped under ``missing="warn"``.
    """

    version: int
    workers: list[WorkerRefit] = field(default_factory=list)
    skipped: list[InstanceId] = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(w.bytes for w in self.workers)

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


# ----------------------------------------------------------------------------- resolver


class StaticResolver:
    """A fixed resolver: ``{instance_id: url}`` hints or an iterable of candidate URLs.

    For a set of workers that changes over time pass a callable instead (for the local
    stack: ``stack.control_urls``), since the resolver is asked again at every discovery.
    """

    def __init__(self, urls: ControlUrls):
        self._urls = dict(urls) if isinstance(urls, Mapping) else list(urls)

    def __call__(self) -> ControlUrls:
        return self._urls

    def __repr__(self) -> str:
        return f"StaticResolver({self._urls!r})"


def _norm_id(x: Any) -> InstanceId:
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


def _norm_url(url: str) -> str:
    url = str(url).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise DiscoveryError(f"control URL {url!r} must start with http:// or https:// (e.g. http://10.0.0.5:9345)")
    return url


# ----------------------------------------------------------------------------- HTTP


class _CallError(Exception):
    def __init__(self, route: str, url: str, message: str, *, status: int | None, retryable: bool):
        self.route, self.url, self.status, self.retryable = route, url, status, retryable
        super().__init__(f"{route} at {url}: {message}")


async def _call(client: httpx.AsyncClient, method: str, url: str, route: str, body: dict | None,
                timeout: float) -> dict:
    """One control call. Errors (transport, HTTP ≥ 400, ``{"error": ...}`` bodies) → _CallError."""
    full = f"{url}/engine/{route}"
    try:
        if method == "GET":
            r = await client.get(full, timeout=timeout)
        else:
            r = await client.post(full, json=body or {}, timeout=timeout)
    except httpx.TimeoutException as e:
        raise _CallError(route, url, f"timed out after {timeout:g} s ({type(e).__name__})",
                         status=None, retryable=True) from e
    except httpx.TransportError as e:
        raise _CallError(route, url, f"unreachable ({type(e).__name__}: {e})", status=None,
                         retryable=True) from e
    try:
        data = r.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and "error" in data:
        status = data.get("status")
        status = int(status) if isinstance(status, int) else (r.status_code if r.status_code >= 400 else 500)
        msg = f"{data['error']}" + (f" ({data['message']})" if data.get("message") else "")
        raise _CallError(route, url, f"error {status}: {msg}", status=status,
                         retryable=status >= 500)
    if r.status_code >= 400 or not isinstance(data, dict):
        raise _CallError(route, url, f"HTTP {r.status_code}: {r.text[:500]!r}", status=r.status_code,
                         retryable=r.status_code >= 500)
    return data


async def _health_instances(client: httpx.AsyncClient, frontend_url: str, timeout: float, *,
                            endpoint: str | None, component: str | None,
                            namespace: str | None) -> list[Instance]:
    url = frontend_url.rstrip("/") + "/health"
    try:
        r = await client.get(url, timeout=timeout)
        data = r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise DiscoveryError(
            f"frontend health {url} did not answer with JSON ({type(e).__name__}: {e}); "
            "check frontend_url and that the Dynamo frontend is running") from e
    if not isinstance(data, dict) or not isinstance(data.get("instances"), list):
        raise DiscoveryError(f"frontend health {url} has no 'instances' list (got {str(data)[:300]!r})")
    seen: dict[InstanceId, Instance] = {}
    for raw in data["instances"]:
        if not isinstance(raw, dict) or "instance_id" not in raw:
            continue
        if endpoint is not None and raw.get("endpoint") != endpoint:
            continue
        if component is not None and raw.get("component") != component:
            continue
        if namespace is not None and raw.get("namespace") != namespace:
            continue
        iid = _norm_id(raw["instance_id"])
        seen.setdefault(iid, Instance(iid, raw.get("namespace"), raw.get("component"), raw.get("endpoint")))
    return list(seen.values())


@dataclass
class _Discovery:
    instances: list[Instance]                      # from /health (filtered)
    urls: dict[InstanceId, str]                    # confirmed control URL per instance
    infos: dict[InstanceId, dict]                  # /engine/info per confirmed instance
    unreachable: dict[InstanceId, str]             # hinted URL did not answer
    missing: list[InstanceId]                      # in /health, no control URL

    def targets(self) -> set[InstanceId]:
        return {i.instance_id for i in self.instances} | set(self.urls)


async def _resolve(resolver: Resolver) -> ControlUrls:
    out = resolver()
    if inspect.isawaitable(out):
        out = await out
    return out


async def _discover_once(client, frontend_url, resolver, t: RefitTimeouts, filters: dict) -> _Discovery:
    instances = await _health_instances(client, frontend_url, t.health_s, **filters)
    resolved = await _resolve(resolver)
    urls: dict[InstanceId, str] = {}
    infos: dict[InstanceId, dict] = {}
    unreachable: dict[InstanceId, str] = {}

    async def info(url: str) -> dict | _CallError:
        try:
            return await _call(client, "GET", url, "info", None, t.info_s)
        except _CallError as e:
            return e

    if isinstance(resolved, Mapping):
        # a None key means "id not known yet" (e.g. a worker still starting): probe it as a candidate
        hints = {_norm_id(k): _norm_url(v) for k, v in resolved.items() if k is not None}
        cands = sorted({_norm_url(v) for k, v in resolved.items() if k is None} - set(hints.values()))
    else:
        hints, cands = {}, sorted({_norm_url(u) for u in resolved})
    answers = await asyncio.gather(*(info(u) for u in [*hints.values(), *cands]))
    for (iid, url), ans in zip(hints.items(), answers[:len(hints)]):
        if isinstance(ans, _CallError):
            unreachable[iid] = str(ans)
            continue
        if ans.get("instance_id") is None:
            unreachable[iid] = f"{url}/engine/info reports no instance_id yet (worker still starting?)"
            continue
        got = _norm_id(ans["instance_id"])
        if got != iid:
            raise DiscoveryError(
                f"control URL {url} was given for instance {iid!r} but its /engine/info reports "
                f"instance_id {got!r}; fix the resolver's mapping (stale URL or port reused?)")
        urls[iid], infos[iid] = url, ans
    for url, ans in zip(cands, answers[len(hints):]):
        if isinstance(ans, _CallError):
            log.debug("refit: candidate control URL ignored: %s", ans)
            continue
        if ans.get("instance_id") is None:
            log.debug("refit: candidate control URL %s has no instance_id yet; ignored", url)
            continue
        got = _norm_id(ans["instance_id"])
        if got in urls:
            raise DiscoveryError(
                f"control URLs {urls[got]} and {url} both report instance_id {got!r}; "
                "the resolver must list each worker once")
        urls[got], infos[got] = url, ans
    missing = [i.instance_id for i in instances if i.instance_id not in urls and i.instance_id not in unreachable]
    # an unreachable hint for an instance the frontend does not route to is a departed worker
    listed = {i.instance_id for i in instances}
    unreachable = {k: v for k, v in unreachable.items() if k in listed}
    return _Discovery(instances, urls, infos, unreachable, missing)


async def _discover(client, frontend_url, resolver, t: RefitTimeouts, filters: dict,
                    known: set | frozenset = frozenset()) -> _Discovery:
    """Discover; while some /health instance (not in ``known``) has no control URL, re-ask for up
    to resolve_grace_s (a worker registers with the frontend slightly before/after its pod or
    process is listed)."""
    deadline = time.monotonic() + t.resolve_grace_s
    while True:
        d = await _discover_once(client, frontend_url, resolver, t, filters)
        if not set(d.missing) - set(known) or time.monotonic() >= deadline:
            return d
        await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


async def discover_instances(frontend_url: str, resolver: Resolver, *,
                             timeouts: RefitTimeouts | None = None, endpoint: str | None = "generate",
                             component: str | None = None, namespace: str | None = None,
                             client: httpx.AsyncClient | None = None) -> dict[InstanceId, str]:
    """Return ``{instance_id: control_url}`` for every instance the frontend routes to.

    Raises:
        DiscoveryError: /health unusable, a mapping contradicted by /engine/info, or an
            instance with no (reachable) control URL.
    """
    t = timeouts or RefitTimeouts()
    own = client is None
    client = client or httpx.AsyncClient()
    try:
        d = await _discover(client, frontend_url, resolver, t,
                            dict(endpoint=endpoint, component=component, namespace=namespace))
    finally:
        if own:
            await client.aclose()
    bad = {**{i: "no control URL" for i in d.missing}, **d.unreachable}
    if bad:
        raise DiscoveryError(f"instances without a reachable control URL: {bad}; fix the resolver")
    return dict(d.urls)


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
    if "path" in src:
        src["path"] = str(src["path"])
    return src


def _with_pull_timeout(src: dict, t: RefitTimeouts) -> dict:
    """A publisher pull gets a worker-side timeout shorter than our HTTP timeout, so a stuck
    pull comes back as the worker's error (naming the publisher) rather than as our timeout."""
    if "publisher" in src and "timeout_s" not in src:
        return {**src, "timeout_s": 0.9 * t.update_s}
    return src


async def refit_all(frontend_url: str, resolver: Resolver, version: int, source: Mapping[str, Any], *,
                    concurrency: int = 8, max_passes: int = 3, retries: int = 1,
                    missing: Literal["error", "warn"] = "error",
                    timeouts: RefitTimeouts | None = None, endpoint: str | None = "generate",
                    component: str | None = None, namespace: str | None = None,
                    client: httpx.AsyncClient | None = None,
                    on_event: Callable[[RefitEvent], Awaitable[None] | None] | None = None) -> RefitReport:
    """Refit every serving instance to weights ``version``; return when all serve it.

    Run one refit at a time per fleet (the trainer's loop is the single caller): two
    overlapping cycles would resume workers under each other's feet. Weights never mix
    within a response either way, since the workers serialise ``update_weights``.

    Args:
        frontend_url: the Dynamo frontend, e.g. ``http://127.0.0.1:8000``; its ``/health``
            lists the instances to refit (filtered by ``endpoint``/``component``/``namespace``).
        resolver: callable → control URLs (see the module docstring), asked at every discovery.
        version: the new weights version N (int ≥ 0); workers refuse a version older than theirs.
        source: the rest of the update_weights body: ``{"path": DIR}`` (safetensors checkpoint
            dir readable by the workers) or ``{"publisher": URL, "transport": "shm"|"dist"|"nixl"|None}``.
        concurrency: workers refitted at once.
        max_passes: bound on refit passes (pass 2+ handles instances that appeared meanwhile).
        retries: extra update_weights attempts after a transport error / timeout / 5xx
            (a 4xx, e.g. an older version or a bad path, is not retried).
        missing: ``"error"`` (default): an instance without a control URL raises
            :class:`DiscoveryError` before any worker is touched; ``"warn"``: it is skipped
            with a logged warning and a ``RuntimeWarning``, listed in ``report.skipped`` —
            it keeps serving its old weights.
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
        ValueError / TypeError: bad ``version`` / ``source`` / ``missing``.
    """
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"version must be an int >= 0, got {version!r}")
    if missing not in ("error", "warn"):
        raise ValueError(f"missing must be 'error' or 'warn', got {missing!r}")
    if concurrency < 1 or max_passes < 1 or retries < 0:
        raise ValueError(f"need concurrency >= 1, max_passes >= 1, retries >= 0; got "
                         f"{concurrency}, {max_passes}, {retries}")
    t = timeouts or RefitTimeouts()
    src = _with_pull_timeout(_check_source(source), t)
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
            return await _refit_worker(client, iid, url, version, src, pass_index, retries, t, emit)

    try:
        d = await _discover(client, frontend_url, resolver, t, filters)
        pass_index = 0
        while True:
            # skip / fail instances without a usable control URL
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
                    f"{failed or 'none'}. Fix discovery and refit again (done workers are a no-op)",
                    failed=failed, report=report) from e

        # verification: the last discovery's /engine/info of every refitted instance
        refitted = {w.instance_id: w for w in report.workers}
        for iid in refitted:
            info = d.infos.get(iid)
            if info is None:
                failed[iid] = f"not reachable at verification ({d.unreachable.get(iid, 'no longer listed')})"
            elif info.get("weights_version") != version or info.get("paused"):
                failed[iid] = (f"verification: reports weights_version={info.get('weights_version')!r}, "
                               f"paused={info.get('paused')!r}; expected {version}, not paused")
        report.workers = [w for w in report.workers if w.instance_id not in failed]
        report.seconds = time.monotonic() - t0
        if failed:
            names = "; ".join(f"instance {i!r}: {why}" for i, why in failed.items())
            raise RefitCycleError(
                f"refit to version {version} failed for {len(failed)} worker(s): {names}. "
                f"{len(report.workers)} other worker(s) serve version {version}. A worker whose update "
                "or flush failed is left paused (it must not serve stale weights next to the new "
                "ones): fix the cause and refit again, or restart it", failed=failed, report=report)
        log.info("refit v%d: %d worker(s), %d bytes, %.3f s, %.3f GB/s, %d pass(es)", version,
                 len(report.workers), report.total_bytes, report.seconds, report.gbps, report.passes)
        return report
    finally:
        if own:
            await client.aclose()


async def _refit_worker(client: httpx.AsyncClient, iid: InstanceId, url: str, version: int, src: dict,
                        pass_index: int, retries: int, t: RefitTimeouts, emit) -> WorkerRefit:
    """pause → update (retried) → flush → resume for one worker. Raises _WorkerFailed."""
    stage = "start"
    keep_paused = False
    t_pause = time.monotonic()
    attempts, result, upd_s, paused = 0, {}, 0.0, {}
    try:
        try:
            pause_timeout = max(t.pause_s, t.drain_s + 5.0)
            # deadline_unix_s: a worker that reads the request after we gave up (e.g. it was
            # SIGSTOPped) refuses it with 408 instead of applying it late
            paused = await _call(client, "POST", url, "pause_generation",
                                 {"timeout_s": t.drain_s, "deadline_unix_s": time.time() + pause_timeout},
                                 pause_timeout)
        except _CallError as e:
            # unknown state: do not resume (if the pause lands late the worker stays paused: safe)
            stage = "pause_failed"
            raise _WorkerFailed(iid, f"pause failed: {e}") from e
        stage = "paused"
        t_pause = time.monotonic()
        await emit(RefitEvent("paused", pass_index, iid, url, f"drained {paused.get('drained')}, "
                                                              f"aborted {paused.get('aborted')}"))
        body = {"version": version, **src}
        t_upd = time.monotonic()
        while True:
            attempts += 1
            try:
                result = await _call(client, "POST", url, "update_weights",
                                     {**body, "deadline_unix_s": time.time() + t.update_s}, t.update_s)
                break
            except _CallError as e:
                if attempts > retries or not e.retryable:
                    keep_paused = True
                    raise _WorkerFailed(iid, f"update_weights failed after {attempts} attempt(s): {e}") from e
                log.warning("refit v%d: update of instance %r failed (%s); retrying", version, iid, e)
                await emit(RefitEvent("retry", pass_index, iid, url, str(e)))
                await asyncio.sleep(0.2)
        upd_s = time.monotonic() - t_upd
        stage = "updated"
        await emit(RefitEvent("updated", pass_index, iid, url))
        try:
            await _flush(client, url, t)
        except _CallError as e:
            keep_paused = True
            raise _WorkerFailed(iid, f"flush_cache failed after update (KV cache may hold old-version "
                                     f"entries): {e}") from e
        stage = "flushed"
        await emit(RefitEvent("flushed", pass_index, iid, url))
    except _WorkerFailed as e:
        await emit(RefitEvent("failed", pass_index, iid, url, e.reason))
        raise
    finally:
        if stage in ("paused", "updated", "flushed") and not keep_paused:
            if stage == "updated":   # interrupted (cancelled) between update and flush
                try:
                    await _flush(client, url, t)
                except _CallError as e:
                    log.error("refit: flush of instance %r after interruption failed (%s); leaving it paused", iid, e)
                    keep_paused = True
            if not keep_paused:
                try:
                    await _call(client, "POST", url, "resume_generation", {}, t.resume_s)
                except _CallError as e:
                    reason = f"resume failed (worker may hold version {version} but is paused): {e}"
                    await emit(RefitEvent("failed", pass_index, iid, url, reason))
                    raise _WorkerFailed(iid, reason) from e
                await emit(RefitEvent("resumed", pass_index, iid, url))
    return WorkerRefit(
        instance_id=iid, url=url, version=int(result.get("version", version)),
        bytes=int(result.get("bytes", 0) or 0), tensors=int(result.get("tensors", 0) or 0),
        seconds=upd_s, paused_seconds=time.monotonic() - t_pause, attempts=attempts,
        pass_index=pass_index, noop=bool(result.get("noop", False)),
        aborted_requests=int(paused.get("aborted", 0) or 0))


async def _flush(client: httpx.AsyncClient, url: str, t: RefitTimeouts) -> dict:
    try:
        return await _call(client, "POST", url, "flush_cache", {}, t.flush_s)
    except _CallError as e:
        if not e.retryable:
            raise
        return await _call(client, "POST", url, "flush_cache", {}, t.flush_s)


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
