"""Environments: multi-turn episodes with tools, run turn by turn through the frontend.

An environment is data plus a class. A new instance runs each episode::

    env = MyEnv()
    first = env.reset(record)          # Reset(messages, tools)
    # the policy answers through the Dynamo frontend's chat route, with first.tools
    result = env.step(assistant)       # Step(messages, reward, done, scores)
    # ... until result.done (or env.max_turns assistant turns: reward 0, "turn_limit": 1)

``assistant`` is the OpenAI message the frontend returned, its tool calls parsed by
Dynamo's tool-call parser (``{"role": "assistant", "content": str, "tool_calls": [{"id",
"type": "function", "function": {"name", "arguments": str}}], "reasoning_content"?}``).
``Step.messages`` are what the policy sees next (``tool`` messages with ``tool_call_id``,
or user messages). The trainer never re-tokenizes the history: each turn's prompt is the
previous turn's prompt + generation ids, verbatim, plus the tokens of only the new messages
(:class:`dynamo_rl.generation.Conversation` with ``prefix="token_ids"``), so it trains on
exactly the ids the workers ran and sampled, with a loss mask on the assistant tokens.

A recipe names an environment as it names a task: ``task.name: tool_lookup`` (built in), or
``task.name: custom`` with ``task.environment: "module:Class"`` (or
``"path/to/file.py:Class"``) and ``task.data`` (a JSONL file; each line is one record
handed to ``reset``). ``demonstration(record)`` (optional) gives the assistant messages that
solve a record: the supervised warm start trains on them.

Built in: :class:`ToolLookup`.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reset:
    """The start of an episode: the first messages (ending with a user message) and the
    OpenAI tool definitions offered (``[{"type": "function", "function": {"name",
    "description", "parameters"}}]``; empty: no tools)."""

    messages: list[dict]
    tools: list[dict] = field(default_factory=list)


@dataclass
class Step:
    """What the environment answers to one assistant message.

    ``messages``: the next turn's new messages (tool results, a user message); ``reward``:
    the episode's reward, read when ``done``; ``scores``: figures logged beside the reward
    (means per step in ``metrics.jsonl``), e.g. ``{"success": 1.0}``.
    """

    messages: list[dict] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    scores: dict[str, float] = field(default_factory=dict)


class Environment:
    """Base class of environments (module docstring). Subclasses implement :meth:`reset` and
    :meth:`step`; a new instance runs each episode, so instance attributes are episode state."""

    #: assistant turns after which an episode that is not done ends with reward 0
    max_turns: int = 4

    def reset(self, record: Mapping[str, Any]) -> Reset:
        raise NotImplementedError

    def step(self, message: dict) -> Step:
        raise NotImplementedError

    def demonstration(self, record: Mapping[str, Any]) -> list[dict] | None:
        """Assistant messages that solve ``record`` (for the supervised warm start), or None."""
        return None

    @classmethod
    def sample_records(cls, rng: random.Random, n: int) -> list[dict]:
        """Records drawn by the environment itself (built-in environments); a custom one reads
        ``task.data`` instead."""
        raise NotImplementedError(f"{cls.__name__} draws no records of its own; give task.data")


def tool_calls(message: Mapping[str, Any]) -> list[tuple[str | None, str, str]]:
    """``[(call id, function name, arguments JSON string)]`` of an assistant message."""
    out = []
    for c in message.get("tool_calls") or []:
        f = c.get("function") or {}
        out.append((c.get("id"), str(f.get("name", "")), f.get("arguments") or ""))
    return out


def function_tool(name: str, description: str, **params: str) -> dict:
    """An OpenAI function tool whose parameters are required strings (``name=description``)."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {k: {"type": "string", "description": d}
                                                        for k, d in params.items()},
                       "required": list(params)}}}


class ToolLookup(Environment):
    """``get a`` / ``rev a``: the answer is a value only a tool knows, so a tool call must be made.

    Each record hides a 3-digit ``value`` under a one-letter ``key`` (``a``-``h``). The user asks
    ``"<verb> <key>"``; two tools are offered: ``get {"k": key}`` returns the value,
    ``rev {"k": key}`` returns it reversed. The right tool is the one the verb names; the
    answer is the tool's result. A tiny model learns it: copy the verb and the key into the
    call, then copy the result.

    Reward: 1 for the right answer after a call to the right tool; otherwise half the share
    of the answer's characters that match the expected ones by position when a tool was
    called, else 0. ``success`` is 1 for the right answer (the success rate).
    Outcomes, each counted in ``scores``: a tool call the parser could not read (its text is
    left in ``content``: ``malformed_tool_call``), an unknown tool or bad arguments (the tool
    message says so and the episode goes on: ``tool_errors``), a turn limit (``max_turns``).
    """

    max_turns = 3
    #: the keys a record's value may hide under, and the value's length
    KEYS = "abcdefgh"
    DIGITS = 3
    TOOLS = [function_tool("get", "the value stored under a key", k="the key"),
             function_tool("rev", "the value stored under a key, reversed", k="the key")]

    @classmethod
    def sample_records(cls, rng: random.Random, n: int) -> list[dict]:
        return [{"verb": rng.choice(["get", "rev"]), "key": rng.choice(cls.KEYS),
                 "value": "".join(rng.choice(string.digits) for _ in range(cls.DIGITS))} for _ in range(n)]

    def reset(self, record: Mapping[str, Any]) -> Reset:
        self.record = dict(record)
        self.used: set[str] = set()
        self.tool_errors = 0
        return Reset(messages=[{"role": "user", "content": f"{record['verb']} {record['key']}"}],
                     tools=[dict(t) for t in self.TOOLS])

    def expected(self) -> str:
        v = str(self.record["value"])
        return v if self.record["verb"] == "get" else v[::-1]

    def _call(self, name: str, arguments: str) -> str:
        if name not in ("get", "rev"):
            self.tool_errors += 1
            return f"error: unknown tool {name}"
        try:
            args = json.loads(arguments)
        except (TypeError, ValueError):
            self.tool_errors += 1
            return "error: arguments are not json"
        if not isinstance(args, dict) or args.get("k") != self.record["key"]:
            self.tool_errors += 1
            return "error: no such key"
        self.used.add(name)
        v = str(self.record["value"])
        return v if name == "get" else v[::-1]

    def step(self, message: dict) -> Step:
        calls = tool_calls(message)
        if calls:
            return Step(messages=[{"role": "tool", "tool_call_id": cid or f"call_{i}", "content": self._call(n, a)}
                                  for i, (cid, n, a) in enumerate(calls)])
        text = (message.get("content") or "").strip()
        malformed = "<tool_call>" in text
        target = self.expected()
        right_tool = self.record["verb"] in self.used
        success = right_tool and text == target
        if success:
            reward = 1.0
        elif self.used and text and not malformed:
            reward = 0.5 * sum(a == b for a, b in zip(text, target)) / max(len(text), len(target))
        else:
            reward = 0.0
        return Step(reward=reward, done=True,
                    scores={"success": float(success), "tool_used": float(bool(self.used)),
                            "malformed_tool_call": float(malformed), "tool_errors": float(self.tool_errors)})

    def demonstration(self, record: Mapping[str, Any]) -> list[dict]:
        self.reset(record)
        call = {"id": "call_0", "type": "function",
                "function": {"name": record["verb"], "arguments": json.dumps({"k": record["key"]},
                                                                             separators=(",", ":"))}}
        return [{"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "assistant", "content": self.expected()}]


#: ``task.name`` → built-in environment class
BUILTIN = {"tool_lookup": ToolLookup}
