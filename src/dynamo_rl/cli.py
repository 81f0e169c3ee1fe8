"""``dynamo-rl``: the command line. A thin shell: every command calls one library function.

Commands: ``train`` (GRPO), ``serve`` (the embedded Dynamo stack), ``k8s ...`` (DGD +
KubeRay launcher).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dynamo_rl.exitcodes import HELP as EXIT_CODES
from dynamo_rl.exitcodes import ExitCode

app = typer.Typer(
    name="dynamo-rl",
    help="GRPO post-training with rollouts served by an NVIDIA Dynamo inference graph.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        import importlib.metadata as md

        def of(dist: str) -> str:
            try:
                return md.version(dist)
            except md.PackageNotFoundError:
                return "not installed"

        typer.echo(f"dynamo-rl {of('dynamo-rl')} (ai-dynamo {of('ai-dynamo')}, torch {of('torch')})")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the versions of dynamo-rl, Dynamo and torch, and exit")]
          = False) -> None:
    """GRPO post-training with rollouts served by an NVIDIA Dynamo inference graph."""


@app.command(context_settings={"ignore_unknown_options": True}, epilog=EXIT_CODES)
def train(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="recipe YAML, e.g. examples/grpo_tiny.yaml", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="OVERRIDES",
        help="dotted overrides, section.key=value (e.g. grpo.num_steps=20)", show_default=False)] = None,
    run_dir: Annotated[Optional[str], typer.Option(metavar="DIR", help="output directory (default runs/<name>-<time>)")] = None,
    resume: Annotated[Optional[str], typer.Option(metavar="PATH",
        help="go on from a checkpoint: a run directory (its latest) or its checkpoints/step-N; the run continues "
             "in that directory (weights, optimizer, step, RNG and weights version restored; metrics append) up to "
             "grpo.num_steps")] = None,
) -> None:
    """Run GRPO on RECIPE, with OVERRIDES applied in order.

    Starts the embedded Dynamo stack (frontend + workers on 127.0.0.1) unless the recipe
    sets generation.dynamo.frontend_url or generation.dynamo.dgd_name. An override is
    section.key=value (value parsed as YAML); a leading + (Hydra habit) is accepted.
    Outputs in the run directory: metrics.jsonl, summary.json, reward.png, tensorboard/,
    recipe.json (the recipe as run), checkpoints/step-N/ (the policy, a Hugging Face checkpoint: serve it with
    `dynamo-rl serve --model-path`), trainer_state/step-N/ (for --resume), stack/logs/ (the embedded stack's logs).
    """
    from dynamo_rl.config import ConfigError, load_recipe
    from dynamo_rl.rl.loop import run_training

    try:
        cfg = load_recipe(recipe, list(overrides or []))
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    code = run_training(cfg, recipe_path=recipe, run_dir=run_dir, resume=resume)
    raise typer.Exit(code)


def _mount_subcommands() -> None:
    try:
        from dynamo_rl.serving.cli import serve
    except ImportError:  # pragma: no cover - module not built yet
        pass
    else:
        app.command(epilog=EXIT_CODES, short_help="Serve a model: the Dynamo frontend and N workers on 127.0.0.1.")(serve)
    try:
        from dynamo_rl.k8s.cli import app as k8s_app
    except ImportError:  # pragma: no cover
        pass
    else:
        app.add_typer(k8s_app, name="k8s", short_help="Kubernetes: DGD + KubeRay RayCluster/RayJob launcher.",
                      help="Kubernetes: DGD + KubeRay RayCluster/RayJob launcher. -v goes before the subcommand "
                           "(dynamo-rl k8s -v up INFRA) and logs every API call.",
                      epilog=EXIT_CODES + " `k8s run --wait` exits with the driver's code.")


_mount_subcommands()

if __name__ == "__main__":
    app()
