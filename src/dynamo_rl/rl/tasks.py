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
from collections.abc import Sequence
from dataclasses import dataclass

from dynamo_rl.config import TaskConfig
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


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Chat-template ``messages`` with the generation prompt, as a list of token ids."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def next_turn_ids(tokenizer, messages: list[dict], history_ids: Sequence[int]) -> list[int]:
    """Tokens of only the messages after ``history_ids`` (the rule of ``models.chat``).

    ``messages`` is the whole conversation including the new user message; the returned
    ids end with the generation prompt. Appending them to ``history_ids`` gives the next
    prompt, which extends the previous prompt + generation ids byte-for-byte.
    """
    rendered = render_prompt(tokenizer, messages)
    return rendered[new_message_start(rendered, history_ids, tokenizer.eos_token_id):]


def supervised_example(tokenizer, problem: Problem) -> tuple[list[int], list[int]]:
    """Teacher-forced ids of a whole episode and the mask of answer tokens (answer + eos).

    Built with the same prompt rule as rollouts, so warm start and GRPO see identical ids.
    Returns ``(ids, mask)``, two equal-length int lists.
    """
    messages: list[dict] = []
    ids: list[int] = []
    mask: list[int] = []
    eos = tokenizer.eos_token_id
    for turn in problem.turns:
        messages.append({"role": "user", "content": turn.user})
        new = render_prompt(tokenizer, messages) if not ids else next_turn_ids(tokenizer, messages, ids)
        answer = tokenizer(turn.target, add_special_tokens=False).input_ids + [eos]
        ids += new + answer
        mask += [0] * len(new) + [1] * len(answer)
        messages.append({"role": "assistant", "content": turn.target})
    return ids, mask
