"""Companion documents of a DGD manifest file (QA 3): its ConfigMaps and PVCs are applied
before the DGD (namespaced, labelled, ConfigMaps owned like the DGD, PVCs kept), rolled
back on failure and deleted by `down` (ConfigMaps only); Secrets/Pods are skipped with a
warning naming them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dynamo_rl.k8s.manifests import MANAGED_BY, TARGET_LABEL
from dynamo_rl.k8s.orchestrate import check, down, render_plan, run
from dynamo_rl.k8s.schema import load_infra

from .conftest import FAST
from .emulator import Fault
from .operators import DynamoOperator, KubeRayOperator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "k8s"
DGD, RC = "dynamo-rl-tiny", "dynamo-rl-train"
CM = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "llm-config", "namespace": "elsewhere"},
      "data": {"config.yaml": "a: 1\n"}}
PVC = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "model-cache"},
       "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "10Gi"}}}}
SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token-secret"}, "stringData": {"HF_TOKEN": "x"}}
POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "debug"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
CORE_W = ("configmaps", "persistentvolumeclaims", "dynamographdeployments", "rayclusters", "rayjobs")


@pytest.fixture
def infra(tmp_path):
    docs = [CM, PVC, SECRET, POD, yaml.safe_load((EXAMPLES / "tiny.dgd.yaml").read_text())]
    (tmp_path / "tiny.dgd.yaml").write_text(yaml.safe_dump_all(docs))
    (tmp_path / "infra.yaml").write_text((EXAMPLES / "infra.yaml").read_text())
    infra = load_infra(tmp_path / "infra.yaml")
    infra.dynamo["serving"].ready_timeout_s = 30
    infra.launch.cluster_ready_timeout_s = 30
    infra.launch.job_timeout_s = 60
    return infra


def writes(emu):
    return [(r.method, r.plural, r.name) for r in emu.requests
            if r.method in ("POST", "PATCH", "DELETE") and r.plural in CORE_W and 200 <= r.status < 300]


def test_real_multidoc_case_renders_its_configmap(cases, tmp_path):
    (tmp_path / "infra.yaml").write_text(yaml.safe_dump({
        "namespace": "rl", "dynamo": {"g": {"manifest": str(cases / "dgd/v1alpha1_recipe-gpt-oss-120b_trtllm_agg_deploy.multidoc.yaml")}}}))
    plan = render_plan(load_infra(tmp_path / "infra.yaml"))
    assert [(m["kind"], m["metadata"]["name"]) for m in plan.manifests()] == [
        ("ConfigMap", "llm-config"), ("DynamoGraphDeployment", plan.dgds["g"]["metadata"]["name"])]
    cm = plan.companions["g"][0]
    assert cm["metadata"]["namespace"] == "rl" and cm["metadata"]["labels"][TARGET_LABEL] == "dynamo.g"
    assert plan.warnings == []


def test_render_lists_companions_and_warns_about_the_rest(infra):
    plan = render_plan(infra, mode="rayjob", recipe={})
    assert [m["kind"] for m in plan.manifests()] == ["ConfigMap", "PersistentVolumeClaim", "DynamoGraphDeployment", "RayJob"]
    assert all(m["metadata"]["namespace"] == "default" and m["metadata"]["labels"].items() >= MANAGED_BY.items()
               for m in plan.manifests())
    assert len(plan.warnings) == 3
    assert plan.warnings[0] == ("dynamo.serving: tiny.dgd.yaml's ConfigMap 'llm-config' says metadata.namespace "
                                "'elsewhere'; it is applied in the infra namespace 'default'")
    assert "Secret 'hf-token-secret', which is NOT applied" in plan.warnings[1] and "kubectl apply -n default" in plan.warnings[1]
    assert "Pod 'debug', which is NOT applied" in plan.warnings[2]
    assert plan.warnings == check(None, infra).warnings[:3]


def test_run_rayjob_applies_companions_first_and_owns_the_configmap(kube, emu, infra):
    DynamoOperator(emu, model="tiny")
    ray = KubeRayOperator(emu)
    msgs: list[str] = []
    res = run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", timing=FAST, progress=msgs.append)
    assert res.exit_code == 0
    assert sum("NOT applied" in m and m.startswith("warning: ") for m in msgs) == 2
    cluster = f"{RC}-x7k2p"
    assert writes(emu)[:5] == [("POST", "configmaps", "llm-config"), ("POST", "persistentvolumeclaims", "model-cache"),
                               ("POST", "dynamographdeployments", DGD), ("POST", "rayjobs", RC),
                               ("PATCH", "configmaps", "llm-config")]
    assert ("PATCH", "dynamographdeployments", DGD) in writes(emu)
    patch = next(r.body for r in emu.requests if r.method == "PATCH" and r.plural == "configmaps")
    assert patch["metadata"]["ownerReferences"][0]["uid"] == ray.cluster_uids[cluster]
    # the cluster is gone (shutdownAfterJobFinishes): the ConfigMap went with it, the PVC stays
    assert emu.get("configmaps", "llm-config") is None and emu.get("dynamographdeployments", DGD) is None
    assert emu.get("persistentvolumeclaims", "model-cache") is not None


def test_run_raycluster_owns_configmap_at_create_and_down_keeps_the_pvc(kube, emu, infra):
    DynamoOperator(emu, model="tiny")
    KubeRayOperator(emu)
    msgs: list[str] = []
    run(kube, infra, EXAMPLES / "recipe.yaml", mode="raycluster", timing=FAST)
    uid = emu.get("rayclusters", RC)["metadata"]["uid"]
    assert writes(emu) == [("POST", "rayclusters", RC), ("POST", "configmaps", "llm-config"),
                           ("POST", "persistentvolumeclaims", "model-cache"), ("POST", "dynamographdeployments", DGD)]
    assert emu.get("configmaps", "llm-config")["metadata"]["ownerReferences"][0]["uid"] == uid
    assert "ownerReferences" not in emu.get("persistentvolumeclaims", "model-cache")["metadata"]
    emu.requests.clear()
    down(kube, infra, timing=FAST, progress=msgs.append)
    assert writes(emu) == [("DELETE", "dynamographdeployments", DGD), ("DELETE", "configmaps", "llm-config"),
                           ("DELETE", "rayclusters", RC)]
    assert any("PersistentVolumeClaim/model-cache" in m and "kept" in m for m in msgs)
    assert list(emu.objects) == [("persistentvolumeclaims", "default", "model-cache")]


def test_a_failed_launch_rolls_back_the_companions(kube, emu, infra):
    KubeRayOperator(emu)
    emu.faults.append(Fault("POST", "dynamographdeployments", 403))
    with pytest.raises(Exception, match="lacks RBAC permission"):
        run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", timing=FAST)
    assert writes(emu) == [("POST", "configmaps", "llm-config"), ("POST", "persistentvolumeclaims", "model-cache"),
                           ("DELETE", "persistentvolumeclaims", "model-cache"), ("DELETE", "configmaps", "llm-config")]
    assert emu.objects == {}


def test_existing_configmap_is_reused_and_left_alone_on_rollback(kube, emu, infra):
    emu.insert({**CM, "metadata": {"name": "llm-config", "namespace": "default"}})
    KubeRayOperator(emu)
    emu.faults.append(Fault("POST", "dynamographdeployments", 403))
    with pytest.raises(Exception):
        run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", timing=FAST)
    assert ("DELETE", "configmaps", "llm-config") not in writes(emu)
    assert emu.get("configmaps", "llm-config") is not None


def test_recreate_never_recreates_a_pvc(kube, emu, infra):
    emu.insert({**PVC, "metadata": {"name": "model-cache", "namespace": "default"}})
    emu.insert({**CM, "metadata": {"name": "llm-config", "namespace": "default"}})
    KubeRayOperator(emu)
    emu.faults.append(Fault("POST", "dynamographdeployments", 403))
    with pytest.raises(Exception):
        run(kube, infra, EXAMPLES / "recipe.yaml", mode="rayjob", recreate=True, timing=FAST)
    assert ("DELETE", "configmaps", "llm-config") in writes(emu)  # recreated, then rolled back
    assert not any(w[1] == "persistentvolumeclaims" for w in writes(emu))
    assert emu.get("persistentvolumeclaims", "model-cache") is not None


def test_check_validates_the_recipe_without_a_training_role(tmp_path):
    from dynamo_rl.k8s.errors import RecipeError
    from dynamo_rl.k8s.schema import parse_infra

    with pytest.raises(RecipeError, match="grpo.num_stepz: unknown key"):
        check(None, parse_infra({}), recipe={"grpo": {"num_stepz": 2}}, recipe_source="r.yaml")
