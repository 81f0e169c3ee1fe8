"""What a user writes onto a manifest, and the checks on it: the deep merge of a recipe's
``overrides`` onto a DGD or RayCluster ``spec`` (by name for lists of named objects, as
kubectl's strategic merge), the names an override may use, and the ``${...}`` placeholders
a rendered object must not keep.

Pure functions over dicts. Raise :class:`~dynamo_rl.k8s.errors.ManifestError` naming the
override path or manifest path and the fix. Imports only yaml and ``k8s.errors``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from .errors import ManifestError

_PLACEHOLDER = re.compile(r"\$\{[^}]*\}")


def _named_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in v)


def deep_merge(base: Any, override: Any, path: str = "overrides") -> Any:
    """Return ``base`` with ``override`` merged in (neither is modified).

    Mappings merge key by key, ``None`` in ``override`` deletes the key, scalars and
    plain lists replace. A list of named objects (every item a mapping with a ``name``:
    v1beta1 ``components``, ``containers``, ``env``, ``volumes``, ...) merges **by name**,
    like kubectl's strategic merge: an override item merges onto the item of the same
    name, a new name is appended, and the override may also be a mapping
    ``{<name>: {fields}}`` (``<name>: null`` deletes that item). Raises
    :class:`ManifestError` when a mapping would replace a list/scalar or the reverse
    (almost always a wrong indentation or a wrong key).
    """
    if _named_list(base) and (isinstance(override, dict) or _named_list(override)):
        items = override.items() if isinstance(override, dict) else [(i["name"], i) for i in override]
        out = copy.deepcopy(base)
        for name, v in items:
            idx = next((i for i, item in enumerate(out) if item.get("name") == name), None)
            if v is None:
                if idx is not None:
                    out.pop(idx)
                continue
            if not isinstance(v, dict):
                raise ManifestError(f"{path}.{name}: give a mapping of the fields to change, got {v!r:.60}")
            v = {**v, "name": name}
            if idx is None:
                out.append(copy.deepcopy(v))
            else:
                out[idx] = deep_merge(out[idx], v, f"{path}.{name}")
        return out
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


def check_override_names(spec: dict, overrides: dict, source: str, where: str) -> None:
    """An override of ``services`` (v1alpha1, a mapping) or ``components`` (v1beta1, a list
    of named objects; a list or a ``{name: fields}`` mapping in the override) may only
    name what the manifest declares: a typo would otherwise add a bogus service/component.
    Raises :class:`ManifestError` naming the unknown name, the declared ones and the closest.
    To add a service/component, edit a copy of the manifest (or use an inline ``spec``).
    """
    import difflib

    _check_override_api(spec, overrides or {}, source, where)
    for key, noun in (("services", "service"), ("components", "component")):
        ov = (overrides or {}).get(key)
        if ov is None or key not in spec:
            continue
        base = spec.get(key)
        have = list(base) if isinstance(base, dict) else [i.get("name") for i in base or [] if isinstance(i, dict)]
        if isinstance(ov, dict):
            names = list(ov)
        elif isinstance(ov, list):
            names = [i.get("name") if isinstance(i, dict) else None for i in ov]
            if key == "components" and any(not isinstance(n, str) for n in names):
                raise ManifestError(f"{where}.{key}: every item needs a `name:` (one of {', '.join(map(str, have))}); "
                                    "components merge by name")
        else:
            continue
        for n in names:
            if isinstance(n, str) and n not in have:
                close = difflib.get_close_matches(n, [str(h) for h in have], n=1)
                raise ManifestError(
                    f"no {noun} {n!r} in {source} ({key}: {', '.join(map(str, have))})"
                    + (f"; did you mean {close[0]!r}?" if close else "")
                    + f" (in {where}; to add a {noun}, edit a copy of the manifest)"
                )


def _check_override_api(spec: dict, overrides: dict, source: str, where: str) -> None:
    """``services`` overrides (v1alpha1) on a v1beta1 DGD, or ``components`` overrides on a
    v1alpha1 one: say so, and show the override in the DGD's own API (else the CRD check
    says only "'services' was unexpected")."""
    if "services" in overrides and "components" in spec and "services" not in spec:
        names = overrides["services"] if isinstance(overrides["services"], dict) else {}
        example = {n: {k: v for k, v in (f or {}).items() if k in ("replicas",)} or {"replicas": 2}
                   for n, f in list(names.items())[:2]} or {"<Name>": {"replicas": 2}}
        raise ManifestError(
            f"{where}.services: {source} is a nvidia.com/v1beta1 DGD, whose spec lists `components` (matched by "
            f"name), not v1alpha1 `services`. Write the override as `components`, e.g. {where}: "
            f"{{components: {_flow(example)}}} (per-pod fields go under podTemplate.spec instead of "
            "extraPodSpec; env is `env:`, not `envs:`)")
    if "components" in overrides and "services" in spec and "components" not in spec:
        raise ManifestError(
            f"{where}.components: {source} is a nvidia.com/v1alpha1 DGD, whose spec maps `services` by name, "
            f"not v1beta1 `components`. Write the override as `services`, e.g. {where}: "
            "{services: {<Name>: {replicas: 2}}}")


def _flow(obj) -> str:
    return yaml.safe_dump(obj, default_flow_style=True, sort_keys=False).strip()


#: ``${VAR}``, ``${VAR:-x}``, ``${VAR:0:3}``, ``${#VAR}``: shell expansions, legitimate in container commands.
_SHELL_VAR = re.compile(r"^#?[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?([:]?[-=+?]|:[0-9 ]|[#%/^,]|$)")
_SHELL_KEYS = {"command", "args", "entrypoint"}


def unresolved_placeholders(obj: Any, path: str = "") -> list[str]:
    """Every ``path = 'value'`` of a string in ``obj`` holding an unresolved ``${...}``
    (OmegaConf/nrl-k8s interpolations such as ``${user:}``, ``${oc.env:X}``, ``${a.b}``).
    Inside container ``command``/``args`` and a RayJob ``entrypoint``, shell expansions
    (``${VAR}``, ``${VAR:-default}``) are left alone: the container's shell resolves them."""
    found: list[str] = []

    def bad(text: str, shell: bool) -> bool:
        for m in _PLACEHOLDER.finditer(text):
            if not (shell and _SHELL_VAR.match(m.group(0)[2:-1])):
                return True
        return False

    def walk(node: Any, p: str, shell: bool) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{p}.{k}" if p else str(k), shell or k in _SHELL_KEYS)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{p}[{i}]", shell)
        elif isinstance(node, str) and "${" in node and bad(node, shell):
            found.append(f"{p} = {node!r}")

    walk(obj, path, False)
    return found


DGD_FIX = ("Write the values: a name via the `name:` key, an image via `overrides` (the infra `image` "
            "only fills containers that have none), anything else via `overrides` or the manifest.")


def check_placeholders(obj: dict, source: str, infra_keys: dict[str, str] | None = None,
                        fix: str = DGD_FIX) -> None:
    """Raise :class:`ManifestError` listing every unresolved ``${...}`` of ``obj``.

    ``infra_keys`` maps a manifest path (``metadata.name``) to the infra key it came from
    (``dynamo.serving.name``): such a placeholder is blamed on the infra file, not the manifest.
    ``fix`` ends the message: where the user writes the values for this kind of object.
    """
    found = unresolved_placeholders(obj)
    if not found:
        return
    blamed = []
    for f in found:
        p = f.split(" = ", 1)[0]
        if infra_keys and p in infra_keys:
            blamed.append(f"{infra_keys[p]} (the infra file) = {f.split(' = ', 1)[1]}")
        else:
            blamed.append(f)
    raise ManifestError(
        f"{source}: unresolved placeholder(s), which dynamo-rl does not interpolate:\n  "
        + "\n  ".join(blamed) + "\n" + fix
    )
