"""Kubernetes launcher: a DynamoGraphDeployment (inference) + a KubeRay RayCluster or
RayJob (training), with owner references, readiness gates, rollback and status.

Modules, one concern each: ``schema`` (infra file), ``manifests`` (rendering, owner
references, recipe stamping), ``validate`` (CRD schemas), ``api`` (official client
calls), ``readiness`` (three gates), ``status`` (operator status), ``orchestrate``
(up/down/run/check), ``cli`` (the ``dynamo-rl k8s`` commands), ``errors`` (one
exception family). Nothing here imports ``rl``, ``refit`` or ``serving``.
"""

from .errors import (
    CRDMissingError,
    DeploymentFailed,
    InfraConfigError,
    JobFailed,
    K8sError,
    KubeApiError,
    ManifestError,
    RecipeError,
    SchemaValidationError,
    WaitTimeout,
)
from .schema import Infra, load_infra, parse_infra

__all__ = [
    "CRDMissingError",
    "DeploymentFailed",
    "Infra",
    "InfraConfigError",
    "JobFailed",
    "K8sError",
    "KubeApiError",
    "ManifestError",
    "RecipeError",
    "SchemaValidationError",
    "WaitTimeout",
    "load_infra",
    "parse_infra",
]
