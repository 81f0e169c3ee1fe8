"""The one exception family of ``dynamo_rl.k8s``.

Every error says which input was wrong (file, key, object) and what to do about it.
Catch :class:`K8sError` to handle all of them. This module imports nothing else.
"""

from __future__ import annotations


class K8sError(Exception):
    """Base class of every error raised by ``dynamo_rl.k8s``."""


class InfraConfigError(K8sError):
    """The infra YAML file is malformed, has unknown keys, or wrong value types."""


class ManifestError(K8sError):
    """A manifest cannot be rendered: no DGD in the file, several DGDs and no choice,
    an override that does not merge, an unresolved ``${...}`` placeholder, a bad name."""


class RecipeError(ManifestError):
    """The training recipe (with the command-line overrides) does not validate against
    ``dynamo_rl.config.Recipe``, or it disagrees with the infra file (served model name).
    The message is the one ``dynamo-rl train`` prints for the same recipe."""


class SchemaValidationError(K8sError):
    """A rendered manifest does not validate against its CRD's openAPIV3Schema.

    ``errors`` holds one ``"path: message"`` string per violation.
    """

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = list(errors or [])


class CRDMissingError(K8sError):
    """A CustomResourceDefinition (DGD, RayCluster or RayJob) is not installed in the cluster."""


class KubeApiError(K8sError):
    """The Kubernetes API server refused or failed a request. ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class WaitTimeout(K8sError):
    """A bounded wait (readiness, deletion, RayJob cluster name, job end) ran past its deadline.

    ``last`` describes the last observed state, so the message says what was still missing.
    """

    def __init__(self, message: str, last: str = ""):
        super().__init__(message)
        self.last = last


class DeploymentFailed(K8sError):
    """An operator reported a terminal failure (DGD ``state: failed``, RayJob deployment
    ``Failed``) before the object became ready."""


class JobFailed(K8sError):
    """The trainer driver (RayJob or dashboard job) ended in FAILED or STOPPED.

    ``exit_code`` is the driver's exit code when Ray reported it, else 1.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
