"""Rollouts: episodes generated through the Dynamo frontend, and their training batch.

An :class:`Episode` keeps the token ids the engine saw and produced, verbatim, with the
engine's logprob at every generated position and the weights version(s) that produced
them; :func:`collect_rollouts` runs the multi-turn episodes of a step; :func:`to_batch`
pads them into tensors for the loss.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from dynamo_rl.generation import Conversation
from dynamo_rl.rl.tasks import Completion, Problem, Task


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
    """
    convs = [Conversation(gen, tokenizer=tokenizer) for _ in problems for _ in range(group)]
    episodes = [Episode(problem_index=pi) for pi in range(len(problems)) for _ in range(group)]

    async def turn(i: int, t: int) -> None:
        ep, turns = episodes[i], problems[episodes[i].problem_index].turns
        if t >= len(turns):
            return
        s = await convs[i].step(turns[t].new_messages(), sampling=sampling, seed=seed + 7919 * t + i)
        new_prompt = s.prompt_token_ids.tolist()[len(ep.ids):]
        gen_ids = s.generation_token_ids.tolist()
        ep.ids += new_prompt + gen_ids
        ep.mask += [0] * len(new_prompt) + [1] * len(gen_ids)
        ep.engine_logp += [0.0] * len(new_prompt) + s.generation_logprobs.tolist()
        ep.versions.add(s.weights_version)
        ep.finish_reasons.append(s.finish_reason)
        ep.gen_tokens += len(gen_ids)
        text = tokenizer.decode([t for t in gen_ids if t != tokenizer.eos_token_id], skip_special_tokens=True)
        score = task.score(problems[ep.problem_index], t, Completion(text.strip(), gen_ids, s.finish_reason))
        ep.scores.append(score)
        ep.rewards.append(score["reward"])

    for t in range(max(len(p.turns) for p in problems)):
        await asyncio.gather(*(turn(i, t) for i in range(len(episodes))))
    return episodes


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
