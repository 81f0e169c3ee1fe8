"""Which workers to refit: the instances the frontend routes to, and each one's system URL.

:func:`discover_instances` (and the orchestrator's passes) read the frontend's ``/health``
(instances of the ``generate`` endpoint) and ask a *resolver* for candidate system URLs;
each URL is identified by the instance id its ``/metrics`` name
(:func:`dynamo_rl.refit.control.identify`), which works for every Dynamo worker, stock
or ours. Resolvers: a mapping or list (:class:`StaticResolver`), ``LocalStack.control_urls``
for the embedded stack, and on Kubernetes :func:`dgd_pod_resolver`.

Inside the trainer's pod, the serving workers of a DynamoGraphDeployment are the pods
labelled ``nvidia.com/dynamo-graph-deployment-name=<dgd>`` (the label the Dynamo operator
puts on every pod of a DGD); each serves its control routes on the Dynamo system port
(``DYN_SYSTEM_PORT``, 9090 in ``examples/k8s``). Pods whose URL names no worker (the
frontend's) are ignored, so the resolver only lists running pods. Uses the official
``kubernetes`` client with the pod's service account (``load_incluster_config``); needs
``get``/``list`` on ``pods``.

Must not import ``dynamo_rl.k8s`` (the launcher) or anything below ``refit``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import httpx

from dynamo_rl.refit.control import ControlCallError, RefitTimeouts, identify, norm_instance_id
from dynamo_rl.refit.errors import RefitError

log = logging.getLogger(__name__)

InstanceId = Union[int, str]
ControlUrls = Union[Mapping[Any, str], Iterable[str]]
Resolver = Callable[[], Union[ControlUrls, Awaitable[ControlUrls]]]
_norm_id = norm_instance_id


class DiscoveryError(RefitError):
    """Discovery could not build a trustworthy instance → system-URL map (nothing was touched).

    Raised for: /health unreachable or malformed, a URL whose metrics name another
    instance, two URLs naming one instance, instances without a URL under ``missing="error"``.
    """


@dataclass(frozen=True)
class Instance:
    """One serving instance as the frontend's ``/health`` lists it."""

    instance_id: InstanceId
    namespace: str | None = None
    component: str | None = None
    endpoint: str | None = None



DGD_LABEL = "nvidia.com/dynamo-graph-deployment-name"


def dgd_pod_resolver(dgd_name: str, namespace: str, *, system_port: int = 9090,
                     core_v1=None) -> Callable[[], list[str]]:
    """Return a resolver: ``() -> ["http://<podIP>:<system_port>", ...]`` for the DGD's running pods.

    Args:
        dgd_name: the DGD's ``metadata.name``.
        namespace: its namespace.
        system_port: the workers' ``DYN_SYSTEM_PORT``.
        core_v1: a ``kubernetes.client.CoreV1Api`` (default: in-cluster configuration).
    Raises:
        kubernetes.config.ConfigException: outside a pod when ``core_v1`` is not given.
    """
    if core_v1 is None:
        from kubernetes import client, config

        config.load_incluster_config()
        core_v1 = client.CoreV1Api()

    def resolve() -> list[str]:
        pods = core_v1.list_namespaced_pod(namespace, label_selector=f"{DGD_LABEL}={dgd_name}")
        return [f"http://{p.status.pod_ip}:{system_port}" for p in pods.items
                if p.status and p.status.pod_ip and p.status.phase == "Running"]

    return resolve


def pod_ip() -> str:
    """This pod's IP: ``$POD_IP`` (downward API) or the address of the pod's hostname."""
    return os.environ.get("POD_IP") or socket.gethostbyname(socket.gethostname())




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


def _norm_url(url: str) -> str:
    url = str(url).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise DiscoveryError(f"control URL {url!r} must start with http:// or https:// (e.g. http://10.0.0.5:9345)")
    return url




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
    urls: dict[InstanceId, str]                    # confirmed system URL per instance
    unreachable: dict[InstanceId, str]             # hinted URL did not answer
    missing: list[InstanceId]                      # in /health, no system URL

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
    unreachable: dict[InstanceId, str] = {}
    endpoint = filters.get("endpoint") or "generate"

    async def who(url: str) -> InstanceId | None | ControlCallError:
        try:
            return await identify(client, url, t.info_s, endpoint=endpoint)
        except ControlCallError as e:
            return e

    if isinstance(resolved, Mapping):
        # a None key means "id not known yet" (e.g. a worker still starting): probe it as a candidate
        hints = {_norm_id(k): _norm_url(v) for k, v in resolved.items() if k is not None}
        cands = sorted({_norm_url(v) for k, v in resolved.items() if k is None} - set(hints.values()))
    else:
        hints, cands = {}, sorted({_norm_url(u) for u in resolved})
    answers = await asyncio.gather(*(who(u) for u in [*hints.values(), *cands]))
    for (iid, url), ans in zip(hints.items(), answers[:len(hints)]):
        if isinstance(ans, ControlCallError):
            unreachable[iid] = str(ans)
            continue
        if ans is None:
            unreachable[iid] = f"{url}/metrics name no {endpoint!r} instance yet (worker still starting?)"
            continue
        if ans != iid:
            raise DiscoveryError(
                f"control URL {url} was given for instance {iid!r} but its /metrics name instance "
                f"{ans!r}; fix the resolver's mapping (stale URL or port reused?)")
        urls[iid] = url
    for url, ans in zip(cands, answers[len(hints):]):
        if isinstance(ans, ControlCallError) or ans is None:
            log.debug("refit: candidate URL %s ignored: %s", url, ans or "no instance yet")
            continue
        if ans in urls:
            raise DiscoveryError(
                f"control URLs {urls[ans]} and {url} both name instance {ans!r}; "
                "the resolver must list each worker once")
        urls[ans] = url
    missing = [i.instance_id for i in instances if i.instance_id not in urls and i.instance_id not in unreachable]
    # an unreachable hint for an instance the frontend does not route to is a departed worker
    listed = {i.instance_id for i in instances}
    unreachable = {k: v for k, v in unreachable.items() if k in listed}
    return _Discovery(instances, urls, unreachable, missing)


async def _discover(client, frontend_url, resolver, t: RefitTimeouts, filters: dict,
                    known: set | frozenset = frozenset()) -> _Discovery:
    """Discover; while some /health instance (not in ``known``) has no system URL, re-ask for up
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
    """Return ``{instance_id: system_url}`` for every instance the frontend routes to.

    Raises:
        DiscoveryError: /health unusable, a mapping contradicted by a worker's metrics, or an
            instance with no (reachable) system URL.
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
