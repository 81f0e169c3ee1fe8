"""Rollouts: episodes generated through the Dynamo frontend, and their training batch.

An :class:`Episode` keeps the token ids the engine saw and produced, verbatim, with the
engine's logprob at every generated position and the weights version(s) that produced
them; :func:`collect_rollouts` runs the episodes of a step (a task's turns, or an
environment's episodes with tools: :func:`run_environment_episode`); :func:`to_batch` pads
them into tensors for the loss.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from dynamo_rl.generation import Conversation, RequestRejectedError, Sample, assistant_message
from dynamo_rl.rl.tasks import Completion, EnvironmentTask, Problem, Task


@dataclass
class Episode:
    """One trajectory: the full token sequence and, aligned with it, what the engine said."""

    problem_index: int
    ids: list[int] = field(default_factory=list)        # prompt(s) + generation(s), verbatim
    mask: list[int] = field(default_factory=list)       # 1 on generated tokens
    engine_logp: list[float] = field(default_factory=list)  # engine logprob at generated positions, 0 elsewhere
    versions: set = field(default_factory=set)          # weights versions that produced its tokens
    rewards: list[float] = field(default_factory=list)  # one per turn
    scores: list[dict] = field(default_factory=list)    # the task's named figures, one dict per turn
    finish_reasons: list[str] = field(default_factory=list)
    gen_tokens: int = 0
    version_from_barrier: bool = False   # the server sent no version; the refit barrier gave it
    turns: list[Sample] = field(default_factory=list)   # the engine's answer of every assistant turn

    def add_turn(self, s: Sample) -> None:
        """Append one turn: the new prompt ids (mask 0) and the generated ids (mask 1, with
        the engine's logprobs). ``s.prompt_token_ids`` must extend :attr:`ids` (the
        conversation checked it)."""
        new_prompt = s.prompt_token_ids.tolist()[len(self.ids):]
        gen_ids = s.generation_token_ids.tolist()
        self.ids += new_prompt + gen_ids
        self.mask += [0] * len(new_prompt) + [1] * len(gen_ids)
        self.engine_logp += [0.0] * len(new_prompt) + s.generation_logprobs.tolist()
        self.versions.add(s.weights_version)
        self.finish_reasons.append(s.finish_reason)
        self.gen_tokens += len(gen_ids)
        self.turns.append(s)

    @property
    def reward(self) -> float:
        return sum(self.rewards) / len(self.rewards) if self.rewards else 0.0

    @property
    def version(self) -> int | None:
        """Oldest weights version among its tokens (None if the server did not say)."""
        vs = [v for v in self.versions if v is not None]
        return min(vs) if vs else None


async def collect_rollouts(gen, tokenizer, problems: list[Problem], group: int, sampling, seed: int,
                          task: Task) -> list[Episode]:
    """Generate ``group`` episodes per problem through the frontend, turn by turn.

    Each episode is a :class:`~dynamo_rl.generation.Conversation` on the completion route:
    turn N+1's prompt is turn N's prompt + generation ids verbatim plus the tokens of only
    the new user message, checked for contiguity against what the engine saw.
    Returns episodes ordered problem-major (the ``group`` samples of a problem are contiguous).
    An :class:`EnvironmentTask` runs :func:`run_environment_episode` for each.
    """
    if isinstance(task, EnvironmentTask):
        return list(await asyncio.gather(*(
            run_environment_episode(gen, tokenizer, task, problems[pi], pi, sampling, seed=seed + 7919 * (pi * group + k))
            for pi in range(len(problems)) for k in range(group))))
    convs = [Conversation(gen, tokenizer=tokenizer) for _ in problems for _ in range(group)]
    episodes = [Episode(problem_index=pi) for pi in range(len(problems)) for _ in range(group)]

    async def turn(i: int, t: int) -> None:
        ep, turns = episodes[i], problems[episodes[i].problem_index].turns
        if t >= len(turns):
            return
        s = await convs[i].step(turns[t].new_messages(), sampling=sampling, seed=seed + 7919 * t + i)
        ep.add_turn(s)
        gen_ids = s.generation_token_ids.tolist()
        text = tokenizer.decode([t for t in gen_ids if t != tokenizer.eos_token_id], skip_special_tokens=True)
        score = task.score(problems[ep.problem_index], t, Completion(text.strip(), gen_ids, s.finish_reason))
        ep.scores.append(score)
        ep.rewards.append(score["reward"])

    for t in range(max(len(p.turns) for p in problems)):
        await asyncio.gather(*(turn(i, t) for i in range(len(episodes))))
    return episodes


async def run_environment_episode(gen, tokenizer, task: EnvironmentTask, problem: Problem, problem_index: int,
                                  sampling, seed: int | None) -> Episode:
    """One episode of an environment through the frontend's chat route, with its tools.

    Turn 1 is rendered by the frontend; every later prompt is the previous prompt +
    generation ids verbatim plus the tokens of only the environment's new messages, sent as
    ``nvext.token_data`` (any worker kind), and checked for contiguity. The assistant
    message handed to ``env.step`` is the frontend's, tool calls parsed by Dynamo's parser;
    when the parser dropped a tool call it could not read (1.6.1's ``hermes`` answers with
    neither content nor tool calls), its ``content`` is the generated text, so that the
    environment can judge it (``ToolLookup`` counts a ``malformed_tool_call``).

    Defined outcomes, each a counted zero-reward episode (``scores``): the environment not
    done after ``max_turns`` turns (``turn_limit``); a turn the frontend refuses, e.g. a
    prompt past the model's context (``rejected``). Other generation failures raise.
    Raises:
        TaskError: the environment's ``step`` raised or returned a bad Step
            (:meth:`EnvironmentTask.step`).
    """
    from dynamo_rl.rl.environments import Step

    env = task.make()
    first = task.reset(env, problem)
    conv = Conversation(gen, endpoint="chat", tokenizer=tokenizer, tools=first.tools or None, prefix="token_ids")
    ep = Episode(problem_index=problem_index)
    new, outcome = list(first.messages), None
    for t in range(env.max_turns):
        try:
            s = await conv.step(new, sampling=sampling, seed=None if seed is None else seed + t)
        except RequestRejectedError as e:
            outcome = Step(done=True, scores={"rejected": 1.0})
            ep.finish_reasons.append(f"rejected: {e.server_message}"[:200])
            break
        ep.add_turn(s)
        message = assistant_message(s)
        if not message["content"] and not message.get("tool_calls") and len(s.generation_token_ids):
            # Dynamo's tool-call parser drops a tool call it cannot read (content null, no
            # tool_calls): the environment gets what the model wrote instead, to judge it
            eos = tokenizer.eos_token_id
            message["content"] = tokenizer.decode([t for t in s.generation_token_ids.tolist() if t != eos])
        outcome = task.step(env, message)   # checked: TaskError naming the environment and the field
        if outcome.done:
            break
        new = list(outcome.messages)
    else:
        outcome = Step(done=True, scores={"turn_limit": 1.0})
    reward = float(outcome.reward)
    ep.rewards = [reward]
    ep.scores = [{"reward": reward, "turns": float(len(ep.turns)), **{k: float(v) for k, v in outcome.scores.items()}}]
    return ep


def to_batch(episodes: list[Episode], pad_id: int):
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
