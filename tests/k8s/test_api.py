"""The API layer, over real HTTP with the official client: idempotent apply (reuse,
drift warning, recreate), deletion waits, the CRD probe (403 = installed), the service
proxy, and errors that say what to do."""

from __future__ import annotations

import logging

import pytest

from dynamo_rl.k8s.api import is_subset
from dynamo_rl.k8s.errors import CRDMissingError, KubeApiError, WaitTimeout
from dynamo_rl.k8s.manifests import ObjRef

from .emulator import Fault

RC = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
      "metadata": {"name": "train", "namespace": "default", "labels": {"a": "b"}},
      "spec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [{"name": "ray-head", "image": "i"}]}}}}}
REF = ObjRef("ray.io/v1", "RayCluster", "default", "train")


def test_apply_creates_then_reuses(kube, emu):
    a = kube.apply(RC)
    assert a.action == "created" and a.obj["metadata"]["uid"]
    # server-side additions (status, defaults) are not drift
    emu.set_status("rayclusters", "train", {"state": "ready"})
    emu.objects[("rayclusters", "default", "train")]["spec"]["headGroupSpec"]["serviceType"] = "ClusterIP"
    b = kube.apply(RC)
    assert b.action == "reused" and b.obj["metadata"]["uid"] == a.obj["metadata"]["uid"]
    assert emu.log() == [("POST", "rayclusters", "train")]


def test_apply_warns_on_drift_and_keeps_live(kube, emu, caplog):
    kube.apply(RC)
    emu.update_spec("rayclusters", "train", {"rayVersion": "2.9.0"})
    changed = {**RC, "spec": {**RC["spec"], "rayVersion": "2.52.0"}}
    with caplog.at_level(logging.WARNING, logger="dynamo_rl.k8s.api"):
        a = kube.apply(changed)
    assert a.action == "drifted" and a.obj["spec"]["rayVersion"] == "2.9.0"
    assert "differs from the rendered manifest" in caplog.text and "--recreate" in caplog.text


def test_apply_recreate_replaces(kube, emu):
    uid = kube.apply(RC).obj["metadata"]["uid"]
    a = kube.apply(RC, recreate=True, gone_timeout_s=2, poll_s=0.01)
    assert a.action == "recreated" and a.created and a.obj["metadata"]["uid"] != uid
    assert emu.log() == [("POST", "rayclusters", "train"), ("DELETE", "rayclusters", "train"), ("POST", "rayclusters", "train")]


def test_wait_gone_times_out_with_finalizer_hint(kube, emu):
    kube.apply(RC)
    emu.objects[("rayclusters", "default", "train")]["metadata"]["finalizers"] = ["ray.io/gcs-ft"]
    with pytest.raises(WaitTimeout, match=r"still exists after 0s \(finalizers \['ray.io/gcs-ft'\]: is its operator running\?\)"):
        kube.wait_gone(REF, 0.0, 0.01)


def test_delete_absent_is_false(kube):
    assert kube.delete(REF) is False and kube.get(REF) is None


def test_garbage_collection_follows_owner_uid(kube, emu):
    """The emulator's GC is what makes 'deleting the cluster frees the DGD' checkable."""
    rc = kube.apply(RC).obj
    emu.insert({"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoGraphDeployment",
                "metadata": {"name": "g", "ownerReferences": [{"uid": rc["metadata"]["uid"]}]}, "spec": {}})
    kube.delete(REF)
    assert emu.get("dynamographdeployments", "g") is None


def test_crd_probe(kube, emu):
    assert kube.probe_crd("ray.io", "v1", "rayclusters", "default") == "installed"
    emu.forbidden_list.add("rayclusters")
    assert kube.probe_crd("ray.io", "v1", "rayclusters", "default") == "installed-no-list-permission"
    emu.missing_crds.add("dynamographdeployments")
    assert kube.probe_crd("nvidia.com", "v1alpha1", "dynamographdeployments", "default") == "missing"


def test_create_without_crd_names_the_fix(kube, emu):
    emu.missing_crds.add("rayclusters")
    with pytest.raises(CRDMissingError, match="install the RayCluster CRD"):
        kube.apply(RC)


@pytest.mark.parametrize("status, hint", [(403, "lacks RBAC permission"), (409, "use --recreate"), (422, "dynamo-rl k8s render"),
                                          (500, "HTTP 500")])
def test_api_errors_name_the_fix(kube, emu, status, hint):
    emu.faults.append(Fault("POST", "rayclusters", status))
    with pytest.raises(KubeApiError) as e:
        kube.apply(RC)
    assert e.value.status == status and hint in str(e.value) and "RayCluster/train" in str(e.value)


def test_merge_patch_with_resource_version(kube, emu):
    live = kube.apply(RC).obj
    out = kube.patch(REF, {"metadata": {"resourceVersion": live["metadata"]["resourceVersion"], "labels": {"c": "d"}}})
    assert out["metadata"]["labels"] == {"a": "b", "c": "d"}
    with pytest.raises(KubeApiError, match="HTTP 409"):
        kube.patch(REF, {"metadata": {"resourceVersion": live["metadata"]["resourceVersion"], "labels": {"e": "f"}}})


def test_service_proxy_get_and_post(kube, emu):
    seen = []
    emu.proxies["svc:8265"] = lambda m, p, b: (seen.append((m, p, b)) or (200, {"ok": True}))
    assert kube.proxy("GET", "default", "svc", 8265, "api/jobs/abc") == (200, '{"ok": true}')
    assert kube.proxy("POST", "default", "svc", 8265, "api/jobs/", {"entrypoint": "x"})[0] == 200
    assert seen == [("GET", "api/jobs/abc", None), ("POST", "api/jobs", {"entrypoint": "x"})]
    assert kube.proxy("GET", "default", "nosvc", 80, "x")[0] == 503


def test_list_pods_and_objects_by_label(kube, emu):
    emu.add_pod("p1", {"app": "x"}, True)
    emu.add_pod("p2", {"app": "y"}, False)
    assert [p["metadata"]["name"] for p in kube.list_pods("default", "app=x")] == ["p1"]
    kube.apply(RC)
    assert [o["metadata"]["name"] for o in kube.list_objects(REF, "a=b")] == ["train"]
    assert kube.list_objects(REF, "a=c") == []


def test_is_subset():
    assert is_subset({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2, "c": 3}], "d": 4})
    assert not is_subset({"a": [1]}, {"a": [1, 2]})
    assert is_subset({"q": "1"}, {"q": 1}) and not is_subset({"x": True}, {"x": "True"})


def test_connect_without_configuration_names_the_fix(tmp_path, monkeypatch):
    from dynamo_rl.k8s.api import Kube

    with pytest.raises(KubeApiError, match=r"--kubeconfig '.*absent-kubeconfig' does not exist; give the path"):
        Kube.connect(str(tmp_path / "absent-kubeconfig"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeApiError, match="pass --kubeconfig/--context or set KUBECONFIG"):
        Kube.connect()
