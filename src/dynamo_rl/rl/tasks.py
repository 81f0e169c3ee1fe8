"""Reward tasks. A problem is a list of user turns, each with the answer it expects.

- ``reverse_digits``: "rev 472" → "274" (one turn). Learns visibly on the tiny model after
  a short supervised warm start (``shared/notes/tiny-grpo.md``).
- ``multiturn_reverse``: the same, ``turns`` times in one conversation; turn N+1's prompt
  extends turn N's prompt + generation ids, so it exercises token contiguity.

Reward of one turn: matching characters at the same position / ``max(len(out), len(target))``
in ``[0, 1]``, which punishes a wrong length; the episode reward is the mean over turns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dynamo_rl.config import TaskConfig
from dynamo_rl.generation import render_ids
from dynamo_rl.models.chat import new_message_start


@dataclass(frozen=True)
class Turn:
    user: str
    target: str


@dataclass(frozen=True)
class Problem:
    turns: tuple[Turn, ...]


def turn_reward(output: str, target: str) -> float:
    """Positional character matches over ``max(len(output), len(target))``; 0 for empty output."""
    if not output:
        return 0.0
    return sum(o == t for o, t in zip(output, target)) / max(len(output), len(target))


def sample_problems(cfg: TaskConfig, rng: random.Random, n: int) -> list[Problem]:
    """Draw ``n`` problems of the configured task."""
    turns = 1 if cfg.name == "reverse_digits" else cfg.turns
    out = []
    for _ in range(n):
        ts = []
        for _ in range(turns):
            s = "".join(rng.choice("0123456789") for _ in range(cfg.num_digits))
            ts.append(Turn(user=f"rev {s}", target=s[::-1]))
        out.append(Problem(tuple(ts)))
    return out


def supervised_example(tokenizer, problem: Problem) -> tuple[list[int], list[int]]:
    """Teacher-forced ids of a whole episode and the mask of answer tokens (answer + eos).

    Built with the rule rollouts use (``generation.Conversation``: history ids + tokens of
    only the new messages), so warm start and GRPO see identical ids.
    Returns ``(ids, mask)``, two equal-length int lists.
    """
    messages: list[dict] = []
    ids: list[int] = []
    mask: list[int] = []
    eos = tokenizer.eos_token_id
    for turn in problem.turns:
        messages.append({"role": "user", "content": turn.user})
        rendered = render_ids(tokenizer, messages)
        new = rendered[new_message_start(rendered, ids, eos):] if ids else rendered
        answer = tokenizer(turn.target, add_special_tokens=False).input_ids + [eos]
        ids += new + answer
        mask += [0] * len(new) + [1] * len(answer)
        messages.append({"role": "assistant", "content": turn.target})
    return ids, mask
