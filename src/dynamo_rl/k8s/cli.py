"""``dynamo-rl k8s``: the command-line shell over ``orchestrate`` and ``status``.

Each command parses options, calls one library function, and prints (rich tables for
humans, plain YAML for ``render``/``--dry-run`` so it pipes into ``kubectl apply -f -``).
No logic lives here. Exit codes: 0 ok, 1 a launch/cluster failure, 2 a bad input
(infra file, manifest, CRD schema), or the driver's exit code for ``run``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dynamo_rl.exitcodes import HELP as EXIT_CODES

from . import orchestrate
from .errors import (
    CRDMissingError,
    InfraConfigError,
    K8sError,
    KubeApiError,
    ManifestError,
    SchemaValidationError,
)
from .manifests import dgd_api, dgd_components
from .schema import Infra, check_namespace, load_infra

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Kubernetes launcher: DynamoGraphDeployment (inference) + KubeRay RayCluster/RayJob (training).")
console = Console(stderr=True)

InfraArg = Annotated[Path, typer.Argument(metavar="INFRA", help="infra YAML (see examples/k8s/infra.yaml)")]
NamespaceOpt = Annotated[Optional[str], typer.Option("--namespace", "-n", metavar="NAMESPACE", help="override the infra file's namespace")]
KubeconfigOpt = Annotated[Optional[str], typer.Option(metavar="FILE", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")]
ContextOpt = Annotated[Optional[str], typer.Option(metavar="NAME", help="kubeconfig context")]
TargetOpt = Annotated[Optional[list[str]], typer.Option("--target", "-t", metavar="TARGET", help="dynamo.<key>, kuberay.<role> or deployments.<key> (repeatable; default all)")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print every manifest as YAML and send nothing")]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="wait until every object is provisioned/ready")]
DownWaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="wait until every deleted object is gone")]
RunWaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="follow the driver to its end and exit with its exit code")]
RecreateOpt = Annotated[bool, typer.Option("--recreate", help="delete and recreate objects that exist")]
PollOpt = Annotated[float, typer.Option(metavar="SECONDS", help="poll interval of every wait, seconds")]


def _fail(e: Exception, code: int) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


def _code(e: K8sError) -> int:
    return 2 if isinstance(e, (InfraConfigError, ManifestError, SchemaValidationError)) else 1


def _infra(path: Path, namespace: str | None) -> Infra:
    infra = load_infra(path)
    if namespace is None:
        return infra
    try:
        check_namespace(namespace)
    except ValueError as e:
        raise InfraConfigError(f"--namespace: {e}") from None
    return infra.model_copy(update={"namespace": namespace})


def _progress(msg: str) -> None:
    console.print(f"[cyan]•[/cyan] {msg}", highlight=False, soft_wrap=True)


def _warn(plan: orchestrate.Plan) -> None:
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)


def _print_yaml(docs: list[dict], note: str | None = None) -> None:
    if note:
        typer.echo(f"# {note}")
    typer.echo(yaml.safe_dump_all(docs, sort_keys=False), nl=False)


def _comment(text: str) -> str:
    return "\n".join(f"# {line}".rstrip() for line in text.rstrip("\n").splitlines())


def _mode(raycluster: bool, rayjob: bool, infra: Infra) -> str:
    if raycluster and rayjob:
        raise typer.BadParameter("give at most one of --raycluster / --rayjob")
    return "raycluster" if raycluster else "rayjob" if rayjob else infra.launch.mode


def _kube(kubeconfig: str | None, context: str | None):
    from .api import Kube

    return Kube.connect(kubeconfig, context)


@app.command(short_help='Validate every manifest against the CRDs and probe the cluster.', epilog=EXIT_CODES)
def check(
    infra_file: InfraArg,
    recipe: Annotated[Optional[Path], typer.Option(metavar="FILE", help="recipe YAML, to render the RayJob entrypoint with it")] = None,
    offline: Annotated[bool, typer.Option(help="render and validate only; do not contact the cluster")] = False,
    namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
) -> None:
    """Render and validate everything against the CRD schemas, probe the CRDs, print a summary."""
    try:
        infra = _infra(infra_file, namespace)
        try:
            kube = None if offline else _kube(kubeconfig, context)
        except KubeApiError as e:
            raise KubeApiError(f"{e}; or run `dynamo-rl k8s check --offline` to render and validate without a cluster",
                               e.status) from None
        rep = orchestrate.check(kube, infra, recipe=orchestrate.load_recipe_dict(recipe) if recipe else None,
                                recipe_source=str(recipe or "recipe"))
    except CRDMissingError as e:
        raise _fail(e, 1) from None
    except K8sError as e:
        raise _fail(e, _code(e)) from None

    report = Console()  # the report on stdout (`> file` keeps it); warnings and errors on stderr
    roles = Table(title=f"KubeRay roles (namespace {infra.namespace}, launch.mode {infra.launch.mode}, launch.role {infra.launch.role})")
    for col in ("role", "RayCluster", "head image", "worker groups"):
        roles.add_column(col, overflow="fold")
    for role, m in rep.plan.rayclusters.items():
        head = m["spec"].get("headGroupSpec", {}).get("template", {}).get("spec", {}).get("containers", [{}])[0]
        groups = ", ".join(f"{g.get('groupName')}×{g.get('replicas', 1)}" for g in m["spec"].get("workerGroupSpecs") or []) or "none"
        roles.add_row(role, m["metadata"]["name"], head.get("image", ""), groups)
    report.print(roles)
    dgds = Table(title="Dynamo graphs")
    for col in ("key", "DGD", "api", "service", "type", "replicas", "image"):
        dgds.add_column(col, overflow="fold")
    for key, m in rep.plan.dgds.items():
        for i, c in enumerate(dgd_components(m)):
            dgds.add_row(key if i == 0 else "", m["metadata"]["name"] if i == 0 else "", dgd_api(m) if i == 0 else "",
                         c["name"], c["type"], str(c["replicas"]), c["image"])
    report.print(dgds)
    for key, m in rep.plan.deployments.items():
        report.print(f"deployments.{key}: Deployment/{m['metadata']['name']} ×{m['spec'].get('replicas', 1)} "
                      "(apps/v1: no CRD here, the API server validates it)", highlight=False)
    for key, comps in rep.plan.companions.items():
        report.print(f"dynamo.{key} also applies, before its DGD: "
                      + ", ".join(f"{m['kind']}/{m['metadata']['name']}" for m in comps), highlight=False)
    t = Table(title="Readiness and timeouts (seconds)")
    for col in ("what", "value"):
        t.add_column(col, overflow="fold")
    for key in rep.plan.dgds:
        g = infra.dynamo[key]
        t.add_row(f"dynamo.{key}", f"model {rep.plan.served_model(key) or '(any)'}, port {g.frontend_port}, readyTimeoutS {g.ready_timeout_s:g}")
    lc = infra.launch
    t.add_row("launch", f"clusterReadyTimeoutS {lc.cluster_ready_timeout_s:g}, submissionGraceS {lc.submission_grace_s:g}, jobTimeoutS {lc.job_timeout_s:g}")
    for crd, state in rep.crds.items():
        t.add_row(f"CRD {crd}", state)
    report.print(t)
    for w in rep.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    report.print("[green]ok[/green]: every custom resource validates against its CRD schema" + ("" if offline else "; CRDs installed"))


@app.command(short_help='Print every manifest as YAML.', epilog=EXIT_CODES)
def render(
    infra_file: InfraArg,
    recipe: Annotated[Optional[Path], typer.Option(metavar="FILE", help="recipe YAML (run mode: stamped into the entrypoint)")] = None,
    raycluster: Annotated[bool, typer.Option("--raycluster", help="render `run --raycluster`")] = False,
    rayjob: Annotated[bool, typer.Option("--rayjob", help="render `run --rayjob`")] = False,
    target: TargetOpt = None, namespace: NamespaceOpt = None,
) -> None:
    """Print every manifest as YAML (validated against the CRDs). Without --raycluster/--rayjob: what `up` sends."""
    try:
        infra = _infra(infra_file, namespace)
        mode = ("raycluster" if raycluster else "rayjob") if (raycluster or rayjob) else None
        if raycluster and rayjob:
            raise typer.BadParameter("give at most one of --raycluster / --rayjob")
        plan = orchestrate.render_plan(infra, mode=mode, targets=target,
                                       recipe=orchestrate.load_recipe_dict(recipe) if recipe else None,
                                       recipe_source=str(recipe or "recipe"))
    except K8sError as e:
        raise _fail(e, _code(e)) from None
    _warn(plan)
    _print_yaml(plan.manifests(), _owner_note(plan))


def _owner_note(plan: orchestrate.Plan) -> str | None:
    if plan.dgds and plan.mode != "rayjob" and infra_role_name(plan):
        return (f"the DGDs get an ownerReference to RayCluster {infra_role_name(plan)} at apply time "
                "(its uid is known only then)")
    if plan.dgds and plan.mode == "rayjob":
        return "after the RayJob's cluster exists, the DGDs get an ownerReference to it (KubeRay names it <rayjob>-<suffix>)"
    return None


def infra_role_name(plan: orchestrate.Plan) -> str | None:
    r = plan.infra.kuberay.get(plan.infra.launch.role)
    return r.name if r else None


@app.command(short_help='Create the RayClusters, then the DGDs; wait until ready.', epilog=EXIT_CODES)
def up(
    infra_file: InfraArg, target: TargetOpt = None, recreate: RecreateOpt = False, dry_run: DryRunOpt = False,
    wait: WaitOpt = True, poll_s: PollOpt = 5.0,
    namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
) -> None:
    """Create the RayClusters, then the DGDs (owned by the training cluster), and wait until ready.
    On failure, deletes what it created."""
    try:
        infra = _infra(infra_file, namespace)
        if dry_run:
            plan = orchestrate.render_plan(infra, targets=target)
            _warn(plan)
            _print_yaml(plan.manifests(), _owner_note(plan))
            return
        orchestrate.up(_kube(kubeconfig, context), infra, targets=target, recreate=recreate, wait=wait,
                       timing=orchestrate.Timing(poll_s=poll_s), progress=_progress)
    except K8sError as e:
        raise _fail(e, _code(e)) from None
    console.print("[green]up[/green]")


@app.command(short_help='Delete the DGDs, then the RayJobs/RayClusters.', epilog=EXIT_CODES)
def down(
    infra_file: InfraArg, target: TargetOpt = None, dry_run: DryRunOpt = False, wait: DownWaitOpt = True,
    poll_s: PollOpt = 5.0, namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
) -> None:
    """Delete the DGDs, then the RayJobs/RayClusters (absent ones are skipped)."""
    try:
        infra = _infra(infra_file, namespace)
        if dry_run:
            plan = orchestrate.render_plan(infra, targets=target, validate=False)
            _print_yaml([{"apiVersion": m["apiVersion"], "kind": m["kind"], "metadata": {"name": m["metadata"]["name"],
                          "namespace": m["metadata"]["namespace"]}} for m in [*plan.deployments.values(), *plan.dgds.values(),
                          *(c for cs in plan.companions.values() for c in cs if c["kind"] == "ConfigMap"),
                          *plan.rayclusters.values()]],
                        "would delete (and any RayJob of the same name as a role's cluster)")
            return
        deleted = orchestrate.down(_kube(kubeconfig, context), infra, targets=target, wait=wait,
                                   timing=orchestrate.Timing(poll_s=poll_s), progress=_progress)
    except K8sError as e:
        raise _fail(e, _code(e)) from None
    console.print(f"[green]down[/green]: {len(deleted)} object(s) deleted")


@app.command(context_settings={"ignore_unknown_options": True}, epilog=EXIT_CODES + " With --wait: the driver's code.",
             short_help="Bring up inference, wait until it serves, start the trainer.")
def run(
    infra_file: InfraArg,
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="training recipe YAML", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="OVERRIDES",
        help="the recipe's dotted overrides, section.key=value (e.g. grpo.num_steps=20)", show_default=False)] = None,
    raycluster: Annotated[bool, typer.Option("--raycluster", help="RayCluster first, DGDs owned by it, driver via the dashboard")] = False,
    rayjob: Annotated[bool, typer.Option("--rayjob", help="DGDs first, then a RayJob; its cluster then owns the DGDs")] = False,
    recreate: RecreateOpt = False, dry_run: DryRunOpt = False, wait: RunWaitOpt = True, poll_s: PollOpt = 5.0,
    namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
) -> None:
    """Bring up inference, wait until it serves, start the trainer (`dynamo-rl train <recipe>`).

    Mode: --rayjob or --raycluster; with neither, the infra file's launch.mode (default:
    rayjob). The recipe and the extra arguments (dotted overrides, e.g. grpo.num_steps=20)
    are validated like `dynamo-rl train` before anything is sent.

    Exits with the driver's exit code when waiting. Rolls back what it created on any
    failure before the driver starts. An existing RayJob of the same name is reused
    (use --recreate to start a new one).
    """
    try:
        infra = _infra(infra_file, namespace)
        mode = _mode(raycluster, rayjob, infra)
        if dry_run:
            plan = orchestrate.render_plan(infra, mode=mode, recipe=orchestrate.load_recipe_dict(recipe),
                                           recipe_overrides=list(overrides or []), recipe_source=str(recipe))
            docs = plan.manifests()
            _warn(plan)
            _print_yaml(docs, _owner_note(plan))
            # comment lines only: the output stays one `kubectl apply -f -` stream
            head = ("the recipe the trainer runs: stamped, with the command-line overrides applied "
                    f"({' '.join(overrides or [])}; they are passed on the trainer's command line, after the stamped file)"
                    if overrides else "the stamped recipe the trainer runs")
            typer.echo(_comment(head + ":\n" + yaml.safe_dump(plan.effective_recipe, sort_keys=False)))
            if mode == "raycluster":
                typer.echo(_comment(f"driver entrypoint, submitted through the Ray dashboard:\n{plan.entrypoint}"))
            return
        result = orchestrate.run(_kube(kubeconfig, context), infra, recipe, mode=mode, recipe_overrides=list(overrides or []),
                                 recreate=recreate, wait=wait, timing=orchestrate.Timing(poll_s=poll_s),
                                 progress=_progress)
    except K8sError as e:
        raise _fail(e, _code(e)) from None
    if result.outcome is None:
        console.print(f"[green]started[/green] ({result.mode}) on RayCluster {result.cluster}, job {result.job_id}")
        return
    color = "green" if result.outcome.succeeded else "red"
    console.print(f"[{color}]driver {'succeeded' if result.outcome.succeeded else 'failed'}[/{color}]: {result.outcome.summary}",
                  highlight=False)
    raise typer.Exit(result.exit_code)


@app.command(short_help='Show the DGDs, RayClusters and RayJobs.', epilog=EXIT_CODES)
def status(
    infra_file: InfraArg, namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
) -> None:
    """Show the DGDs, RayClusters and RayJobs of the infra file (a RayJob's suffixed cluster included)."""
    from .status import collect_status

    try:
        infra = _infra(infra_file, namespace)
        rows = collect_status(_kube(kubeconfig, context), infra)
    except K8sError as e:
        raise _fail(e, _code(e)) from None
    t = Table(title=f"namespace {infra.namespace}")
    for col in ("target", "kind", "name", "status"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r.target, r.kind, r.name, r.summary if r.exists else f"[dim]{r.summary}[/dim]")
    Console().print(t)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log API activity")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
