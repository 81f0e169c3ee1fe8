"""Rendering of every Kubernetes object the launcher sends: DGDs, RayClusters, RayJobs,
Deployments; owner references; the stamped recipe and the driver entrypoint.

Pure functions over dicts: no API calls, no I/O except reading the DGD manifest file.
Field names follow the Dynamo operator (``nvidia.com/v1alpha1`` ``spec.services``,
``nvidia.com/v1beta1`` ``spec.components``) and KubeRay (``ray.io/v1``) APIs.

Rules (issue 7):
* A DGD file may hold several documents; with several DGDs, ``dynamo.<key>.select``
  must name one. Its ``ConfigMap``/``PersistentVolumeClaim`` documents are companions
  (:func:`render_companions`): applied before the DGD, in the infra namespace, labelled
  and rolled back like it; ConfigMaps are owned like the DGD, PVCs are not. Secrets,
  Pods and other kinds are not applied: ``check``/``render``/``run`` warn, naming them.
* ``image`` is only a default, set where a container has none; ``imagePullSecrets``
  are appended; a DGD's ``serviceAccountName`` is never set (the Dynamo operator wires
  its own); ``serviceAccount`` applies to RayCluster pod templates only, where unset.
* ``overrides`` deep-merge onto ``.spec`` (:mod:`dynamo_rl.k8s.overrides`: mappings merge,
  ``null`` deletes the key, lists of named objects merge by ``name``, other lists and
  scalars replace); an override naming a service/component the manifest lacks is an
  error listing the declared ones.
* Every string of every rendered object is checked for an unresolved ``${...}``
  (shell ``${VAR}`` in container command/args excepted); values that come from the
  infra file (``name:``, ``namespace``, ``labels``) are blamed on the infra key.

Imports only yaml and ``k8s.schema``/``k8s.errors``/``k8s.overrides``.
"""

from __future__ import annotations

import base64
import copy
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ManifestError
from .overrides import check_override_names, check_placeholders, deep_merge
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
    "ConfigMap": "configmaps",
    "PersistentVolumeClaim": "persistentvolumeclaims",
}

#: Companion kinds of a DGD file that the launcher applies with the DGD (see :func:`render_companions`).
COMPANION_KINDS = ("ConfigMap", "PersistentVolumeClaim")

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
        """The API group; ``""`` for core objects (``apiVersion: v1``)."""
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


#: component types that run an engine (v1alpha1 ``componentType``, v1beta1 ``type``)
WORKER_TYPES = ("worker", "decode", "prefill", "main")


def check_serving_graph(manifest: dict, source: str) -> None:
    """A DGD the trainer generates with needs a Frontend and at least one worker.

    Raises :class:`ManifestError` naming the graph, what it lacks and what it declares
    (before any wait: without them the frontend never lists the model)."""
    comps = dgd_components(manifest)
    types = {c["type"] for c in comps}
    missing = []
    if "frontend" not in types:
        missing.append("no Frontend (a service/component of type `frontend`)")
    if not types.intersection(WORKER_TYPES):
        missing.append(f"no worker (type {', '.join(f'`{t}`' for t in WORKER_TYPES[:3])})")
    if missing:
        name = (manifest.get("metadata") or {}).get("name", "?")
        declared = ", ".join(f"{c['name']} ({c['type'] or 'no type'})" for c in comps) or "nothing"
        raise ManifestError(f"{source}: DGD {name} has {' and '.join(missing)}, so its frontend would never "
                            f"serve a model; it declares {declared}. Select a complete graph (`select:`) or add "
                            "them to the manifest")


def _words(container: dict) -> list[str]:
    """A container's command and args as words (one-string shell args split like a shell)."""
    words: list[str] = []
    for part in list(container.get("command") or []) + list(container.get("args") or []):
        try:
            words += shlex.split(str(part))
        except ValueError:
            words += str(part).split()
    return words


def declared_served_name(manifest: dict) -> str | None:
    """The model name a DGD's workers say outright (``--served-model-name X`` or a
    ``SERVED_MODEL_NAME`` env), or None (``--model`` paths are only a guess)."""
    found = None
    for c in _iter_main_containers(manifest):
        words = _words(c)
        if "--served-model-name" in words:
            i = words.index("--served-model-name")
            if i + 1 < len(words) and "$" not in words[i + 1]:
                return words[i + 1]
        for e in c.get("env") or []:
            if e.get("name") == "SERVED_MODEL_NAME" and e.get("value") and "$" not in str(e["value"]):
                found = found or str(e["value"])
    return found


def _labels(infra: Infra, target: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**(extra or {}), **infra.labels, **MANAGED_BY, TARGET_LABEL: target}


def _spec_fix(key: str) -> str:
    return (f"Write the values: a name via `{key}.name`, anything else in `{key}.spec` (the infra "
            "`image` only fills containers that have none).")


def _blame(infra: Infra, name_key: str | None) -> dict[str, str]:
    """Manifest paths whose value comes from the infra file → the infra key to blame."""
    out = {"metadata.namespace": "namespace"}
    if name_key:
        out["metadata.name"] = name_key
    for k in infra.labels:
        out[f"metadata.labels.{k}"] = f"labels.{k}"
    for k in infra.annotations:
        out[f"metadata.annotations.{k}"] = f"annotations.{k}"
    return out


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


def render_companions(infra: Infra, key: str) -> tuple[list[dict], list[str]]:
    """The other documents of ``dynamo.<key>``'s manifest file that the DGD needs.

    ``ConfigMap`` and ``PersistentVolumeClaim`` documents are returned rendered (the infra
    namespace, the launcher labels with target ``dynamo.<key>``, server fields dropped,
    placeholders checked): the launcher applies them before the DGD, rolls them back on
    failure, gives ConfigMaps the DGD's ownerReference (deleted with the training
    cluster) and leaves PVCs unowned (data such as a model cache outlives a run; `down`
    does not delete them). Any other kind (``Secret``: credentials are not shipped with
    a run; ``Pod``, ...) is skipped: returned as a warning naming it and how to apply it.
    Other DGDs of the file (alternatives to ``select``) are ignored. Inline specs have none.
    """
    g = infra.dynamo[key]
    if g.manifest is None:
        return [], []
    path = infra.dgd_path(key)
    out: list[dict] = []
    warnings: list[str] = []
    for doc in load_yaml_documents(path):
        if not isinstance(doc, dict) or doc.get("kind") == DGD_KIND:
            continue
        kind, name = doc.get("kind", "?"), (doc.get("metadata") or {}).get("name", "?")
        if kind in COMPANION_KINDS and doc.get("apiVersion") == "v1":
            m = copy.deepcopy(doc)
            md = m.setdefault("metadata", {})
            for k in ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "ownerReferences"):
                md.pop(k, None)
            m.pop("status", None)
            if md.get("namespace") and md["namespace"] != infra.namespace:
                warnings.append(f"dynamo.{key}: {path.name}'s {kind} {name!r} says metadata.namespace "
                                f"{md['namespace']!r}; it is applied in the infra namespace {infra.namespace!r}")
            md["namespace"] = infra.namespace
            md["labels"] = _labels(infra, f"dynamo.{key}", md.get("labels"))
            check_placeholders(m, f"dynamo.{key} ({path.name}, {kind} {name})", _blame(infra, None))
            out.append(m)
        else:
            why = "Secrets are not applied by dynamo-rl (keep credentials out of run files)" if kind == "Secret" \
                else f"dynamo-rl applies only {' and '.join(COMPANION_KINDS)} documents of a DGD file"
            warnings.append(f"dynamo.{key}: {path.name} also declares {kind} {name!r}, which is NOT applied ({why}); "
                            f"if the DGD needs it, create it first: `kubectl apply -n {infra.namespace} -f <that document>`")
    return out, warnings


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
        words = _words(c)
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


def _check_has_services(spec: Any, what: str) -> None:
    if not isinstance(spec, dict) or not (spec.get("services") or spec.get("components")):
        raise ManifestError(
            f"{what} no services (spec.services, v1alpha1) or components (spec.components, v1beta1); "
            "a DynamoGraphDeployment needs at least a frontend and a worker. Start from a complete one, "
            "e.g. examples/k8s/tiny.dgd.yaml or Dynamo's examples/backends/<backend>/deploy/agg.yaml")


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
        origin = str(g.manifest)
        dgd = select_dgd(load_yaml_documents(path), g.select, source)
    else:
        source = f"dynamo.{key} (inline spec)"
        origin = f"the inline dynamo.{key}.spec"
        spec = g.spec or {}
        api = g.api_version or ("nvidia.com/v1beta1" if "components" in spec else "nvidia.com/v1alpha1")
        dgd = {"apiVersion": api, "kind": DGD_KIND, "metadata": {}, "spec": copy.deepcopy(spec)}
    if dgd.get("apiVersion", "").split("/")[0] != DGD_GROUP:
        raise ManifestError(f"{source}: apiVersion {dgd.get('apiVersion')!r} is not in group {DGD_GROUP}")
    _check_has_services(dgd.get("spec"), f"{source}: the DGD declares")
    check_override_names(dgd.get("spec") or {}, g.overrides, origin, f"dynamo.{key}.overrides")
    dgd["spec"] = deep_merge(dgd.get("spec") or {}, g.overrides, f"dynamo.{key}.overrides")
    _check_has_services(dgd["spec"], f"{source}: after dynamo.{key}.overrides, the DGD has")
    md = dgd.setdefault("metadata", {})
    if g.name:
        md["name"] = g.name
    if not md.get("name"):
        raise ManifestError(f"{source}: the DGD has no metadata.name; set dynamo.{key}.name")
    if md.get("namespace") and md["namespace"] != infra.namespace:
        log.warning("%s: metadata.namespace %r replaced by the infra namespace %r", source, md["namespace"], infra.namespace)
    md["namespace"] = infra.namespace
    md["labels"] = _labels(infra, f"dynamo.{key}", {**(md.get("labels") or {}), **g.labels})
    if infra.annotations or g.annotations:
        md["annotations"] = {**(md.get("annotations") or {}), **infra.annotations, **g.annotations}
    for k in ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"):
        md.pop(k, None)
    dgd.pop("status", None)
    _default_dgd_images(dgd, infra)
    check_placeholders(dgd, source, _blame(infra, f"dynamo.{key}.name" if g.name else None))
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
    check_placeholders(rc, f"kuberay.{role}", _blame(infra, f"kuberay.{role}.name"), _spec_fix(f"kuberay.{role}"))
    return rc


#: ``launch.rayJob`` keys that would break a run, and why.
_RAYJOB_REFUSED = {
    "entrypoint": "dynamo-rl sets it (launch.command + the stamped recipe); change launch.command",
    "clusterSelector": "it runs the job on an existing cluster, but the DGDs must be owned by the "
                       "cluster rendered from kuberay.<role>; use `launch.mode: raycluster` instead",
    "rayClusterSpec": "it comes from kuberay.<role>.spec; edit that",
}


def render_rayjob(infra: Infra, role: str, entrypoint: str) -> dict:
    """Render a ``ray.io/v1`` RayJob running ``entrypoint`` on a new cluster of ``kuberay.<role>``.

    KubeRay names the cluster ``<rayjob>-<random suffix>`` (read it from
    ``.status.rayClusterName``). Defaults: ``submissionMode: K8sJobMode``,
    ``shutdownAfterJobFinishes: true``; ``launch.rayJob`` is deep-merged on top.
    """
    if role not in infra.kuberay:
        raise ManifestError(f"no kuberay.{role} in the infra file (declared: {sorted(infra.kuberay)})")
    r = infra.kuberay[role]
    for key, why in _RAYJOB_REFUSED.items():
        if key in infra.launch.ray_job:
            raise ManifestError(f"launch.rayJob.{key}: not allowed: {why}")
    if infra.launch.ray_job.get("suspend") is True:
        raise ManifestError("launch.rayJob.suspend: true would create the RayJob without its cluster, and the "
                            "run would wait for it until launch.jobTimeoutS; remove it")
    mode = infra.launch.ray_job.get("submissionMode")
    if mode is not None and mode not in ("K8sJobMode", "HTTPMode", "SidecarMode"):
        raise ManifestError(f"launch.rayJob.submissionMode {mode!r}: dynamo-rl needs KubeRay to submit the "
                            "driver itself; use K8sJobMode (the default), HTTPMode or SidecarMode "
                            "(InteractiveMode would wait for a `ray job submit` that never comes)")
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
    check_placeholders(job, f"kuberay.{role}", _blame(infra, f"kuberay.{role}.name"),
                        _spec_fix(f"kuberay.{role}") + " RayJob fields come from `launch.rayJob`.")
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
    check_placeholders(dep, f"deployments.{key}", _blame(infra, f"deployments.{key}.name"), _spec_fix(f"deployments.{key}"))
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
    """Point the recipe's generation at the policy's DGD.

    ``dgds`` is the DGD that serves the policy (one; ``launch.policyGraph`` picks it when the
    infra file declares several, see ``orchestrate.policy_graph``), or none. Writes
    ``generation.backend: dynamo``, ``generation.dynamo.dgd_name`` and
    ``generation.dynamo.namespace`` (and ``frontend_port`` when not 8000) into a copy of
    ``recipe``; drops a ``frontend_url`` (it would conflict). With no DGD the recipe is
    returned unchanged.

    Raises:
        ValueError: several DGDs given (the caller must pick one).
    """
    out = copy.deepcopy(recipe or {})
    if len(dgds) > 1:
        raise ValueError(f"stamp_recipe: {len(dgds)} DGDs given; pass the one that serves the policy")
    if not dgds:
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
