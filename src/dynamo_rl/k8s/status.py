"""Reading what the operators report: DGD, RayCluster and RayJob status.

Owns: the RayJob terminal-state logic, RayCluster provisioning, the cluster name of a
RayJob (KubeRay appends a random suffix), a parser for ``kubectl describe`` status
text (so excerpts can be checked too), and the rows of ``dynamo-rl k8s status``.
Field names are KubeRay's (``jobDeploymentStatus``, ``jobStatus``, ``rayClusterName``,
``conditions[type=RayClusterProvisioned]``) and the Dynamo operator's (``state``,
``conditions[type=Ready]``, ``services``/``components``).

Imports ``k8s.api``/``manifests``/``schema``/``readiness``/``errors``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .api import Kube
from .errors import K8sError
from .manifests import RAY_API, ObjRef
from .schema import Infra

#: jobDeploymentStatus values after which KubeRay does nothing more for the RayJob.
DEPLOYMENT_TERMINAL = {"Complete", "Failed", "ValidationFailed"}
#: Ray job statuses that end a driver (Ray JobStatus).
JOB_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class JobOutcome:
    """Where a RayJob stands. ``terminal``: nothing more will happen; ``succeeded`` is
    meaningful only when terminal; ``exit_code`` is 0 on success, else 1 (or the driver's
    code when known); ``summary`` is one line for humans."""

    terminal: bool
    succeeded: bool
    exit_code: int
    summary: str


def _message_gist(message: str, width: int = 300) -> str:
    """A RayJob ``status.message`` in one line: its first line and, when the driver's log
    follows ("last available logs ..."), the log's last line, where the error usually is."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    clip = lambda t: t if len(t) <= width else t[: width - 1] + "…"  # noqa: E731
    return clip(lines[0]) if len(lines) == 1 else f"{clip(lines[0])} … {clip(lines[-1])}"


def rayjob_outcome(rayjob: dict) -> JobOutcome:
    """Decide from a live RayJob (``.spec`` + ``.status``) whether the driver is done.

    ``jobStatus`` (Ray's view of the driver) and ``jobDeploymentStatus`` (KubeRay's view of
    the whole RayJob) may disagree; the rules:

    * ``jobStatus SUCCEEDED`` → succeeded, whatever the deployment says (a ``Running``
      deployment is only lagging; a later ``Failed`` is about cleanup, reported in the summary).
    * ``jobStatus FAILED/STOPPED`` → failed — unless the deployment is not terminal and
      retries remain (``spec.backoffLimit`` > ``status.failed``, or ``Retrying``): KubeRay
      will start a new attempt.
    * ``jobDeploymentStatus Complete/Failed/ValidationFailed`` with a non-terminal job
      status (e.g. ``Failed`` + ``RUNNING`` after ``SubmissionFailed`` or
      ``DeadlineExceeded``) → failed: the operator has given up and the job status is stale.
    * otherwise not terminal.
    """
    st = rayjob.get("status") or {}
    spec = rayjob.get("spec") or {}
    dep = st.get("jobDeploymentStatus") or ""
    job = st.get("jobStatus") or ""
    why = "; ".join(x for x in (st.get("reason"), _message_gist(st.get("message") or "")) if x)
    head = f"jobDeploymentStatus={dep or '-'} jobStatus={job or '-'}" + (f" ({why})" if why else "")
    if job == "SUCCEEDED":
        note = "; the deployment then failed (cleanup?)" if dep == "Failed" else ""
        return JobOutcome(True, True, 0, head + note)
    if job in ("FAILED", "STOPPED"):
        retries_left = (spec.get("backoffLimit") or 0) > (st.get("failed") or 0)
        if dep == "Retrying" or (dep not in DEPLOYMENT_TERMINAL and retries_left):
            return JobOutcome(False, False, 1, head + "; KubeRay will retry")
        return JobOutcome(True, False, 1, head)
    if dep in DEPLOYMENT_TERMINAL:
        return JobOutcome(True, False, 1, head)
    return JobOutcome(False, False, 1, head)


def condition(obj_status: dict, ctype: str) -> dict | None:
    """The condition of type ``ctype`` in a status mapping, or None."""
    for c in obj_status.get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def raycluster_provisioned(rc_status: dict) -> bool:
    """True once KubeRay reports all pods ready the first time.

    ``conditions[RayClusterProvisioned]=True`` (KubeRay ≥ 1.2; the pre-release name was
    ``RayClusterReady``); without conditions (feature gate off / older KubeRay),
    ``state == ready``.
    """
    for name in ("RayClusterProvisioned", "RayClusterReady"):
        c = condition(rc_status, name)
        if c is not None:
            return c.get("status") == "True"
    return rc_status.get("state") == "ready"


def rayjob_cluster_name(kube: Kube, rayjob: dict) -> str | None:
    """The RayCluster a RayJob runs on: ``.status.rayClusterName``, else the cluster
    KubeRay labelled ``ray.io/originated-from-cr-name=<rayjob>`` (``clusterSelector`` jobs
    name their cluster in ``spec.clusterSelector``). None while KubeRay has not created it."""
    st = rayjob.get("status") or {}
    if st.get("rayClusterName"):
        return st["rayClusterName"]
    sel = (rayjob.get("spec") or {}).get("clusterSelector") or {}
    if sel.get("ray.io/cluster"):
        return sel["ray.io/cluster"]
    md = rayjob["metadata"]
    items = kube.list_objects(
        ObjRef(RAY_API, "RayCluster", md["namespace"], "-"),
        f"ray.io/originated-from-crd=RayJob,ray.io/originated-from-cr-name={md['name']}",
    )
    return items[0]["metadata"]["name"] if len(items) == 1 else None


# ------------------------------------------------------------------ kubectl describe


def _camel(key: str) -> str:
    words = re.split(r"[\s\-]+", key.strip())
    words = [w for w in words if w]
    return words[0].lower() + "".join(w[:1].upper() + w[1:] for w in words[1:]) if words else key


_KEY = re.compile(r"^(\s*)([A-Z][A-Za-z0-9 \-]*):(?:\s+(.*))?$")


def parse_describe(text: str) -> dict[str, Any]:
    """Parse the ``Status:`` part of ``kubectl describe`` output into camelCase keys.

    ``Job Deployment Status: Complete`` → ``{"jobDeploymentStatus": "Complete"}``;
    indentation nests (``Ray Cluster Status:`` → a mapping); a line that is not a
    ``Key:`` continues the previous value (multi-line ``Message``). ``#`` lines and the
    ``Events:`` table are skipped. Values stay strings.
    """
    root: dict[str, Any] = {}
    stack: list[tuple[int, dict]] = [(-1, root)]
    last: tuple[dict, str] | None = None
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("Events:"):
            break
        m = _KEY.match(line)
        if not m:
            if last is not None:
                d, k = last
                d[k] = (d[k] + "\n" + line.strip()).strip()
            continue
        indent, key, value = len(m.group(1)), _camel(m.group(2)), (m.group(3) or "").strip()
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if value:
            parent[key] = value
            last = (parent, key)
        else:
            child: dict[str, Any] = {}
            parent[key] = child
            stack.append((indent, child))
            last = None
    return root


# ------------------------------------------------------------------ summaries


def dgd_summary(dgd: dict) -> str:
    """One line: state, Ready condition and per-service ready replicas (v1alpha1 ``services``, v1beta1 ``components``)."""
    st = dgd.get("status") or {}
    parts = [f"state={st.get('state') or '-'}"]
    c = condition(st, "Ready")
    if c:
        parts.append(f"Ready={c.get('status')}" + (f" ({c.get('reason')})" if c.get("reason") else ""))
    per = {**(st.get("services") or {}), **(st.get("components") or {})}
    for name, v in per.items():
        if isinstance(v, dict):
            parts.append(f"{name} {v.get('readyReplicas', 0)}/{v.get('replicas', '?')}")
    return " ".join(parts)


def raycluster_summary(rc: dict) -> str:
    """One line: state, provisioned, head ready, available workers."""
    st = rc.get("status") or {}
    parts = [f"state={st.get('state') or '-'}", f"provisioned={raycluster_provisioned(st)}"]
    c = condition(st, "HeadPodReady")
    if c:
        parts.append(f"HeadPodReady={c.get('status')}")
    if "availableWorkerReplicas" in st:
        parts.append(f"workers={st.get('availableWorkerReplicas')}/{st.get('desiredWorkerReplicas', '?')}")
    return " ".join(parts)


@dataclass
class StatusRow:
    """One line of ``dynamo-rl k8s status``."""

    target: str
    kind: str
    name: str
    exists: bool
    summary: str


def collect_status(kube: Kube, infra: Infra) -> list[StatusRow]:
    """Status of every object the infra file declares: each ``kuberay.<role>`` as a
    RayCluster or, if none, a RayJob (with its suffixed cluster), each ``deployments.<key>``
    and each ``dynamo.<key>``.

    Raises :class:`KubeApiError`.
    """
    from .manifests import render_dgd  # local: status does not need rendering otherwise

    rows: list[StatusRow] = []
    ns = infra.namespace
    for role, r in infra.kuberay.items():
        rc = kube.get(ObjRef(RAY_API, "RayCluster", ns, r.name))
        job = kube.get(ObjRef(RAY_API, "RayJob", ns, r.name))
        if job is not None:
            out = rayjob_outcome(job)
            rows.append(StatusRow(f"kuberay.{role}", "RayJob", r.name, True, out.summary))
            cname = rayjob_cluster_name(kube, job)
            if cname:
                jrc = kube.get(ObjRef(RAY_API, "RayCluster", ns, cname))
                rows.append(StatusRow(f"kuberay.{role}", "RayCluster", cname, jrc is not None,
                                      raycluster_summary(jrc) if jrc else "deleted"))
        if rc is not None or job is None:
            rows.append(StatusRow(f"kuberay.{role}", "RayCluster", r.name, rc is not None,
                                  raycluster_summary(rc) if rc else "absent"))
    for key, d in infra.deployments.items():
        obj = kube.get(ObjRef("apps/v1", "Deployment", ns, d.name))
        st = (obj or {}).get("status") or {}
        rows.append(StatusRow(f"deployments.{key}", "Deployment", d.name, obj is not None,
                              f"available {st.get('availableReplicas') or 0}/{((obj or {}).get('spec') or {}).get('replicas', 1)}"
                              if obj else "absent"))
    for key in infra.dynamo:
        try:
            m = render_dgd(infra, key)
        except K8sError as e:
            rows.append(StatusRow(f"dynamo.{key}", "DynamoGraphDeployment", "?", False, f"cannot render: {e}"))
            continue
        obj = kube.get(ObjRef.of(m))
        owners = [o.get("name") for o in ((obj or {}).get("metadata") or {}).get("ownerReferences") or []]
        summary = dgd_summary(obj) + (f" owner={','.join(owners)}" if owners else "") if obj else "absent"
        rows.append(StatusRow(f"dynamo.{key}", "DynamoGraphDeployment", m["metadata"]["name"], obj is not None, summary))
    return rows
