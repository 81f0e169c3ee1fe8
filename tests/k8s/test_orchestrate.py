"""The whole flows against the emulator, with the test playing the Dynamo operator and
KubeRay: ``run`` in both modes (order of requests, owner references sent, readiness
before the trainer, the stamped recipe, exit codes), rollback at every failure point,
the RayJob dashboard fallback, ``up``/``down``/``check``. Uses the examples/k8s trio."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import yaml

from dynamo_rl.k8s import orchestrate
from dynamo_rl.k8s.errors import CRDMissingError, DeploymentFailed, KubeApiError, ManifestError, WaitTimeout
from dynamo_rl.k8s.manifests import ObjRef
from dynamo_rl.k8s.orchestrate import check, down, run, up
from dynamo_rl.k8s.schema import Infra, load_infra

from .conftest import FAST
from .emulator import Fault
from .operators import DynamoOperator, KubeRayOperator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "k8s"
DGD, RC = "dynamo-rl-tiny", "dynamo-rl-train"
DGD_W = ("dynamographdeployments", DGD)


@pytest.fixture
def infra():
    infra = load_infra(EXAMPLES / "infra.yaml")
    # bounded so that a broken fake fails with a WaitTimeout instead of waiting for minutes
    infra.dynamo["serving"].ready_timeout_s = 30
    infra.launch.cluster_ready_timeout_s = 30
    infra.launch.job_timeout_s = 60
    return infra


def writes(emu, ok_only=True):
    return [(r.method, r.plural, r.name) for r in emu.requests
            if r.method in ("POST", "PATCH", "DELETE") and r.plural in ("dynamographdeployments", "rayclusters", "rayjobs", "deployments")
            and (not ok_only or 200 <= r.status < 300)]


def first(emu, pred):
    return next(i for i, r in enumerate(emu.requests) if pred(r))


def owner(name, uid):
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "name": name, "uid": uid, "controller": False,
            "blockOwnerDeletion": False}


def recipe_in(entrypoint: str) -> dict:
    b64 = re.search(r"echo (\S+) \| base64 -d", entrypoint).group(1)
    return yaml.safe_load(base64.b64decode(b64))


# ------------------------------------------------------------------ happy paths


def test_run_rayjob_mode(kube, emu, infra):
    DynamoOperator(emu, model="tiny", ready_after=2)
    ray = KubeRayOperator(emu)
    msgs = []
    res = run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", recipe_overrides=["grpo.num_steps=3"],
              timing=FAST, progress=msgs.append)
    assert res.exit_code == 0 and res.outcome.succeeded and res.cluster == f"{RC}-x7k2p" and res.job_id == f"{RC}-kd8wq"
    # DGD first, the RayJob only after the frontend listed the model, then the owner reference
    assert writes(emu) == [("POST", *DGD_W), ("POST", "rayjobs", RC), ("PATCH", *DGD_W)]
    models_ok = first(emu, lambda r: r.plural == "services/proxy" and r.name == f"{DGD}-frontend:8000" and r.status == 200)
    assert models_ok < first(emu, lambda r: r.method == "POST" and r.plural == "rayjobs")
    patch = next(r.body for r in emu.requests if r.method == "PATCH")
    assert patch["metadata"]["ownerReferences"] == [owner(f"{RC}-x7k2p", ray.cluster_uids[f"{RC}-x7k2p"])]
    assert "resourceVersion" in patch["metadata"]
    job = next(r.body for r in emu.requests if r.method == "POST" and r.plural == "rayjobs")
    stamped = recipe_in(job["spec"]["entrypoint"])
    assert stamped["generation"]["backend"] == "dynamo"
    assert stamped["generation"]["dynamo"] == {"model": "tiny", "dgd_name": DGD, "namespace": "default"}
    assert job["spec"]["entrypoint"].endswith("exec dynamo-rl train /tmp/dynamo-rl/recipe.yaml grpo.num_steps=3")
    # shutdownAfterJobFinishes: KubeRay deleted the cluster, the GC the DGD and its pods (GPUs freed)
    assert emu.get("rayclusters", f"{RC}-x7k2p") is None and emu.get(*DGD_W) is None and emu.pods == {}
    assert ray.submissions == []  # the operator submitted; no fallback
    assert any("owned by RayCluster dynamo-rl-train-x7k2p" in m for m in msgs)


def test_run_raycluster_mode_then_down(kube, emu, infra):
    DynamoOperator(emu, model="tiny")
    ray = KubeRayOperator(emu, provision_after=2)
    res = run(kube, infra, EXAMPLES / "recipe.yaml", mode="raycluster", recipe_overrides=["grpo.num_steps=3"], timing=FAST)
    assert res.exit_code == 0 and res.cluster == RC
    assert writes(emu) == [("POST", "rayclusters", RC), ("POST", *DGD_W)]
    rc_uid = emu.get("rayclusters", RC)["metadata"]["uid"]
    dgd_post = next(r.body for r in emu.requests if r.method == "POST" and r.plural == "dynamographdeployments")
    assert dgd_post["metadata"]["ownerReferences"] == [owner(RC, rc_uid)]
    # the driver is submitted only after both the cluster and the DGD are ready
    submit = first(emu, lambda r: r.plural == "services/proxy" and r.method == "POST")
    assert submit > first(emu, lambda r: r.plural == "services/proxy" and r.name == f"{DGD}-frontend:8000" and r.status == 200)
    assert [s["submission_id"] for s in ray.submissions] == [res.job_id] and ray.submissions[0]["cluster"] == RC
    stamped = recipe_in(ray.submissions[0]["entrypoint"])
    assert stamped["generation"]["dynamo"]["dgd_name"] == DGD
    assert ray.submissions[0]["entrypoint"].endswith("grpo.num_steps=3")
    # the objects stay after the driver ends; `down` removes DGDs first, then the cluster
    assert emu.get(*DGD_W) and emu.get("rayclusters", RC)
    emu.requests.clear()
    deleted = down(kube, infra, timing=FAST)
    assert writes(emu) == [("DELETE", *DGD_W), ("DELETE", "rayclusters", RC)]
    assert len(deleted) == 2 and emu.objects == {}


def test_deleting_the_cluster_frees_the_dgd(kube, emu, infra):
    DynamoOperator(emu)
    KubeRayOperator(emu)
    run(kube, infra, EXAMPLES / "recipe.yaml", mode="raycluster", wait=False, timing=FAST)
    kube.delete(ObjRef("ray.io/v1", "RayCluster", "default", RC))
    assert emu.get(*DGD_W) is None and emu.pods == {}


@pytest.mark.parametrize("mode, exit_code, expected", [("raycluster", 3, 3), ("raycluster", None, 1), ("rayjob", None, 1),
                                                        ("rayjob", 4, 4)])
def test_driver_failure_propagates_exit_code_without_rollback(kube, emu, infra, mode, exit_code, expected):
    DynamoOperator(emu)
    KubeRayOperator(emu, result="FAILED", exit_code=exit_code)
    infra.launch.ray_job = {"shutdownAfterJobFinishes": False}
    res = run(kube, infra, EXAMPLES / "recipe.yaml", mode=mode, timing=FAST)
    assert res.exit_code == expected and not res.outcome.succeeded
    assert not [w for w in writes(emu) if w[0] == "DELETE"]  # a failed driver is not a failed launch
    assert emu.get(*DGD_W) is not None


def test_run_without_wait_returns_after_start(kube, emu, infra):
    DynamoOperator(emu)
    KubeRayOperator(emu)
    res = run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", wait=False, timing=FAST)
    assert res.outcome is None and res.exit_code == 0 and res.cluster == f"{RC}-x7k2p"
    assert emu.get(*DGD_W)["metadata"]["ownerReferences"][0]["name"] == f"{RC}-x7k2p"


def test_finished_rayjob_is_not_silently_reused(kube, emu, infra):
    DynamoOperator(emu)
    KubeRayOperator(emu)
    infra.launch.ray_job = {"shutdownAfterJobFinishes": False}
    assert run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", timing=FAST).exit_code == 0
    emu.requests.clear()
    with pytest.raises(KubeApiError, match="from an earlier run exists and has ended .*--recreate"):
        run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", timing=FAST)
    assert writes(emu, ok_only=False) == []
    res = run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", recreate=True, timing=FAST)
    assert res.exit_code == 0 and ("DELETE", "rayjobs", RC) in writes(emu)


def test_two_dgds_are_both_owned_and_the_policy_graph_is_stamped(kube, emu, infra):
    infra.dynamo["judge"] = infra.dynamo["serving"].model_copy(update={"name": "judge"})
    with pytest.raises(ManifestError, match=r"(?s)declares 2 DGDs .* policyGraph: serving"):
        run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", wait=False, timing=FAST)
    assert not [r for r in emu.requests if r.method in ("POST", "PATCH", "DELETE")]   # nothing sent
    infra.launch.policy_graph = "judge"
    DynamoOperator(emu)
    ray = KubeRayOperator(emu)
    res = run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", wait=False, timing=FAST)
    uid = ray.cluster_uids[res.cluster]
    for name in (DGD, "judge"):
        assert emu.get("dynamographdeployments", name)["metadata"]["ownerReferences"] == [owner(res.cluster, uid)]
    job = next(r.body for r in emu.requests if r.method == "POST" and r.plural == "rayjobs")
    assert recipe_in(job["spec"]["entrypoint"])["generation"]["dynamo"]["dgd_name"] == "judge"


# ------------------------------------------------------------------ rollback


def _raycluster_failures(emu, infra):
    return {
        "dgd-create-forbidden": (lambda: (DynamoOperator(emu), KubeRayOperator(emu),
                                          emu.faults.append(Fault("POST", "dynamographdeployments", 403))),
                                 KubeApiError, [("DELETE", "rayclusters", RC)]),
        "cluster-never-provisioned": (lambda: (DynamoOperator(emu), KubeRayOperator(emu, provision_after=10**9),
                                               setattr(infra.launch, "cluster_ready_timeout_s", 0.05)),
                                      WaitTimeout, [("DELETE", *DGD_W), ("DELETE", "rayclusters", RC)]),
        "model-never-listed": (lambda: (DynamoOperator(emu, serving=False), KubeRayOperator(emu),
                                        setattr(infra.dynamo["serving"], "ready_timeout_s", 0.05)),
                               WaitTimeout, [("DELETE", *DGD_W), ("DELETE", "rayclusters", RC)]),
        "dgd-failed": (lambda: (DynamoOperator(emu, state="failed"), KubeRayOperator(emu)),
                       DeploymentFailed, [("DELETE", *DGD_W), ("DELETE", "rayclusters", RC)]),
        "submission-fails": (lambda: (DynamoOperator(emu), KubeRayOperator(emu, dashboard_fails=True)),
                             KubeApiError, [("DELETE", *DGD_W), ("DELETE", "rayclusters", RC)]),
    }


@pytest.mark.parametrize("point", ["dgd-create-forbidden", "cluster-never-provisioned", "model-never-listed",
                                   "dgd-failed", "submission-fails"])
def test_rollback_raycluster_mode(kube, emu, infra, point):
    setup, exc, deletes = _raycluster_failures(emu, infra)[point]
    setup()
    msgs = []
    with pytest.raises(exc):
        run(kube, infra, EXAMPLES / "recipe.yaml", mode="raycluster", timing=FAST, progress=msgs.append)
    assert [w for w in writes(emu) if w[0] == "DELETE"] == deletes
    assert emu.objects == {} and emu.pods == {}
    assert sum(m.startswith("rollback: deleted") for m in msgs) == len(deletes)


def _rayjob_failures(emu, infra):
    return {
        "model-never-listed": (lambda: (DynamoOperator(emu, serving=False), KubeRayOperator(emu),
                                        setattr(infra.dynamo["serving"], "ready_timeout_s", 0.05)),
                               WaitTimeout, [("DELETE", *DGD_W)]),
        "rayjob-create-rejected": (lambda: (DynamoOperator(emu), KubeRayOperator(emu),
                                            emu.faults.append(Fault("POST", "rayjobs", 422))),
                                   KubeApiError, [("DELETE", *DGD_W)]),
        "no-cluster-name": (lambda: (DynamoOperator(emu), KubeRayOperator(emu, names_cluster=False),
                                     setattr(infra.launch, "cluster_ready_timeout_s", 0.05)),
                            WaitTimeout, [("DELETE", "rayjobs", RC), ("DELETE", *DGD_W)]),
        "owner-patch-conflict": (lambda: (DynamoOperator(emu), KubeRayOperator(emu),
                                          emu.faults.append(Fault("PATCH", "dynamographdeployments", 409))),
                                 KubeApiError, [("DELETE", "rayjobs", RC), ("DELETE", *DGD_W)]),
    }


@pytest.mark.parametrize("point", ["model-never-listed", "rayjob-create-rejected", "no-cluster-name", "owner-patch-conflict"])
def test_rollback_rayjob_mode(kube, emu, infra, point):
    setup, exc, deletes = _rayjob_failures(emu, infra)[point]
    setup()
    with pytest.raises(exc):
        run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", timing=FAST)
    assert [w for w in writes(emu) if w[0] == "DELETE"] == deletes
    assert emu.objects == {} and emu.pods == {}
    if point in ("model-never-listed",):
        assert not any(w[1] == "rayjobs" for w in writes(emu, ok_only=False))  # never started the trainer


def test_rollback_on_ctrl_c(kube, emu, infra):
    DynamoOperator(emu)
    KubeRayOperator(emu)

    def progress(msg):
        if "created" in msg and "DynamoGraphDeployment" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(kube, infra, EXAMPLES / "recipe.yaml", mode="raycluster", timing=FAST, progress=progress)
    assert [w for w in writes(emu) if w[0] == "DELETE"] == [("DELETE", *DGD_W), ("DELETE", "rayclusters", RC)]


def test_rollback_leaves_reused_objects(kube, emu, infra):
    """A DGD that existed before the run (and matches) is reused and survives the rollback."""
    DynamoOperator(emu)
    KubeRayOperator(emu)
    plan = orchestrate.render_plan(infra)
    emu.insert(plan.dgds["serving"])
    emu.faults.append(Fault("POST", "rayjobs", 500))
    with pytest.raises(KubeApiError):
        run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", timing=FAST)
    assert writes(emu, ok_only=False) == [("POST", "rayjobs", RC)]
    assert emu.get(*DGD_W) is not None


def test_rollback_unowns_a_reused_dgd_before_deleting_the_new_cluster(kube, emu, infra):
    """A reused DGD got an ownerReference to the RayCluster this run created; rollback
    removes it first, so deleting that cluster does not garbage-collect the DGD."""
    DynamoOperator(emu)
    KubeRayOperator(emu, dashboard_fails=True)
    plan = orchestrate.render_plan(infra)
    emu.insert(plan.dgds["serving"])
    msgs = []
    with pytest.raises(KubeApiError, match="submitting the driver"):
        run(kube, infra, EXAMPLES / "recipe.yaml", mode="raycluster", timing=FAST, progress=msgs.append)
    assert writes(emu) == [("POST", "rayclusters", RC), ("PATCH", *DGD_W), ("PATCH", *DGD_W), ("DELETE", "rayclusters", RC)]
    patches = [r.body for r in emu.requests if r.method == "PATCH"]
    assert patches[0]["metadata"]["ownerReferences"][0]["kind"] == "RayCluster"
    assert patches[1] == {"metadata": {"ownerReferences": None}}
    assert emu.get(*DGD_W) is not None and "ownerReferences" not in emu.get(*DGD_W)["metadata"]
    assert "rollback: removed the ownerReference added to DynamoGraphDeployment/dynamo-rl-tiny (namespace default)" in msgs


# ------------------------------------------------------------------ RayJob fallback


def test_rayjob_fallback_submits_with_job_id(kube, emu, infra):
    """The operator never submits: after the grace period (0 s here) past RayClusterProvisioned,
    the driver goes through the dashboard with submission_id = status.jobId."""
    DynamoOperator(emu)
    ray = KubeRayOperator(emu, submits=False)
    infra.launch.submission_grace_s = 0
    msgs = []
    res = run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", timing=FAST, progress=msgs.append)
    assert res.exit_code == 0
    job = next(r.body for r in emu.requests if r.method == "POST" and r.plural == "rayjobs")
    assert ray.submissions == [{"cluster": f"{RC}-x7k2p", "entrypoint": job["spec"]["entrypoint"], "submission_id": f"{RC}-kd8wq"}]
    assert any("has not submitted" in m for m in msgs)
    # the dashboard was asked first (GET 404), then POSTed to
    dash = [(r.method, r.status) for r in emu.requests if r.plural == "services/proxy" and r.name.endswith("-head-svc:8265")]
    assert dash[:2] == [("GET", 404), ("POST", 200)]


def test_rayjob_no_fallback_within_grace(kube, emu, infra):
    DynamoOperator(emu)
    ray = KubeRayOperator(emu, submits=False)
    infra.launch.submission_grace_s = 3600
    infra.launch.job_timeout_s = 0.05
    with pytest.raises(WaitTimeout, match="not finished"):
        run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", timing=FAST)
    assert ray.submissions == []
    assert emu.get("rayjobs", RC) is not None  # past the launch: a slow job is not rolled back


# ------------------------------------------------------------------ up / down / check


def test_up_is_idempotent_and_owns_dgds(kube, emu, infra):
    DynamoOperator(emu)
    KubeRayOperator(emu)
    up(kube, infra, timing=FAST)
    assert writes(emu) == [("POST", "rayclusters", RC), ("POST", *DGD_W)]
    assert emu.get(*DGD_W)["metadata"]["ownerReferences"] == [owner(RC, emu.get("rayclusters", RC)["metadata"]["uid"])]
    emu.requests.clear()
    up(kube, infra, timing=FAST)
    assert writes(emu) == []  # reused


def test_up_dgd_alone_then_owned_when_cluster_appears(kube, emu, infra):
    DynamoOperator(emu)
    KubeRayOperator(emu)
    msgs = []
    up(kube, infra, targets=["dynamo.serving"], timing=FAST, progress=msgs.append)
    assert "ownerReferences" not in emu.get(*DGD_W)["metadata"] and any("get no owner" in m for m in msgs)
    up(kube, infra, targets=["kuberay.training"], timing=FAST)
    up(kube, infra, targets=["dynamo.serving"], timing=FAST)  # reused, and the owner reference is patched on
    assert emu.get(*DGD_W)["metadata"]["ownerReferences"][0]["name"] == RC
    with pytest.raises(Exception, match=r"unknown target 'dynamo.nope'"):
        up(kube, infra, targets=["dynamo.nope"], timing=FAST)


def test_up_recreate_and_rollback(kube, emu, infra):
    DynamoOperator(emu)
    KubeRayOperator(emu)
    up(kube, infra, timing=FAST)
    emu.requests.clear()
    up(kube, infra, recreate=True, wait=False, timing=FAST)
    # deleting the old cluster garbage-collected the owned DGD (at once in the emulator), so it is created anew
    assert writes(emu) == [("DELETE", "rayclusters", RC), ("POST", "rayclusters", RC), ("POST", *DGD_W)]
    down(kube, infra, timing=FAST)
    emu.requests.clear()
    emu.faults.append(Fault("POST", "dynamographdeployments", 500))
    with pytest.raises(KubeApiError):
        up(kube, infra, timing=FAST)
    assert [w for w in writes(emu) if w[0] == "DELETE"] == [("DELETE", "rayclusters", RC)]


def test_apply_waits_out_an_object_being_deleted(kube, emu, infra):
    DynamoOperator(emu)
    plan = orchestrate.render_plan(infra)
    emu.insert(plan.dgds["serving"])
    emu.objects[("dynamographdeployments", "default", DGD)]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    emu.hooks.append(lambda e, r: e._delete(("dynamographdeployments", "default", DGD)) if r.method == "GET" else None)
    assert kube.apply(plan.dgds["serving"], gone_timeout_s=5, poll_s=0.001).action == "created"


def test_down_of_nothing_and_targets(kube, emu, infra):
    assert down(kube, infra, timing=FAST) == []
    KubeRayOperator(emu)
    up(kube, infra, targets=["kuberay.training"], timing=FAST)
    assert down(kube, infra, targets=["dynamo.serving"], timing=FAST) == []
    assert emu.get("rayclusters", RC) is not None


def test_check_probes_crds(kube, emu, infra):
    rep = check(kube, infra)
    assert set(rep.crds.values()) == {"installed"} and rep.rayjob["kind"] == "RayJob"
    assert rep.plan.served_model("serving") == "tiny"
    emu.forbidden_list.add("rayjobs")
    assert any("installed but you may not list it" in w for w in check(kube, infra).warnings)
    emu.missing_crds.add("dynamographdeployments")
    with pytest.raises(CRDMissingError, match="dynamographdeployments.nvidia.com/v1alpha1: install the NVIDIA Dynamo"):
        check(kube, infra)
    assert writes(emu, ok_only=False) == []  # check never writes


# ------------------------------------------------------------------ deployments


SANDBOX = {"name": "sandbox", "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "sandbox"}},
                                       "template": {"metadata": {"labels": {"app": "sandbox"}},
                                                    "spec": {"containers": [{"name": "sandbox"}]}}}}


def _deployment_controller(emu, available=True):
    def hook(e, r):
        if r.plural == "deployments" and r.method == "GET" and r.status == 200 and available:
            o = e.objects[("deployments", r.namespace, r.name)]
            if "status" not in o:
                e.set_status("deployments", r.name, {"observedGeneration": o["metadata"]["generation"],
                                                     "availableReplicas": o["spec"].get("replicas", 1)}, ns=r.namespace)
    emu.hooks.append(hook)


@pytest.mark.parametrize("mode", ["raycluster", "rayjob"])
def test_deployments_follow_the_dgds(kube, emu, infra, mode):
    """`deployments.<key>` (apps/v1) are applied with the DGDs, get the same ownerReference,
    must be available before the trainer starts, and go with the cluster."""
    infra = infra.model_copy(update={"deployments": Infra.model_validate({"deployments": {"tools": SANDBOX}}).deployments})
    DynamoOperator(emu)
    ray = KubeRayOperator(emu)
    _deployment_controller(emu)
    res = run(kube, infra, EXAMPLES / "recipe.yaml", mode=mode, timing=FAST)
    assert res.exit_code == 0
    posts = [w for w in writes(emu) if w[0] == "POST"]
    if mode == "raycluster":
        assert posts == [("POST", "rayclusters", RC), ("POST", *DGD_W), ("POST", "deployments", "sandbox")]
        dep = next(r.body for r in emu.requests if r.method == "POST" and r.plural == "deployments")
        assert dep["metadata"]["ownerReferences"] == [owner(RC, emu.get("rayclusters", RC)["metadata"]["uid"])]
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == infra.image  # default filled
        emu.requests.clear()
        down(kube, infra, timing=FAST)
        assert writes(emu) == [("DELETE", "deployments", "sandbox"), ("DELETE", *DGD_W), ("DELETE", "rayclusters", RC)]
    else:
        assert posts == [("POST", *DGD_W), ("POST", "deployments", "sandbox"), ("POST", "rayjobs", RC)]
        assert ("PATCH", "deployments", "sandbox") in writes(emu)
        assert emu.get("deployments", "sandbox") is None  # collected with the job's cluster
        assert ray.cluster_uids


def test_unavailable_deployment_rolls_back(kube, emu, infra):
    infra = infra.model_copy(update={"deployments": Infra.model_validate({"deployments": {"tools": SANDBOX}}).deployments})
    infra.launch.cluster_ready_timeout_s = 0.05
    DynamoOperator(emu)
    KubeRayOperator(emu)
    _deployment_controller(emu, available=False)
    with pytest.raises(WaitTimeout, match=r"Deployment/sandbox .* 0/1 replicas available"):
        run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", timing=FAST)
    assert [w for w in writes(emu) if w[0] == "DELETE"] == [("DELETE", "deployments", "sandbox"), ("DELETE", *DGD_W)]
