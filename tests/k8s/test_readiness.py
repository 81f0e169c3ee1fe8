"""The three readiness gates against the emulator: ``successful`` with an unready pod, or
with the model not yet listed by the frontend, is not ready; a stale observedGeneration
is not ready; ``failed`` fails fast; in-cluster vs proxy routing of the frontend check."""

from __future__ import annotations

import pytest

from dynamo_rl.k8s import readiness
from dynamo_rl.k8s.errors import DeploymentFailed, WaitTimeout
from dynamo_rl.k8s.manifests import DGD_POD_LABEL, ObjRef
from dynamo_rl.k8s.readiness import check_dgd, frontend_gate, frontend_url, operator_gate, pods_gate, wait_dgd_ready

from .operators import DynamoOperator, models_body

DGD = {"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoGraphDeployment",
       "metadata": {"name": "g", "namespace": "default"},
       "spec": {"services": {"Frontend": {"componentType": "frontend", "replicas": 1},
                             "Worker": {"componentType": "worker", "replicas": 1}}}}
REF = ObjRef.of(DGD)


@pytest.fixture
def ready_dgd(kube, emu):
    op = DynamoOperator(emu, model="tiny")
    kube.apply(DGD)
    kube.get(REF)  # the operator acts on the first observation
    return op


def gates(r):
    return [(g.name, g.ok) for g in r.gates]


def test_all_three_gates_pass(kube, emu, ready_dgd):
    r = check_dgd(kube, REF, "tiny")
    assert r.ready and gates(r) == [("operator", True), ("pods", True), ("frontend", True)]
    # the frontend was reached through the API server's service proxy
    assert any(q.plural == "services/proxy" and q.name == "g-frontend:8000" and q.path == "v1/models" for q in emu.requests)


def test_successful_with_an_unready_pod_is_not_ready(kube, emu, ready_dgd):
    emu.set_pod_ready("g-0-worker-abc", False)
    r = check_dgd(kube, REF, "tiny")
    assert not r.ready and gates(r) == [("operator", True), ("pods", False)]
    assert "waiting for g-0-worker-abc" in r.describe() and "frontend: not checked" in r.describe()


def test_successful_with_model_not_listed_is_not_ready(kube, emu, ready_dgd):
    ready_dgd.serving = False
    r = check_dgd(kube, REF, "tiny")
    assert not r.ready and gates(r) == [("operator", True), ("pods", True), ("frontend", False)]
    assert "tiny not listed yet" in r.describe()
    ready_dgd.serving, ready_dgd.model = True, "other"
    assert not check_dgd(kube, REF, "tiny").ready
    assert check_dgd(kube, REF, None).ready  # unknown served name: any listed model counts


def test_stale_observed_generation_is_not_ready(kube, emu, ready_dgd):
    emu.update_spec("dynamographdeployments", "g", {"services": {"Worker": {"replicas": 2}}})
    r = check_dgd(kube, REF, "tiny")
    assert gates(r) == [("operator", False)] and "is for generation 1, spec is at 2" in r.describe()


def test_replica_counts_in_status_gate_pods(kube, emu, ready_dgd):
    emu.set_status("dynamographdeployments", "g", {"services": {"Worker": {"replicas": 2, "readyReplicas": 1}}})
    r = check_dgd(kube, REF, "tiny")
    assert gates(r) == [("operator", True), ("pods", False)] and "Worker 1/2" in r.describe()


def test_pending_then_ready_wait(kube, emu):
    DynamoOperator(emu, model="tiny", ready_after=3)
    kube.apply(DGD)
    seen = []
    r = wait_dgd_ready(kube, REF, "tiny", timeout_s=30, poll_s=0.001, on_progress=lambda r: seen.append(r.describe()))
    assert r.ready and seen[0].startswith("DGD g: operator: waiting (state <none>")


def test_wait_times_out_naming_the_gate(kube, emu, ready_dgd):
    ready_dgd.serving = False
    with pytest.raises(WaitTimeout, match=r"not ready after 0s: .*frontend: waiting \(tiny not listed yet"):
        wait_dgd_ready(kube, REF, "tiny", timeout_s=0.0, poll_s=0.001)


def test_failed_state_fails_fast(kube, emu):
    DynamoOperator(emu, state="failed")
    kube.apply(DGD)
    kube.get(REF)
    with pytest.raises(DeploymentFailed, match="state 'failed'.*kubectl describe dgd g -n default"):
        wait_dgd_ready(kube, REF, "tiny", timeout_s=30, poll_s=0.001)


def test_gate_functions_on_snapshots(cases):
    import yaml

    snap = yaml.safe_load((cases / "status/dgd_v1alpha1_vllm-agg_state-successful.kubectl-get.excerpt.yaml").read_text())
    assert operator_gate(snap).ok  # generation 2, no observedGeneration published: the state counts
    pods = [{"metadata": {"name": "p"}, "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}]
    assert pods_gate(pods, snap).ok and not pods_gate([], snap).ok
    terminating = [{"metadata": {"name": "p", "deletionTimestamp": "x"}, "status": pods[0]["status"]}]
    assert not pods_gate(terminating, snap).ok
    import json

    assert frontend_gate(200, json.dumps(models_body(["Qwen/Qwen3-0.6B"])), "Qwen/Qwen3-0.6B").ok
    assert not frontend_gate(503, "", "Qwen/Qwen3-0.6B").ok and not frontend_gate(200, "<html>", None).ok


def test_in_cluster_route_uses_service_dns(monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("t")
    monkeypatch.setattr("dynamo_rl.k8s.api.SA_TOKEN", token)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    calls = []

    class Resp:
        status_code, text = 200, '{"data": [{"id": "tiny"}]}'

    monkeypatch.setattr(readiness.httpx, "get", lambda url, timeout: calls.append(url) or Resp())
    assert readiness.fetch_models(None, "g", "rl", 8000) == (200, Resp.text)
    assert calls == ["http://g-frontend.rl.svc.cluster.local:8000/v1/models"] == [frontend_url("g", "rl") + "/v1/models"]
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert not readiness.in_pod()


def test_pods_are_selected_by_the_operator_label(kube, emu, ready_dgd):
    emu.add_pod("other-0", {DGD_POD_LABEL: "other"}, False)
    assert check_dgd(kube, REF, "tiny").ready
