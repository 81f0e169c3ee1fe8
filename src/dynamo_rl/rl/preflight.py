"""Checks of a recipe made before a run creates or starts anything: each raises ValueError /
FileNotFoundError (``dynamo_rl.rl.tasks.TaskError`` for the task) naming the key and the fix,
which ``dynamo-rl train`` turns into exit 2 with no run directory left behind."""

from __future__ import annotations

import random
from pathlib import Path

from dynamo_rl.config import Recipe
from dynamo_rl.models import check_device, load_tokenizer
from dynamo_rl.rl.tasks import AgentTask, EnvironmentTask, TaskError, load_task, sample_problems


def check_inputs(cfg: Recipe) -> None:
    """Fail before anything is created or started when the recipe cannot run (ValueError /
    FileNotFoundError naming the key and the fix): the policy path, devices, the vLLM
    environment, optional packages, where the workers are, and whether a prompt and
    ``max_tokens`` fit the model's context."""
    import importlib.util

    dyn = cfg.generation.dynamo
    check_device(cfg.policy.device, "policy.device")
    if not dyn.is_remote:
        check_device(cfg.cluster.worker_device, "cluster.worker_device")
        from dynamo_rl.serving.worker_kinds import check_parsers

        check_parsers(cfg.cluster.tool_call_parser, cfg.cluster.reasoning_parser,
                      ("cluster.tool_call_parser", "cluster.reasoning_parser"))
        from dynamo_rl.serving.stack import check_engine_cpus

        check_engine_cpus(cfg.cluster.engine_cpus, cfg.cluster.engines(), what="cluster.engine_cpus")
        if cfg.refit.control_urls:
            raise ValueError(
                "refit.control_urls is set but the recipe starts the embedded stack, whose workers it finds "
                "itself: drop refit.control_urls, or point the recipe at your deployment with "
                "generation.dynamo.frontend_url (or dgd_name)")
        if "vllm" in cfg.cluster.engines():
            from dynamo_rl.serving.worker_kinds import find_vllm_python

            try:
                find_vllm_python(cfg.cluster.vllm_python)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"cluster.engine: {e}") from None
    elif not cfg.refit.control_urls and not dyn.dgd_name:
        raise ValueError(
            "generation.dynamo.frontend_url points at a deployment but refit.control_urls is empty: list the "
            "workers' system servers, e.g. 'refit.control_urls=[http://127.0.0.1:PORT_1, http://127.0.0.1:PORT_2]' "
            "(`dynamo-rl serve` prints them), so that every worker gets the new weights")
    else:
        _check_control_urls(cfg.refit.control_urls)
    if cfg.refit.transport == "nixl" and not any(
            importlib.util.find_spec(m) for m in ("nixl_cu13", "nixl")):
        raise ValueError("refit.transport=nixl but NIXL is not installed: pip install --no-deps nixl-cu13==1.5.1, "
                         "or use refit.transport=shm (one host) or dist")
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("logging.wandb is true but wandb is not installed: pip install wandb, or set "
                         "logging.wandb=false")
    if cfg.policy.model_path:
        p = Path(cfg.policy.model_path)
        if not p.exists():
            raise FileNotFoundError(f"policy.model_path {str(p)!r} does not exist; fix the path, or drop "
                                    "policy.model_path to train the tiny model")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"policy.model_path {str(p)!r} is not a Hugging Face checkpoint directory "
                                    "(no config.json); point it at a directory written by save_pretrained")
    task = load_task(cfg.task)   # reads a custom task's data, imports and probes its reward (TaskError)
    if isinstance(task, AgentTask):
        _check_agent(cfg)
        return
    if cfg.policy.warm_start.steps and not task.has_answers():
        if isinstance(task, EnvironmentTask):
            raise TaskError(f"policy.warm_start.steps={cfg.policy.warm_start.steps} needs {task.name}.demonstration"
                            "(record) (the assistant messages that solve it); implement it, or set "
                            "policy.warm_start.steps=0")
        raise TaskError(f"policy.warm_start.steps={cfg.policy.warm_start.steps} needs an 'answer' in every record of "
                        f"{cfg.task.data}; add them, or set policy.warm_start.steps=0")
    _check_tools(cfg, task)
    _check_context(cfg)


def _check_tools(cfg: Recipe, task) -> None:
    """An environment that offers tools needs the workers' tool-call parser and, for the tiny
    model, its ``tools`` vocabulary."""
    if isinstance(task, EnvironmentTask) and task.first_reset.tools:
        if not cfg.generation.dynamo.is_remote and not cfg.cluster.tool_call_parser:
            raise ValueError(f"task {task.name!r} offers tools, but the embedded stack's workers have no tool-call "
                             "parser, so the policy's tool calls would come back as plain text: set "
                             "cluster.tool_call_parser=hermes (the <tool_call> format of Qwen models)")
        if not cfg.policy.model_path and cfg.policy.tiny.vocab != "tools":
            raise ValueError(f"task {task.name!r} offers tools, but the tiny model's vocabulary has no tool-call "
                             "characters: set policy.tiny.vocab=tools")


def _check_agent(cfg: Recipe) -> None:
    """``task.name: agent``: its program exists; no warm start or eval (the agent owns the tasks)."""
    import shutil

    from dynamo_rl.rl.agents import agent_argv

    try:
        argv = agent_argv(cfg.task.agent_command or "")
    except ValueError as e:
        raise TaskError(f"task.agent_command {cfg.task.agent_command!r} does not parse as a command line ({e})") from None
    prog = argv[0] if argv else ""
    if not prog or (shutil.which(prog) is None and not Path(prog).is_file()):
        raise TaskError(f"task.agent_command {cfg.task.agent_command!r}: no program {prog!r} (not on PATH, not a "
                        "file); give the command that runs your agent, e.g. 'python examples/agents/tool_agent.py'")
    ws = cfg.policy.warm_start
    if ws.steps and ws.task is None:
        raise TaskError(f"policy.warm_start.steps={ws.steps}: an external agent gives no answers to warm start on; "
                        "name a task that has them (policy.warm_start.task, e.g. {name: tool_lookup}), set "
                        "policy.warm_start.steps=0, or start from a trained checkpoint (policy.model_path)")
    if ws.steps:
        wtask = load_task(ws.task)
        if isinstance(wtask, AgentTask) or not wtask.has_answers():
            raise TaskError(f"policy.warm_start.task {ws.task.name!r} has no answers or demonstrations to warm "
                            "start on; name one that has")
        _check_tools(cfg, wtask)
    if cfg.grpo.eval_every:
        raise TaskError(f"grpo.eval_every={cfg.grpo.eval_every}: an external agent's tasks are its own, there are no "
                        "eval prompts; set grpo.eval_every=0 (the agent's rewards are logged every step)")


def _check_control_urls(urls: list[str]) -> None:
    """Every ``refit.control_urls`` entry must be a Dynamo worker's system server (its
    ``/metrics`` name an instance); else a ValueError naming the URL and the key."""
    import httpx

    from dynamo_rl.refit.control import worker_id_from_metrics

    for url in urls:
        why = None
        try:
            r = httpx.get(f"{str(url).rstrip('/')}/metrics", timeout=5.0)
            if r.status_code != 200:
                why = f"HTTP {r.status_code} on /metrics"
            elif worker_id_from_metrics(r.text) is None:
                why = "its /metrics name no serving instance (a worker still starting?)"
        except (httpx.HTTPError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"
        if why:
            raise ValueError(
                f"refit.control_urls: {url} is not a reachable Dynamo worker system server ({why}); list each "
                "worker's http://host:DYN_SYSTEM_PORT (as `dynamo-rl serve` prints them) in refit.control_urls")


def _check_context(cfg: Recipe) -> None:
    """The longest episode the task can make (every turn's prompt plus ``max_tokens`` per
    turn) must fit the model's context window (``max_position_embeddings``)."""
    from dynamo_rl.generation.conversation import render_ids
    from dynamo_rl.models.tiny import build_tokenizer

    if cfg.policy.model_path:
        import json as _json

        try:
            context = int(_json.loads((Path(cfg.policy.model_path) / "config.json").read_text())
                          ["max_position_embeddings"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        tokenizer = load_tokenizer(cfg.policy.model_path)
    else:
        context, tokenizer = cfg.policy.tiny.max_position_embeddings, build_tokenizer(cfg.policy.tiny.vocab)
    max_tokens = cfg.generation.sampling.max_tokens
    task = load_task(cfg.task)
    if isinstance(task, EnvironmentTask):
        first = task.first_reset
        longest = len(render_ids(tokenizer, first.messages, **({"tools": first.tools} if first.tools else {})))
        turns = task.make().max_turns
        if longest + max_tokens > context:
            raise ValueError(
                f"generation.sampling.max_tokens={max_tokens} does not fit the model's context of {context} tokens: "
                f"{task.name}'s first prompt takes {longest} tokens. Lower generation.sampling.max_tokens to at "
                f"most {max(0, context - longest)}")
        if longest + turns * max_tokens > context:
            from rich.console import Console

            Console(stderr=True).print(
                f"[yellow]note:[/] {task.name} episodes of {turns} turns could pass the model's context of {context} "
                f"tokens (first prompt {longest} + {turns} × max_tokens {max_tokens}); a turn that does not fit is "
                "refused by the worker and ends its episode with reward 0 (counted as 'rejected')")
        return
    problems = sample_problems(cfg.task, random.Random(0), 32)
    turns = max(len(p.turns) for p in problems)
    longest = 0
    for p in problems:
        messages: list[dict] = []
        for t in p.turns:
            messages += t.new_messages()
            longest = max(longest, len(render_ids(tokenizer, messages)))
            messages += [{"role": "assistant", "content": ""}]
    need = longest + turns * max_tokens
    if need > context:
        raise ValueError(
            f"generation.sampling.max_tokens={max_tokens} does not fit the model's context of {context} tokens: "
            f"the task's prompts take up to {longest} tokens over {turns} turn(s), so an episode could need "
            f"{need}. Lower generation.sampling.max_tokens to at most {max(0, (context - longest) // turns)}")


def find_resume(cfg: Recipe, resume: str, run_dir: str | None):
    """The checkpoint ``--resume`` names, checked against the recipe (ValueError /
    FileNotFoundError naming the input)."""
    from dynamo_rl.rl.checkpoint import find

    found = find(resume)
    if run_dir is not None and Path(run_dir).resolve() != found.run_dir.resolve():
        raise ValueError(f"--run-dir {run_dir!r} and --resume {resume!r} name different runs; a resumed run goes "
                         f"on in its own directory ({found.run_dir}): drop --run-dir")
    differ = found.recipe_differences(cfg.model_dump(mode="json"))
    if differ:
        raise ValueError(f"--resume: the recipe differs from the one {found.policy} was trained with on "
                         f"{', '.join(differ)}; resume with that run's recipe (its task and model), or start a new "
                         "run from the checkpoint with policy.model_path")
    if found.step >= cfg.grpo.num_steps:
        raise ValueError(f"--resume: {found.policy} is at step {found.step}, and grpo.num_steps is "
                         f"{cfg.grpo.num_steps}: nothing left to run; raise grpo.num_steps (e.g. "
                         f"grpo.num_steps={found.step + cfg.grpo.num_steps})")
    return found
