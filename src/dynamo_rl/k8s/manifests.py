"""Rendering of every Kubernetes object the launcher sends: DGDs, RayClusters, RayJobs,
Deployments; owner references; the stamped recipe and the driver entrypoint.

Pure functions over dicts: no API calls, no I/O except reading the DGD manifest file.
Field names follow the Dynamo operator (``nvidia.com/v1alpha1`` ``spec.services``,
``nvidia.com/v1beta1`` ``spec.components``) and KubeRay (``ray.io/v1``) APIs.

Rules (issue 7):
* A DGD file may hold several documents: ConfigMaps, PVCs, Pods, ... are skipped; with
  several DGDs, ``dynamo.<key>.select`` must name one.
* ``image`` is only a default, set where a container has none; ``imagePullSecrets``
  are appended; a DGD's ``serviceAccountName`` is never set (the Dynamo operator wires
  its own); ``serviceAccount`` applies to RayCluster pod templates only, where unset.
* ``overrides`` deep-merge onto ``.spec``: mappings merge, lists and scalars replace,
  ``null`` deletes the key.

Imports only yaml and ``k8s.schema``/``k8s.errors``.
"""

from __future__ import annotations

import base64
import copy
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ManifestError
from .schema import DynamoGraphSpec, Infra

log = logging.getLogger(__name__)

DGD_KIND = "DynamoGraphDeployment"
DGD_GROUP = "nvidia.com"
RAY_API = "ray.io/v1"
MANAGED_BY = {"app.kubernetes.io/managed-by": "dynamo-rl"}
TARGET_LABEL = "dynamo-rl/target"
#: The label the Dynamo operator puts on every pod of a DGD (operator consts.KubeLabelDynamoGraphDeploymentName).
DGD_POD_LABEL = "nvidia.com/dynamo-graph-deployment-name"

PLURALS = {
    DGD_KIND: "dynamographdeployments",
    "RayCluster": "rayclusters",
    "RayJob": "rayjobs",
    "Deployment": "deployments",
}

_PLACEHOLDER = re.compile(r"\$\{[^}]*\}")


@dataclass(frozen=True)
class ObjRef:
    """Identity of one namespaced object: ``apiVersion``, ``kind``, ``namespace``, ``name``."""

    api_version: str
    kind: str
    namespace: str
    name: str

    @classmethod
    def of(cls, obj: dict) -> "ObjRef":
        md = obj.get("metadata") or {}
        return cls(obj["apiVersion"], obj["kind"], md.get("namespace", "default"), md["name"])

    @property
    def group(self) -> str:
        return self.api_version.split("/", 1)[0] if "/" in self.api_version else ""

    @property
    def version(self) -> str:
        return self.api_version.split("/", 1)[-1]

    @property
    def plural(self) -> str:
        return PLURALS[self.kind]

    def __str__(self) -> str:
        return f"{self.kind}/{self.name} (namespace {self.namespace})"


# --------------------------------------------------------------------------- helpers


def deep_merge(base: Any, override: Any, path: str = "overrides") -> Any:
    """Return ``base`` with ``override`` merged in (neither is modified).

    Mappings merge key by key, lists and scalars replace, ``None`` in ``override``
    deletes the key. Raises :class:`ManifestError` when a mapping would replace a
    list/scalar or the reverse (almost always a wrong indentation or a wrong key).
    """
    if not isinstance(override, dict):
        if isinstance(base, dict) and override is not None:
            raise ManifestError(
                f"{path}: cannot replace a mapping with a {type(override).__name__} ({override!r:.60}); "
                "give a mapping of the fields to change"
            )
        return copy.deepcopy(override)
    if base is None:
        base = {}
    if not isinstance(base, dict):
        raise ManifestError(
            f"{path}: cannot merge a mapping onto a {type(base).__name__} ({base!r:.60}); "
            "give a value of the same type as the manifest's"
        )
    out = copy.deepcopy(base)
    for k, v in override.items():
        if v is None:
            out.pop(k, None)
        elif k in out:
            out[k] = deep_merge(out[k], v, f"{path}.{k}")
        else:
            out[k] = copy.deepcopy(v)
    return out


def _labels(infra: Infra, target: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**(extra or {}), **infra.labels, **MANAGED_BY, TARGET_LABEL: target}


def _check_placeholders(obj: dict, source: str) -> None:
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "image" and isinstance(v, str) and _PLACEHOLDER.search(v):
                    found.append(f"{path}.{k} = {v!r}")
                else:
                    walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    md = obj.get("metadata") or {}
    for k in ("name", "namespace"):
        if isinstance(md.get(k), str) and _PLACEHOLDER.search(md[k]):
            found.append(f"metadata.{k} = {md[k]!r}")
    walk(obj.get("spec"), "spec")
    if found:
        raise ManifestError(
            f"{source}: unresolved placeholder(s), which dynamo-rl does not interpolate: "
            + "; ".join(found)
            + ". Write the value: a name via the `name:` key, an image via `overrides` (the infra `image` "
            "only fills containers that have none)."
        )


def _add_pull_secrets(pod_spec: dict, secrets: Iterable[str]) -> None:
    have = {s.get("name") for s in pod_spec.get("imagePullSecrets") or []}
    for s in secrets:
        if s not in have:
            pod_spec.setdefault("imagePullSecrets", []).append({"name": s})


def _default_pod_template(pod_spec: dict, infra: Infra, *, service_account: bool) -> None:
    for c in pod_spec.get("containers") or []:
        if infra.image and not c.get("image"):
            c["image"] = infra.image
    _add_pull_secrets(pod_spec, infra.image_pull_secrets)
    if service_account and infra.service_account and not pod_spec.get("serviceAccountName"):
        pod_spec["serviceAccountName"] = infra.service_account


# --------------------------------------------------------------------------- DGD


def load_yaml_documents(path: Path) -> list[dict]:
    """All non-empty documents of a YAML file. Raises :class:`ManifestError` when unreadable."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the DGD manifest ({e.strerror}); paths are relative to the infra file") from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML: {e}") from None


def select_dgd(docs: list[dict], select: str | None, source: str) -> dict:
    """Pick the DynamoGraphDeployment out of ``docs`` (other kinds are skipped).

    Raises :class:`ManifestError` when there is none, or several and ``select`` does not
    name exactly one of them.
    """
    dgds = [d for d in docs if isinstance(d, dict) and d.get("kind") == DGD_KIND]
    if not dgds:
        kinds = [d.get("kind", "?") if isinstance(d, dict) else type(d).__name__ for d in docs]
        raise ManifestError(f"{source}: no {DGD_KIND} in the file (found: {kinds or 'nothing'})")
    names = [(d.get("metadata") or {}).get("name") for d in dgds]
    if select is not None:
        chosen = [d for d, n in zip(dgds, names) if n == select]
        if not chosen:
            raise ManifestError(f"{source}: `select: {select}` matches no {DGD_KIND}; the file declares {names}")
        return copy.deepcopy(chosen[0])
    if len(dgds) > 1:
        raise ManifestError(
            f"{source}: the file declares {len(dgds)} DynamoGraphDeployments {names}; "
            "choose one with `select: <name>` under its dynamo.<key> entry"
        )
    return copy.deepcopy(dgds[0])


def dgd_api(manifest: dict) -> str:
    """``"v1alpha1"`` (``spec.services`` mapping) or ``"v1beta1"`` (``spec.components`` list)."""
    return manifest.get("apiVersion", "").split("/")[-1]


def dgd_components(manifest: dict) -> list[dict]:
    """One ``{name, type, replicas, image}`` per service/component, for summaries (both APIs)."""
    spec = manifest.get("spec") or {}
    out = []
    if isinstance(spec.get("services"), dict):
        for name, svc in spec["services"].items():
            svc = svc or {}
            main = ((svc.get("extraPodSpec") or {}).get("mainContainer")) or {}
            out.append({
                "name": name,
                "type": svc.get("componentType", ""),
                "replicas": svc.get("replicas", 1),
                "image": main.get("image", ""),
            })
    for comp in spec.get("components") or []:
        containers = ((comp.get("podTemplate") or {}).get("spec") or {}).get("containers") or [{}]
        out.append({
            "name": comp.get("name", ""),
            "type": comp.get("type", ""),
            "replicas": comp.get("replicas", 1),
            "image": containers[0].get("image", ""),
        })
    return out


def _iter_main_containers(manifest: dict) -> Iterable[dict]:
    spec = manifest.get("spec") or {}
    for svc in (spec.get("services") or {}).values():
        yield ((svc or {}).get("extraPodSpec") or {}).get("mainContainer") or {}
        yield {"env": (svc or {}).get("envs") or []}
    for comp in spec.get("components") or []:
        yield from ((comp.get("podTemplate") or {}).get("spec") or {}).get("containers") or []


def guess_served_model(manifest: dict) -> str | None:
    """The served model name a DGD's workers announce, when the manifest says it.

    Looks for ``--served-model-name X``, then ``--model X``/``--model-path X`` in container
    args/commands (also inside one-string shell args), then a ``SERVED_MODEL_NAME`` env.
    Returns None when none is found (the readiness gate then accepts any listed model).
    """
    found: dict[str, str] = {}
    for c in _iter_main_containers(manifest):
        words: list[str] = []
        for part in list(c.get("command") or []) + list(c.get("args") or []):
            try:
                words += shlex.split(str(part))
            except ValueError:
                words += str(part).split()
        for flag in ("--served-model-name", "--model", "--model-path"):
            if flag in words and words.index(flag) + 1 < len(words) and flag not in found:
                val = words[words.index(flag) + 1]
                if "$" not in val:
                    found[flag] = val
        for e in c.get("env") or []:
            if e.get("name") == "SERVED_MODEL_NAME" and e.get("value") and "env" not in found:
                found["env"] = e["value"]
    for k in ("--served-model-name", "env", "--model", "--model-path"):
        if k in found:
            return found[k]
    return None


def _default_dgd_images(manifest: dict, infra: Infra) -> None:
    spec = manifest.setdefault("spec", {})
    if isinstance(spec.get("services"), dict):
        for name, svc in spec["services"].items():
            if svc is None:
                svc = spec["services"][name] = {}
            eps = svc.get("extraPodSpec")
            if infra.image and not ((eps or {}).get("mainContainer") or {}).get("image"):
                eps = svc.setdefault("extraPodSpec", {})
                eps.setdefault("mainContainer", {})["image"] = infra.image
            if infra.image_pull_secrets:
                _add_pull_secrets(svc.setdefault("extraPodSpec", {}), infra.image_pull_secrets)
    for comp in spec.get("components") or []:
        if infra.image:
            pod = comp.setdefault("podTemplate", {}).setdefault("spec", {})
            if not pod.get("containers"):
                pod["containers"] = [{"name": "main"}]
        pod = (comp.get("podTemplate") or {}).get("spec")
        if pod is not None:
            _default_pod_template(pod, infra, service_account=False)
        elif infra.image_pull_secrets:
            pod = comp.setdefault("podTemplate", {}).setdefault("spec", {"containers": [{"name": "main"}]})
            _add_pull_secrets(pod, infra.image_pull_secrets)


def render_dgd(infra: Infra, key: str) -> dict:
    """Render ``dynamo.<key>`` into a DynamoGraphDeployment manifest (v1alpha1 or v1beta1).

    Raises :class:`ManifestError` (file unreadable, no/several DGDs, a merge conflict in
    ``overrides``, no name, an unresolved ``${...}``). CRD validation is separate
    (``validate.validate_manifest``).
    """
    if key not in infra.dynamo:
        raise ManifestError(f"no dynamo.{key} in the infra file (declared: {sorted(infra.dynamo)})")
    g: DynamoGraphSpec = infra.dynamo[key]
    if g.manifest is not None:
        path = infra.dgd_path(key)
        source = f"dynamo.{key} ({path.name})"
        dgd = select_dgd(load_yaml_documents(path), g.select, source)
    else:
        source = f"dynamo.{key} (inline spec)"
        spec = g.spec or {}
        api = g.api_version or ("nvidia.com/v1beta1" if "components" in spec else "nvidia.com/v1alpha1")
        dgd = {"apiVersion": api, "kind": DGD_KIND, "metadata": {}, "spec": copy.deepcopy(spec)}
    if dgd.get("apiVersion", "").split("/")[0] != DGD_GROUP:
        raise ManifestError(f"{source}: apiVersion {dgd.get('apiVersion')!r} is not in group {DGD_GROUP}")
    dgd["spec"] = deep_merge(dgd.get("spec") or {}, g.overrides, f"dynamo.{key}.overrides")
    md = dgd.setdefault("metadata", {})
    if g.name:
        md["name"] = g.name
    if not md.get("name"):
        raise ManifestError(f"{source}: the DGD has no metadata.name; set dynamo.{key}.name")
    if md.get("namespace") and md["namespace"] != infra.namespace:
        log.warning("%s: metadata.namespace %r replaced by the infra namespace %r", source, md["namespace"], infra.namespace)
    md["namespace"] = infra.namespace
    md["labels"] = _labels(infra, f"dynamo.{key}", md.get("labels"))
    if infra.annotations:
        md["annotations"] = {**(md.get("annotations") or {}), **infra.annotations}
    for k in ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"):
        md.pop(k, None)
    dgd.pop("status", None)
    _default_dgd_images(dgd, infra)
    _check_placeholders(dgd, source)
    return dgd


# --------------------------------------------------------------------------- KubeRay


def _ray_cluster_spec(infra: Infra, role: str) -> dict:
    spec = copy.deepcopy(infra.kuberay[role].spec)
    head = (spec.get("headGroupSpec") or {}).get("template", {}).get("spec")
    if head is not None:
        _default_pod_template(head, infra, service_account=True)
    for wg in spec.get("workerGroupSpecs") or []:
        pod = (wg.get("template") or {}).get("spec")
        if pod is not None:
            _default_pod_template(pod, infra, service_account=True)
    return spec


def render_raycluster(infra: Infra, role: str) -> dict:
    """Render ``kuberay.<role>`` into a ``ray.io/v1`` RayCluster. Raises :class:`ManifestError`."""
    if role not in infra.kuberay:
        raise ManifestError(f"no kuberay.{role} in the infra file (declared: {sorted(infra.kuberay)})")
    r = infra.kuberay[role]
    md: dict[str, Any] = {"name": r.name, "namespace": infra.namespace, "labels": _labels(infra, f"kuberay.{role}", r.labels)}
    if r.annotations or infra.annotations:
        md["annotations"] = {**infra.annotations, **r.annotations}
    rc = {"apiVersion": RAY_API, "kind": "RayCluster", "metadata": md, "spec": _ray_cluster_spec(infra, role)}
    _check_placeholders(rc, f"kuberay.{role}")
    return rc


def render_rayjob(infra: Infra, role: str, entrypoint: str) -> dict:
    """Render a ``ray.io/v1`` RayJob running ``entrypoint`` on a new cluster of ``kuberay.<role>``.

    KubeRay names the cluster ``<rayjob>-<random suffix>`` (read it from
    ``.status.rayClusterName``). Defaults: ``submissionMode: K8sJobMode``,
    ``shutdownAfterJobFinishes: true``; ``launch.rayJob`` is deep-merged on top.
    """
    if role not in infra.kuberay:
        raise ManifestError(f"no kuberay.{role} in the infra file (declared: {sorted(infra.kuberay)})")
    r = infra.kuberay[role]
    spec: dict[str, Any] = {
        "entrypoint": entrypoint,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "rayClusterSpec": _ray_cluster_spec(infra, role),
    }
    spec = deep_merge(spec, infra.launch.ray_job, "launch.rayJob")
    md: dict[str, Any] = {"name": r.name, "namespace": infra.namespace, "labels": _labels(infra, f"kuberay.{role}", r.labels)}
    if r.annotations or infra.annotations:
        md["annotations"] = {**infra.annotations, **r.annotations}
    job = {"apiVersion": RAY_API, "kind": "RayJob", "metadata": md, "spec": spec}
    _check_placeholders(job, f"kuberay.{role}")
    return job


def render_deployment(infra: Infra, key: str) -> dict:
    """Render ``deployments.<key>`` into an ``apps/v1`` Deployment."""
    d = infra.deployments[key]
    spec = copy.deepcopy(d.spec)
    pod = (spec.get("template") or {}).get("spec")
    if pod is not None:
        _default_pod_template(pod, infra, service_account=True)
    dep = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": d.name, "namespace": infra.namespace, "labels": _labels(infra, f"deployments.{key}", d.labels)},
        "spec": spec,
    }
    _check_placeholders(dep, f"deployments.{key}")
    return dep


def owner_reference(owner: dict) -> dict:
    """A non-controlling ownerReference to ``owner`` (a live object: it needs ``metadata.uid``).

    ``controller: false`` — the Dynamo operator controls the DGD; we only tie its
    lifetime to the training RayCluster, so deleting the cluster garbage-collects the
    DGD and frees the inference GPUs. ``blockOwnerDeletion: false`` — setting it true
    needs ``update`` on ``rayclusters/finalizers`` (OwnerReferencesPermissionEnforcement)
    and only matters for foreground deletion of the cluster; background deletion (the
    default, and what KubeRay does for ``shutdownAfterJobFinishes``) still collects the DGD.
    Raises :class:`ManifestError` when ``owner`` has no uid.
    """
    md = owner.get("metadata") or {}
    if not md.get("uid"):
        raise ManifestError(f"{owner.get('kind')}/{md.get('name')}: no metadata.uid; read the live object first")
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": md["name"],
        "uid": md["uid"],
        "controller": False,
        "blockOwnerDeletion": False,
    }


# --------------------------------------------------------------------------- recipe + driver


def stamp_recipe(recipe: dict, dgds: list[dict], frontend_ports: dict[str, int] | None = None) -> dict:
    """Point the recipe's generation at the DGD when exactly one is declared.

    Writes ``generation.backend: dynamo``, ``generation.dynamo.dgd_name`` and
    ``generation.dynamo.namespace`` (and ``frontend_port`` when not 8000) into a copy of
    ``recipe``; drops a ``frontend_url`` (it would conflict). With zero or several DGDs
    the recipe is returned unchanged (the user picks the endpoint).
    """
    out = copy.deepcopy(recipe or {})
    if len(dgds) != 1:
        if dgds:
            log.warning("%d DGDs declared: the recipe is not stamped; set generation.dynamo.dgd_name yourself", len(dgds))
        return out
    md = dgds[0]["metadata"]
    gen = out.setdefault("generation", {}) or {}
    out["generation"] = gen
    gen["backend"] = "dynamo"
    dyn = gen.setdefault("dynamo", {}) or {}
    gen["dynamo"] = dyn
    if dyn.get("dgd_name") not in (None, md["name"]):
        log.warning("recipe generation.dynamo.dgd_name %r replaced by %r", dyn["dgd_name"], md["name"])
    if dyn.pop("frontend_url", None):
        log.warning("recipe generation.dynamo.frontend_url dropped: the DGD %r is used", md["name"])
    dyn["dgd_name"] = md["name"]
    dyn["namespace"] = md["namespace"]
    port = (frontend_ports or {}).get(md["name"], 8000)
    if port != 8000:
        dyn["frontend_port"] = port
    return out


def driver_entrypoint(recipe: dict, command: str, recipe_path: str, overrides: Iterable[str] = ()) -> str:
    """The shell command the Ray driver runs: write the recipe, then ``exec`` the trainer.

    The recipe travels base64-encoded inside the command (no ConfigMap, no quoting
    issues); ``exec`` makes the trainer's exit code the driver's exit code (no
    ``| tee`` that would hide a failure).
    """
    text = yaml.safe_dump(recipe, sort_keys=False)
    b64 = base64.b64encode(text.encode()).decode()
    parent = recipe_path.rsplit("/", 1)[0] or "/"
    args = " ".join(shlex.quote(o) for o in overrides)
    return (
        f"mkdir -p {shlex.quote(parent)} && echo {b64} | base64 -d > {shlex.quote(recipe_path)} && "
        f"exec {command} {shlex.quote(recipe_path)}" + (f" {args}" if args else "")
    )
