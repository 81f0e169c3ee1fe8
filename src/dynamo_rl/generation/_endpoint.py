"""Where the Dynamo frontend is: ``generation.dynamo`` → base URL, and the served model.

Convention (Dynamo operator): a DynamoGraphDeployment ``<dgd>`` in namespace ``<ns>``
exposes its frontend as the Service ``<dgd>-frontend`` (port 8000 by default), so inside
a pod of that cluster the URL is ``http://<dgd>-frontend.<ns>.svc.cluster.local:<port>``.
Outside a pod that name does not resolve; ``frontend_url`` (a port-forward, an ingress,
the embedded stack) works anywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from dynamo_rl.config import DynamoConfig
from dynamo_rl.generation.errors import EndpointConfigError, ModelNotServedError

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def in_kubernetes_pod(environ: Mapping[str, str] | None = None) -> bool:
    """True when the kubelet's service environment is present (``KUBERNETES_SERVICE_HOST``)."""
    env = os.environ if environ is None else environ
    return bool(env.get("KUBERNETES_SERVICE_HOST"))


def _check_url(url: str, source: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EndpointConfigError(
            f"{source} {url!r} is not an http(s) URL; write it like http://127.0.0.1:8000")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EndpointConfigError(
            f"{source} {url!r} must be the frontend's base URL (scheme://host:port), without a path "
            "such as /v1; the client adds /v1/completions itself")
    return url.rstrip("/")


def resolve_frontend_url(cfg: DynamoConfig, *, frontend_url: str | None = None,
                         environ: Mapping[str, str] | None = None) -> str:
    """Base URL of the frontend (no trailing slash) from exactly one source.

    Args:
        cfg: ``generation.dynamo``. ``dgd_name`` (+ ``namespace``, ``frontend_port``) or
            ``frontend_url``.
        frontend_url: an explicit URL (e.g. the embedded stack's); allowed only when the
            recipe names no ``dgd_name`` and no different ``frontend_url``.
        environ: the environment to inspect (default ``os.environ``).
    Returns:
        e.g. ``"http://rl-frontend.team.svc.cluster.local:8000"`` or ``"http://127.0.0.1:41234"``.
    Raises:
        EndpointConfigError: two sources, none, ``dgd_name`` outside a Kubernetes pod, an
            invalid DNS name, or a URL that is not ``http(s)://host[:port]``.
    """
    if frontend_url is not None:
        if cfg.dgd_name:
            raise EndpointConfigError(
                f"generation.dynamo.dgd_name={cfg.dgd_name!r} and an explicit frontend_url={frontend_url!r} "
                "were both given; use one (drop dgd_name to use the URL)")
        if cfg.frontend_url and cfg.frontend_url.rstrip("/") != frontend_url.rstrip("/"):
            raise EndpointConfigError(
                f"generation.dynamo.frontend_url={cfg.frontend_url!r} differs from the explicit "
                f"frontend_url={frontend_url!r}; use one")
        return _check_url(frontend_url, "frontend_url")
    if cfg.dgd_name and cfg.frontend_url:
        raise EndpointConfigError(
            "generation.dynamo: set either dgd_name (in-cluster) or frontend_url, not both")
    if cfg.frontend_url:
        return _check_url(cfg.frontend_url, "generation.dynamo.frontend_url")
    if cfg.dgd_name:
        service = f"{cfg.dgd_name}-frontend"
        for what, name in (("dgd_name", cfg.dgd_name), ("namespace", cfg.namespace)):
            if not _DNS_LABEL.match(name) or len(name) > 63:
                raise EndpointConfigError(
                    f"generation.dynamo.{what}={name!r} is not a valid Kubernetes name (lowercase "
                    "letters, digits and '-', starting and ending with a letter or digit, at most 63)")
        if len(service) > 63:
            raise EndpointConfigError(
                f"generation.dynamo.dgd_name={cfg.dgd_name!r} is too long: the Service "
                f"{service!r} must be at most 63 characters (dgd_name at most 54)")
        if not in_kubernetes_pod(environ):
            raise EndpointConfigError(
                f"generation.dynamo.dgd_name={cfg.dgd_name!r} resolves to the in-cluster Service "
                f"{service}.{cfg.namespace}.svc.cluster.local, which only exists inside a Kubernetes pod "
                "(KUBERNETES_SERVICE_HOST is not set here). Run the trainer in the cluster (e.g. the "
                "RayJob), or set generation.dynamo.frontend_url (e.g. after `kubectl port-forward "
                f"-n {cfg.namespace} svc/{service} 8000`) and drop dgd_name")
        return f"http://{service}.{cfg.namespace}.svc.cluster.local:{cfg.frontend_port}"
    raise EndpointConfigError(
        "generation.dynamo has neither dgd_name nor frontend_url: set one "
        "(or run `dynamo-rl train`, which starts the embedded stack and passes its URL)")


def choose_model(models_body: object, wanted: str | None, url: str) -> str | None:
    """Pick the served model from a ``/v1/models`` body.

    Returns:
        The model name, or ``None`` when the frontend lists no model yet (the caller may
        retry: workers register after the frontend starts).
    Raises:
        ModelNotServedError: ``wanted`` is not among the (non-empty) served models, or
            several are served and ``wanted`` is None.
    """
    data = models_body.get("data") if isinstance(models_body, dict) else None
    served = [m.get("id") for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
    if not served:
        return None
    if wanted is None:
        if len(served) == 1:
            return served[0]
        raise ModelNotServedError(
            f"{url}/v1/models serves several models ({', '.join(served)}); choose one with "
            "generation.dynamo.model", served=served)
    if wanted not in served:
        raise ModelNotServedError(
            f"model {wanted!r} is not served by {url}; served: {', '.join(served)}. Fix "
            "generation.dynamo.model (or leave it null to use the only served model)", served=served)
    return wanted
