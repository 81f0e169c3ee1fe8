"""The trainer's driver on Ray: submit it through the Ray dashboard and follow it to its end.

The dashboard of a RayCluster is its head Service ``<cluster>-head-svc`` on port
:data:`DASHBOARD_PORT` (KubeRay's naming), reached in-cluster or through the API server's
service proxy. The driver is submitted with the Ray Jobs REST API (``POST /api/jobs/``,
idempotent through ``submission_id``) and followed with ``GET /api/jobs/<id>``; a RayJob
is followed through its ``status`` (:func:`~dynamo_rl.k8s.status.rayjob_outcome`), with the
dashboard as the fallback submitter and the source of the driver's exit code. Every wait
is a bounded loop: a deadline and a poll interval in seconds.

Used by :mod:`dynamo_rl.k8s.orchestrate`; imports ``api``, ``errors``, ``manifests`` and
``status`` only.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

import httpx

from .api import Kube, in_pod
from .errors import JobFailed, KubeApiError, WaitTimeout
from .manifests import ObjRef
from .status import JobOutcome, raycluster_provisioned, rayjob_cluster_name, rayjob_outcome

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
"""Receives one line of progress per event (``orchestrate`` passes the CLI's printer)."""

DASHBOARD_PORT = 8265  # KubeRay head service port name "dashboard"


def log_progress(msg: str) -> None:
    """The default :data:`Progress`: the line goes to this module's logger at INFO."""
    log.info("%s", msg)


def dashboard(kube: Kube, namespace: str, cluster: str, method: str, path: str,
              body: dict | None = None, *, in_cluster: bool | None = None) -> tuple[int, dict | str]:
    """Call the Ray dashboard of ``cluster`` (Service ``<cluster>-head-svc:8265``, KubeRay naming)
    in-cluster or through the API server proxy. Returns ``(status, JSON or text)``."""
    svc = f"{cluster}-head-svc"
    if in_cluster if in_cluster is not None else in_pod():
        url = f"http://{svc}.{namespace}.svc.cluster.local:{DASHBOARD_PORT}/{path.lstrip('/')}"
        try:
            r = httpx.request(method, url, json=body, timeout=30)
            status, text = r.status_code, r.text
        except httpx.HTTPError as e:
            return 0, str(e)
    else:
        status, text = kube.proxy(method, namespace, svc, DASHBOARD_PORT, path, body, timeout_s=30)
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def submit_driver(kube: Kube, namespace: str, cluster: str, entrypoint: str, submission_id: str,
                  env: dict[str, str] | None = None) -> str:
    """Submit the driver through the Ray Jobs REST API (``POST /api/jobs/``) with ``submission_id``.

    Idempotent: an existing job with that id counts as submitted. Raises :class:`KubeApiError`.
    """
    body: dict = {"entrypoint": entrypoint, "submission_id": submission_id}
    if env:
        body["runtime_env"] = {"env_vars": dict(env)}
    status, data = dashboard(kube, namespace, cluster, "POST", "api/jobs/", body)
    if 200 <= status < 300:
        return submission_id
    st, _ = dashboard(kube, namespace, cluster, "GET", f"api/jobs/{submission_id}")
    if st == 200:
        return submission_id
    raise KubeApiError(f"submitting the driver to RayCluster {cluster}'s dashboard failed: HTTP {status}: {str(data)[:300]}", status)


def dashboard_outcome(info: dict) -> JobOutcome:
    """A Ray Jobs API job record (``status``, ``message``, ``driver_exit_code``) as a :class:`JobOutcome`."""
    st = info.get("status") or ""
    code = info.get("driver_exit_code")
    summary = f"job {info.get('submission_id') or info.get('job_id')}: {st}" + (f" ({info.get('message')})" if info.get("message") else "")
    if st == "SUCCEEDED":
        return JobOutcome(True, True, 0, summary)
    if st in ("FAILED", "STOPPED"):
        return JobOutcome(True, False, code if isinstance(code, int) and code != 0 else 1, summary)
    return JobOutcome(False, False, 1, summary)



def follow_dashboard_job(kube: Kube, namespace: str, cluster: str, submission_id: str,
                         timeout_s: float, poll_s: float, progress: Progress = log_progress) -> JobOutcome:
    """Poll ``GET /api/jobs/<id>`` until the job ends. Raises :class:`WaitTimeout`."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        status, info = dashboard(kube, namespace, cluster, "GET", f"api/jobs/{submission_id}")
        if status == 200 and isinstance(info, dict):
            out = dashboard_outcome(info)
            if out.summary != last:
                progress(out.summary)
                last = out.summary
            if out.terminal:
                return out
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"driver {submission_id} on {cluster} still running after {timeout_s:.0f}s", last=last)
        time.sleep(poll_s)


def wait_rayjob_cluster(kube: Kube, ref: ObjRef, timeout_s: float, poll_s: float) -> tuple[str, dict]:
    """Wait until KubeRay names the RayJob's cluster (``status.rayClusterName``, which has a
    random suffix); returns ``(cluster name, the RayJob)``. Raises :class:`JobFailed` when the
    job ends first, :class:`WaitTimeout` after ``timeout_s`` seconds, :class:`KubeApiError`
    when the RayJob vanishes."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = kube.get(ref)
        if job is None:
            raise KubeApiError(f"{ref} vanished while waiting for its RayCluster", 404)
        name = rayjob_cluster_name(kube, job)
        if name:
            return name, job
        out = rayjob_outcome(job)
        if out.terminal:
            raise JobFailed(f"{ref} ended before its RayCluster appeared: {out.summary}")
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{ref}: KubeRay set no status.rayClusterName within {timeout_s:.0f}s "
                              f"({out.summary}); is the KubeRay operator running?")
        time.sleep(poll_s)


def _with_driver_exit_code(kube: Kube, namespace: str, st: dict, out: JobOutcome) -> JobOutcome:
    """RayJob status carries no exit code: ask the dashboard (if the cluster still exists)."""
    if out.succeeded or not st.get("rayClusterName") or not st.get("jobId"):
        return out
    code, info = dashboard(kube, namespace, st["rayClusterName"], "GET", f"api/jobs/{st['jobId']}")
    exit_code = info.get("driver_exit_code") if code == 200 and isinstance(info, dict) else None
    if isinstance(exit_code, int) and exit_code != 0:
        out.exit_code = exit_code
    return out


def follow_rayjob(kube: Kube, ref: ObjRef, grace_s: float, timeout_s: float, poll_s: float,
                  progress: Progress = log_progress) -> JobOutcome:
    """Poll a RayJob until :func:`status.rayjob_outcome` says terminal.

    Fallback: once the job's cluster is provisioned, if ``grace_s`` seconds pass with no
    ``jobStatus`` and the dashboard has no job ``status.jobId``, submit
    ``spec.entrypoint`` through the dashboard with ``submission_id = jobId`` (once) — the
    operator's submitter then finds the job and follows it. On failure the driver's exit
    code is read from the dashboard while the cluster still exists (else 1).
    Raises :class:`WaitTimeout`.
    """
    deadline = time.monotonic() + timeout_s
    provisioned_at: float | None = None
    fallback_done = False
    last = ""
    while True:
        job = kube.get(ref)
        if job is None:
            raise KubeApiError(f"{ref} was deleted while the driver ran", 404)
        out = rayjob_outcome(job)
        if out.summary != last:
            progress(f"{ref.name}: {out.summary}")
            last = out.summary
        st = job.get("status") or {}
        if out.terminal:
            return _with_driver_exit_code(kube, ref.namespace, st, out)
        if provisioned_at is None and raycluster_provisioned(st.get("rayClusterStatus") or {}):
            provisioned_at = time.monotonic()
        if (not fallback_done and provisioned_at is not None and not st.get("jobStatus") and st.get("jobId")
                and st.get("rayClusterName") and time.monotonic() - provisioned_at >= grace_s):
            fallback_done = True
            code, _ = dashboard(kube, ref.namespace, st["rayClusterName"], "GET", f"api/jobs/{st['jobId']}")
            if code == 404:
                progress(f"{ref.name}: the operator has not submitted {st['jobId']} after {grace_s:.0f}s; submitting it through the dashboard")
                submit_driver(kube, ref.namespace, st["rayClusterName"], job["spec"]["entrypoint"], st["jobId"])
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{ref} not finished after {timeout_s:.0f}s ({out.summary})", last=out.summary)
        time.sleep(poll_s)
