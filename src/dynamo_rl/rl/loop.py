"""The GRPO recipe, top to bottom: generate → reward → train → refit, repeated.

``run_training(recipe)``:
1. build or load the policy (HF checkpoint dir, or the seeded tiny model);
2. start the embedded Dynamo stack (broker + frontend + workers on 127.0.0.1) unless the
   recipe points at a deployment (``generation.dynamo.frontend_url`` / ``dgd_name``);
3. optional supervised warm start, then refit → weights version 1;
4. each step: rollouts through the real frontend (exact engine ids + logprobs + the
   weights version that produced them), rewards, group advantages, ``updates_per_batch``
   clipped-ratio updates, then publish the new weights and refit every worker.
   ``grpo.loop: async`` generates step N+1's rollouts while step N trains; samples older
   than ``max_staleness`` versions are dropped and counted.
5. ``metrics.jsonl``, TensorBoard, ``reward.png``, ``summary.json`` in the run directory.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dynamo_rl.config import Recipe
from dynamo_rl.exitcodes import ExitCode
from dynamo_rl.models import ensure_tiny_model, load_model, load_tokenizer
from dynamo_rl.rl.metrics import MetricsLogger, plot_rewards, summarize
from dynamo_rl.rl.preflight import check_inputs, find_resume
from dynamo_rl.rl.rollouts import collect_rollouts
from dynamo_rl.rl.tasks import Problem, TaskError, load_task, sample_problems
from dynamo_rl.rl.trainer import Trainer

# soft_wrap: a step line stays one line in a log file (no wrapping at 80 columns)
console = Console(highlight=False, soft_wrap=True)
err_console = Console(highlight=False, soft_wrap=True, stderr=True)  # errors: scripts read stderr



class BadInput(ValueError):
    """The recipe is wrong in a way found only once the run had begun (e.g. the deployment's
    model does not match); exits 2 even when raised from code whose other errors exit 1."""


def _run_dir(cfg: Recipe, run_dir: str | None) -> Path:
    if run_dir or cfg.logging.run_dir:
        return Path(run_dir or cfg.logging.run_dir)
    return Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_training(cfg: Recipe, recipe_path: str | None = None, run_dir: str | None = None,
                 resume: str | None = None) -> int:
    """Run the recipe; returns a process exit code (0 ok, 1 failed, 2 bad input, 130 interrupted).

    SIGTERM (``kill``, a pod being deleted) is handled like Ctrl-C: everything this run
    started is stopped, what was measured so far is summarized and the policy is saved.
    ``resume``: a run directory or one of its ``checkpoints/step-N``: the run goes on in that
    directory from the step after the checkpoint (:mod:`dynamo_rl.rl.checkpoint`).
    """
    found = None
    try:
        check_inputs(cfg)
        if resume is not None:
            found = find_resume(cfg, resume, run_dir)
    except (FileNotFoundError, ValueError) as e:
        err_console.print(f"[red]error:[/] {escape(str(e))}")
        return ExitCode.BAD_INPUT
    out = found.run_dir if found is not None else _run_dir(cfg, run_dir)
    created = out  # the topmost directory this run creates, if any
    while not created.parent.exists():
        created = created.parent
    created = None if out.exists() else created
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(cfg.model_dump_json(indent=2))
    except OSError as e:
        key = "--run-dir" if run_dir else "logging.run_dir" if cfg.logging.run_dir else "the run directory"
        err_console.print(f"[red]error:[/] {key} {str(out)!r}: cannot write there ({e.strerror or e}); "
                      "give a directory path that can be created")
        return ExitCode.BAD_INPUT
    code = _run(cfg, out, found)
    # bad input found before training began: leave no run dir (the tiny model's model/ is
    # rebuilt from the recipe; nothing trained is ever removed)
    if code == ExitCode.BAD_INPUT and created is not None and {p.name for p in out.iterdir()} <= {"recipe.json",
                                                                                                  "model"}:
        shutil.rmtree(out, ignore_errors=True)
        parent = out
        while parent != created:  # and the parents it made, while empty (never another run's files)
            parent = parent.parent
            try:
                parent.rmdir()
            except OSError:
                break
        console.print(f"(removed {out}: nothing ran)")
    return code


def _run(cfg: Recipe, out: Path, resume=None) -> int:
    torch.set_num_threads(cfg.policy.num_threads)
    torch.manual_seed(cfg.grpo.seed)
    _quiet_libraries()

    def _sigterm(_signum, frame):
        # handled as Ctrl-C: inside asyncio.run that is the runner's SIGINT handler, which
        # cancels the main task, so that the run's cleanup (its `finally`s, the ExitStack of the
        # stack and the publisher) runs on the event loop. A KeyboardInterrupt raised wherever
        # the signal lands could leave the coroutine to be closed during garbage collection,
        # where that cleanup can deadlock (seen: a server's shutdown() waiting forever).
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)  # the runner's returns (a second one raises); the default raises

    previous = signal.signal(signal.SIGTERM, _sigterm)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job ignores it
    from dynamo_rl.generation import GenerationError
    from dynamo_rl.generation.errors import EndpointConfigError
    from dynamo_rl.refit.errors import RefitError
    from dynamo_rl.rl.agents import AgentError
    from dynamo_rl.serving.stack import StackError

    try:
        return asyncio.run(_train(cfg, out, resume))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; everything this run started has been stopped[/]")
        return ExitCode.INTERRUPTED
    except (BadInput, EndpointConfigError, TaskError) as e:
        err_console.print(f"[red]error:[/] {escape(str(e))}")
        return ExitCode.BAD_INPUT
    except (GenerationError, RefitError, StackError, AgentError) as e:
        # a runtime failure of the stack, the frontend or a refit (RefitError and some
        # GenerationErrors are ValueErrors too: checked before bad input)
        err_console.print(f"[red]{type(e).__name__}:[/] {escape(str(e))}")
        err_console.print(f"partial outputs (if any) are in {out}")
        return ExitCode.FAILURE
    except (FileNotFoundError, ValueError) as e:
        err_console.print(f"[red]error:[/] {escape(str(e))}")
        return ExitCode.BAD_INPUT
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _quiet_libraries() -> None:
    """No per-file progress bars from transformers / safetensors on every checkpoint load."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


async def _train(cfg: Recipe, out: Path, resume=None) -> int:
    from dynamo_rl.generation import DynamoGeneration
    from dynamo_rl.refit.publisher import Publisher

    t_start = time.perf_counter()
    g = cfg.grpo
    if cfg.generation.dynamo.is_remote:
        await _preflight(cfg)
    # 1. policy (the path was checked before anything was started)
    if resume is not None:
        model_dir = resume.policy
    elif cfg.policy.model_path:
        model_dir = Path(cfg.policy.model_path)
    else:
        model_dir = ensure_tiny_model(out / "model", cfg.policy.tiny)
    model = load_model(model_dir, dtype=cfg.policy.dtype, device=cfg.policy.device)
    tokenizer = load_tokenizer(model_dir)
    trainer = Trainer(model, cfg)
    rng = random.Random(g.seed)
    if resume is not None:
        from dynamo_rl.rl.checkpoint import set_aside_after

        resume.optimizer_sha256 = resume.restore(trainer, rng)
        for moved in set_aside_after(out, resume.step):
            console.print(f"kept {moved} (from the run before this resume: never overwritten)")
        console.print(f"resumed from {resume.policy} (step {resume.step}, weights version "
                      f"{resume.state['weights_version']})")

    with ExitStack() as stack:
        dyn = cfg.generation.dynamo
        # 2. inference: a deployment, or the embedded stack
        if dyn.is_remote:
            frontend_url = None
            control_urls = list(cfg.refit.control_urls)
            if not control_urls:   # dgd_name (checked up front): the DGD's pods
                from dynamo_rl.refit.discovery import dgd_pod_resolver

                control_urls = dgd_pod_resolver(dyn.dgd_name, dyn.namespace)
            served = dyn.model
        else:
            from dynamo_rl.serving.stack import LocalStack

            # the same default name as `dynamo-rl serve`: "tiny", or the checkpoint dir's name
            served = dyn.model or (Path(cfg.policy.model_path).name if cfg.policy.model_path else "tiny")
            kinds = cfg.cluster.engines()
            what = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
            console.print(f"[bold]starting the embedded Dynamo stack[/] ({what} worker"
                          f"{'s' if cfg.cluster.workers > 1 else ''}) in {out / 'stack'}")
            local = stack.enter_context(LocalStack(
                model_dir, served_model_name=served, workers=cfg.cluster.workers, run_dir=out / "stack",
                worker_threads=cfg.cluster.worker_threads, device=cfg.cluster.worker_device,
                startup_timeout_s=cfg.cluster.startup_timeout_s, engine=kinds,
                vllm_python=cfg.cluster.vllm_python, dtype=cfg.policy.dtype,
                tool_call_parser=cfg.cluster.tool_call_parser, reasoning_parser=cfg.cluster.reasoning_parser,
                stream_interval=cfg.cluster.stream_interval, engine_cpus=cfg.cluster.engine_cpus))
            frontend_url = local.frontend_url
            control_urls = None
            console.print(f"frontend {frontend_url}; workers " + ", ".join(w.system_url for w in local.workers))
        gen = DynamoGeneration(cfg.generation, frontend_url=frontend_url)
        await gen.__aenter__()
        # one control-plane client for every refit of the run: making an httpx.AsyncClient
        # (its TLS context) costs ~40 ms of CPU, as much as a refit of the tiny model
        control = httpx.AsyncClient(limits=httpx.Limits(max_connections=32))
        try:
            from dynamo_rl.refit.orchestrator import RefitTimeouts, refit_all

            if control_urls is None:
                resolver = local.control_urls
            elif callable(control_urls):
                resolver = control_urls
            else:
                resolver = (lambda: control_urls)
            timeouts = RefitTimeouts(update_s=cfg.refit.timeout_s)
            model_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
            if cfg.refit.transport == "checkpoint":
                source = _checkpoint_source(trainer, out / "refit")
            else:
                host = cfg.refit.publisher_host
                if dyn.dgd_name and host == "127.0.0.1":
                    from dynamo_rl.refit.discovery import pod_ip

                    host = pod_ip()   # the workers reach the trainer's publisher at the pod IP
                publisher = Publisher(host=host, transport=cfg.refit.transport)
                stack.callback(publisher.close)
                source = _publisher_source(trainer, publisher, cfg)

            async def refit(version: int) -> dict:
                """Publish the trainer's weights as ``version`` and refit every worker to it."""
                src = await source(version)
                rep = await refit_all(frontend_url or gen.base_url, resolver, version, src, timeouts=timeouts,
                                      pause_mode=cfg.refit.pause_mode, client=control)
                # a stock worker does not report bytes (Dynamo passes no rpc result back): it
                # loaded the whole model (TP=1), as the trainer counts it
                nbytes = sum(model_bytes if w.bytes is None else w.bytes for w in rep.workers)
                return {"workers": len(rep.workers), "seconds": rep.seconds, "bytes": nbytes}

            try:
                if cfg.task.name != "agent":
                    return await _grpo(cfg, out, trainer, tokenizer, gen, refit, rng, t_start, resume)
                from dynamo_rl.rl.rollout_server import RolloutServer

                async with RolloutServer(gen, tokenizer, sampling=cfg.generation.sampling,
                                         session_timeout_s=cfg.task.session_timeout_s) as server:
                    console.print(f"rollout endpoint for the agent: {server.url} (agent log: {out / 'agent.log'})")
                    return await _grpo(cfg, out, trainer, tokenizer, gen, refit, rng, t_start, resume, server=server)
            except Exception:
                if not dyn.is_remote:
                    local.check()   # a crashed child explains the error better: StackError with its log tail
                raise
        finally:
            await control.aclose()
            await gen.aclose()


def _task_figures(episodes) -> dict:
    """Mean over episodes of every figure the task reports beside the reward (each episode's
    mean over its turns): ``exact_match`` for the built-in tasks, whatever a custom reward
    returns. Without an ``exact_match`` figure, it is the share of episodes with reward 1."""
    names = sorted({k for e in episodes for s in e.scores for k in s if k != "reward"})
    out = {}
    for k in names:
        vals = [sum(s[k] for s in e.scores if k in s) / max(1, sum(k in s for s in e.scores)) for e in episodes]
        out[k] = sum(vals) / len(vals)
    out.setdefault("exact_match", float(sum(e.reward == 1.0 for e in episodes) / len(episodes)))
    return out


def _version_from_barrier(episodes, version: int, *, exact: bool) -> None:
    """Give responses that carried no weights version (Dynamo's stock workers send none) the
    version the refit barrier guarantees: when no refit ran while the batch was generated
    (``exact``; always so in the sync loop), every response came from ``version`` — each
    refit pauses, verifies and resumes every worker before it returns. Otherwise (async
    loop) they keep ``None`` and count as on-policy-unknown (no logprob check)."""
    for e in episodes:
        if None in e.versions and exact:
            e.versions = {v for v in e.versions if v is not None} | {version}
            e.version_from_barrier = True


def _publisher_source(trainer, publisher, cfg: Recipe):
    """``version -> source``: publish the trainer's weights, then the workers pull them
    (``update_weights_from_distributed``)."""
    async def source(version: int) -> dict:
        params = {n: p.detach() for n, p in trainer.model.named_parameters()}
        await asyncio.to_thread(publisher.publish, version, params, naming="hf",
                                model_config=trainer.model.config.to_dict())
        return {"publisher": publisher.url, "transport": cfg.refit.transport, "in_place": cfg.refit.in_place}

    return source


def _checkpoint_source(trainer, root: Path):
    """``version -> source``: write ``<root>/v<version>`` (safetensors), then the workers load it
    (``update_weights_from_disk``). The previous version's directory is removed once the next
    one is written (these are transfer copies, not the run's checkpoints)."""
    from dynamo_rl.models import save_checkpoint

    written: list[Path] = []

    async def source(version: int) -> dict:
        path = root / f"v{version}"
        await asyncio.to_thread(save_checkpoint, trainer.model, path)
        for old in written:
            shutil.rmtree(old, ignore_errors=True)
        written[:] = [path]
        return {"path": str(path.resolve())}

    return source


async def _preflight(cfg: Recipe, deadline_s: float = 5.0) -> None:
    """Fail at once, not after the warm start, when the deployment is unreachable."""
    from dynamo_rl.generation import DynamoGeneration, GenerationError

    probe_cfg = cfg.generation.model_copy(update={"retry_deadline_s": min(deadline_s, cfg.generation.retry_deadline_s),
                                                  "request_timeout_s": deadline_s})
    async with DynamoGeneration(probe_cfg) as probe:
        try:
            name = await probe.model()
        except GenerationError as e:
            raise ValueError(f"generation.dynamo: {e}") from None
    console.print(f"deployment at {probe.base_url} serves {name!r}")
    urls = list(cfg.refit.control_urls)
    if urls:  # every instance the frontend routes to must get the new weights: check it now
        from dynamo_rl.refit.control import RefitTimeouts
        from dynamo_rl.refit.discovery import DiscoveryError, discover_instances

        try:
            await discover_instances(probe.base_url, lambda: urls,
                                     timeouts=RefitTimeouts(health_s=deadline_s, info_s=deadline_s, resolve_grace_s=0.0))
        except DiscoveryError as e:
            why = str(e).removesuffix("; fix the resolver")
            raise ValueError(
                f"refit.control_urls ({len(urls)} given) does not cover the workers the frontend at "
                f"{probe.base_url} routes to: {why}. List every worker's system server (`dynamo-rl serve` "
                "prints a train command with all of them); a worker left out would serve old weights") from None


async def _evaluate(gen, tokenizer, cfg: Recipe, problems: list[Problem]) -> float:
    from dynamo_rl.config import SamplingConfig

    greedy = SamplingConfig(temperature=0.0, max_tokens=cfg.generation.sampling.max_tokens)
    eps = await collect_rollouts(gen, tokenizer, problems, 1, greedy, seed=0, task=load_task(cfg.task))
    return sum(e.reward for e in eps) / len(eps)


async def _grpo(cfg, out, trainer, tokenizer, gen, refit, rng, t_start, resume=None, server=None) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from dynamo_rl.rl.checkpoint import Checkpointer

    g = cfg.grpo
    first = resume.step + 1 if resume is not None else 1
    log = MetricsLogger(out, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                        wandb_project=cfg.logging.wandb_project, config=cfg.model_dump(),
                        keep_until=first - 1 if resume is not None else None)
    extra: dict = dict(resume.state.get("extra", {})) if resume is not None else {}
    if resume is not None:
        extra.update(resumed_from=str(resume.policy), resumed_optimizer_sha256=resume.optimizer_sha256)
        if log.superseded is not None:
            console.print(f"kept {log.superseded} (metrics.jsonl as it was: its steps after {first - 1} are run again)")
    version = 0
    completed = False
    bar = None
    updates = ThreadPoolExecutor(1, thread_name_prefix="grpo-update")   # awaited in `finally`
    ckpt = Checkpointer(out, cfg.checkpoint.every, trainer, tokenizer, rng,
                        start_step=first - 1, start_version=resume.state["weights_version"] if resume else 0,
                        trained=resume is not None, recipe=cfg.model_dump(mode="json"))
    eval_problems = sample_problems(cfg.task, random.Random(10_000 + g.seed), g.eval_prompts) if g.eval_every else []
    agent = None
    figure_names: set[str] = set()   # what the task reports beside the reward (first/last in summary.json)
    agent_clock, backlog = [0.0], [0]   # task.name agent: last collection's time; sessions dropped as backlog
    pending: asyncio.Task | None = None   # the next step's rollouts, generating in the background
    try:
        if resume is None:
            if cfg.policy.warm_start.steps:
                console.print(f"warm start: {cfg.policy.warm_start.steps} supervised steps")
                extra.update(await asyncio.to_thread(trainer.warm_start, tokenizer, rng))
                console.print(f"warm start done in {extra['warm_start_seconds']:.1f}s "
                              f"(loss {extra['warm_start_loss']:.3f})")
                ckpt.updated(0, 1)
            trainer.freeze_reference()
            version = 1
        else:
            version = int(resume.state["weights_version"])
        ckpt.model_version = version
        rep = await refit(version)
        console.print(f"refit → weights version {version} on {rep['workers']} worker{'s' if rep['workers'] != 1 else ''} "
                      f"({rep['seconds']:.2f}s)")
        if g.eval_every and resume is None:
            extra["eval_reward_initial"] = await _evaluate(gen, tokenizer, cfg, eval_problems)
            console.print(f"greedy eval reward before GRPO: {extra['eval_reward_initial']:.3f}")

        refits = [0]   # refit cycles finished so far (a rollout batch that saw none knows its version)

        async def rollouts(step: int):
            nonlocal agent
            t0 = time.perf_counter()
            v0, r0 = version, refits[0]
            if server is not None:   # task.name: agent — the episodes an external agent ended
                from dynamo_rl.rl.agents import ExternalAgent, agent_rollouts

                if agent is None:
                    agent = ExternalAgent(cfg.task.agent_command, url=server.url, group_size=g.samples_per_prompt,
                                          model=await gen.model(), log_path=out / "agent.log")
                    agent.start()
                    agent_clock[0] = time.perf_counter()
                    console.print(f"agent started (pid {agent.proc.pid}): {cfg.task.agent_command}")
                dropped = server.counts["dropped_backlog"]
                eps = await agent_rollouts(server, agent, g.prompts_per_step, g.samples_per_prompt,
                                           cfg.task.agent_timeout_s)
                backlog[0] = server.counts["dropped_backlog"] - dropped
                # the agent plays all along: its throughput is over the time since the last collection
                now = time.perf_counter()
                gen_s, agent_clock[0] = now - agent_clock[0], now
                return eps, gen_s
            problems = sample_problems(cfg.task, rng, g.prompts_per_step)
            eps = await collect_rollouts(gen, tokenizer, problems, g.samples_per_prompt,
                                         cfg.generation.sampling, seed=g.seed * 1_000_003 + step * 1009,
                                         task=load_task(cfg.task))
            _version_from_barrier(eps, v0, exact=refits[0] == r0)
            return eps, time.perf_counter() - t0

        pending = asyncio.create_task(rollouts(first))
        bar = _progress_bar(g.num_steps, done=first - 1)
        for step in range(first, g.num_steps + 1):
            episodes, gen_s = await pending
            if g.loop == "async" and step < g.num_steps:
                pending = asyncio.create_task(rollouts(step + 1))   # overlaps with training below
            rec: dict = {"step": step, "weights_version": version}
            # staleness: versions behind the trainer's current weights
            stale = [version - (e.version if e.version is not None else version) for e in episodes]
            rec["stale_samples"] = sum(1 for s in stale if s > 0)
            rec["unversioned_samples"] = sum(1 for e in episodes if e.version_from_barrier)
            rec["max_staleness_seen"] = max(stale)
            # (an external agent plays through refits: its samples may be stale, as in the async loop)
            rec["version_mismatches"] = sum(1 for s in stale if s != 0) if g.loop == "sync" and server is None else 0
            keep_groups = []
            G = g.samples_per_prompt
            for i in range(0, len(episodes), G):
                grp = episodes[i:i + G]
                if all(s <= g.max_staleness for s in stale[i:i + G]):
                    keep_groups += grp
            rec["dropped_samples"] = len(episodes) - len(keep_groups) + backlog[0]
            backlog[0] = 0
            rewards = torch.tensor([e.reward for e in episodes])
            rec["reward_mean"], rec["reward_std"] = float(rewards.mean()), float(rewards.std())
            figures = _task_figures(episodes)
            figure_names.update(figures)
            rec.update(figures)
            ntok = sum(e.gen_tokens for e in episodes)
            rec["gen_tokens"] = ntok
            rec["gen_seconds"] = gen_s
            rec["gen_tokens_per_s"] = ntok / gen_s if gen_s > 0 else None
            if keep_groups:
                update = updates.submit(trainer.step, keep_groups, tokenizer.pad_token_id, version)
                # (in the update's thread: also when this coroutine is cancelled meanwhile)
                update.add_done_callback(lambda f, s=step, v=version + 1: f.cancelled() or f.exception()
                                         or ckpt.updated(s, v))
                rec.update(await asyncio.wrap_future(update))
            else:
                ckpt.updated(step, version + 1)
            version += 1
            rep = await refit(version)
            refits[0] += 1
            rec["weights_version"] = version
            rec["refit_seconds"] = rep["seconds"]
            rec["refit_bytes"] = rep["bytes"]
            rec["refit_gb_per_s"] = rep["bytes"] / rep["seconds"] / 1e9 if rep["seconds"] > 0 else None
            if g.loop == "sync" and step < g.num_steps:
                pending = asyncio.create_task(rollouts(step + 1))
            if g.eval_every and (step % g.eval_every == 0 or step == g.num_steps):
                rec["eval_reward"] = await _evaluate(gen, tokenizer, cfg, eval_problems)
            rec["elapsed_seconds"] = time.perf_counter() - t_start
            log.log(rec)
            _print_step(rec, g.num_steps)
            bar.advance(rec)
            if (saved := ckpt.step_done(step, extra)) is not None:
                console.print(f"checkpoint: {saved.policy}")
        completed = True
    except BaseException as exc:   # named in summary.json, then handled by the caller as before
        extra["stopped_by"] = ("interrupted" if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError))
                               else f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        if bar is not None:
            bar.close()
        await _discard(pending)
        # an update still running (Ctrl-C during a step) finishes first: the policy saved
        # below is never half-updated
        updates.shutdown(wait=True)
        if agent is not None:
            agent.stop()
        try:
            saved = ckpt.final(extra)
        except Exception as e:  # noqa: BLE001 - never hide the run's own error behind this one
            err_console.print(f"[red]could not save the policy:[/] {type(e).__name__}: {escape(str(e))}")
            saved = None
        if saved is not None:
            extra["checkpoint"] = str(saved.policy)
        log.close()
        # also on Ctrl-C / SIGTERM / a failure: what was measured so far is summarized
        summary = summarize(log.records, figures=sorted(figure_names), wall_seconds=time.perf_counter() - t_start,
                            loop=g.loop,
                            generation_gpus=0, completed=completed, **extra)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if log.records:
            try:
                plot_rewards(log.records, out / "reward.png", title=f"{cfg.name}: {cfg.task.name}",
                             initial_eval=extra.get("eval_reward_initial"))
            except ImportError as e:   # a minimal install (e.g. a GPU image): the figures are in metrics.jsonl
                console.print(f"[yellow]reward.png not drawn:[/] {e}")
    _print_summary(summary, out)
    return ExitCode.OK


async def _discard(task: asyncio.Task | None, grace_s: float = 5.0) -> None:
    """Cancel the next step's rollouts when the run ends before it awaits them (a failure
    in training, refit or eval). Their own error, a consequence of the one being reported
    (e.g. the frontend stopped with a crashed stack), is retrieved and dropped here, so asyncio
    does not print it as "Task exception was never retrieved" when the run exits."""
    if task is None:
        return
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=grace_s)
    if task.done() and not task.cancelled():
        task.exception()


class _progress_bar:
    """A live bar under the step lines (terminals only): steps done, ETA, last reward."""

    def __init__(self, total: int, done: int = 0):
        self._p = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("GRPO"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                               TextColumn("{task.fields[info]}"), console=console, transient=True)
            self._task = self._p.add_task("grpo", total=total, completed=done, info="")
            self._p.start()

    def advance(self, rec: dict) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=1, info=f"reward {rec['reward_mean']:.3f}  v{rec['weights_version']}")

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def _print_step(r: dict, n: int) -> None:
    ev = f" eval {r['eval_reward']:.3f}" if "eval_reward" in r else ""
    loss = f"{r['loss']:+.4f}" if "loss" in r else "n/a (all samples dropped)"
    mae = f"{r['logprob_mae']:.1e}" if "logprob_mae" in r else "n/a"
    console.print(
        f"step {r['step']:>4}/{n}  reward {r['reward_mean']:.3f}±{r['reward_std']:.2f}{ev}  "
        + (f"success {100 * r['success']:.1f}%  " if "success" in r else
           f"exact {100 * r.get('exact_match', 0.0):.1f}%  ")
        + f"loss {loss}  |Δlogp| {mae}  "
        f"gen {r['gen_tokens_per_s'] or 0:,.0f} tok/s  train {r.get('train_seconds', 0):.2f}s  "
        f"refit {r['refit_seconds']:.2f}s  v{r['weights_version']}"
        + (f"  stale {r['stale_samples']}" if r["stale_samples"] else ""))


def _print_summary(s: dict, out: Path) -> None:
    t = Table(title="dynamo-rl run summary", show_header=False)
    t.add_column(overflow="fold")
    t.add_column(overflow="fold")   # paths and hashes are never cut (a log file is 80 columns wide)
    for k, v in s.items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(t)
    extra = "".join(f", {name}" for name, there in (("model/", (out / "model").is_dir()),
                                                    ("stack/logs/", (out / "stack" / "logs").is_dir())) if there)
    console.print(f"outputs in [bold]{out}[/]: metrics.jsonl, summary.json, reward.png, tensorboard/, "
                  f"recipe.json, checkpoints/, trainer_state/{extra}")
    if s.get("checkpoint"):
        console.print(f"the trained policy: [bold]{s['checkpoint']}[/] (serve it: dynamo-rl serve --model-path "
                      f"{s['checkpoint']}; go on to N steps: dynamo-rl train {out / 'recipe.json'} --resume {out} "
                      "grpo.num_steps=N)")
