"""Control-URL resolvers for the refit orchestrator on Kubernetes.

Inside the trainer's pod, the serving workers of a DynamoGraphDeployment are the pods
labelled ``nvidia.com/dynamo-graph-deployment-name=<dgd>`` (the label the Dynamo operator
puts on every pod of a DGD); each serves its control routes on the Dynamo system port
(``DYN_SYSTEM_PORT``, 9090 in ``examples/k8s``). The orchestrator probes every candidate's
``/engine/info`` and keeps the ones that answer (the frontend pod does not), so the
resolver only lists running pods. Uses the official ``kubernetes`` client with the pod's
service account (``load_incluster_config``); needs ``get``/``list`` on ``pods``.

Must not import ``dynamo_rl.k8s`` (the launcher) or anything below ``refit``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

DGD_LABEL = "nvidia.com/dynamo-graph-deployment-name"


def dgd_pod_resolver(dgd_name: str, namespace: str, *, system_port: int = 9090,
                     core_v1=None) -> Callable[[], list[str]]:
    """Return a resolver: ``() -> ["http://<podIP>:<system_port>", ...]`` for the DGD's running pods.

    Args:
        dgd_name: the DGD's ``metadata.name``.
        namespace: its namespace.
        system_port: the workers' ``DYN_SYSTEM_PORT``.
        core_v1: a ``kubernetes.client.CoreV1Api`` (default: in-cluster configuration).
    Raises:
        kubernetes.config.ConfigException: outside a pod when ``core_v1`` is not given.
    """
    if core_v1 is None:
        from kubernetes import client, config

        config.load_incluster_config()
        core_v1 = client.CoreV1Api()

    def resolve() -> list[str]:
        pods = core_v1.list_namespaced_pod(namespace, label_selector=f"{DGD_LABEL}={dgd_name}")
        return [f"http://{p.status.pod_ip}:{system_port}" for p in pods.items
                if p.status and p.status.pod_ip and p.status.phase == "Running"]

    return resolve


def pod_ip() -> str:
    """This pod's IP: ``$POD_IP`` (downward API) or the address of the pod's hostname."""
    return os.environ.get("POD_IP") or socket.gethostbyname(socket.gethostname())
