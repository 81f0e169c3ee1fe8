"""Validation of rendered manifests against the real CRDs' ``openAPIV3Schema``.

Owns: finding the CRD files, picking the schema of a manifest's ``apiVersion``, and
reporting every violation with its path. Uses ``jsonschema`` on the schema the
API server itself enforces, tightened the way a strict server (``fieldValidation=Strict``,
kubectl's default) treats unknown fields: an object schema that declares ``properties``
and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields`` rejects
other keys (so a typo in an override fails here instead of being pruned silently).
OpenAPI ``nullable: true`` becomes a ``null`` type, and a ``required`` field that has a
schema ``default`` is not required (the API server fills defaults before validating).

CRD directory, first that exists: the ``crd_dir`` argument → ``$DYNAMO_RL_CRD_DIR`` →
``../shared/crds`` beside a source checkout (development) → the copy shipped in this
package (``dynamo_rl/k8s/crds``; Apache-2.0, see LICENSE.* and PROVENANCE.txt there).

Imports only jsonschema, yaml and ``k8s.errors``.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import SchemaValidationError

PACKAGED_CRD_DIR = Path(__file__).resolve().parent / "crds"
DEV_CRD_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "crds"

#: (group, kind) → CRD file name (KubeRay / Dynamo operator naming: <group>_<plural>.yaml).
CRD_FILES: dict[tuple[str, str], str] = {
    ("nvidia.com", "DynamoGraphDeployment"): "nvidia.com_dynamographdeployments.yaml",
    ("ray.io", "RayCluster"): "ray.io_rayclusters.yaml",
    ("ray.io", "RayJob"): "ray.io_rayjobs.yaml",
}

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def crd_dir(explicit: str | Path | None = None) -> Path:
    """The directory CRD files are read from (see the module docstring for the order)."""
    for cand in (explicit, os.environ.get("DYNAMO_RL_CRD_DIR"), DEV_CRD_DIR):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return PACKAGED_CRD_DIR


@functools.lru_cache(maxsize=16)
def _load_crd(path: str) -> dict:
    with open(path, "rb") as f:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        return yaml.load(f, Loader=loader)


def _tighten(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _tighten(v) for k, v in node.items()}
        props = out.get("properties")
        if isinstance(out.get("required"), list) and isinstance(props, dict):
            # the API server applies schema defaults before validating: a defaulted field is never missing
            out["required"] = [r for r in out["required"] if not (isinstance(props.get(r), dict) and "default" in props[r])]
            if not out["required"]:
                del out["required"]
        if out.get("nullable") is True and "type" in out:
            out["type"] = [out["type"], "null"]
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_tighten(v) for v in node]
    return node


@functools.lru_cache(maxsize=16)
def _validator(path: str, version: str) -> jsonschema.protocols.Validator:
    crd = _load_crd(path)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = _tighten(v["schema"]["openAPIV3Schema"])  # _tighten builds a new tree
            return jsonschema.Draft7Validator(schema)
    names = [v["name"] for v in crd["spec"]["versions"]]
    raise SchemaValidationError(f"{path}: the CRD has no version {version!r} (it serves {names})")


def crd_path(group: str, kind: str, directory: str | Path | None = None) -> Path:
    """Path of the CRD file for ``group``/``kind``. Raises :class:`SchemaValidationError` when unknown/absent."""
    name = CRD_FILES.get((group, kind))
    if name is None:
        raise SchemaValidationError(f"no CRD known for kind {kind!r} in group {group!r}")
    p = crd_dir(directory) / name
    if not p.is_file():
        raise SchemaValidationError(f"CRD file {p} is missing; set DYNAMO_RL_CRD_DIR to a directory holding {name}")
    return p


def crd_versions(group: str, kind: str, directory: str | Path | None = None) -> list[str]:
    """The versions a CRD file serves, e.g. ``['v1alpha1', 'v1beta1']`` for the newest DGD CRD."""
    crd = _load_crd(str(crd_path(group, kind, directory)))
    return [v["name"] for v in crd["spec"]["versions"] if v.get("served", True)]


def _fmt_path(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def schema_errors(manifest: dict, directory: str | Path | None = None) -> list[str]:
    """Every violation of ``manifest`` against its CRD schema, as ``"path: message"`` strings.

    Also checks ``metadata.name`` is an RFC 1123 subdomain (the API server does; the CRD
    schema leaves metadata open). An empty list means valid.
    """
    api_version = manifest.get("apiVersion", "")
    kind = manifest.get("kind", "")
    if "/" not in api_version:
        return [f"apiVersion: {api_version!r} is not <group>/<version>"]
    group, version = api_version.split("/", 1)
    validator = _validator(str(crd_path(group, kind, directory)), version)
    errors = [
        f"{_fmt_path(e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    ]
    name = (manifest.get("metadata") or {}).get("name")
    if not name:
        if not (manifest.get("metadata") or {}).get("generateName"):
            errors.append("metadata.name: required")
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        errors.append(
            f"metadata.name: {name!r} is not a valid Kubernetes name (lowercase letters, digits, '-' and '.')"
        )
    return errors


def validate_manifest(manifest: dict, *, source: str = "", directory: str | Path | None = None) -> None:
    """Raise :class:`SchemaValidationError` listing every violation of ``manifest`` against its CRD.

    ``source`` (e.g. ``"dynamo.serving (dgd/agg.yaml + overrides)"``) is named in the message.
    """
    errors = schema_errors(manifest, directory)
    if errors:
        kind = manifest.get("kind", "?")
        name = (manifest.get("metadata") or {}).get("name", "?")
        where = f" from {source}" if source else ""
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise SchemaValidationError(
            f"{kind} {name!r}{where} does not validate against the {manifest.get('apiVersion')} CRD schema:\n  "
            + "\n  ".join(shown)
            + "\nFix the manifest or the overrides at those paths.",
            errors,
        )
