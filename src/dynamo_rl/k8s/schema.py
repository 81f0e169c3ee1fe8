"""Infra schema: what to run on Kubernetes (pydantic, ``extra="forbid"``).

Owns the shape of the *infra* YAML file (not the training recipe): the namespace and
defaults, the KubeRay roles (``kuberay.<role>`` → a RayClusterSpec), plain Kubernetes
``deployments``, the Dynamo graphs (``dynamo.<key>`` → a DGD manifest file or inline
spec, an optional name override and ``overrides`` deep-merged onto ``.spec``), and how
the trainer is launched. Keys are camelCase like the Kubernetes objects they feed and
like the ``nrl-k8s`` infra files this format descends from.

Merge order of a DGD (applied by ``manifests.render_dgd``): the manifest file (or
inline ``spec``) → ``overrides`` deep-merged onto ``.spec`` → name override →
namespace/labels → ``image`` only where a container has none → ``imagePullSecrets``.

Keys that ``nrl-k8s`` knows but this launcher does not (``submit``, ``scheduler``,
``workspace``, ...) are rejected by name with a hint; top-level keys starting with ``_``
(YAML-anchor holders such as ``_shared``) are ignored. No ``${...}`` interpolation is
done: a placeholder left in a name or image is an error at render time.

Imports only pydantic, yaml and ``k8s.errors``.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InfraConfigError

#: nrl-k8s infra keys with no equivalent here, and what to do instead.
NRL_ONLY_KEYS: dict[str, str] = {
    "submit": "dynamo-rl submits through the RayJob operator or the Ray dashboard; remove it",
    "scheduler": "put schedulerName/annotations into kuberay.<role>.spec pod templates",
    "placement": "put nodeSelector/tolerations into the pod templates",
    "networking": "put NCCL/Gloo env vars into the pod templates",
    "workspace": "mount volumes in the pod templates",
    "hf_cache": "mount volumes in the pod templates",
    "checkpoints": "mount volumes in the pod templates",
    "resources": "set resources in the pod templates",
    "infra": "this file is the infra block itself: move the keys under `infra:` to the top level",
}


#: nrl-k8s keys inside a section (``*`` = any role name), and what to do instead.
NRL_ONLY_NESTED: dict[str, str] = {
    "launch.entrypoint": "dynamo-rl starts the trainer itself with `launch.command` (default `dynamo-rl train`) "
                         "and the stamped recipe path; put setup steps into the image",
    "launch.runMode": "`dynamo-rl k8s run` submits and follows the driver (--no-wait to return at once); remove it",
    "launch.codeSource": "the trainer's code comes from the image (`image`); remove it",
    "launch.codePath": "the trainer's code comes from the image (`image`); remove it",
    "launch.attach": "dynamo-rl creates the RayCluster of `kuberay.<role>` itself; remove it",
    "launch.peerWatcher": "the DGDs' lifetime is tied to the RayCluster by an ownerReference instead; remove it",
    "kuberay.*.segmentSize": "a KAI scheduler topology setting: put it into the pod templates of "
                             "kuberay.<role>.spec (annotations), or drop it",
}


def _nrl_hint(loc: str) -> str | None:
    for pattern, hint in NRL_ONLY_NESTED.items():
        if fnmatch.fnmatchcase(loc, pattern):
            return hint
    return None


#: An RFC 1123 label, what Kubernetes requires of a namespace name.
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """``labels`` if every key and value is valid Kubernetes label syntax, else ValueError
    naming the first bad one (key: ``[prefix/]name``, prefix a DNS subdomain, name and value
    at most 63 characters of ``[A-Za-z0-9-_.]``, starting and ending alphanumeric). A
    ``${...}`` is left to the placeholder check at render time."""
    for key, value in labels.items():
        if "${" in key or (isinstance(value, str) and "${" in value):
            continue  # an unresolved placeholder: rendering reports it, blamed on its infra key
        prefix, _, name = key.rpartition("/")
        if not name or not _LABEL_NAME.fullmatch(name) or (prefix and not _DNS_SUBDOMAIN.fullmatch(prefix)):
            raise ValueError(f"label key {key!r} is not valid: an optional DNS-subdomain prefix and '/', then a "
                             "name of at most 63 letters, digits, '-', '_' or '.', starting and ending with a "
                             "letter or digit")
        if not isinstance(value, str) or not _LABEL_NAME.fullmatch(value):
            raise ValueError(f"label {key}={value!r}: the value must be at most 63 letters, digits, '-', '_' or '.', "
                             "starting and ending with a letter or digit (or empty)")
    return labels


def check_namespace(name: str) -> str:
    """``name`` if it is a valid namespace name (an RFC 1123 label), else ValueError saying why."""
    if not DNS_LABEL.fullmatch(name):
        raise ValueError(f"{name!r} is not a Kubernetes namespace name (RFC 1123 label: at most 63 lowercase "
                         "letters, digits or '-', starting and ending with a letter or digit)")
    return name


#: ``labels`` mappings, checked with :func:`check_labels`.
Labels = Annotated[dict[str, str], AfterValidator(check_labels)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RayClusterRole(_Model):
    """One KubeRay role: a RayCluster named ``name`` with ``spec`` (a ray.io/v1 RayClusterSpec)."""

    name: str
    labels: Labels = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    spec: dict[str, Any]


class DeploymentSpec(_Model):
    """A plain ``apps/v1`` Deployment (e.g. a sandbox/tool server). Applied right after the
    DGDs with the same ownerReference to the training RayCluster; it must have all
    ``spec.replicas`` available (bounded by ``launch.clusterReadyTimeoutS``) before the
    trainer starts. No Service is created for it (declare one yourself if needed)."""

    name: str
    labels: Labels = Field(default_factory=dict)
    spec: dict[str, Any]


class DynamoGraphSpec(_Model):
    """One DynamoGraphDeployment.

    Exactly one of ``manifest`` (a YAML file, path relative to the infra file; may hold
    several documents) or ``spec`` (an inline DGD ``.spec``) is required.
    ``select`` names the DGD to take from a file holding several. ``name`` overrides
    ``metadata.name``; ``labels`` and ``annotations`` are added to the DGD's metadata
    (over the file's; on a clash, infra-wide labels win and this DGD's annotations win, as
    for ``kuberay.<role>``). ``overrides`` is deep-merged onto ``.spec`` (mappings merge,
    ``null`` deletes, lists of named objects such as v1beta1 ``components`` merge by
    ``name`` — a list or a ``{name: fields}`` mapping — other lists and scalars replace;
    naming a service/component the manifest lacks is an error). The file's ConfigMaps
    and PVCs are applied with the DGD (see ``manifests.render_companions``). ``servedModelName`` is the model the
    frontend must list before the graph counts as ready (guessed from the manifest's
    ``--served-model-name``/``--model`` args or ``SERVED_MODEL_NAME`` env when unset).
    ``readyTimeoutS`` bounds the readiness wait, in seconds.
    """

    manifest: str | None = None
    spec: dict[str, Any] | None = None
    api_version: str | None = Field(None, alias="apiVersion")
    select: str | None = None
    name: str | None = None
    labels: Labels = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    overrides: dict[str, Any] = Field(default_factory=dict)
    served_model_name: str | None = Field(None, alias="servedModelName")
    frontend_port: int = Field(8000, alias="frontendPort", gt=0, lt=65536)
    ready_timeout_s: float = Field(900.0, alias="readyTimeoutS", gt=0)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.manifest is None) == (self.spec is None):
            raise ValueError("set exactly one of `manifest` (a DGD YAML file) or `spec` (an inline DGD spec)")
        if self.api_version is not None and self.spec is None:
            raise ValueError("`apiVersion` only applies to an inline `spec`; a manifest file carries its own")
        return self


class LaunchSpec(_Model):
    """How the trainer starts.

    ``mode``: ``raycluster`` (cluster first, then DGDs owned by it, driver submitted
    through the Ray dashboard) or ``rayjob`` (DGDs first, then a RayJob whose cluster
    becomes the DGDs' owner). ``role`` is the ``kuberay`` role that trains.
    ``command`` is the trainer command; the (stamped) recipe path is appended.
    ``recipePath`` is where the recipe is written inside the head pod. ``rayJob`` is
    deep-merged onto the rendered RayJob ``.spec`` (KubeRay field names, e.g.
    ``ttlSecondsAfterFinished``). ``submissionGraceS``: seconds after
    ``RayClusterProvisioned`` before the driver is submitted through the dashboard
    when the operator has not done it. ``clusterReadyTimeoutS``, ``jobTimeoutS``:
    bounds in seconds. ``policyGraph``: the ``dynamo.<key>`` whose frontend serves the
    policy (rollouts and refits); needed when the file declares several DGDs.
    """

    mode: Literal["raycluster", "rayjob"] = "rayjob"
    role: str = "training"
    policy_graph: str | None = Field(None, alias="policyGraph")
    command: str = "dynamo-rl train"
    recipe_path: str = Field("/tmp/dynamo-rl/recipe.yaml", alias="recipePath")
    env: dict[str, str] = Field(default_factory=dict)
    ray_job: dict[str, Any] = Field(default_factory=dict, alias="rayJob")
    submission_grace_s: float = Field(120.0, alias="submissionGraceS", ge=0)
    cluster_ready_timeout_s: float = Field(900.0, alias="clusterReadyTimeoutS", gt=0)
    job_timeout_s: float = Field(7 * 24 * 3600.0, alias="jobTimeoutS", gt=0)


class Infra(_Model):
    """The whole infra file. ``base_dir`` (not a YAML key) resolves relative manifest paths."""

    namespace: str = "default"
    image: str | None = None
    image_pull_secrets: list[str] = Field(default_factory=list, alias="imagePullSecrets")
    service_account: str | None = Field(None, alias="serviceAccount")
    labels: Labels = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    kuberay: dict[str, RayClusterRole] = Field(default_factory=dict)
    deployments: dict[str, DeploymentSpec] = Field(default_factory=dict)
    dynamo: dict[str, DynamoGraphSpec] = Field(default_factory=dict)
    launch: LaunchSpec = Field(default_factory=LaunchSpec)
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @field_validator("namespace")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        return check_namespace(v)

    @model_validator(mode="after")
    def _policy_graph_declared(self):
        pg = self.launch.policy_graph
        if pg is not None and pg not in self.dynamo:
            raise ValueError(f"launch.policyGraph is {pg!r} but the file declares no dynamo.{pg} "
                             f"(dynamo keys: {', '.join(self.dynamo) or 'none'})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _drop_none_roles(cls, data: Any) -> Any:
        # nrl-k8s writes unset roles as `training: null`; treat them as absent.
        if isinstance(data, dict):
            for section in ("kuberay", "deployments", "dynamo"):
                if isinstance(data.get(section), dict):
                    data[section] = {k: v for k, v in data[section].items() if v is not None}
        return data

    def dgd_path(self, key: str) -> Path:
        """Absolute path of ``dynamo.<key>.manifest`` (relative paths resolve against ``base_dir``)."""
        spec = self.dynamo[key]
        assert spec.manifest is not None
        p = Path(spec.manifest)
        return p if p.is_absolute() else self.base_dir / p


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<top level>"


def parse_infra(data: Any, *, source: str = "<infra>", base_dir: Path | None = None) -> Infra:
    """Validate an already-loaded infra mapping.

    Raises :class:`InfraConfigError` naming every bad key (``source: key.path: problem``)
    — unknown keys (with a hint for nrl-k8s-only ones), wrong types, missing fields.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InfraConfigError(f"{source}: the infra file must be a mapping at the top level, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if not str(k).startswith("_")}
    problems: list[str] = []
    for key, hint in NRL_ONLY_KEYS.items():
        if key in data:
            problems.append(f"{key}: an nrl-k8s setting with no equivalent in dynamo-rl ({hint})")
            data.pop(key)
    launch = data.get("launch")
    if isinstance(launch, dict) and "mode" in launch and launch["mode"] not in ("raycluster", "rayjob"):
        problems.append(
            f"launch.mode: {launch['mode']!r} is not a dynamo-rl mode; use `raycluster` or `rayjob`"
        )
    if base_dir is not None:
        data["base_dir"] = base_dir
    try:
        infra = Infra.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            loc = _loc(err["loc"])
            if loc.startswith("launch.mode") and any(p.startswith("launch.mode") for p in problems):
                continue
            hint = _nrl_hint(loc) if err["type"] == "extra_forbidden" else None
            if hint:
                problems.append(f"{loc}: an nrl-k8s setting with no equivalent in dynamo-rl ({hint})")
            elif err["type"] == "extra_forbidden":
                problems.append(f"{loc}: unknown key (check the spelling; examples/k8s/infra.yaml and examples/k8s/README.md show the allowed keys)")
            else:
                problems.append(f"{loc}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r:.80})")
        infra = None
    if problems:
        raise InfraConfigError(f"{source}: invalid infra file:\n  " + "\n  ".join(problems))
    assert infra is not None
    return infra


def load_infra(path: str | Path) -> Infra:
    """Load and validate an infra YAML file; manifest paths resolve relative to its directory.

    Raises :class:`InfraConfigError` when the file is missing, is not YAML, or fails the schema.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InfraConfigError(f"{p}: cannot read the infra file ({e.strerror}); give an infra YAML, e.g. "
                               "examples/k8s/infra.yaml") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InfraConfigError(f"{p}: not valid YAML: {e}") from None
    return parse_infra(data, source=str(p), base_dir=p.resolve().parent)
