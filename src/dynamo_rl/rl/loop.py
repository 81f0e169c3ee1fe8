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
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dynamo_rl.config import Recipe
from dynamo_rl.generation import Conversation
from dynamo_rl.models import ensure_tiny_model, load_model, load_tokenizer
from dynamo_rl.rl.grpo import group_advantages, grpo_loss, logprob_mismatch, token_logprobs
from dynamo_rl.rl.metrics import MetricsLogger, plot_rewards, summarize
from dynamo_rl.rl.tasks import Problem, sample_problems, supervised_example, turn_reward

# soft_wrap: a step line stays one line in a log file (no wrapping at 80 columns)
console = Console(highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- rollouts
@dataclass
class Episode:
    """One trajectory: the full token sequence and, aligned with it, what the engine said."""

    problem_index: int
    ids: list[int] = field(default_factory=list)        # prompt(s) + generation(s), verbatim
    mask: list[int] = field(default_factory=list)       # 1 on generated tokens
    engine_logp: list[float] = field(default_factory=list)  # engine logprob at generated positions, 0 elsewhere
    versions: set = field(default_factory=set)          # weights versions that produced its tokens
    rewards: list[float] = field(default_factory=list)  # one per turn
    finish_reasons: list[str] = field(default_factory=list)
    gen_tokens: int = 0

    @property
    def reward(self) -> float:
        return sum(self.rewards) / len(self.rewards) if self.rewards else 0.0

    @property
    def version(self) -> int | None:
        """Oldest weights version among its tokens (None if the server did not say)."""
        vs = [v for v in self.versions if v is not None]
        return min(vs) if vs else None


async def collect_rollouts(gen, tokenizer, problems: list[Problem], group: int, sampling, seed: int) -> list[Episode]:
    """Generate ``group`` episodes per problem through the frontend, turn by turn.

    Each episode is a :class:`~dynamo_rl.generation.Conversation` on the completion route:
    turn N+1's prompt is turn N's prompt + generation ids verbatim plus the tokens of only
    the new user message, checked for contiguity against what the engine saw.
    Returns episodes ordered problem-major (the ``group`` samples of a problem are contiguous).
    """
    convs = [Conversation(gen, tokenizer=tokenizer) for _ in problems for _ in range(group)]
    episodes = [Episode(problem_index=pi) for pi in range(len(problems)) for _ in range(group)]

    async def turn(i: int, t: int) -> None:
        ep, turns = episodes[i], problems[episodes[i].problem_index].turns
        if t >= len(turns):
            return
        s = await convs[i].step([{"role": "user", "content": turns[t].user}], sampling=sampling,
                                seed=seed + 7919 * t + i)
        new_prompt = s.prompt_token_ids.tolist()[len(ep.ids):]
        gen_ids = s.generation_token_ids.tolist()
        ep.ids += new_prompt + gen_ids
        ep.mask += [0] * len(new_prompt) + [1] * len(gen_ids)
        ep.engine_logp += [0.0] * len(new_prompt) + s.generation_logprobs.tolist()
        ep.versions.add(s.weights_version)
        ep.finish_reasons.append(s.finish_reason)
        ep.gen_tokens += len(gen_ids)
        text = tokenizer.decode([t for t in gen_ids if t != tokenizer.eos_token_id], skip_special_tokens=True)
        ep.rewards.append(turn_reward(text.strip(), turns[t].target))

    for t in range(max(len(p.turns) for p in problems)):
        await asyncio.gather(*(turn(i, t) for i in range(len(episodes))))
    return episodes


def _batch(episodes: list[Episode], pad_id: int):
    """Right-padded ``input_ids`` int64 [B,T], ``attention_mask`` [B,T], ``loss_mask`` f32, ``engine_logp`` f32."""
    T = max(len(e.ids) for e in episodes)
    B = len(episodes)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    elp = torch.zeros((B, T), dtype=torch.float32)
    for i, e in enumerate(episodes):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(e.mask, dtype=torch.float32)
        elp[i, :n] = torch.tensor(e.engine_logp, dtype=torch.float32)
    return ids, attn, mask, elp


# --------------------------------------------------------------------------- training
class Trainer:
    """The policy, its optimizer and (optionally) a frozen reference for the KL term."""

    def __init__(self, model, cfg: Recipe):
        self.model = model
        self.cfg = cfg
        o = cfg.policy.optimizer
        self.opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.ref = None

    def freeze_reference(self) -> None:
        if self.cfg.grpo.kl_coef > 0:
            import copy

            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)

    def warm_start(self, tokenizer, rng: random.Random) -> dict:
        """Supervised steps on reference answers (loss on answer tokens only)."""
        ws = self.cfg.policy.warm_start
        opt = torch.optim.AdamW(self.model.parameters(), lr=ws.lr)
        self.model.train()
        t0, loss = time.perf_counter(), float("nan")
        for _ in range(ws.steps):
            exs = [supervised_example(tokenizer, p) for p in sample_problems(self.cfg.task, rng, ws.batch_size)]
            eps = [Episode(0, ids=i, mask=m, engine_logp=[0.0] * len(i)) for i, m in exs]
            ids, attn, mask, _ = _batch(eps, tokenizer.pad_token_id)
            logp = token_logprobs(self.model, ids, attn)
            l = -(logp * mask).sum() / mask.sum()
            l.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = l.item()
        return {"warm_start_steps": ws.steps, "warm_start_loss": loss, "warm_start_seconds": time.perf_counter() - t0}

    def step(self, episodes: list[Episode], pad_id: int, current_version: int) -> dict:
        """One GRPO update on a batch of complete groups. Returns metrics."""
        g = self.cfg.grpo
        ids, attn, mask, elp = _batch(episodes, pad_id)
        rewards = torch.tensor([e.reward for e in episodes])
        adv = group_advantages(rewards, g.samples_per_prompt)
        self.model.train()
        t0 = time.perf_counter()
        with torch.no_grad():
            tlp = token_logprobs(self.model, ids, attn)
            on_policy = torch.tensor([float(e.version == current_version) for e in episodes])[:, None]
            mm = logprob_mismatch(tlp, elp, mask * on_policy) if on_policy.any() else {}
            ref = token_logprobs(self.ref, ids, attn) if self.ref is not None else None
        stats = {}
        for _ in range(g.updates_per_batch):
            logp = token_logprobs(self.model, ids, attn)
            out = grpo_loss(logp, elp, adv, mask, g.clip_eps, ref, g.kl_coef)
            out.loss.backward()
            clip = self.cfg.policy.optimizer.grad_clip
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else float("inf"))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            stats = {"loss": out.loss.item(), "kl": out.kl, "clip_fraction": out.clip_fraction,
                     "ratio_mean": out.ratio_mean, "grad_norm": float(gn)}
        stats.update(mm)
        stats["train_seconds"] = time.perf_counter() - t0
        return stats


# --------------------------------------------------------------------------- main
def _run_dir(cfg: Recipe, run_dir: str | None) -> Path:
    if run_dir or cfg.logging.run_dir:
        return Path(run_dir or cfg.logging.run_dir)
    return Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _check_model_path(cfg: Recipe) -> None:
    """Fail before anything is created or started when ``policy.model_path`` is unusable."""
    if not cfg.policy.model_path:
        return
    p = Path(cfg.policy.model_path)
    if not p.exists():
        raise FileNotFoundError(f"policy.model_path {str(p)!r} does not exist; fix the path, or drop "
                                "policy.model_path to train the tiny model")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"policy.model_path {str(p)!r} is not a Hugging Face checkpoint directory "
                                "(no config.json); point it at a directory written by save_pretrained")


def run_training(cfg: Recipe, recipe_path: str | None = None, run_dir: str | None = None) -> int:
    """Run the recipe; returns a process exit code (0 ok, 1 failed, 2 bad input, 130 interrupted).

    SIGTERM (``kill``, a pod being deleted) is handled like Ctrl-C: everything this run
    started is stopped and what was measured so far is summarized.
    """
    try:
        _check_model_path(cfg)
    except FileNotFoundError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    out = _run_dir(cfg, run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(cfg.model_dump_json(indent=2))
    torch.set_num_threads(cfg.policy.num_threads)
    torch.manual_seed(cfg.grpo.seed)
    _quiet_libraries()

    def _sigterm(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return asyncio.run(_train(cfg, out))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; everything this run started has been stopped[/]")
        return 130
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    except Exception as e:  # a failure of the stack, the frontend or a refit: say what, then exit 1
        from dynamo_rl.generation import GenerationError
        from dynamo_rl.refit.errors import RefitError
        from dynamo_rl.serving.stack import StackError

        if not isinstance(e, (GenerationError, RefitError, StackError)):
            raise
        console.print(f"[red]{type(e).__name__}:[/] {e}")
        console.print(f"partial outputs (if any) are in {out}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_libraries() -> None:
    """No per-file progress bars from transformers / safetensors on every checkpoint load."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


async def _train(cfg: Recipe, out: Path) -> int:
    from dynamo_rl.generation import DynamoGeneration
    from dynamo_rl.refit.publisher import Publisher

    t_start = time.perf_counter()
    g = cfg.grpo
    if cfg.generation.dynamo.is_remote:
        await _preflight(cfg)
    # 1. policy (the path was checked before anything was started)
    if cfg.policy.model_path:
        model_dir = Path(cfg.policy.model_path)
    else:
        model_dir = ensure_tiny_model(out / "model", cfg.policy.tiny)
    model = load_model(model_dir, dtype=cfg.policy.dtype, device=cfg.policy.device)
    tokenizer = load_tokenizer(model_dir)
    trainer = Trainer(model, cfg)
    rng = random.Random(g.seed)

    with ExitStack() as stack:
        dyn = cfg.generation.dynamo
        # 2. inference: a deployment, or the embedded stack
        if dyn.is_remote:
            frontend_url = None
            control_urls = list(cfg.refit.control_urls)
            if not control_urls and dyn.dgd_name:
                from dynamo_rl.refit.discovery import dgd_pod_resolver

                control_urls = dgd_pod_resolver(dyn.dgd_name, dyn.namespace)
            if not control_urls:
                raise ValueError(
                    "generation points at a deployment but refit.control_urls is empty: list the "
                    "workers' system servers (http://host:DYN_SYSTEM_PORT) so every worker gets the new weights")
            served = dyn.model
        else:
            from dynamo_rl.serving.stack import LocalStack

            # the same default name as `dynamo-rl serve`: "tiny", or the checkpoint dir's name
            served = dyn.model or (model_dir.name if cfg.policy.model_path else "tiny")
            console.print(f"[bold]starting the embedded Dynamo stack[/] ({cfg.cluster.workers} workers) in {out / 'stack'}")
            local = stack.enter_context(LocalStack(
                model_dir, served_model_name=served, workers=cfg.cluster.workers, run_dir=out / "stack",
                worker_threads=cfg.cluster.worker_threads, device=cfg.cluster.worker_device,
                startup_timeout_s=cfg.cluster.startup_timeout_s))
            frontend_url = local.frontend_url
            control_urls = None
            console.print(f"frontend {frontend_url}; workers " + ", ".join(w.system_url for w in local.workers))
        gen = DynamoGeneration(cfg.generation, frontend_url=frontend_url)
        await gen.__aenter__()
        try:
            host = cfg.refit.publisher_host
            if dyn.dgd_name and host == "127.0.0.1":
                from dynamo_rl.refit.discovery import pod_ip

                host = pod_ip()   # the workers reach the trainer's publisher at the pod IP
            publisher = Publisher(host=host, transport=cfg.refit.transport)
            stack.callback(publisher.close)

            from dynamo_rl.refit.orchestrator import RefitTimeouts, refit_all

            if control_urls is None:
                resolver = local.control_urls
            elif callable(control_urls):
                resolver = control_urls
            else:
                resolver = (lambda: control_urls)
            timeouts = RefitTimeouts(update_s=cfg.refit.timeout_s)

            async def refit(version: int) -> dict:
                """Publish the trainer's weights as ``version`` and refit every worker to it."""
                params = {n: p.detach() for n, p in trainer.model.named_parameters()}
                await asyncio.to_thread(publisher.publish, version, params, naming="hf",
                                        model_config=trainer.model.config.to_dict())
                rep = await refit_all(frontend_url or gen.base_url, resolver, version,
                                      {"publisher": publisher.url, "transport": cfg.refit.transport},
                                      timeouts=timeouts)
                return {"workers": len(rep.workers), "seconds": rep.seconds, "bytes": rep.total_bytes}

            try:
                return await _grpo(cfg, out, trainer, tokenizer, gen, refit, rng, t_start)
            except Exception:
                if not dyn.is_remote:
                    local.check()   # a crashed child explains the error better: StackError with its log tail
                raise
        finally:
            await gen.aclose()


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


async def _evaluate(gen, tokenizer, cfg: Recipe, problems: list[Problem]) -> float:
    from dynamo_rl.config import SamplingConfig

    greedy = SamplingConfig(temperature=0.0, max_tokens=cfg.generation.sampling.max_tokens)
    eps = await collect_rollouts(gen, tokenizer, problems, 1, greedy, seed=0)
    return sum(e.reward for e in eps) / len(eps)


async def _grpo(cfg, out, trainer, tokenizer, gen, refit, rng, t_start) -> int:
    g = cfg.grpo
    log = MetricsLogger(out, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                        wandb_project=cfg.logging.wandb_project, config=cfg.model_dump())
    extra: dict = {}
    version = 0
    completed = False
    bar = None
    eval_problems = sample_problems(cfg.task, random.Random(10_000 + g.seed), g.eval_prompts)
    try:
        if cfg.policy.warm_start.steps:
            console.print(f"warm start: {cfg.policy.warm_start.steps} supervised steps")
            extra.update(await asyncio.to_thread(trainer.warm_start, tokenizer, rng))
            console.print(f"warm start done in {extra['warm_start_seconds']:.1f}s (loss {extra['warm_start_loss']:.3f})")
        trainer.freeze_reference()
        version = 1
        rep = await refit(version)
        console.print(f"refit → weights version {version} on {rep['workers']} workers ({rep['seconds']:.2f}s)")
        if g.eval_every:
            extra["eval_reward_initial"] = await _evaluate(gen, tokenizer, cfg, eval_problems)
            console.print(f"greedy eval reward before GRPO: {extra['eval_reward_initial']:.3f}")

        async def rollouts(step: int):
            t0 = time.perf_counter()
            problems = sample_problems(cfg.task, rng, g.prompts_per_step)
            eps = await collect_rollouts(gen, tokenizer, problems, g.samples_per_prompt,
                                         cfg.generation.sampling, seed=g.seed * 1_000_003 + step * 1009)
            return eps, time.perf_counter() - t0

        pending = asyncio.create_task(rollouts(1))
        bar = _progress_bar(g.num_steps)
        for step in range(1, g.num_steps + 1):
            episodes, gen_s = await pending
            if g.loop == "async" and step < g.num_steps:
                pending = asyncio.create_task(rollouts(step + 1))   # overlaps with training below
            rec: dict = {"step": step, "weights_version": version}
            # staleness: versions behind the trainer's current weights
            stale = [version - (e.version if e.version is not None else version) for e in episodes]
            rec["stale_samples"] = sum(1 for s in stale if s > 0)
            rec["version_mismatches"] = sum(1 for s in stale if s != 0) if g.loop == "sync" else 0
            keep_groups = []
            G = g.samples_per_prompt
            for i in range(0, len(episodes), G):
                grp = episodes[i:i + G]
                if all(s <= g.max_staleness for s in stale[i:i + G]):
                    keep_groups += grp
            rec["dropped_samples"] = len(episodes) - len(keep_groups)
            rewards = torch.tensor([e.reward for e in episodes])
            rec["reward_mean"], rec["reward_std"] = float(rewards.mean()), float(rewards.std())
            rec["exact_match"] = float(sum(e.reward == 1.0 for e in episodes) / len(episodes))
            ntok = sum(e.gen_tokens for e in episodes)
            rec["gen_tokens"] = ntok
            rec["gen_seconds"] = gen_s
            rec["gen_tokens_per_s"] = ntok / gen_s if gen_s > 0 else None
            if keep_groups:
                rec.update(await asyncio.to_thread(trainer.step, keep_groups, tokenizer.pad_token_id, version))
            version += 1
            rep = await refit(version)
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
        completed = True
    finally:
        if bar is not None:
            bar.close()
        log.close()
        # also on Ctrl-C / SIGTERM / a failure: what was measured so far is summarized
        summary = summarize(log.records, wall_seconds=time.perf_counter() - t_start, loop=g.loop,
                            generation_gpus=0, completed=completed, **extra)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if log.records:
            plot_rewards(log.records, out / "reward.png", title=f"{cfg.name}: {cfg.task.name}",
                         initial_eval=extra.get("eval_reward_initial"))
    _print_summary(summary, out)
    return 0


class _progress_bar:
    """A live bar under the step lines (terminals only): steps done, ETA, last reward."""

    def __init__(self, total: int):
        self._p = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("GRPO"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                               TextColumn("{task.fields[info]}"), console=console, transient=True)
            self._task = self._p.add_task("grpo", total=total, info="")
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
        f"loss {loss}  |Δlogp| {mae}  "
        f"gen {r['gen_tokens_per_s'] or 0:,.0f} tok/s  train {r.get('train_seconds', 0):.2f}s  "
        f"refit {r['refit_seconds']:.2f}s  v{r['weights_version']}"
        + (f"  stale {r['stale_samples']}" if r["stale_samples"] else ""))


def _print_summary(s: dict, out: Path) -> None:
    t = Table(title="dynamo-rl run summary", show_header=False)
    for k, v in s.items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(t)
    console.print(f"outputs in [bold]{out}[/]: metrics.jsonl, summary.json, reward.png, tensorboard/")
