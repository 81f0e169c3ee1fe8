"""What a ``dynamo-rl k8s`` command would send: the plan, rendered and validated before
anything reaches the cluster.

:func:`render_plan` renders the targeted RayClusters (or the RayJob), DGDs, their companion
documents and Deployments from the infra file, validates every object against the real
CRD schemas, and (``run``, or when a recipe is given) stamps the recipe and validates it
exactly as ``dynamo-rl train`` would (:func:`validate_recipe`). All problems of all objects
are reported at once (:class:`ManifestError`, :class:`RecipeError`: exit 2). Nothing here
talks to a cluster; the flows that apply a plan are :mod:`dynamo_rl.k8s.orchestrate`.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import ManifestError, RecipeError
from .manifests import (
    check_serving_graph,
    declared_served_name,
    driver_entrypoint,
    guess_served_model,
    render_companions,
    render_deployment,
    render_dgd,
    render_raycluster,
    render_rayjob,
    stamp_recipe,
)
from .schema import Infra
from .validate import validate_manifest

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything one command would send, rendered and validated against the CRDs.

    ``rayclusters``/``dgds``/``deployments`` map ``role``/``key`` → manifest; ``rayjob`` is
    set in RayJob mode; ``recipe`` is the stamped recipe (the file written in the head
    pod), ``effective_recipe`` the same with the command-line overrides applied (what the
    trainer runs: the overrides are passed on its command line) and ``entrypoint`` the
    driver's shell command (``run`` only).
    """

    infra: Infra
    mode: str | None
    rayclusters: dict[str, dict] = field(default_factory=dict)
    dgds: dict[str, dict] = field(default_factory=dict)
    deployments: dict[str, dict] = field(default_factory=dict)
    companions: dict[str, list[dict]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    rayjob: dict | None = None
    recipe: dict | None = None
    effective_recipe: dict | None = None
    entrypoint: str | None = None

    def manifests(self) -> list[dict]:
        """In the order they are applied (each DGD right after its file's companions)."""
        graphs = [m for k, dgd in self.dgds.items() for m in [*self.companions.get(k, []), dgd]]
        if self.mode == "rayjob":
            return [*graphs, *self.deployments.values(), *([self.rayjob] if self.rayjob else [])]
        return [*self.rayclusters.values(), *graphs, *self.deployments.values()]

    def served_model(self, key: str) -> str | None:
        g = self.infra.dynamo[key]
        return g.served_model_name or guess_served_model(self.dgds[key])


def parse_targets(infra: Infra, targets: Iterable[str] | None) -> tuple[list[str], list[str], list[str]]:
    """``["kuberay.<role>", "dynamo.<key>", "deployments.<key>"]`` → (roles, dgd keys, deployment keys).
    None/empty → everything. Raises :class:`ManifestError` on an unknown target.
    """
    targets = list(targets or [])
    if not targets:
        return list(infra.kuberay), list(infra.dynamo), list(infra.deployments)
    sections = {"kuberay": infra.kuberay, "dynamo": infra.dynamo, "deployments": infra.deployments}
    picked: dict[str, list[str]] = {k: [] for k in sections}
    for t in targets:
        section, _, name = t.partition(".")
        if section in sections and name in sections[section]:
            picked[section].append(name)
        else:
            known = [f"{s}.{n}" for s, d in sections.items() for n in d]
            raise ManifestError(f"unknown target {t!r}; the infra file declares {known}")
    return picked["kuberay"], picked["dynamo"], picked["deployments"]


def validate_recipe(stamped: dict, overrides: Iterable[str], source: str) -> dict:
    """The stamped recipe with ``overrides`` applied, validated exactly as ``dynamo-rl train``
    does (``dynamo_rl.config``: ``apply_overrides`` then the ``Recipe`` schema, same messages).
    Returns the effective recipe as a mapping. Raises :class:`RecipeError`."""
    from pydantic import ValidationError

    from dynamo_rl.config import ConfigError, Recipe, apply_overrides
    from dynamo_rl.config.loader import format_validation_error, override_keys

    overrides = list(overrides)
    dgd_name = ((stamped.get("generation") or {}).get("dynamo") or {}).get("dgd_name")
    if dgd_name:
        for o in overrides:
            key = o.lstrip("+").split("=", 1)[0].strip()
            if key == "generation.dynamo.frontend_url":
                raise RecipeError(
                    f"{o!r}: `k8s run` points the trainer at DGD {dgd_name} itself (it sets "
                    f"generation.dynamo.dgd_name), so a frontend_url would conflict; drop this override")
    try:
        data = apply_overrides(stamped, overrides, source)
        Recipe.model_validate(data)
    except ConfigError as e:
        raise RecipeError(str(e)) from None
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, source, overridden=override_keys(overrides))) from None
    return data


def policy_graph(infra: Infra) -> str | None:
    """The ``dynamo.<key>`` that serves the policy: ``launch.policyGraph``, else the only
    DGD, else None when there is none.

    Raises:
        ManifestError: several DGDs and no ``launch.policyGraph`` (the message lists the keys
            and shows the line to add).
    """
    if infra.launch.policy_graph is not None:
        return infra.launch.policy_graph
    keys = list(infra.dynamo)
    if len(keys) > 1:
        raise ManifestError(
            f"the infra file declares {len(keys)} DGDs ({', '.join(f'dynamo.{k}' for k in keys)}) and does not say "
            f"which one serves the policy the trainer generates with and refits; add it under launch, e.g.\n"
            f"  launch:\n    policyGraph: {keys[0]}")
    return keys[0] if keys else None


def _graph_problem(infra: Infra, key: str, dgd: dict) -> str | None:
    """What makes ``dynamo.<key>`` unable to serve (no frontend / worker, or a
    ``servedModelName`` the workers' own args contradict), or None."""
    try:
        check_serving_graph(dgd, f"dynamo.{key}")
    except ManifestError as e:
        return str(e)
    declared = infra.dynamo[key].served_model_name
    said = declared_served_name(dgd)
    if declared is not None and said is not None and declared != said:
        return (f"dynamo.{key}.servedModelName is {declared!r} but the DGD's workers serve {said!r} "
                f"(--served-model-name / SERVED_MODEL_NAME); make them the same, or readiness would wait for a "
                f"model that never appears")
    return None


def _check_served_model(plan: Plan, effective: dict, source: str) -> None:
    """The recipe's ``generation.dynamo.model`` must be the model the policy's DGD serves."""
    key = policy_graph(plan.infra)
    if key is None or key not in plan.dgds:
        return
    want = ((effective.get("generation") or {}).get("dynamo") or {}).get("model")
    declared = plan.infra.dynamo[key].served_model_name
    if want is None:
        return
    if declared is not None and want != declared:
        raise RecipeError(
            f"{source}: generation.dynamo.model is {want!r} but dynamo.{key}.servedModelName (the model "
            f"DGD {plan.dgds[key]['metadata']['name']} serves) is {declared!r}; make them the same"
        )
    guessed = plan.served_model(key)
    if declared is None and guessed is not None and want != guessed:
        log.warning("%s: generation.dynamo.model %r differs from the model dynamo.%s appears to serve (%r, "
                    "guessed from its args); set dynamo.%s.servedModelName to be sure", source, want, key, guessed, key)


def render_plan(infra: Infra, *, mode: str | None = None, targets: Iterable[str] | None = None,
                recipe: dict | None = None, recipe_overrides: Iterable[str] = (), validate: bool = True,
                recipe_source: str = "recipe") -> Plan:
    """Render (and by default validate against the CRDs) what a command would send.
    (``deployments`` are core ``apps/v1`` objects: no CRD, the API server validates them.)

    ``mode`` None (``up``/``render``): a RayCluster per targeted role. ``raycluster``/``rayjob``
    (``run``): only ``launch.role``, as a RayCluster or as a RayJob whose entrypoint runs
    the stamped ``recipe``. In run mode (or whenever a ``recipe`` is given) the stamped
    recipe plus ``recipe_overrides`` is validated first, as ``dynamo-rl train`` would
    (``recipe_source`` names it in messages), and its ``generation.dynamo.model`` must match
    the single DGD's ``servedModelName``. Raises :class:`RecipeError`,
    :class:`ManifestError`, :class:`SchemaValidationError`.
    """
    roles, keys, deps = parse_targets(infra, targets)
    plan = Plan(infra, mode)
    errors: list[str] = []  # every object's problems at once, not one object per attempt

    def attempt(render, *args):
        try:
            return render(infra, *args)
        except ManifestError as e:
            errors.append(str(e))
            return None

    for key in keys:
        if (dgd := attempt(render_dgd, key)) is not None:
            plan.dgds[key] = dgd
            problem = _graph_problem(infra, key, dgd)
            if problem:
                errors.append(problem)
        comps, warns = attempt(render_companions, key) or ([], [])
        if comps:
            plan.companions[key] = comps
        plan.warnings += warns
    for key in deps:
        if (dep := attempt(render_deployment, key)) is not None:
            plan.deployments[key] = dep
    if mode is None:
        for role in roles:
            if (rc := attempt(render_raycluster, role)) is not None:
                plan.rayclusters[role] = rc
    elif infra.launch.role in infra.kuberay:  # its problems now, with the others'
        if (rc := attempt(render_raycluster, infra.launch.role)) is not None and mode == "raycluster":
            plan.rayclusters[infra.launch.role] = rc
    if errors:
        raise ManifestError("\n".join(errors))
    if mode is not None or recipe is not None:
        key = policy_graph(infra)
        policy = [plan.dgds[key]] if key in plan.dgds else []
        plan.recipe = stamp_recipe(recipe or {}, policy,
                                   {m["metadata"]["name"]: infra.dynamo[k].frontend_port for k, m in plan.dgds.items()})
        plan.effective_recipe = validate_recipe(plan.recipe, recipe_overrides, recipe_source)
        _check_served_model(plan, plan.effective_recipe, recipe_source)
    if mode is not None:
        role = infra.launch.role
        if role not in infra.kuberay:
            raise ManifestError(f"launch.role is {role!r} but the infra file has no kuberay.{role}")
        assert plan.recipe is not None
        plan.entrypoint = _entrypoint(infra, plan.recipe, recipe_overrides)
        if mode == "rayjob":
            plan.rayjob = render_rayjob(infra, role, plan.entrypoint)
    if validate:
        for role, m in plan.rayclusters.items():
            validate_manifest(m, source=f"kuberay.{role}")
        for key, m in plan.dgds.items():
            g = infra.dynamo[key]
            validate_manifest(m, source=f"dynamo.{key} ({g.manifest or 'inline spec'}{' + overrides' if g.overrides else ''})")
        if plan.rayjob is not None:
            validate_manifest(plan.rayjob, source=f"kuberay.{infra.launch.role} as a RayJob (+ launch.rayJob)")
    return plan


def _entrypoint(infra: Infra, recipe: dict, overrides: Iterable[str]) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in infra.launch.env.items())
    cmd = f"env {env} {infra.launch.command}" if env else infra.launch.command
    return driver_entrypoint(recipe, cmd, infra.launch.recipe_path, overrides)


def load_recipe_dict(path: str | Path) -> dict:
    """The recipe YAML as a plain mapping (stamping edits it as a dict), read by
    ``dynamo_rl.config.load_yaml`` (same messages as ``dynamo-rl train``). Raises :class:`RecipeError`."""
    from dynamo_rl.config import ConfigError, load_yaml

    try:
        return load_yaml(path)
    except ConfigError as e:
        raise RecipeError(str(e)) from None
