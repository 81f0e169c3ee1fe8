"""The launcher's flows: render a plan, ``up``, ``down``, ``run`` — with rollback.

Order and lifetimes (issue 7):

* **RayCluster mode** (``run --raycluster``): the training RayCluster first; then each
  DGD carrying a non-controlling ownerReference to it (``manifests.owner_reference``);
  wait until the cluster is provisioned and every DGD passes the three readiness gates
  (``readiness``); then submit the driver through the Ray dashboard
  (``POST /api/jobs/``) and, unless told not to wait, follow it to the end.
* **RayJob mode** (``run --rayjob``): the DGDs first; wait for readiness; apply the
  RayJob; read ``.status.rayClusterName`` (KubeRay adds a random suffix); patch the
  ownerReference to that cluster onto each DGD; follow the RayJob (``status.rayjob_outcome``),
  submitting the driver through the dashboard with ``submission_id = status.jobId`` when
  the operator has not done so ``launch.submissionGraceS`` seconds after the cluster
  is provisioned.

``deployments.<key>`` (plain ``apps/v1`` Deployments) go with the DGDs: same stage, same
ownerReference, and they must be available before the trainer starts.

**Companion documents** of a DGD manifest file (``manifests.render_companions``): its
``ConfigMap``s and ``PersistentVolumeClaim``s (e.g. the ``llm-config`` a TensorRT-LLM
worker mounts) are applied right before their DGD, in the infra namespace, with the
launcher labels, recorded for rollback like every object this run creates. ConfigMaps
get the DGD's ownerReference (to the training RayCluster; in RayJob mode attached with
the DGDs'), so they go with the run and ``down`` deletes them; PVCs get none (their data
outlives a run; ``down`` leaves them and says so; ``--recreate`` never recreates them). Secrets, Pods and other kinds are
never applied: ``render_plan`` collects a warning naming each (``Plan.warnings``: shown
by ``check``/``render``/``--dry-run``, reported through ``progress`` by ``up``/``run``) with the ``kubectl apply`` to do by hand.

Deleting the training RayCluster (``down``, or KubeRay's ``shutdownAfterJobFinishes``)
garbage-collects the DGDs (and Deployments) and frees the inference GPUs.

**Rollback**: any failure (or Ctrl-C) before the driver is running deletes, in reverse
order, every object this run *created* (objects it found and reused are left alone).
A driver that fails is not a launch failure: its exit code is returned.

The trainer is started as ``<launch.command> <recipe> <overrides>`` with the recipe stamped
(``manifests.stamp_recipe``) and written in the head pod by the entrypoint. Before
anything is rendered or sent, the stamped recipe plus the overrides is validated as
``dynamo-rl train`` would (:func:`validate_recipe`, :class:`RecipeError`, exit 2), and
its ``generation.dynamo.model`` must equal the single DGD's ``servedModelName``. All waits
are bounded loops with a deadline and a poll interval in seconds (``Timing``).

What a command would send is rendered and validated first (:mod:`dynamo_rl.k8s.plan`,
whose names are re-exported here); the driver is submitted and followed by
:mod:`dynamo_rl.k8s.driver`. Imports every other ``k8s`` module except ``cli``.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .api import Applied, Kube
from .driver import Progress, follow_dashboard_job, follow_rayjob, log_progress, submit_driver, wait_rayjob_cluster
from .errors import CRDMissingError, K8sError, KubeApiError, ManifestError, WaitTimeout
from .manifests import RAY_API, ObjRef, owner_reference, render_companions, render_deployment, render_dgd
from .plan import Plan, load_recipe_dict, parse_targets, policy_graph, render_plan, validate_recipe
from .readiness import Readiness, wait_dgd_ready
from .schema import Infra
from .status import JobOutcome, raycluster_provisioned, rayjob_outcome

log = logging.getLogger(__name__)


@dataclass
class Timing:
    """Poll interval and deletion bound, in seconds. Readiness/job bounds come from the infra file."""

    poll_s: float = 5.0
    gone_timeout_s: float = 300.0


# ------------------------------------------------------------------ rollback


class Rollback:
    """Records what this run changed; :meth:`undo` reverts it in reverse order.

    Two kinds of steps: an object this run *created* (undo: delete it) and an
    ownerReference this run *added* to an object it found (undo: remove that reference,
    so deleting the new owner does not garbage-collect an object the run did not create).
    Failures while undoing are logged and collected in ``errors`` (never raised), so the
    original failure is what the caller sees. :meth:`commit` forgets everything.
    """

    def __init__(self, kube: Kube, progress: Progress):
        self.kube = kube
        self.progress = progress
        self.steps: list[tuple[str, ObjRef, str | None]] = []
        self.errors: list[str] = []

    @property
    def created(self) -> list[ObjRef]:
        return [ref for kind, ref, _ in self.steps if kind == "delete"]

    def record(self, applied: Applied) -> Applied:
        if applied.created:
            self.steps.append(("delete", ObjRef.of(applied.obj), None))
        return applied

    def record_owner(self, ref: ObjRef, owner_uid: str) -> None:
        self.steps.append(("unown", ref, owner_uid))

    def commit(self) -> None:
        self.steps.clear()

    def undo(self) -> list[ObjRef]:
        done = []
        for kind, ref, uid in reversed(self.steps):
            try:
                if kind == "delete":
                    self.kube.delete(ref)
                    done.append(ref)
                    self.progress(f"rollback: deleted {ref}")
                else:
                    live = self.kube.get(ref)
                    if live is not None:
                        refs = [r for r in live["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
                        self.kube.patch(ref, {"metadata": {"ownerReferences": refs or None}})
                        self.progress(f"rollback: removed the ownerReference added to {ref}")
            except K8sError as e:
                self.errors.append(str(e))
                log.error("rollback: could not revert %s: %s", ref, e)
        self.steps.clear()
        return done


# ------------------------------------------------------------------ flows


@dataclass
class RunResult:
    """What ``run`` did: the mode, the objects created, the training cluster, the
    submission/job id, and — when it waited — the driver's outcome and exit code."""

    mode: str
    created: list[str]
    cluster: str | None = None
    job_id: str | None = None
    outcome: JobOutcome | None = None

    @property
    def exit_code(self) -> int:
        return 0 if self.outcome is None else self.outcome.exit_code


def _with_owner(dgd: dict, owner: dict) -> dict:
    m = copy.deepcopy(dgd)
    refs = [r for r in m["metadata"].get("ownerReferences") or [] if r.get("uid") != owner["metadata"]["uid"]]
    m["metadata"]["ownerReferences"] = refs + [owner_reference(owner)]
    return m


def attach_owner(kube: Kube, dgd_ref: ObjRef, owner: dict, rb: Rollback | None = None) -> dict:
    """Add a non-controlling ownerReference to ``owner`` onto a live DGD (merge patch of
    ``metadata.ownerReferences``, existing references kept; ``resourceVersion`` sent so a
    concurrent change fails with 409 instead of being overwritten). No-op when present.
    The addition is recorded in ``rb`` so a rollback can remove it."""
    live = kube.get(dgd_ref)
    if live is None:
        raise KubeApiError(f"{dgd_ref} vanished before its ownerReference could be set", 404)
    refs = (live.get("metadata") or {}).get("ownerReferences") or []
    if any(r.get("uid") == owner["metadata"]["uid"] for r in refs):
        return live
    if rb is not None:
        rb.record_owner(dgd_ref, owner["metadata"]["uid"])
    body = {"metadata": {"resourceVersion": live["metadata"].get("resourceVersion"),
                         "ownerReferences": refs + [owner_reference(owner)]}}
    if body["metadata"]["resourceVersion"] is None:
        del body["metadata"]["resourceVersion"]
    return kube.patch(dgd_ref, body)


def wait_raycluster(kube: Kube, ref: ObjRef, timeout_s: float, poll_s: float) -> dict:
    """Poll until the RayCluster is provisioned (``status.raycluster_provisioned``). Raises :class:`WaitTimeout`."""
    deadline = time.monotonic() + timeout_s
    while True:
        rc = kube.get(ref)
        if rc is not None and raycluster_provisioned(rc.get("status") or {}):
            return rc
        if time.monotonic() >= deadline:
            st = (rc or {}).get("status") or {}
            raise WaitTimeout(f"{ref} not provisioned after {timeout_s:.0f}s (state {st.get('state')!r}, "
                              f"conditions {[(c.get('type'), c.get('status')) for c in st.get('conditions') or []]}); "
                              "raise launch.clusterReadyTimeoutS or check `kubectl describe raycluster`")
        time.sleep(poll_s)


def _apply_dgds(kube: Kube, plan: Plan, rb: Rollback, owner: dict | None, recreate: bool,
                timing: Timing, progress: Progress, owned_extra: list[ObjRef] | None = None) -> dict[str, ObjRef]:
    """Apply each DGD's companions (ConfigMaps, PVCs of its file), the DGDs, then the
    Deployments (keys ``dynamo.<k>`` / ``deployments.<k>``), each — PVCs excepted — with
    the non-controlling ownerReference to ``owner`` when given. The companion ConfigMaps
    are appended to ``owned_extra`` (RayJob mode attaches the owner to them later)."""
    refs = {}
    for key, comps in plan.companions.items():
        for m in comps:
            owned = m["kind"] == "ConfigMap"
            body = _with_owner(m, owner) if owner is not None and owned else m
            # a PVC is never recreated (--recreate would throw its data away)
            a = rb.record(kube.apply(body, recreate=recreate and owned, gone_timeout_s=timing.gone_timeout_s, poll_s=timing.poll_s))
            ref = ObjRef.of(a.obj)
            progress(f"dynamo.{key}: {ref} {a.action}" + ("" if owned else " (not owned: kept after the run)"))
            if owned and owner is not None and not a.created:
                attach_owner(kube, ref, owner, rb)
            if owned and owned_extra is not None:
                owned_extra.append(ref)
    items = [(f"dynamo.{k}", m) for k, m in plan.dgds.items()] + [(f"deployments.{k}", m) for k, m in plan.deployments.items()]
    for target, m in items:
        body = _with_owner(m, owner) if owner is not None else m
        a = rb.record(kube.apply(body, recreate=recreate, gone_timeout_s=timing.gone_timeout_s, poll_s=timing.poll_s))
        ref = ObjRef.of(a.obj)
        progress(f"{target}: {ref} {a.action}")
        if owner is not None and not a.created:
            attach_owner(kube, ref, owner, rb)
        refs[target] = ref
    return refs


def wait_deployment(kube: Kube, ref: ObjRef, timeout_s: float, poll_s: float) -> dict:
    """Poll until an ``apps/v1`` Deployment is current (``status.observedGeneration`` ≥
    ``metadata.generation``) and ``status.availableReplicas`` ≥ ``spec.replicas`` (default 1).
    Raises :class:`WaitTimeout`."""
    deadline = time.monotonic() + timeout_s
    while True:
        d = kube.get(ref) or {}
        st, md = d.get("status") or {}, d.get("metadata") or {}
        want = (d.get("spec") or {}).get("replicas", 1)
        if d and st.get("observedGeneration", 0) >= md.get("generation", 0) and (st.get("availableReplicas") or 0) >= want:
            return d
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{ref}: {st.get('availableReplicas') or 0}/{want} replicas available after {timeout_s:.0f}s; "
                              f"check `kubectl describe deployment {ref.name} -n {ref.namespace}`")
        time.sleep(poll_s)


def _wait_dgds(kube: Kube, plan: Plan, refs: dict[str, ObjRef], timing: Timing, progress: Progress) -> None:
    for target, ref in refs.items():
        if target.startswith("deployments."):
            wait_deployment(kube, ref, plan.infra.launch.cluster_ready_timeout_s, timing.poll_s)
            progress(f"{target}: {ref.name} available")
            continue
        key = target.split(".", 1)[1]
        g = plan.infra.dynamo[key]
        last: list[str] = []

        def note(r: Readiness, last=last) -> None:
            d = r.describe()
            if not last or last[-1] != d:
                last.append(d)
                progress(d)

        wait_dgd_ready(kube, ref, plan.served_model(key), g.frontend_port,
                       timeout_s=g.ready_timeout_s, poll_s=timing.poll_s, on_progress=note)
        progress(f"dynamo.{key}: {ref.name} ready")


def up(kube: Kube, infra: Infra, *, targets: Iterable[str] | None = None, recreate: bool = False,
       wait: bool = True, timing: Timing | None = None, progress: Progress = log_progress) -> Plan:
    """Bring up the targeted RayClusters, then the targeted DGDs (owned by the
    ``launch.role`` RayCluster when it exists), and wait for readiness unless ``wait`` is False.

    Rolls back what it created on any failure, then re-raises it.
    """
    timing = timing or Timing()
    plan = render_plan(infra, targets=targets)
    for w in plan.warnings:
        progress(f"warning: {w}")
    rb = Rollback(kube, progress)
    try:
        clusters = {}
        for role, m in plan.rayclusters.items():
            a = rb.record(kube.apply(m, recreate=recreate, gone_timeout_s=timing.gone_timeout_s, poll_s=timing.poll_s))
            progress(f"kuberay.{role}: {ObjRef.of(a.obj)} {a.action}")
            clusters[role] = a.obj
        owner = clusters.get(infra.launch.role)
        if owner is None and (plan.dgds or plan.deployments) and infra.launch.role in infra.kuberay:
            owner = kube.get(ObjRef(RAY_API, "RayCluster", infra.namespace, infra.kuberay[infra.launch.role].name))
        if owner is None and (plan.dgds or plan.deployments):
            progress("note: no training RayCluster exists; the DGDs/Deployments get no owner and live until `down`")
        refs = _apply_dgds(kube, plan, rb, owner, recreate, timing, progress)
        if wait:
            for role, rc in clusters.items():
                wait_raycluster(kube, ObjRef.of(rc), infra.launch.cluster_ready_timeout_s, timing.poll_s)
                progress(f"kuberay.{role}: provisioned")
            _wait_dgds(kube, plan, refs, timing, progress)
    except BaseException:
        rb.undo()
        raise
    return plan


def down(kube: Kube, infra: Infra, *, targets: Iterable[str] | None = None, wait: bool = True,
         timing: Timing | None = None, progress: Progress = log_progress) -> list[str]:
    """Delete the targeted Deployments and DGDs, then the RayJobs/RayClusters of the targeted roles
    (reverse of creation). Absent objects are skipped. With ``wait``, blocks until each is
    gone (``Timing.gone_timeout_s``). Returns what was deleted."""
    timing = timing or Timing()
    roles, keys, deps = parse_targets(infra, targets)
    refs: list[ObjRef] = []
    for key in deps:
        refs.append(ObjRef.of(render_deployment(infra, key)))
    kept: list[str] = []
    for key in keys:
        refs.append(ObjRef.of(render_dgd(infra, key)))
        for m in render_companions(infra, key)[0]:
            if m["kind"] == "ConfigMap":
                refs.append(ObjRef.of(m))
            else:
                kept.append(str(ObjRef.of(m)))
    if kept:
        progress(f"kept (not deleted by down; delete with kubectl when no longer needed): {', '.join(kept)}")
    for role in roles:
        name = infra.kuberay[role].name
        refs += [ObjRef(RAY_API, "RayJob", infra.namespace, name), ObjRef(RAY_API, "RayCluster", infra.namespace, name)]
    deleted = []
    for ref in refs:
        if kube.delete(ref):
            deleted.append(str(ref))
            progress(f"deleted {ref}")
    if wait:
        for ref in refs:
            kube.wait_gone(ref, timing.gone_timeout_s, timing.poll_s)
    return deleted


def run(kube: Kube, infra: Infra, recipe_path: str | Path | None, *, mode: str | None = None,
        recipe_overrides: Iterable[str] = (), recreate: bool = False, wait: bool = True,
        timing: Timing | None = None, progress: Progress = log_progress) -> RunResult:
    """Launch inference and training in the order of ``mode`` (default ``launch.mode``).

    Returns a :class:`RunResult`; with ``wait`` its ``exit_code`` is the driver's. Any
    failure before the driver runs rolls back what this run created and is re-raised:
    :class:`ManifestError`/:class:`SchemaValidationError` (nothing sent),
    :class:`CRDMissingError`, :class:`KubeApiError`, :class:`WaitTimeout`,
    :class:`DeploymentFailed`.
    """
    timing = timing or Timing()
    mode = mode or infra.launch.mode
    recipe = load_recipe_dict(recipe_path) if recipe_path else {}
    plan = render_plan(infra, mode=mode, recipe=recipe, recipe_overrides=recipe_overrides,
                       recipe_source=str(recipe_path or "recipe"))
    for w in plan.warnings:
        progress(f"warning: {w}")
    rb = Rollback(kube, progress)
    try:
        if mode == "raycluster":
            return _run_raycluster(kube, plan, rb, recreate, wait, timing, progress)
        return _run_rayjob(kube, plan, rb, recreate, wait, timing, progress)
    except BaseException:
        rb.undo()
        raise


def _run_raycluster(kube: Kube, plan: Plan, rb: Rollback, recreate: bool, wait: bool,
                    timing: Timing, progress: Progress) -> RunResult:
    infra = plan.infra
    role = infra.launch.role
    a = rb.record(kube.apply(plan.rayclusters[role], recreate=recreate, gone_timeout_s=timing.gone_timeout_s, poll_s=timing.poll_s))
    rc = a.obj
    rc_ref = ObjRef.of(rc)
    progress(f"kuberay.{role}: {rc_ref} {a.action}")
    dgd_refs = _apply_dgds(kube, plan, rb, rc, recreate, timing, progress)
    wait_raycluster(kube, rc_ref, infra.launch.cluster_ready_timeout_s, timing.poll_s)
    progress(f"kuberay.{role}: provisioned")
    _wait_dgds(kube, plan, dgd_refs, timing, progress)
    sid = f"dynamo-rl-{rc_ref.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    assert plan.entrypoint is not None
    submit_driver(kube, infra.namespace, rc_ref.name, plan.entrypoint, sid)
    progress(f"driver submitted to {rc_ref.name} as {sid}")
    result = RunResult("raycluster", [str(r) for r in rb.created], rc_ref.name, sid)
    rb.commit()  # the driver runs: from here on, objects stay for `down`
    if wait:
        result.outcome = follow_dashboard_job(kube, infra.namespace, rc_ref.name, sid,
                                              infra.launch.job_timeout_s, timing.poll_s, progress)
    return result


def _run_rayjob(kube: Kube, plan: Plan, rb: Rollback, recreate: bool, wait: bool,
                timing: Timing, progress: Progress) -> RunResult:
    infra = plan.infra
    assert plan.rayjob is not None
    if not recreate:
        old = kube.get(ObjRef.of(plan.rayjob))
        if old is not None and rayjob_outcome(old).terminal:
            raise KubeApiError(
                f"RayJob {plan.rayjob['metadata']['name']} from an earlier run exists and has ended "
                f"({rayjob_outcome(old).summary}); pass --recreate to start a new one, or run `down` first", 409)
    companion_refs: list[ObjRef] = []
    dgd_refs = _apply_dgds(kube, plan, rb, None, recreate, timing, progress, companion_refs)
    _wait_dgds(kube, plan, dgd_refs, timing, progress)
    a = rb.record(kube.apply(plan.rayjob, recreate=recreate, gone_timeout_s=timing.gone_timeout_s, poll_s=timing.poll_s))
    job_ref = ObjRef.of(a.obj)
    progress(f"kuberay.{infra.launch.role}: {job_ref} {a.action}")
    cluster, job = wait_rayjob_cluster(kube, job_ref, infra.launch.cluster_ready_timeout_s, timing.poll_s)
    rc = kube.get(ObjRef(RAY_API, "RayCluster", infra.namespace, cluster))
    if rc is None:
        raise KubeApiError(f"RayJob {job_ref.name} names cluster {cluster}, which does not exist", 404)
    for ref in companion_refs:
        attach_owner(kube, ref, rc, rb)
        progress(f"{ref}: owned by RayCluster {cluster}")
    for target, ref in dgd_refs.items():
        attach_owner(kube, ref, rc, rb)
        progress(f"{target}: owned by RayCluster {cluster}")
    result = RunResult("rayjob", [str(r) for r in rb.created], cluster, (job.get("status") or {}).get("jobId"))
    rb.commit()  # the RayJob owns the run now; its cluster owns the DGDs
    if wait:
        result.outcome = follow_rayjob(kube, job_ref, infra.launch.submission_grace_s,
                                       infra.launch.job_timeout_s, timing.poll_s, progress)
        result.job_id = result.job_id or ((kube.get(job_ref) or {}).get("status") or {}).get("jobId")
    return result


INSTALL_HINTS = {
    "dynamographdeployments": "install the NVIDIA Dynamo Kubernetes platform (its Helm chart installs the "
    "Dynamo operator and the DynamoGraphDeployment CRD), as the Dynamo deployment guide describes",
    "rayclusters": "install the KubeRay operator: `helm repo add kuberay https://ray-project.github.io/kuberay-helm/ "
    "&& helm install kuberay-operator kuberay/kuberay-operator`",
}
INSTALL_HINTS["rayjobs"] = INSTALL_HINTS["rayclusters"]


@dataclass
class CheckReport:
    """What ``check`` found: the rendered plan (RayCluster mode view plus the RayJob),
    the CRD probe results (``plural`` → state) and warnings."""

    plan: Plan
    rayjob: dict | None
    crds: dict[str, str]
    warnings: list[str]


def check(kube: Kube | None, infra: Infra, *, recipe: dict | None = None, recipe_source: str = "recipe") -> CheckReport:
    """Render and validate everything (RayClusters, DGDs, the RayJob of ``launch.role``),
    then, when ``kube`` is given, probe the CRDs.

    Raises :class:`ManifestError`/:class:`SchemaValidationError` for bad manifests and
    :class:`CRDMissingError` (with an install hint) when a needed CRD is missing. A CRD
    that answers 403 counts as installed (a warning says list permission is missing).
    """
    if infra.kuberay:   # a trainer will run: it must know which DGD serves its policy
        policy_graph(infra)
    plan = render_plan(infra, recipe=recipe, recipe_source=recipe_source)
    rayjob = None
    warnings: list[str] = list(plan.warnings)
    if infra.launch.role in infra.kuberay:
        try:
            rayjob = render_plan(infra, mode="rayjob", recipe=recipe or {}, recipe_source=recipe_source).rayjob
        except ManifestError as e:
            if infra.launch.mode == "rayjob":
                raise
            warnings.append(f"`run --rayjob` would fail (launch.mode is {infra.launch.mode}, so `run` is fine): {e}")
    elif infra.kuberay:
        warnings.append(f"launch.role {infra.launch.role!r} is not a kuberay role; `run` will fail")
    for key, m in plan.dgds.items():
        if plan.served_model(key) is None:
            warnings.append(f"dynamo.{key}: served model name unknown; readiness accepts any model listed "
                            "by the frontend (set servedModelName)")
    crds: dict[str, str] = {}
    if kube is not None:
        dgd_versions = sorted({m["apiVersion"].split("/")[1] for m in plan.dgds.values()}) or ["v1alpha1"]
        probes = [("nvidia.com", v, "dynamographdeployments") for v in dgd_versions]
        if infra.kuberay:
            probes += [("ray.io", "v1", "rayclusters"), ("ray.io", "v1", "rayjobs")]
        missing = []
        for group, version, plural in probes:
            state = kube.probe_crd(group, version, plural, infra.namespace)
            crds[f"{plural}.{group}/{version}"] = state
            if state == "missing":
                missing.append(f"{plural}.{group}/{version}: {INSTALL_HINTS[plural]}")
            elif state == "installed-no-list-permission":
                warnings.append(f"{plural}.{group}/{version} is installed but you may not list it in "
                                f"namespace {infra.namespace}; `status`/`down` need get/list/delete on it")
        if missing:
            raise CRDMissingError("missing CRD(s) in the cluster:\n  " + "\n  ".join(missing))
    return CheckReport(plan, rayjob, crds, warnings)


__all__ = [
    "Plan", "RunResult", "Rollback", "Timing", "render_plan", "up", "down", "run", "attach_owner",
    "follow_rayjob", "follow_dashboard_job", "check", "CheckReport", "submit_driver", "wait_raycluster", "load_recipe_dict",
    "validate_recipe",
]
