"""The rollout endpoint: an OpenAI-compatible server for agents that run out of process.

An agent program of any kind (the ``openai`` SDK, litellm, plain HTTP) plays episodes
against the policy as it would against any OpenAI server, one session per episode; the
trainer gets each ended session as one trajectory (:class:`~dynamo_rl.rl.rollouts.Episode`)
with the exact ids and logprobs the workers produced.

HTTP API (127.0.0.1 only; errors in OpenAI's shape ``{"error": {"message", "type", "code"}}``):

``POST /v1/sessions`` ``{"group": str?, "metadata": {}?}`` → 201 ``{"id", "base_url"}``
    Starts an episode. ``group`` names the episodes that GRPO compares with each other
    (the same task; default: the session's own id). Point the OpenAI client at
    ``base_url`` (``http://127.0.0.1:PORT/sessions/<id>/v1``).
``POST /sessions/<id>/v1/chat/completions`` (OpenAI chat: ``messages``, ``tools``,
``stream``, ``temperature``, ``top_p``, ``max_tokens`` / ``max_completion_tokens``,
``seed``, ``logprobs``) → an OpenAI chat completion (``tool_calls`` parsed by Dynamo's
tool-call parser, ``finish_reason``); with ``stream: true``, its chunks as server-sent events.
    Each request holds the whole conversation, as OpenAI clients send it. Its first
    messages must be the session's history (same count and roles; the agent's rendition,
    e.g. tool calls re-serialized with other whitespace, is accepted and never tokenized);
    the rest are the new messages. The endpoint forwards the turn to the Dynamo frontend
    with the prompt ids that keep the session contiguous — the previous turn's prompt +
    generation ids verbatim, then the tokens of only the new messages
    (``nvext.token_data``; both worker kinds) — and records the ids and logprobs.
``GET /sessions/<id>/v1/models`` → the served model.
``POST /v1/sessions/<id>/end`` ``{"reward": number, "scores": {name: number}?}`` → 200
    Ends the episode with its reward; the trainer collects it.
``GET /v1/sessions/<id>`` → ``{"id", "group", "turns", "ended", "outcome"}``.

Defined outcomes: an unknown or collected session → 404; an ended one → 409 (its ``GET``
says how it ended: ``reward`` or ``timeout``); a history that does not extend the session's,
or tools that change mid-session → 409; a second request while one runs → 409; the same
request again (a client retrying an answer it lost) → the same answer, no new turn; a turn
the frontend refuses (e.g. past the model's context) → 400 with its message, the session
unchanged; request fields that would make the trajectory differ from what the policy
samples (``stop``, ``response_format``, ``logit_bias``, penalties, a ``tool_choice`` other
than ``auto``) → 400 naming them; a session idle for ``session_timeout_s`` → ended with
reward 0 and ``outcome: "timeout"``, collected and counted like any other (``timeout`` in
its scores). Nothing waits forever: :meth:`RolloutServer.collect_groups` takes a deadline.
Only text is accepted (content parts are joined into their text).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from dynamo_rl.config import SamplingConfig
from dynamo_rl.generation import (
    ContiguityError,
    Conversation,
    GenerationError,
    RequestRejectedError,
    text_messages,
)
from dynamo_rl.models.chat import PrefixSpliceError
from dynamo_rl.rl.rollouts import Episode
from dynamo_rl.rl.tasks import finite_float

LOOPBACK = "127.0.0.1"


@dataclass
class Session:
    """One episode of an external agent."""

    id: str
    group: str
    conversation: Conversation
    metadata: dict = field(default_factory=dict)
    episode: Episode = field(default_factory=lambda: Episode(problem_index=0))
    created: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    ended: bool = False
    outcome: str | None = None          # "reward" | "timeout"
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last: tuple[str, dict] | None = None   # (request key, answer) of the last turn: a retry gets it again

    def summary(self) -> dict:
        return {"id": self.id, "group": self.group, "turns": len(self.episode.turns), "ended": self.ended,
                "outcome": self.outcome, "metadata": self.metadata}


class RolloutServerError(Exception):
    """An agent's request the endpoint answers with an error (HTTP ``status``)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class RolloutServer:
    """Serve the rollout endpoint (module docstring) in the running event loop.

    Args:
        generation: the :class:`~dynamo_rl.generation.DynamoGeneration` of the trainer.
        tokenizer: the served model's tokenizer (renders new messages; EOS ends a message).
        sampling: defaults for requests that set no ``temperature`` / ``top_p`` /
            ``max_tokens``.
        port: 0 → a free port on 127.0.0.1.
        session_timeout_s: an idle session is ended with reward 0 after this many seconds.

    Use as ``async with RolloutServer(gen, tok) as server:`` then ``server.url``,
    ``await server.collect_groups(num_groups, group_size, timeout_s)``.
    """

    def __init__(self, generation, tokenizer, *, sampling: SamplingConfig | None = None, port: int = 0,
                 session_timeout_s: float = 300.0):
        self.generation = generation
        self.tokenizer = tokenizer
        self.sampling = sampling or SamplingConfig()
        self.session_timeout_s = session_timeout_s
        self.sessions: dict[str, Session] = {}         # open
        self.ended: dict[str, Session] = {}            # ended, not yet collected (GET says how they ended)
        self._ended: dict[str, list[Session]] = {}     # group → ended sessions not yet collected
        self._changed: asyncio.Event | None = None
        self._port = port
        self._server = None
        self._tasks: list[asyncio.Task] = []
        self.counts = {"sessions_opened": 0, "turns": 0, "replayed_turns": 0, "timeouts": 0, "rejected_turns": 0,
                       "collected": 0, "dropped_backlog": 0}

    # -- lifecycle -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._port}"

    async def __aenter__(self) -> RolloutServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind 127.0.0.1 and serve until :meth:`stop` (returns once the socket listens)."""
        import uvicorn

        if self._port == 0:
            with socket.socket() as s:
                s.bind((LOOPBACK, 0))
                self._port = s.getsockname()[1]
        self._changed = asyncio.Event()
        config = uvicorn.Config(self.app(), host=LOOPBACK, port=self._port, log_level="warning",
                                access_log=False, lifespan="off")
        self._server = _Server(config)
        self._tasks = [asyncio.create_task(self._server.serve()), asyncio.create_task(self._reap())]
        while not self._server.started:
            if self._tasks[0].done():
                self._tasks[0].result()   # raises the bind error
                raise RuntimeError(f"the rollout endpoint did not start on {self.url}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stop serving (idempotent); sessions not ended are dropped."""
        if self._server is not None:
            self._server.should_exit = True   # uvicorn's own shutdown
        if self._tasks:
            self._tasks[-1].cancel()          # the reaper
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._server = None

    # -- the trainer's side ------------------------------------------------------------
    async def collect_groups(self, num_groups: int, group_size: int, *, timeout_s: float | None = None,
                             ) -> list[Episode]:
        """Wait for ``num_groups`` groups of ``group_size`` ended sessions each; return their
        episodes, group-major (GRPO's layout), and forget them.

        The most recently completed groups are taken: complete groups older than those (a
        backlog the agent made while the trainer was busy, played by older weights) are
        dropped and counted (``counts["dropped_backlog"]``, sessions). A group's sessions
        beyond ``group_size`` wait for the next call.
        Raises:
            ValueError: ``num_groups`` or ``group_size`` < 1.
            TimeoutError: fewer complete groups than asked after ``timeout_s`` (the message
                says how many sessions ran, ended and timed out).
        """
        if num_groups < 1 or group_size < 1:
            raise ValueError(f"collect_groups needs num_groups >= 1 and group_size >= 1, got {num_groups}, {group_size}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            full = [g for g, ss in self._ended.items() if len(ss) >= group_size]
            if len(full) >= num_groups:
                out: list[Episode] = []
                for g in full[:len(full) - num_groups]:   # the backlog: older than what is taken
                    old = self._ended.pop(g)
                    self.counts["dropped_backlog"] += len(old)
                    for s in old:
                        self.ended.pop(s.id, None)
                for pi, g in enumerate(full[len(full) - num_groups:]):
                    take, self._ended[g] = self._ended[g][:group_size], self._ended[g][group_size:]
                    if not self._ended[g]:
                        del self._ended[g]
                    for s in take:
                        self.ended.pop(s.id, None)
                        s.episode.problem_index = pi
                        out.append(s.episode)
                self.counts["collected"] += len(out)
                return out
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                waiting = {g: len(ss) for g, ss in self._ended.items()}
                raise TimeoutError(
                    f"the rollout endpoint at {self.url} has {len(full)} of {num_groups} groups of {group_size} "
                    f"ended sessions after {timeout_s:.0f}s (ended, by group: {waiting}; running: "
                    f"{sum(not s.ended for s in self.sessions.values())}; counts: {self.counts}). Is the agent "
                    "running, and does it end every session with POST /v1/sessions/<id>/end?")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=remaining if remaining is not None else 1.0)
            except asyncio.TimeoutError:
                pass

    # -- sessions ----------------------------------------------------------------------
    def open_session(self, group: str | None = None, metadata: dict | None = None) -> Session:
        sid = uuid.uuid4().hex[:16]
        conv = Conversation(self.generation, endpoint="chat", tokenizer=self.tokenizer, prefix="token_ids")
        s = Session(id=sid, group=str(group) if group is not None else sid, conversation=conv,
                    metadata=dict(metadata or {}))
        self.sessions[sid] = s
        self.counts["sessions_opened"] += 1
        return s

    def _session(self, sid: str, *, open_only: bool = True) -> Session:
        s = self.sessions.get(sid) or self.ended.get(sid)
        if s is None:
            raise RolloutServerError(404, f"no session {sid!r} (never started, or already collected by the trainer): "
                                          "start one with POST /v1/sessions", "not_found_error")
        if open_only and s.ended:
            raise RolloutServerError(409, f"session {sid!r} has ended ({s.outcome}); start a new session for a new "
                                          "episode", "conflict_error")
        return s

    #: score names the endpoint sets itself
    RESERVED_SCORES = ("reward", "turns", "timeout")

    def end_session(self, sid: str, reward: Any, scores: Any = None, *, outcome: str = "reward") -> Session:
        """End session ``sid`` with its reward (everything is checked before anything changes).

        Raises:
            RolloutServerError: 404/409 (see :meth:`_session`), 400 for a reward that is not a
                finite number or ``scores`` that are not ``{name: finite number}`` (or use a
                reserved name: ``reward``, ``turns``, ``timeout``).
        """
        s = self._session(sid)
        r = finite_float(reward)
        if r is None:
            raise RolloutServerError(400, f"'reward' must be a finite number, got {str(reward)[:40]!r}")
        if scores is not None and not isinstance(scores, dict):
            raise RolloutServerError(400, f"'scores' must be an object {{name: number}}, got {type(scores).__name__}")
        checked = {}
        for k, v in (scores or {}).items():
            f = finite_float(v)
            if f is None:
                raise RolloutServerError(400, f"'scores'[{k!r}] must be a finite number, got {str(v)[:40]!r}")
            if k in self.RESERVED_SCORES:
                raise RolloutServerError(400, f"'scores' may not set {k!r}: the endpoint records it "
                                              f"({', '.join(self.RESERVED_SCORES)} are reserved)")
            checked[str(k)] = f
        s.ended, s.outcome = True, outcome
        ep = s.episode
        ep.rewards = [r]
        ep.scores = [{"reward": r, "turns": float(len(ep.turns)), "timeout": float(outcome == "timeout"), **checked}]
        self._ended.setdefault(s.group, []).append(s)
        self.sessions.pop(sid, None)
        self.ended[sid] = s
        self._changed.set()
        return s

    async def _reap(self) -> None:
        """End sessions idle for ``session_timeout_s`` with reward 0 (``outcome: timeout``)."""
        while True:
            await asyncio.sleep(min(1.0, self.session_timeout_s / 4))
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if not s.ended and not s.lock.locked() and now - s.last_active > self.session_timeout_s:
                    self.counts["timeouts"] += 1
                    self.end_session(s.id, 0.0, outcome="timeout")

    # -- one turn ----------------------------------------------------------------------
    async def chat(self, sid: str, body: Any) -> tuple[dict, Session]:
        """Run one assistant turn of session ``sid``; returns the OpenAI chat completion."""
        s = self._session(sid)
        if s.lock.locked():
            raise RolloutServerError(409, f"session {sid!r} is already running a turn; a session is one "
                                          "conversation: wait for the answer", "conflict_error")
        async with s.lock:
            s.last_active = time.monotonic()
            messages, tools, sampling, seed = self._parse(body)
            key = json.dumps([messages, tools, sampling.model_dump(), seed], sort_keys=True, default=str)
            if s.last is not None and s.last[0] == key:   # a retry of the last turn: its answer again
                self.counts["replayed_turns"] += 1
                return s.last[1], s
            conv = s.conversation
            n = len(conv.messages)
            if conv.samples and json.dumps(tools, sort_keys=True) != json.dumps(conv.tools, sort_keys=True):
                raise RolloutServerError(
                    409, f"session {sid!r}: the tools differ from the ones of its first turn; the prompt ids already "
                         "generated hold those tools, so a session keeps them: start a new session", "conflict_error")
            if len(messages) <= n or [m.get("role") for m in messages[:n]] != [m["role"] for m in conv.messages]:
                raise RolloutServerError(
                    409, f"session {sid!r}: the request's messages do not extend the session's history "
                         f"({n} messages: roles {[m['role'] for m in conv.messages]}); send the whole "
                         "conversation so far plus the new messages, or start a new session", "conflict_error")
            bad = sorted({m["role"] for m in messages[n:]} - {"user", "tool"})
            if bad:
                raise RolloutServerError(400, f"the new messages of a turn are user or tool messages; got {bad} (a "
                                              "system message belongs first, in the first turn)")
            conv.messages = [dict(m) for m in messages[:n]]   # the agent's rendition (only its message ends count)
            conv.tools = tools
            try:
                sample = await conv.step(messages[n:], sampling=sampling, seed=seed)
            except PrefixSpliceError as e:
                raise RolloutServerError(409, f"session {sid!r}: {e}", "conflict_error") from None
            except RequestRejectedError as e:
                self.counts["rejected_turns"] += 1
                raise RolloutServerError(400, f"the Dynamo frontend refused the turn: {e.server_message}") from None
            except ContiguityError as e:
                raise RolloutServerError(500, f"token contiguity broke: {e}", "server_error") from None
            except GenerationError as e:
                raise RolloutServerError(503, f"generation failed: {e}", "server_error") from None
            except Exception as e:  # noqa: BLE001 - the chat template failed on the agent's messages
                raise RolloutServerError(400, f"the messages cannot be rendered by the model's chat template: "
                                              f"{type(e).__name__}: {e}") from None
            s.episode.add_turn(sample)
            s.last_active = time.monotonic()
            self.counts["turns"] += 1
            out = self._completion(s, sample, await self.generation.model(), want_logprobs=bool(body.get("logprobs")))
            s.last = (key, out)
        return out, s

    #: OpenAI chat fields the endpoint takes; others that change what is sampled are refused
    ACCEPTED = {"model", "messages", "tools", "tool_choice", "stream", "stream_options", "temperature", "top_p",
                "max_tokens", "max_completion_tokens", "seed", "logprobs", "top_logprobs", "n", "user", "metadata",
                "parallel_tool_calls", "store"}

    def _parse(self, body: Any):
        """Check an OpenAI chat request; returns ``(messages, tools, sampling, seed)``.
        Raises :class:`RolloutServerError` (400) naming the field."""
        if not isinstance(body, dict):
            raise RolloutServerError(400, "the body must be a JSON object (an OpenAI chat completion request)")
        refused = sorted(k for k, v in body.items() if k not in self.ACCEPTED and v is not None)
        if refused:
            raise RolloutServerError(400, f"not supported by the rollout endpoint: {refused} (a trajectory must be what "
                                          "the policy samples: no stop strings, grammars, biases or penalties)")
        if body.get("tool_choice") not in (None, "auto"):
            raise RolloutServerError(400, f"tool_choice {body['tool_choice']!r} is not supported: only 'auto' (the "
                                          "policy decides; forcing a choice would change what it samples)")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise RolloutServerError(400, "'messages' must be a non-empty list of {'role', 'content'} objects")
        try:
            messages = text_messages([dict(m) for m in messages])
        except ValueError as e:
            raise RolloutServerError(400, str(e)) from None
        for i, m in enumerate(messages):
            calls = m.get("tool_calls")
            if calls is not None and not (isinstance(calls, list) and all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in calls)):
                raise RolloutServerError(400, f"messages[{i}].tool_calls must be a list of "
                                              "{'id', 'type': 'function', 'function': {'name', 'arguments'}}")
        tools = body.get("tools") or None
        if tools is not None and not (isinstance(tools, list) and all(
                isinstance(t, dict) and isinstance(t.get("function", t), dict)
                and isinstance(t.get("function", t).get("name"), str) for t in tools)):
            raise RolloutServerError(400, "'tools' must be a list of OpenAI tool definitions "
                                          "({'type': 'function', 'function': {'name', 'parameters'}})")
        if body.get("n", 1) not in (1, None):
            raise RolloutServerError(400, "'n' must be 1: one session is one trajectory (start a session per sample)")
        d = self.sampling
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
            raise RolloutServerError(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}")
        try:
            sampling = SamplingConfig(
                temperature=body["temperature"] if body.get("temperature") is not None else d.temperature,
                top_p=body["top_p"] if body.get("top_p") is not None else d.top_p,
                top_k=d.top_k, max_tokens=max_tokens or d.max_tokens)
        except ValueError as e:
            raise RolloutServerError(400, f"bad sampling parameters: {e}") from None
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise RolloutServerError(400, f"'seed' must be an integer in [0, 2**63), got {str(seed)[:30]}")
        return messages, [dict(t) for t in tools] if tools else None, sampling, seed

    def _completion(self, s: Session, sample, model: str, *, want_logprobs: bool) -> dict:
        msg = {"role": "assistant", "content": (sample.message or {}).get("content")}
        for key in ("tool_calls", "reasoning_content"):
            if (sample.message or {}).get(key):
                msg[key] = sample.message[key]
        choice: dict = {"index": 0, "message": msg, "finish_reason": sample.finish_reason}
        if want_logprobs:
            ids = sample.generation_token_ids.tolist()
            toks = self.tokenizer.convert_ids_to_tokens(ids)
            choice["logprobs"] = {"content": [{"token": t, "logprob": float(lp), "token_id": i, "top_logprobs": []}
                                              for t, lp, i in zip(toks, sample.generation_logprobs.tolist(), ids)]}
        p, g = len(sample.prompt_token_ids), len(sample.generation_token_ids)
        return {"id": f"chatcmpl-{s.id}-{len(s.episode.turns)}", "object": "chat.completion",
                "created": int(time.time()), "model": model, "choices": [choice],
                "usage": {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}}

    # -- HTTP ----------------------------------------------------------------------------
    def app(self):
        """The FastAPI application (routes of the module docstring)."""
        app = FastAPI(title="dynamo-rl rollout endpoint", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(RolloutServerError)
        async def _error(_req, e: RolloutServerError):
            return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.status}}, status_code=e.status)

        async def _json(req: Request, empty: Any = ...) -> Any:
            try:
                if empty is not ... and not await req.body():
                    return empty
                return await req.json()
            except ValueError:
                raise RolloutServerError(400, "the body is not JSON") from None
            except ClientDisconnect:  # the agent went away mid-request (stopped at the end of a run)
                raise RolloutServerError(400, "the client disconnected before its request was read") from None

        @app.get("/health")
        async def health():
            return {"status": "ok", "open_sessions": len(self.sessions), "ended_not_collected": len(self.ended),
                    **self.counts}

        @app.post("/v1/sessions", status_code=201)
        async def open_(req: Request):
            body = await _json(req, empty={})
            if not isinstance(body, dict):
                raise RolloutServerError(400, "the body must be a JSON object: {'group': str, 'metadata': {}}")
            meta = body.get("metadata")
            if meta is not None and not isinstance(meta, dict):
                raise RolloutServerError(400, "'metadata' must be an object")
            s = self.open_session(body.get("group"), meta)
            return {"id": s.id, "group": s.group, "base_url": f"{self.url}/sessions/{s.id}/v1"}

        @app.get("/v1/sessions/{sid}")
        async def status(sid: str):
            return self._session(sid, open_only=False).summary()

        @app.post("/v1/sessions/{sid}/end")
        async def end(sid: str, req: Request):
            body = await _json(req)
            if not isinstance(body, dict) or "reward" not in body:
                raise RolloutServerError(400, "the body must be {'reward': number, 'scores': {...}?}")
            s = self._session(sid)
            if s.lock.locked():
                raise RolloutServerError(409, f"session {sid!r} is running a turn; end it once the answer came",
                                         "conflict_error")
            s = self.end_session(sid, body["reward"], body.get("scores"))
            return {"id": s.id, "group": s.group, "turns": len(s.episode.turns), "reward": s.episode.reward}

        @app.get("/sessions/{sid}/v1/models")
        async def models(sid: str):
            self._session(sid)
            return {"object": "list", "data": [{"id": await self.generation.model(), "object": "model",
                                                "owned_by": "dynamo-rl"}]}

        @app.post("/sessions/{sid}/v1/chat/completions")
        async def chat(sid: str, req: Request):
            body = await _json(req)
            out, _ = await self.chat(sid, body)
            if isinstance(body, dict) and body.get("stream"):
                return StreamingResponse(_sse(out), media_type="text/event-stream")
            return out

        return app


def _sse(completion: dict):
    """An OpenAI chat completion as stream chunks (role + content, tool calls, finish)."""
    choice = completion["choices"][0]
    msg = choice["message"]
    base = {k: completion[k] for k in ("id", "created", "model")}

    def chunk(delta: dict, finish=None, logprobs=None) -> str:
        c = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            c["logprobs"] = logprobs
        return f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [c]})}\n\n"

    async def gen():
        delta: dict = {"role": "assistant", "content": msg.get("content") or ""}
        if msg.get("reasoning_content"):
            delta["reasoning_content"] = msg["reasoning_content"]
        yield chunk(delta, logprobs=choice.get("logprobs"))
        if msg.get("tool_calls"):
            yield chunk({"tool_calls": [{"index": i, **tc} for i, tc in enumerate(msg["tool_calls"])]})
        yield chunk({}, finish=choice["finish_reason"])
        yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': completion['usage']})}\n\n"
        yield "data: [DONE]\n\n"

    return gen()


class _Server:
    """``uvicorn.Server`` that leaves signal handling to the trainer (Ctrl-C / SIGTERM)."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            def capture_signals(self):  # noqa: D102 - uvicorn's would replace the trainer's handlers
                return nullcontext()

        return Server(config)
