"""The in-cluster refit resolver lists a DGD's running pods through the real client."""

from kubernetes import client as k8s_client

from dynamo_rl.refit.discovery import DGD_LABEL, dgd_pod_resolver


def test_dgd_pod_resolver_lists_running_pods_of_that_dgd_only(emu):
    emu.add_pod("rl-frontend-0", {DGD_LABEL: "rl"}, ready=True)
    emu.add_pod("rl-worker-0", {DGD_LABEL: "rl"}, ready=True)
    emu.add_pod("other-worker-0", {DGD_LABEL: "other"}, ready=True)
    for name, ip in [("rl-frontend-0", "10.0.0.5"), ("rl-worker-0", "10.0.0.6"), ("other-worker-0", "10.0.0.7")]:
        emu.pods[("default", name)]["status"]["podIP"] = ip
    api = emu.api_client()
    try:
        resolve = dgd_pod_resolver("rl", "default", system_port=9090, core_v1=k8s_client.CoreV1Api(api))
        assert sorted(resolve()) == ["http://10.0.0.5:9090", "http://10.0.0.6:9090"]
        emu.pods[("default", "rl-worker-0")]["status"]["phase"] = "Pending"
        assert resolve() == ["http://10.0.0.5:9090"]
    finally:
        api.close()
