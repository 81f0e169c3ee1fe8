"""Readiness of a DynamoGraphDeployment: three gates, all required.

1. **Operator**: ``status.state == "successful"`` and the status is about the current
   spec (``status.observedGeneration`` — or the Ready condition's — is at least
   ``metadata.generation``; older operators publish neither, then the state alone counts).
2. **Pods**: at least one pod carries ``nvidia.com/dynamo-graph-deployment-name=<dgd>``,
   every such pod is Running with condition ``Ready=True`` and not terminating, and no
   ``status.services``/``status.components`` entry has fewer ``readyReplicas`` than ``replicas``.
3. **Frontend**: ``GET /v1/models`` on ``<dgd>-frontend:<port>`` lists the served model
   (any model when the name is unknown). Inside a pod (see ``api.in_pod``) it is reached
   at ``http://<dgd>-frontend.<ns>.svc.cluster.local:<port>``, else through the API
   server's service proxy.

``successful`` alone is not ready: the Dynamo operator reports it before workers have
registered the model with the frontend. Gates are checked in order; a later gate is
not checked while an earlier one fails. Field names follow the Dynamo operator's DGD
status (``state``, ``conditions``, ``observedGeneration``, ``services``/``components``).

Imports httpx and ``k8s.api``/``manifests``/``errors``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

from .api import Kube, in_pod
from .errors import DeploymentFailed, WaitTimeout
from .manifests import DGD_POD_LABEL, ObjRef


@dataclass
class Gate:
    """One gate's verdict: ``ok`` and a human-readable ``detail``."""

    name: str
    ok: bool
    detail: str


@dataclass
class Readiness:
    """All gates checked so far for one DGD; ``ready`` when all three passed."""

    dgd: str
    gates: list[Gate] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return len(self.gates) == 3 and all(g.ok for g in self.gates)

    def describe(self) -> str:
        names = ["operator", "pods", "frontend"]
        parts = [f"{g.name}: {'ok' if g.ok else 'waiting'} ({g.detail})" for g in self.gates]
        parts += [f"{n}: not checked" for n in names[len(self.gates):]]
        return f"DGD {self.dgd}: " + "; ".join(parts)


def _ready_condition(status: dict) -> dict:
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            return c
    return {}


def operator_gate(dgd: dict) -> Gate:
    """Gate 1 on a live DGD object. Raises :class:`DeploymentFailed` on ``state: failed``
    for the current generation (the operator gave up on this spec)."""
    md = dgd.get("metadata") or {}
    st = dgd.get("status") or {}
    state = st.get("state") or "<none>"
    gen = md.get("generation")
    cond = _ready_condition(st)
    observed = st.get("observedGeneration", cond.get("observedGeneration"))
    current = gen is None or observed is None or observed >= gen
    if state == "failed" and current:
        raise DeploymentFailed(
            f"DGD {md.get('name')}: the Dynamo operator reports state 'failed'"
            + (f" ({cond.get('reason')}: {cond.get('message')})" if cond else "")
            + f"; inspect it with `kubectl describe dgd {md.get('name')} -n {md.get('namespace')}`"
        )
    if not current:
        return Gate("operator", False, f"state {state} is for generation {observed}, spec is at {gen}")
    if state != "successful":
        msg = f"state {state}"
        if cond.get("message"):
            msg += f", Ready: {cond.get('message')}"
        return Gate("operator", False, msg)
    return Gate("operator", True, "state successful" + (f", generation {gen}" if gen is not None else ""))


def _pod_ready(pod: dict) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    st = pod.get("status") or {}
    if st.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


def pods_gate(pods: list[dict], dgd: dict | None = None) -> Gate:
    """Gate 2 over the DGD's pods (and the replica counts in its status, when given)."""
    if not pods:
        return Gate("pods", False, "no pods yet")
    unready = [(p.get("metadata") or {}).get("name", "?") for p in pods if not _pod_ready(p)]
    if unready:
        return Gate("pods", False, f"{len(pods) - len(unready)}/{len(pods)} ready; waiting for {', '.join(sorted(unready)[:5])}")
    st = (dgd or {}).get("status") or {}
    per = {**(st.get("services") or {}), **(st.get("components") or {})}
    short = [
        f"{n} {v.get('readyReplicas', 0)}/{v['replicas']}"
        for n, v in per.items()
        if isinstance(v, dict) and isinstance(v.get("replicas"), int) and (v.get("readyReplicas") or 0) < v["replicas"]
    ]
    if short:
        return Gate("pods", False, "replicas not ready: " + ", ".join(short))
    return Gate("pods", True, f"{len(pods)}/{len(pods)} pods ready")


def frontend_gate(status: int, body: str, model: str | None) -> Gate:
    """Gate 3 on the answer of ``GET /v1/models`` (OpenAI list: ``{"data": [{"id": ...}]}``)."""
    if status != 200:
        return Gate("frontend", False, f"/v1/models answered HTTP {status}")
    try:
        ids = [m.get("id") for m in json.loads(body).get("data") or []]
    except (ValueError, AttributeError):
        return Gate("frontend", False, "/v1/models did not return an OpenAI model list")
    if model is None:
        return Gate("frontend", bool(ids), f"models {ids}" if ids else "no model listed yet")
    if model in ids:
        return Gate("frontend", True, f"serves {model}")
    return Gate("frontend", False, f"{model} not listed yet (listed: {ids})")


def frontend_service(dgd_name: str) -> str:
    """The frontend Service the Dynamo operator creates for a DGD: ``<dgd>-frontend``."""
    return f"{dgd_name}-frontend"


def frontend_url(dgd_name: str, namespace: str, port: int = 8000) -> str:
    """In-cluster URL of a DGD's frontend: ``http://<dgd>-frontend.<ns>.svc.cluster.local:<port>``."""
    return f"http://{frontend_service(dgd_name)}.{namespace}.svc.cluster.local:{port}"


def fetch_models(kube: Kube, dgd_name: str, namespace: str, port: int = 8000,
                 *, in_cluster: bool | None = None, timeout_s: float = 10.0) -> tuple[int, str]:
    """``GET /v1/models`` on the DGD's frontend → ``(HTTP status, body)``; 0 when unreachable.

    ``in_cluster`` defaults to :func:`api.in_pod` (cluster DNS), else the API server proxy.
    """
    if in_cluster is None:
        in_cluster = in_pod()
    if in_cluster:
        try:
            r = httpx.get(frontend_url(dgd_name, namespace, port) + "/v1/models", timeout=timeout_s)
            return r.status_code, r.text
        except httpx.HTTPError as e:
            return 0, str(e)
    return kube.proxy("GET", namespace, frontend_service(dgd_name), port, "v1/models", timeout_s=timeout_s)


def check_dgd(kube: Kube, ref: ObjRef, model: str | None, port: int = 8000, *, in_cluster: bool | None = None) -> Readiness:
    """Evaluate the gates once, in order, stopping at the first that fails.

    Raises :class:`DeploymentFailed` (state failed) and :class:`KubeApiError`.
    """
    r = Readiness(ref.name)
    dgd = kube.get(ref)
    if dgd is None:
        r.gates.append(Gate("operator", False, "the DGD does not exist"))
        return r
    r.gates.append(operator_gate(dgd))
    if not r.gates[-1].ok:
        return r
    r.gates.append(pods_gate(kube.list_pods(ref.namespace, f"{DGD_POD_LABEL}={ref.name}"), dgd))
    if not r.gates[-1].ok:
        return r
    status, body = fetch_models(kube, ref.name, ref.namespace, port, in_cluster=in_cluster)
    r.gates.append(frontend_gate(status, body, model))
    return r


def wait_dgd_ready(kube: Kube, ref: ObjRef, model: str | None, port: int = 8000, *,
                   timeout_s: float, poll_s: float = 5.0, in_cluster: bool | None = None,
                   on_progress: Callable[[Readiness], None] | None = None) -> Readiness:
    """Poll :func:`check_dgd` every ``poll_s`` seconds until ready.

    Raises :class:`WaitTimeout` after ``timeout_s`` seconds (the message names the gate
    still failing), :class:`DeploymentFailed` when the operator reports ``failed``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        r = check_dgd(kube, ref, model, port, in_cluster=in_cluster)
        if on_progress is not None:
            on_progress(r)
        if r.ready:
            return r
        if time.monotonic() >= deadline:
            raise WaitTimeout(
                f"{ref} not ready after {timeout_s:.0f}s: {r.describe()}. Raise dynamo.<key>.readyTimeoutS "
                f"or inspect `kubectl get pods -l {DGD_POD_LABEL}={ref.name} -n {ref.namespace}`",
                last=r.describe(),
            )
        time.sleep(poll_s)
