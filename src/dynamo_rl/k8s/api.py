"""Kubernetes API calls, through the official ``kubernetes`` client only.

Owns: connecting (kubeconfig/context, or in-cluster), get/create/patch/delete of
namespaced custom objects (``CustomObjectsApi``) and of core ``v1`` objects
(ConfigMaps, PVCs: the same client's ``call_api``), pod listing and the API server's
service proxy (``CoreV1Api``), idempotent apply, bounded waits for deletion, and the
CRD probe. Everything is ordinary client code, so it runs unchanged against a real
cluster and against the test emulator.

No retries beyond the bounded ``wait_*`` loops; no logic about what to create (that is
``orchestrate``). Imports the client, ``k8s.manifests`` (for :class:`ObjRef`) and
``k8s.errors``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from .errors import CRDMissingError, KubeApiError, WaitTimeout
from .manifests import ObjRef

log = logging.getLogger(__name__)

SA_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")

CrdState = Literal["installed", "missing", "installed-no-list-permission"]


def in_pod() -> bool:
    """True inside a Kubernetes pod: ``KUBERNETES_SERVICE_HOST`` is set and a service-account token is mounted."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and SA_TOKEN.exists()


def _reason(e: ApiException) -> str:
    try:
        return json.loads(e.body or "{}").get("message") or e.reason or ""
    except (ValueError, AttributeError):
        return str(e.body or e.reason or "")


def api_error(e: ApiException, verb: str, what: str) -> KubeApiError:
    """Translate an :class:`ApiException` into a :class:`KubeApiError` whose message names the fix."""
    msg = f"{verb} {what}: HTTP {e.status}: {_reason(e)}"
    if e.status == 401:
        msg += " — the credentials were refused; refresh your kubeconfig (or pass --kubeconfig/--context)"
    elif e.status == 403:
        msg += " — your account lacks RBAC permission for this; ask a cluster admin for a Role granting it"
    elif e.status == 404 and verb == "create":
        msg += " — the resource type is unknown to the API server; is its CRD/operator installed? (`dynamo-rl k8s check`)"
    elif e.status == 409:
        msg += " — the object changed or already exists; rerun, or use --recreate"
    elif e.status == 422:
        msg += " — the API server rejected the manifest; check it with `dynamo-rl k8s render`"
    return KubeApiError(msg, status=e.status)


def is_subset(desired: Any, live: Any) -> bool:
    """True when every field of ``desired`` is present and equal in ``live`` (lists element-wise).

    Extra fields in ``live`` (server/operator defaults) are not drift.
    """
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and is_subset(v, live[k]) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(desired) == len(live) and all(is_subset(a, b) for a, b in zip(desired, live))
    return desired == live or (desired is not None and live is not None and str(desired) == str(live) and not isinstance(desired, bool))


@dataclass
class Applied:
    """Result of :meth:`Kube.apply`: the live object and what happened
    (``created``, ``reused`` — matched, ``drifted`` — reused although it differs, ``recreated``)."""

    obj: dict
    action: Literal["created", "reused", "drifted", "recreated"]

    @property
    def created(self) -> bool:
        return self.action in ("created", "recreated")


class Kube:
    """A connection to one cluster. Methods raise :class:`KubeApiError` on API failures."""

    def __init__(self, api_client: k8s_client.ApiClient):
        self.api_client = api_client
        self.custom = k8s_client.CustomObjectsApi(api_client)
        self.core = k8s_client.CoreV1Api(api_client)

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> "Kube":
        """Connect with ``kubeconfig``/``context`` (kubectl's rules: ``$KUBECONFIG``, ``~/.kube/config``);
        inside a pod with neither given, use the pod's service account.

        Raises :class:`KubeApiError` when no configuration is found.
        """
        if kubeconfig is not None and not Path(kubeconfig).expanduser().is_file():
            what = "is a directory" if Path(kubeconfig).expanduser().is_dir() else "does not exist"
            raise KubeApiError(f"--kubeconfig {kubeconfig!r} {what}; give the path of a kubeconfig file "
                               "(kubectl's default is ~/.kube/config)")
        try:
            if kubeconfig is None and context is None and in_pod():
                cfg = k8s_client.Configuration()
                k8s_config.load_incluster_config(client_configuration=cfg)
                return cls(k8s_client.ApiClient(cfg))
            return cls(k8s_config.new_client_from_config(config_file=kubeconfig, context=context))
        except (k8s_config.ConfigException, OSError) as e:
            hint = ("check --kubeconfig/--context" if kubeconfig or context
                    else "pass --kubeconfig/--context or set KUBECONFIG")
            raise KubeApiError(f"cannot load a Kubernetes configuration ({e}); {hint}") from None

    # ------------------------------------------------------------------ objects

    def _core(self, method: str, ref: ObjRef, body: dict | None = None, *, named: bool = True,
              content_type: str = "application/json", query: str = "") -> dict:
        """A call on a core (``v1``) namespaced object such as a ConfigMap or PVC, through the
        same client (``/api/v1/namespaces/<ns>/<plural>[/<name>]``). Raises :class:`ApiException`."""
        path = f"/api/v1/namespaces/{quote(ref.namespace)}/{ref.plural}" + (f"/{quote(ref.name)}" if named else "")
        params = self.api_client.param_serialize(
            method=method, resource_path=path + query,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"],
        )
        resp = self.api_client.call_api(*params)
        resp.read()
        text = resp.data.decode() if resp.data else ""
        if not 200 <= resp.status < 300:
            raise ApiException(status=resp.status, reason=resp.reason, body=text)
        return json.loads(text) if text else {}

    def get(self, ref: ObjRef) -> dict | None:
        """The live object, or None when it does not exist (HTTP 404)."""
        try:
            if not ref.group:
                return self._core("GET", ref)
            return self.custom.get_namespaced_custom_object(ref.group, ref.version, ref.namespace, ref.plural, ref.name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise api_error(e, "get", str(ref)) from None

    def create(self, obj: dict) -> dict:
        """Create ``obj``; returns the live object (with ``metadata.uid``)."""
        ref = ObjRef.of(obj)
        try:
            if not ref.group:
                return self._core("POST", ref, obj, named=False)
            return self.custom.create_namespaced_custom_object(ref.group, ref.version, ref.namespace, ref.plural, obj)
        except ApiException as e:
            if e.status == 404:
                raise CRDMissingError(
                    f"create {ref}: the API server does not know {ref.plural}.{ref.group}/{ref.version}; "
                    f"install the {ref.kind} CRD (its operator) first — see `dynamo-rl k8s check`"
                ) from None
            raise api_error(e, "create", str(ref)) from None

    def patch(self, ref: ObjRef, body: dict) -> dict:
        """JSON merge patch (``application/merge-patch+json``). Lists in ``body`` replace whole lists."""
        try:
            if not ref.group:
                return self._core("PATCH", ref, body, content_type="application/merge-patch+json")
            return self.custom.patch_namespaced_custom_object(
                ref.group, ref.version, ref.namespace, ref.plural, ref.name, body,
                _content_type="application/merge-patch+json",
            )
        except ApiException as e:
            raise api_error(e, "patch", str(ref)) from None

    def delete(self, ref: ObjRef, propagation: str = "Background") -> bool:
        """Delete; returns False when it was already gone. ``propagation`` is the
        Kubernetes ``propagationPolicy`` (``Background`` lets the garbage collector
        delete dependents such as owned DGDs)."""
        try:
            if not ref.group:
                self._core("DELETE", ref, {"propagationPolicy": propagation})
                return True
            self.custom.delete_namespaced_custom_object(
                ref.group, ref.version, ref.namespace, ref.plural, ref.name, propagation_policy=propagation
            )
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise api_error(e, "delete", str(ref)) from None

    def wait_gone(self, ref: ObjRef, timeout_s: float, poll_s: float = 2.0) -> None:
        """Poll every ``poll_s`` seconds until ``ref`` no longer exists. Raises :class:`WaitTimeout` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            obj = self.get(ref)
            if obj is None:
                return
            if time.monotonic() >= deadline:
                fins = (obj.get("metadata") or {}).get("finalizers")
                raise WaitTimeout(
                    f"{ref} still exists after {timeout_s:.0f}s"
                    + (f" (finalizers {fins}: is its operator running?)" if fins else ""),
                    last=str(fins),
                )
            time.sleep(poll_s)

    def apply(self, obj: dict, *, recreate: bool = False, gone_timeout_s: float = 300.0, poll_s: float = 2.0) -> Applied:
        """Create ``obj`` unless it exists (idempotent).

        Existing and matching (every field of our ``spec`` and ``labels`` equal in the live
        object) → ``reused``. Existing but different → logged warning, ``drifted`` (the live
        object is kept; pass ``recreate=True`` to replace it). ``recreate=True`` deletes,
        waits up to ``gone_timeout_s`` seconds, and creates. An object already being deleted
        (``deletionTimestamp`` set) is waited out and created anew.
        """
        ref = ObjRef.of(obj)
        live = self.get(ref)
        if live is not None and (live.get("metadata") or {}).get("deletionTimestamp"):
            # being deleted (e.g. garbage-collected after its owner went): let it go, then create
            self.wait_gone(ref, gone_timeout_s, poll_s)
            live = None
        if live is None:
            return Applied(self.create(obj), "created")
        if recreate:
            log.info("recreating %s", ref)
            self.delete(ref)
            self.wait_gone(ref, gone_timeout_s, poll_s)
            return Applied(self.create(obj), "recreated")
        want = {k: obj[k] for k in ("spec", "data", "binaryData") if k in obj}
        want["metadata"] = {"labels": (obj.get("metadata") or {}).get("labels") or {}}
        if is_subset(want, live):
            return Applied(live, "reused")
        log.warning("%s exists and differs from the rendered manifest; reusing it as is (pass --recreate to replace it)", ref)
        return Applied(live, "drifted")

    # ------------------------------------------------------------------ core

    def list_pods(self, namespace: str, label_selector: str) -> list[dict]:
        """Pods matching ``label_selector`` (``k=v,k2=v2``), as plain dicts (camelCase keys)."""
        try:
            res = self.core.list_namespaced_pod(namespace, label_selector=label_selector)
        except ApiException as e:
            raise api_error(e, "list", f"pods ({label_selector}) in namespace {namespace}") from None
        return self.api_client.sanitize_for_serialization(res).get("items") or []

    def probe_crd(self, group: str, version: str, plural: str, namespace: str) -> CrdState:
        """Is ``plural.group/version`` served? Lists at most one object in ``namespace``.

        404 → ``missing``; 403 → ``installed-no-list-permission`` (the API server
        authorizes only known resources, so a 403 proves the CRD exists); 2xx → ``installed``.
        Other failures raise :class:`KubeApiError`.
        """
        try:
            self.custom.list_namespaced_custom_object(group, version, namespace, plural, limit=1)
            return "installed"
        except ApiException as e:
            if e.status == 404:
                return "missing"
            if e.status == 403:
                return "installed-no-list-permission"
            raise api_error(e, "list", f"{plural}.{group}/{version}") from None

    def proxy(self, method: str, namespace: str, service: str, port: int, path: str,
              body: dict | None = None, timeout_s: float = 10.0) -> tuple[int, str]:
        """Call ``path`` on ``service:port`` through the API server's service proxy
        (``/api/v1/namespaces/<ns>/services/<svc>:<port>/proxy/<path>``).

        Returns ``(HTTP status, body text)``; a non-2xx answer is returned, not raised
        (503 is normal while pods start). GET uses ``connect_get_namespaced_service_proxy_with_path``;
        POST (which that API cannot send a body with) uses the same client's ``param_serialize``/``call_api``.
        """
        name = f"{service}:{port}"
        path = path.lstrip("/")
        try:
            if method == "GET" and body is None:
                resp = self.core.connect_get_namespaced_service_proxy_with_path(
                    name, namespace, path, _preload_content=False, _request_timeout=timeout_s
                )
                return resp.status, resp.data.decode()
            params = self.api_client.param_serialize(
                method=method,
                resource_path=f"/api/v1/namespaces/{quote(namespace)}/services/{quote(name)}/proxy/{quote(path, safe='/')}",
                header_params={"Content-Type": "application/json", "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
            )
            resp = self.api_client.call_api(*params, _request_timeout=timeout_s)
            resp.read()
            return resp.status, resp.data.decode()
        except ApiException as e:
            return int(e.status or 0), str(e.body or e.reason or "")

    def list_objects(self, ref: ObjRef, label_selector: str) -> list[dict]:
        """Objects of ``ref``'s kind in ``ref.namespace`` matching ``label_selector`` (``ref.name`` is ignored)."""
        try:
            res = self.custom.list_namespaced_custom_object(
                ref.group, ref.version, ref.namespace, ref.plural, label_selector=label_selector
            )
        except ApiException as e:
            raise api_error(e, "list", f"{ref.plural} ({label_selector}) in namespace {ref.namespace}") from None
        return res.get("items") or []
