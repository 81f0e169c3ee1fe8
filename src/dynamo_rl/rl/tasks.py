"""Tasks: data plus a reward. Built-in ones and the user's own share one interface.

A :class:`Task` draws :class:`Problem` s (one or more turns of messages, each with the
answer it expects when known) and scores a turn's completion::

    score(problem, turn_index, Completion(text, token_ids, finish_reason)) -> {"reward": r, ...}

The ``"reward"`` entry is the GRPO training signal; other entries (``"exact_match"``,
anything the task reports) are logged per step as their mean (``metrics.jsonl``).

Built-in (``task.name``):

- ``reverse_digits``: "rev 472" → "274" (one turn). Learns visibly on the tiny model after
  a short supervised warm start (``shared/notes/tiny-grpo.md``).
- ``multiturn_reverse``: the same, ``turns`` times in one conversation; turn N+1's prompt
  extends turn N's prompt + generation ids, so it exercises token contiguity.

  Their reward (shaped): matching characters at the same position /
  ``max(len(output), len(target))`` in ``[0, 1]``, which punishes a wrong length, averaged
  over turns; ``exact_match`` is 1 when the output equals the target.

Your own (``task.name: custom``, ``task.data``, ``task.reward``):

- ``data``: a JSONL file, one record per line: ``"prompt": str`` (one user message) or
  ``"messages": [{"role", "content"}, ...]`` (a chat history ending with a user message),
  an optional ``"answer": str`` (the supervised warm start trains on it), and any other
  fields the reward reads.
- ``reward``: ``"module:function"`` (imported; the current directory is on ``sys.path``) or
  ``"path/to/file.py:function"``, called as ``function(record, completion)`` with the
  record (a dict) and a :class:`Completion`; it returns a number (the reward) or a dict of
  numbers holding ``"reward"`` (and e.g. ``"exact_match"``).

An environment (``task.name: tool_lookup``, or ``custom`` with ``task.environment``) runs
multi-turn episodes with tools instead (:mod:`dynamo_rl.rl.environments`): its task is an
:class:`EnvironmentTask`, whose problems carry a record and no turns.

Every problem is checked before anything starts (:func:`load_task` raises
:class:`TaskError` naming the file and line, or the function): a line that is not a JSON
object or has neither ``prompt`` nor ``messages``, a module that does not import, a name
that is not a function, and a reward that raises or returns no number when called on the
first record with its answer (or an empty completion). A reward that raises or returns a
non-number during training raises :class:`TaskError` too, naming the record's line.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_rl.config import TaskConfig
from dynamo_rl.generation import render_ids
from dynamo_rl.models.chat import splice_required_prefix
from dynamo_rl.rl.environments import BUILTIN, Environment, Reset, Step


class TaskError(ValueError):
    """The task's data or reward function is unusable; the message names the file and line,
    or the function, and the fix. Bad input: ``dynamo-rl train`` exits 2."""


@dataclass(frozen=True)
class Turn:
    """One turn: the new messages (``user``: one user message; ``messages``: a chat history,
    for custom records) and the expected answer (``target``; None when unknown)."""

    user: str | None = None
    target: str | None = None
    messages: tuple = ()

    def new_messages(self) -> list[dict]:
        return [dict(m) for m in self.messages] if self.messages else [{"role": "user", "content": self.user}]


@dataclass(frozen=True)
class Problem:
    turns: tuple[Turn, ...]
    record: Mapping[str, Any] | None = None   # a custom task's JSONL record
    line: int | None = None                   # its line in the file (1-based)


@dataclass(frozen=True)
class Completion:
    """What a reward function is given: the generated text (EOS removed, stripped) and the
    engine's token ids (int list, the EOS that ended it included) and finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


def turn_reward(output: str, target: str) -> float:
    """Positional character matches over ``max(len(output), len(target))``; 0 for empty output."""
    if not output:
        return 0.0
    return sum(o == t for o, t in zip(output, target)) / max(len(output), len(target))


class Task:
    """Data + reward. Subclasses draw problems and score completions (see the module docstring)."""

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        raise NotImplementedError

    def score(self, problem: Problem, turn: int, completion: Completion) -> dict[str, float]:
        raise NotImplementedError

    def has_answers(self) -> bool:
        return True


class ReverseDigits(Task):
    """The built-in tasks ``reverse_digits`` (one turn) and ``multiturn_reverse`` (``turns``)."""

    def __init__(self, cfg: TaskConfig):
        self.turns = 1 if cfg.name == "reverse_digits" else cfg.turns
        self.num_digits = cfg.num_digits

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        out = []
        for _ in range(n):
            ts = []
            for _ in range(self.turns):
                s = "".join(rng.choice("0123456789") for _ in range(self.num_digits))
                ts.append(Turn(user=f"rev {s}", target=s[::-1]))
            out.append(Problem(tuple(ts)))
        return out

    def score(self, problem: Problem, turn: int, completion: Completion) -> dict[str, float]:
        target = problem.turns[turn].target or ""
        return {"reward": turn_reward(completion.text, target), "exact_match": float(completion.text == target)}


class CustomTask(Task):
    """Records from a JSONL file, scored by the user's ``module:function`` (module docstring)."""

    def __init__(self, data: str, reward: str):
        self.data_path = Path(data)
        self.reward_name = reward
        self.problems = _read_jsonl(self.data_path)
        self.fn = _import_reward(reward)
        first = self.problems[0]
        probe = Completion(text=first.turns[0].target or "", token_ids=[])
        self.score(first, 0, probe)   # raises TaskError naming the function and the line

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        return [rng.choice(self.problems) for _ in range(n)]

    def has_answers(self) -> bool:
        return all(p.turns[0].target is not None for p in self.problems)

    def score(self, problem: Problem, turn: int, completion: Completion) -> dict[str, float]:
        where = f"{self.reward_name} on {self.data_path}:{problem.line}"
        try:
            out = self.fn(dict(problem.record or {}), completion)
        except Exception as e:  # noqa: BLE001 - the user's code: name it, with the record
            raise TaskError(f"reward {where} raised {type(e).__name__}: {e}; fix the function "
                            "(it gets the record dict and a Completion with .text, .token_ids)") from e
        return _as_rewards(out, where)


def _as_rewards(out: Any, where: str) -> dict[str, float]:
    def number(x: Any) -> float | None:
        if isinstance(x, (int, float)) and not isinstance(x, complex):
            f = float(x)
            return f if math.isfinite(f) else None
        return None

    if isinstance(out, Mapping):
        if "reward" not in out:
            raise TaskError(f"reward {where} returned a dict without 'reward' ({sorted(out)}); return a number or "
                            "a dict of numbers holding 'reward'")
        vals = {str(k): number(v) for k, v in out.items()}
        bad = [k for k, v in vals.items() if v is None]
        if bad:
            raise TaskError(f"reward {where} returned non-numbers (or nan/inf) for {bad}: {dict(out)!r:.200}")
        return vals  # type: ignore[return-value]
    r = number(out)
    if r is None:
        raise TaskError(f"reward {where} returned {out!r:.80} ({type(out).__name__}); return a finite number or "
                        "a dict of numbers holding 'reward'")
    return {"reward": r}


def _read_jsonl(path: Path) -> list[Problem]:
    problems = []
    for n, rec in _json_lines(path):
        answer = rec.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise TaskError(f"{path}:{n}: 'answer' must be a string, got {type(answer).__name__}")
        if isinstance(rec.get("prompt"), str):
            turn = Turn(user=rec["prompt"], target=answer)
        elif isinstance(rec.get("messages"), list) and rec["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in rec["messages"]):
            if rec["messages"][-1]["role"] != "user":
                raise TaskError(f"{path}:{n}: 'messages' must end with a user message (the model answers it)")
            turn = Turn(target=answer, messages=tuple(rec["messages"]))
        else:
            raise TaskError(f"{path}:{n}: the record needs 'prompt' (a string) or 'messages' (a list of "
                            f"{{'role', 'content'}} strings); it has {sorted(rec)}")
        problems.append(Problem((turn,), record=rec, line=n))
    return problems


def _import_reward(spec: str, key: str = "task.reward", what: str = "function"):
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise TaskError(f"{key} {spec!r}: write 'module:{what}' or 'path/to/file.py:{what}'")
    try:
        if mod_name.endswith(".py"):
            file = Path(mod_name)
            if not file.is_file():
                raise TaskError(f"{key} {spec!r}: no file {mod_name}"
                                + ("" if file.is_absolute() else " (relative to the current directory)"))
            loader_spec = importlib.util.spec_from_file_location(f"dynamo_rl_user_reward_{file.stem}", file)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except TaskError:
        raise
    except Exception as e:  # noqa: BLE001 - an import of the user's code
        raise TaskError(f"{key} {spec!r}: module {mod_name!r} does not import ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise TaskError(f"{key} {spec!r}: {mod_name} has no {what} {fn_name!r}"
                        + (f" ({fn_name} is a {type(fn).__name__})" if fn is not None else ""))
    return fn


class AgentTask(Task):
    """``task.name: agent``: the episodes come from an external agent program
    (:mod:`dynamo_rl.rl.agents`); the trainer draws no problems and scores nothing."""

    def __init__(self, command: str):
        self.command = command

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        raise TaskError("task.name=agent: the agent program chooses the tasks; the trainer draws none "
                        "(grpo.eval_every must be 0)")

    def score(self, problem: Problem, turn: int, completion: Completion) -> dict[str, float]:
        raise TypeError("an external agent ends its sessions with their reward")

    def has_answers(self) -> bool:
        return False


class EnvironmentTask(Task):
    """Episodes run by an :class:`~dynamo_rl.rl.environments.Environment` (a new instance per
    episode) on records drawn by the environment (built-in) or read from ``task.data``.

    Raises (from the constructor): :class:`TaskError` naming the class or ``file:line`` when
    the class does not import, is not an Environment, or its ``reset`` fails or returns
    something else than a :class:`Reset` whose messages end with a user message on the first
    record."""

    def __init__(self, env_cls: type, name: str, data: str | None = None):
        if not (isinstance(env_cls, type) and issubclass(env_cls, Environment)):
            raise TaskError(f"task.environment {name!r} is not a subclass of dynamo_rl.rl.environments.Environment")
        self.env_cls, self.name = env_cls, name
        self.problems = [Problem((), record=r, line=n) for n, r in _json_lines(Path(data))] if data else None
        first = self.problems[0] if self.problems else Problem((), record=env_cls.sample_records(random.Random(0), 1)[0])
        self.first_reset = self.reset(self.make(), first)

    def make(self) -> Environment:
        return self.env_cls()

    def reset(self, env: Environment, problem: Problem) -> Reset:
        """``env.reset(record)``, checked. Raises :class:`TaskError` naming the record's line."""
        where = f"{self.name}.reset" + (f" on {problem.line and f'task.data line {problem.line}'}" if problem.line else "")
        try:
            r = env.reset(dict(problem.record or {}))
        except Exception as e:  # noqa: BLE001 - the user's code: name it, with the record
            raise TaskError(f"{where} raised {type(e).__name__}: {e}") from e
        if not isinstance(r, Reset):
            raise TaskError(f"{where} returned a {type(r).__name__}, not a Reset: return "
                            "Reset(messages=[{'role': 'user', 'content': ...}], tools=[...]) "
                            "(from dynamo_rl.rl.environments import Reset)")
        if not (isinstance(r.messages, list) and r.messages and _messages_ok(r.messages)):
            raise TaskError(f"{where}: Reset.messages must be a non-empty list of {{'role': str, 'content': str}} "
                            f"chat messages, got {r.messages!r:.120}")
        if not (isinstance(r.tools, list) and all(isinstance(t, dict) and isinstance(t.get("function", t), dict)
                                                  and isinstance(t.get("function", t).get("name"), str)
                                                  for t in r.tools)):
            raise TaskError(f"{where}: Reset.tools must be a list of OpenAI tool definitions "
                            f"({{'type': 'function', 'function': {{'name', 'parameters'}}}}), got {r.tools!r:.120}")
        if r.messages[-1]["role"] not in ("user", "tool"):
            raise TaskError(f"{where}: the first messages must end with a user message (the policy answers it), "
                            f"not {r.messages[-1]['role']!r}")
        return r

    def step(self, env: Environment, message: dict) -> Step:
        """``env.step(message)``, checked: a :class:`Step` whose reward is a finite number (bools
        and strings are not), whose scores are ``{name: finite number}`` without ``reward`` /
        ``turns``, and whose messages are chat messages. Raises :class:`TaskError` naming the
        environment and the field."""
        where = f"{self.name}.step"
        try:
            out = env.step(message)
        except Exception as e:  # noqa: BLE001 - the user's code: name it
            raise TaskError(f"{where} raised {type(e).__name__}: {e}") from e
        if not isinstance(out, Step):
            raise TaskError(f"{where} returned a {type(out).__name__}; return a Step "
                            "(from dynamo_rl.rl.environments import Step)")
        if finite_float(out.reward) is None:
            raise TaskError(f"{where} returned Step.reward={out.reward!r:.40}; it must be a finite number")
        if not isinstance(out.scores, dict) or any(finite_float(v) is None for v in out.scores.values()):
            raise TaskError(f"{where} returned Step.scores={out.scores!r:.120}; it must be {{name: finite number}}")
        if {"reward", "turns"} & set(out.scores):
            raise TaskError(f"{where}: Step.scores may not set 'reward' or 'turns' (the episode's own figures)")
        if not isinstance(out.messages, list) or (out.messages and not _messages_ok(out.messages)):
            raise TaskError(f"{where} returned Step.messages={out.messages!r:.120}; it must be a list of chat "
                            "messages ({'role': 'tool', 'tool_call_id': ..., 'content': str}, or user messages)")
        if not out.done and not out.messages:
            raise TaskError(f"{where} returned a Step that is not done and has no messages: the policy would have "
                            "nothing new to answer")
        return out

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        if self.problems is not None:
            return [rng.choice(self.problems) for _ in range(n)]
        return [Problem((), record=r) for r in self.env_cls.sample_records(rng, n)]

    def score(self, problem: Problem, turn: int, completion: Completion) -> dict[str, float]:
        raise TypeError("an environment scores whole episodes (Environment.step), not single completions")

    def has_answers(self) -> bool:
        return self.make().demonstration(self.sample(random.Random(0), 1)[0].record) is not None

    def demonstration_ids(self, tokenizer, problem: Problem) -> tuple[list[int], list[int]]:
        """Teacher-forced ids of a demonstrated episode and the mask of its assistant tokens.

        Each assistant message of ``demonstration(record)`` is rendered by the chat template
        (what the policy should generate: its content and tool calls, up to and including
        ``<|im_end|>``); the environment answers it as in a rollout; prompts grow by the rule
        rollouts use. Raises :class:`TaskError` when the environment has no demonstration.
        """
        env = self.make()
        demo = env.demonstration(dict(problem.record or {}))
        if not demo:
            raise TaskError(f"the supervised warm start needs {self.name}.demonstration(record); "
                            "implement it, or set policy.warm_start.steps=0")
        first = self.reset(env, problem)
        kw = {"tools": first.tools} if first.tools else {}
        messages, ids, mask = list(first.messages), [], []
        eos = tokenizer.eos_token_id
        for m in demo:
            prompt = render_ids(tokenizer, messages, **kw)
            new = splice_required_prefix(prompt, ids, eos)[len(ids):] if ids else prompt
            answer = assistant_ids(tokenizer, messages, m, eos, **kw)
            ids += new + answer
            mask += [0] * len(new) + [1] * len(answer)
            step = self.step(env, dict(m))
            messages += [m] + list(step.messages)
            if step.done:
                break
        return ids, mask


def finite_float(v: Any) -> float | None:
    """``v`` as a finite float, or None (bools, strings, nan, inf and ints too large for a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _messages_ok(messages: list) -> bool:
    """Chat messages: dicts with a string role and string (or null, with tool calls) content."""
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            return False
        c = m.get("content")
        if not (isinstance(c, str) or (c is None and m.get("tool_calls"))):
            return False
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(
                isinstance(x, dict) and isinstance(x.get("function"), dict) for x in calls)):
            return False
    return True


def assistant_ids(tokenizer, messages: list[dict], message: dict, eos: int, **template_kwargs) -> list[int]:
    """The ids an assistant ``message`` is rendered to after ``messages`` by the chat template,
    up to and including its ``<|im_end|>`` (what the policy generates for it)."""
    prompt = render_ids(tokenizer, messages, **template_kwargs)
    out = tokenizer.apply_chat_template(messages + [message], add_generation_prompt=False, tokenize=True,
                                        **template_kwargs)
    full = [int(t) for t in (out["input_ids"] if isinstance(out, Mapping) else out)]
    if full[:len(prompt)] != prompt or eos not in full[len(prompt):]:
        raise TaskError("the chat template does not render an assistant message after the generation prompt; "
                        "the supervised warm start cannot tell its tokens")
    rest = full[len(prompt):]
    return rest[:rest.index(eos) + 1]


def _json_lines(path: Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` of every non-empty line of a JSONL file of objects.
    Raises :class:`TaskError` naming ``file:line`` (or the file when it is missing or empty)."""
    if not path.is_file():
        raise TaskError(f"task.data {str(path)!r}: no such file"
                        + ("" if path.is_absolute() else " (relative to the current directory)"))
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno}); one JSON object per line") from None
            if not isinstance(rec, dict):
                raise TaskError(f"{path}:{n}: a record must be a JSON object, got {type(rec).__name__}")
            out.append((n, rec))
    if not out:
        raise TaskError(f"task.data {str(path)!r} holds no record")
    return out


_TASKS: dict[tuple, Task] = {}


def load_task(cfg: TaskConfig) -> Task:
    """The task ``cfg`` describes (built once per distinct config; a custom task's file is read
    and its reward imported and probed then). Raises :class:`TaskError`."""
    key = (cfg.name, cfg.num_digits, cfg.turns, cfg.data, cfg.reward, cfg.environment)
    if key not in _TASKS:
        if cfg.name == "agent":
            _TASKS[key] = AgentTask(cfg.agent_command or "")
        elif cfg.name in BUILTIN:
            _TASKS[key] = EnvironmentTask(BUILTIN[cfg.name], cfg.name)
        elif cfg.environment:
            cls = _import_reward(cfg.environment, "task.environment", "class")
            _TASKS[key] = EnvironmentTask(cls, cfg.environment, cfg.data)
        elif cfg.name == "custom":
            if not cfg.data or not cfg.reward:
                raise TaskError("task.name=custom needs task.data (a JSONL file) and task.reward ('module:function')")
            _TASKS[key] = CustomTask(cfg.data, cfg.reward)
        else:
            _TASKS[key] = ReverseDigits(cfg)
    return _TASKS[key]


def sample_problems(cfg: TaskConfig, rng: random.Random, n: int) -> list[Problem]:
    """Draw ``n`` problems of the configured task."""
    return load_task(cfg).sample(rng, n)


def supervised_example(tokenizer, problem: Problem, task: Task | None = None) -> tuple[list[int], list[int]]:
    """Teacher-forced ids of a whole episode and the mask of answer tokens (answer + eos).

    Built with the rule rollouts use (``generation.Conversation``: history ids + tokens of
    only the new messages), so warm start and GRPO see identical ids. An environment's
    problem takes its demonstration (:meth:`EnvironmentTask.demonstration_ids`).
    Returns ``(ids, mask)``, two equal-length int lists.
    """
    if isinstance(task, EnvironmentTask):
        return task.demonstration_ids(tokenizer, problem)
    messages: list[dict] = []
    ids: list[int] = []
    mask: list[int] = []
    eos = tokenizer.eos_token_id
    for turn in problem.turns:
        if turn.target is None:
            raise TaskError(f"the supervised warm start needs an 'answer' for every record (line {problem.line}); "
                            "add one, or set policy.warm_start.steps=0")
        messages += turn.new_messages()
        rendered = render_ids(tokenizer, messages)
        new = splice_required_prefix(rendered, ids, eos)[len(ids):] if ids else rendered
        answer = tokenizer(turn.target, add_special_tokens=False).input_ids + [eos]
        ids += new + answer
        mask += [0] * len(new) + [1] * len(answer)
        messages.append({"role": "assistant", "content": turn.target})
    return ids, mask
