"""The test plays the operators: hooks on the emulator that write status the way the
Dynamo operator and KubeRay do (field names from their CRDs), one step per observed GET,
so flows advance deterministically without timing."""

from __future__ import annotations

from typing import Any

from dynamo_rl.k8s.manifests import DGD_POD_LABEL

from .emulator import KubeEmulator, Req


def models_body(ids: list[str]) -> dict:
    return {"object": "list", "data": [{"id": i, "object": "object", "created": 0, "owned_by": "nvidia"} for i in ids]}


class DynamoOperator:
    """After ``ready_after`` GETs of a DGD: ``state`` (default successful) with
    observedGeneration current, one pod per service (Ready = ``pods_ready``), and a frontend
    Service whose ``/v1/models`` lists ``model`` while ``serving`` is True."""

    def __init__(self, emu: KubeEmulator, *, model: str = "tiny", ready_after: int = 1, state: str = "successful",
                 pods_ready: bool = True, serving: bool = True, port: int = 8000):
        self.emu, self.model, self.ready_after, self.state = emu, model, ready_after, state
        self.pods_ready, self.serving, self.port = pods_ready, serving, port
        self.gets: dict[str, int] = {}
        self.done: set[str] = set()
        emu.hooks.append(self.hook)

    def frontend(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "v1/models":
            return 200, models_body([self.model] if self.serving else [])
        return 404, {"error": "not found"}

    def hook(self, emu: KubeEmulator, req: Req) -> None:
        if req.plural != "dynamographdeployments" or req.method != "GET" or not req.name or req.status != 200:
            return
        name = req.name
        obj = emu.objects[("dynamographdeployments", req.namespace, name)]
        uid = obj["metadata"]["uid"]  # per object: a recreated DGD is reconciled anew
        self.gets[uid] = self.gets.get(uid, 0) + 1
        if uid in self.done or self.gets[uid] < self.ready_after:
            return
        self.done.add(uid)
        services = obj["spec"].get("services") or {c["name"]: c for c in obj["spec"].get("components") or []}
        emu.set_status("dynamographdeployments", name, {
            "state": self.state,
            "observedGeneration": obj["metadata"]["generation"],
            "conditions": [{"type": "Ready", "status": "True" if self.state == "successful" else "False",
                            "reason": "all_resources_are_ready", "message": "All resources are ready",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        }, ns=req.namespace)
        for svc in services:
            emu.add_pod(f"{name}-0-{svc.lower()}-abc", {DGD_POD_LABEL: name}, self.pods_ready,
                        ns=req.namespace, owner_uid=obj["metadata"]["uid"])
        emu.proxies[f"{name}-frontend:{self.port}"] = self.frontend


class KubeRayOperator:
    """RayCluster: provisioned after ``provision_after`` GETs; its dashboard
    (``<name>-head-svc:8265``) runs submitted jobs to ``result`` after ``job_after`` polls.

    RayJob: on its first GET, creates ``<name>-x7k2p`` (controller ownerReference to the
    RayJob, KubeRay labels), sets ``rayClusterName``/``jobId``/``jobDeploymentStatus``; submits
    the job itself unless ``submits`` is False; after the job ends sets ``jobStatus`` and
    ``jobDeploymentStatus: Complete`` and, with ``shutdownAfterJobFinishes``, deletes the cluster.
    ``names_cluster`` False leaves ``rayClusterName`` unset forever.
    """

    def __init__(self, emu: KubeEmulator, *, provision_after: int = 1, result: str = "SUCCEEDED", job_after: int = 2,
                 exit_code: int | None = None, submits: bool = True, names_cluster: bool = True,
                 dashboard_fails: bool = False):
        self.emu, self.provision_after, self.result, self.job_after = emu, provision_after, result, job_after
        self.exit_code, self.submits, self.names_cluster, self.dashboard_fails = exit_code, submits, names_cluster, dashboard_fails
        self.rc_gets: dict[str, int] = {}
        self.jobs: dict[str, dict] = {}  # submission id -> {status, polls, cluster, entrypoint}
        self.submissions: list[dict] = []
        self.job_cluster: dict[str, str] = {}
        self.cluster_uids: dict[str, str] = {}
        self.created_jobs = 0
        emu.hooks.append(self.hook)

    def _provision(self, name: str, ns: str) -> None:
        self.emu.set_status("rayclusters", name, {
            "state": "ready",
            "conditions": [{"type": "HeadPodReady", "status": "True", "reason": "HeadPodRunningAndReady",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"},
                           {"type": "RayClusterProvisioned", "status": "True", "reason": "AllPodRunningAndReadyFirstTime",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}, ns=ns)
        self.emu.proxies[f"{name}-head-svc:8265"] = lambda m, p, b, c=name: self.dashboard(c, m, p, b)

    def dashboard(self, cluster: str, method: str, path: str, body: Any) -> tuple[int, Any]:
        if self.dashboard_fails:
            return 500, {"error": "dashboard down"}
        if method == "POST" and path.rstrip("/") == "api/jobs":
            sid = body["submission_id"]
            self.submissions.append({"cluster": cluster, **body})
            if sid in self.jobs:
                return 400, {"error": f"Job with submission_id {sid} already exists"}
            self.jobs[sid] = {"status": "RUNNING", "polls": 0, "cluster": cluster}
            return 200, {"submission_id": sid, "job_id": sid}
        if method == "GET" and path.startswith("api/jobs/"):
            sid = path.split("/", 2)[2]
            job = self.jobs.get(sid)
            if job is None:
                return 404, f"Job {sid} does not exist"
            job["polls"] += 1
            if job["polls"] >= self.job_after and job["status"] == "RUNNING":
                job["status"] = self.result
            info = {"submission_id": sid, "status": job["status"], "message": f"job {job['status'].lower()}"}
            if job["status"] != "RUNNING" and self.exit_code is not None:
                info["driver_exit_code"] = self.exit_code
            return 200, info
        return 404, "not found"

    def hook(self, emu: KubeEmulator, req: Req) -> None:
        if req.status not in (200, 201) or not req.name:
            return
        ns = req.namespace
        if req.plural == "rayclusters" and req.method == "GET":
            self.rc_gets[req.name] = self.rc_gets.get(req.name, 0) + 1
            if self.rc_gets[req.name] == self.provision_after:
                self._provision(req.name, ns)
        if req.plural == "rayjobs" and req.method == "POST":
            self.job_cluster.pop(req.name, None)  # a new RayJob object: new job id, new cluster
            self.created_jobs += 1
            jid = f"{req.name}-kd8wq" + (f"{self.created_jobs}" if self.created_jobs > 1 else "")
            emu.set_status("rayjobs", req.name, {"jobDeploymentStatus": "Initializing", "jobId": jid}, ns=ns)
        if req.plural == "rayjobs" and req.method == "GET":
            job = emu.objects.get(("rayjobs", ns, req.name))
            st = job.get("status") or {}
            jid = st.get("jobId")
            if not self.names_cluster:
                return
            if req.name not in self.job_cluster:
                cname = f"{req.name}-x7k2p"
                self.job_cluster[req.name] = cname
                rc = emu.insert({"apiVersion": "ray.io/v1", "kind": "RayCluster",
                            "metadata": {"name": cname, "namespace": ns,
                                         "labels": {"ray.io/originated-from-crd": "RayJob",
                                                    "ray.io/originated-from-cr-name": req.name},
                                         "ownerReferences": [{"apiVersion": "ray.io/v1", "kind": "RayJob", "name": req.name,
                                                              "uid": job["metadata"]["uid"], "controller": True,
                                                              "blockOwnerDeletion": True}]},
                            "spec": job["spec"]["rayClusterSpec"]})
                self.cluster_uids[cname] = rc["metadata"]["uid"]
                self._provision(cname, ns)
                rcs = emu.objects[("rayclusters", ns, cname)]["status"]
                emu.set_status("rayjobs", req.name, {"rayClusterName": cname, "jobDeploymentStatus": "Running",
                                                     "dashboardURL": f"{cname}-head-svc.{ns}.svc.cluster.local:8265",
                                                     "rayClusterStatus": rcs}, ns=ns)
                if self.submits:
                    self.jobs[jid] = {"status": "RUNNING", "polls": 0, "cluster": cname}
                return
            sj = self.jobs.get(jid)
            if sj is None:
                return  # the operator's submitter never ran
            sj["polls"] += 1
            if sj["polls"] >= self.job_after:
                sj["status"] = self.result
                emu.set_status("rayjobs", req.name, {"jobStatus": self.result, "jobDeploymentStatus": "Complete",
                                                     "message": f"job {self.result.lower()}"}, ns=ns)
                if job["spec"].get("shutdownAfterJobFinishes"):
                    emu._delete(("rayclusters", ns, self.job_cluster[req.name]))
            else:
                emu.set_status("rayjobs", req.name, {"jobStatus": "RUNNING"}, ns=ns)
