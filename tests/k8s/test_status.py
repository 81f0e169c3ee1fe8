"""Status reading on the real snapshots in ../shared/cases/status/ (kubectl excerpts:
YAML parsed as is, ``describe`` text through ``parse_describe``; the truncated JSON
fragment is checked for what it shows), RayJob terminal logic when
``jobDeploymentStatus`` and ``jobStatus`` disagree, and suffixed RayJob clusters."""

from __future__ import annotations

import re

import pytest
import yaml

from dynamo_rl.k8s.manifests import ObjRef
from dynamo_rl.k8s.schema import parse_infra
from dynamo_rl.k8s.status import (
    collect_status,
    dgd_summary,
    parse_describe,
    raycluster_provisioned,
    raycluster_summary,
    rayjob_cluster_name,
    rayjob_outcome,
)

from .operators import DynamoOperator


def _yaml(cases, name):
    data = yaml.safe_load((cases / "status" / name).read_text())
    return data.get("status", data) if isinstance(data, dict) and set(data) == {"status"} else data


def test_dgd_snapshot(cases):
    dgd = _yaml(cases, "dgd_v1alpha1_vllm-agg_state-successful.kubectl-get.excerpt.yaml")
    assert dgd_summary(dgd) == "state=successful Ready=True (all_resources_are_ready) Frontend 1/1 VllmDecodeWorker 1/1"


def test_raycluster_provisioning_snapshot(cases):
    st = _yaml(cases, "raycluster_conditions_provisioning.excerpt.yaml")
    assert raycluster_provisioned(st) is False
    assert raycluster_summary({"status": st}) == "state=- provisioned=False HeadPodReady=False"


def test_raycluster_pre_rename_snapshot(cases):
    """KubeRay 1.2 pre-release called the condition RayClusterReady."""
    st = _yaml(cases, "raycluster_conditions_steady_pre-rename.excerpt.yaml")
    assert raycluster_provisioned(st) is True


def test_raycluster_describe_condition(cases):
    text = (cases / "status/raycluster_condition_provisioned-true.describe.excerpt.txt").read_text()
    cond = parse_describe(text)
    assert cond == {"lastTransitionTime": "2024-08-10T23:00:02Z", "message": "All Ray Pods are ready for the first time",
                    "reason": "AllPodRunningAndReadyFirstTime", "status": "True", "type": "RayClusterProvisioned"}
    assert raycluster_provisioned({"conditions": [cond]}) is True


def test_raycluster_legacy_state_without_conditions():
    assert raycluster_provisioned({"state": "ready"}) and not raycluster_provisioned({"state": "unhealthy"})


def test_rayjob_describe_succeeded(cases):
    st = parse_describe((cases / "status/rayjob_describe_complete_succeeded.excerpt.txt").read_text())["status"]
    assert st["jobDeploymentStatus"] == "Complete" and st["jobStatus"] == "SUCCEEDED"
    assert st["rayClusterName"] == "rayjob-sample-raycluster-v6qcq"  # the suffixed cluster
    assert st["rayClusterStatus"]["state"] == "ready" and st["rayClusterStatus"]["endpoints"]["dashboard"] == "8265"
    out = rayjob_outcome({"status": st})
    assert out.terminal and out.succeeded and out.exit_code == 0


def test_rayjob_describe_failed_with_multiline_message(cases):
    st = parse_describe((cases / "status/rayjob_describe_complete_failed.excerpt.txt").read_text())["status"]
    assert st["jobDeploymentStatus"] == "Complete" and st["jobStatus"] == "FAILED"
    assert st["message"].endswith("No such file or directory")  # the continuation line is kept
    out = rayjob_outcome({"status": st})
    assert out.terminal and not out.succeeded and out.exit_code == 1  # Complete does not mean success
    assert "Job failed due to an application error" in out.summary
    # ... and the driver's last log line, where the error is
    assert out.summary.endswith("… python: can't open file '/home/ray/samples/sample_code.ppy': "
                                "[Errno 2] No such file or directory)"), out.summary


def test_rayjob_json_fragment(cases):
    """Truncated operator-log JSON (not parseable): the values it shows are read by the same logic."""
    text = (cases / "status/rayjob_status_json_fragment_with_raycluster_conditions.excerpt.txt").read_text()
    body = "".join(line for line in text.splitlines() if not line.startswith("#"))
    assert '"failed":1' in body and '"state":"ready"' in body
    head = re.search(r'"podName":"([^"]+)"', body).group(1)
    assert head == "v6e-16-job-6p4qq-head"
    # failed=1 with jobStatus not shown and the deployment still running: retries decide
    st = {"failed": 1, "jobDeploymentStatus": "Running", "jobStatus": "FAILED"}
    assert rayjob_outcome({"spec": {"backoffLimit": 2}, "status": st}).terminal is False
    assert rayjob_outcome({"spec": {"backoffLimit": 1}, "status": st}).terminal is True


@pytest.mark.parametrize("dep, job, terminal, ok", [
    ("Running", "RUNNING", False, False),
    ("Initializing", "", False, False),
    ("Running", "SUCCEEDED", True, True),      # deployment status lags
    ("Complete", "SUCCEEDED", True, True),
    ("Complete", "FAILED", True, False),
    ("Failed", "RUNNING", True, False),        # SubmissionFailed / DeadlineExceeded: job status is stale
    ("Failed", "", True, False),
    ("ValidationFailed", "", True, False),
    ("Failed", "SUCCEEDED", True, True),       # the driver succeeded; cleanup failed afterwards
    ("Running", "STOPPED", True, False),
    ("Retrying", "FAILED", False, False),
    ("Suspended", "", False, False),
])
def test_rayjob_disagreements(dep, job, terminal, ok):
    out = rayjob_outcome({"status": {"jobDeploymentStatus": dep, "jobStatus": job, "reason": "R"}})
    assert (out.terminal, out.succeeded if out.terminal else False) == (terminal, ok)
    assert out.exit_code == (0 if ok else 1)


def test_rayjob_cluster_name_resolution(kube, emu):
    """`.status.rayClusterName` first, then KubeRay's labels (the name has a random suffix)."""
    job = {"metadata": {"name": "train", "namespace": "default"}, "spec": {}, "status": {"rayClusterName": "train-x7k2p"}}
    assert rayjob_cluster_name(kube, job) == "train-x7k2p"
    job["status"] = {}
    assert rayjob_cluster_name(kube, job) is None
    emu.insert({"apiVersion": "ray.io/v1", "kind": "RayCluster",
                "metadata": {"name": "train-q9zzt", "labels": {"ray.io/originated-from-crd": "RayJob",
                                                               "ray.io/originated-from-cr-name": "train"}}, "spec": {}})
    assert rayjob_cluster_name(kube, job) == "train-q9zzt"
    assert rayjob_cluster_name(kube, {**job, "spec": {"clusterSelector": {"ray.io/cluster": "shared"}}}) == "shared"


def test_collect_status_rows(kube, emu, tmp_path):
    dgd = {"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoGraphDeployment", "metadata": {"name": "g"},
           "spec": {"services": {"Frontend": {"componentType": "frontend"}}}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(dgd))
    infra = parse_infra({"kuberay": {"training": {"name": "train", "spec": {}}},
                         "dynamo": {"serving": {"manifest": "g.yaml"}}}, base_dir=tmp_path)
    rows = collect_status(kube, infra)
    assert [(r.kind, r.name, r.exists) for r in rows] == [("RayCluster", "train", False), ("DynamoGraphDeployment", "g", False)]
    job = emu.insert({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "train"}, "spec": {"entrypoint": "x"}})
    emu.set_status("rayjobs", "train", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "train-x7k2p"})
    rc = emu.insert({"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "train-x7k2p"}, "spec": {}})
    emu.set_status("rayclusters", "train-x7k2p", {"state": "ready"})
    DynamoOperator(emu)
    emu.insert({**dgd, "metadata": {"name": "g", "ownerReferences": [{"apiVersion": "ray.io/v1", "kind": "RayCluster",
                                                                      "name": "train-x7k2p", "uid": rc["metadata"]["uid"]}]}})
    kube.get(ObjRef("nvidia.com/v1alpha1", "DynamoGraphDeployment", "default", "g"))
    rows = collect_status(kube, infra)
    assert [(r.kind, r.name) for r in rows] == [("RayJob", "train"), ("RayCluster", "train-x7k2p"), ("DynamoGraphDeployment", "g")]
    assert rows[0].summary == "jobDeploymentStatus=Running jobStatus=RUNNING"
    assert rows[1].summary.startswith("state=ready provisioned=True")
    assert rows[2].summary.startswith("state=successful Ready=True") and rows[2].summary.endswith("owner=train-x7k2p")
    assert job["metadata"]["uid"]
