"""``DynamoGeneration``: token-in/token-out rollouts through a Dynamo frontend.

Owns the data plane of ``shared/DESIGN.md``: one ``aiohttp.ClientSession`` per backend, a
semaphore bounding requests in flight, exact tensors per sample, retries with backoff.
aiohttp, not httpx: httpx 0.28–0.29's connection pool rescans every connection for every
request (encode/httpx#3215), which at the hundreds of requests an RL batch keeps in flight
costs milliseconds of CPU per request on the trainer's event loop
(``benchmarks/generation.py``).
Must not import ``dynamo_rl.rl``, ``dynamo_rl.k8s`` or ``dynamo_rl.serving`` (the worker
is reached only over HTTP).

Wire protocol (Dynamo 1.6.1 frontend, OpenAI routes):

* A prompt given as token ids goes to ``POST /v1/completions`` with ``"prompt": [ids]``;
  a prompt given as chat messages goes to ``POST /v1/chat/completions`` (the frontend
  renders the chat template and tokenizes).
* Every request asks ``nvext.extra_fields = ["worker_id", "completion_token_ids",
  "engine_data"]``: the generated ids are read from ``nvext.completion_token_ids`` (never
  re-encoded from text); ``nvext.worker_id`` names the worker; the worker's own
  ``engine_data`` passthrough carries ``prompt_token_ids`` (the prompt the engine ran,
  after a prefix splice) and ``weights_version`` (see ``dynamo_rl.serving.worker``).
* A chat prompt with history ids (:class:`ChatPrompt`) sends them as
  ``nvext.annotations = ["required_prefix_token_ids:1,5,6"]``; the worker splices them in
  place of the rendered history (our worker only).
* A chat prompt with ``token_ids`` sends them as ``nvext.token_data``: the frontend runs
  exactly those ids instead of rendering the messages (both worker kinds; verified on
  1.6.1 without ``backend_instance_id``), and still applies the model's tool-call and
  reasoning parsers to the output. ``tools`` go in the body as OpenAI ``tools``.
* ``n`` samples per prompt are ``n`` separate requests, sample ``k`` with seed
  ``seed + k`` when a seed is given (so a seeded replay reproduces every sample). The
  frontend refuses ``n > 1`` together with ``completion_token_ids`` ("requires exactly one
  generated choice").
* Logprobs are the sampled tokens' (``logprobs: 1`` on completions, ``logprobs: true`` on
  chat), read from the OpenAI ``logprobs`` object and checked to align with the ids.

Retries: connection refused/reset, timeouts and HTTP 502/503/504 (what the 1.6.1 frontend
answers while a worker is gone or "not ready to serve requests yet") are retried with
exponential backoff (50 ms doubling to 2 s, jittered; a small bounded loop, no retry
library is installed) until ``GenerationConfig.retry_deadline_s`` has passed since the
frontend was last seen answering (shared by all requests of the client, so a dead
frontend fails a whole batch once, not once per request), then
:class:`FrontendUnavailableError`. Other 4xx/5xx are not retried
(:class:`RequestRejectedError` with the server's message). A 404 on a generation route
means the model is not registered: if ``/v1/models`` lists other models but not this one,
it is a :class:`ModelNotServedError` that lists them (not retried); if it lists none (every
worker gone: the frontend deregisters a model ~15 s after its last worker, say while
workers restart), lists this one again, or cannot be read, the 404 is retried like a 503.
The first failing request
ends the batch: the rest are cancelled and the error lists every missing
``(prompt_index, sample_index)``. A retried request is resent whole; a request that
reached the worker before the connection broke may therefore appear twice in the
worker's record, but once in the result.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import torch

from dynamo_rl.config import GenerationConfig, SamplingConfig
from dynamo_rl.generation import _wire
from dynamo_rl.generation._endpoint import choose_model, resolve_frontend_url
from dynamo_rl.generation.errors import (
    FrontendUnavailableError,
    GenerationError,
    ModelNotServedError,
    RequestRejectedError,
    ResponseFormatError,
    _with_batch_context,
)

#: HTTP statuses that mean "the frontend (or its upstream) is briefly unavailable".
RETRY_STATUSES = frozenset({502, 503, 504})
#: Transport errors worth retrying (refused, reset, timeouts, a connection dropped mid-response).
_RETRY_EXC = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)
EXTRA_FIELDS = ["worker_id", "completion_token_ids", "engine_data"]
#: Dynamo 1.6.1 rejects unknown body and ``nvext`` keys but passes ``nvext.annotations``
#: (strings) to the worker: the verbatim history ids travel as one annotation
#: ``"required_prefix_token_ids:1,5,6"`` (see ``dynamo_rl.serving.worker``).
REQUIRED_PREFIX_ANNOTATION = "required_prefix_token_ids:"
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 2.0


@dataclass
class Sample:
    """One generated sample, exactly as the engine produced it.

    ``prompt_token_ids`` int64 ``[P]`` (what the engine saw, including a spliced history),
    ``generation_token_ids`` int64 ``[G]`` (``G`` may be 0), ``generation_logprobs`` float32
    ``[G]`` (log-softmax of the raw logits, as the engine reports them), ``finish_reason``
    (``"stop"``: the last id is the stop/EOS token; ``"length"``; ``"cancelled"``: the
    engine aborted it, the ids are a prefix), ``weights_version`` of the weights that produced it,
    ``worker_id`` (Dynamo instance id, as a string), ``text`` the frontend's detokenized
    text (for chat histories only; never re-encoded), ``request_id`` the response's ``id``
    (``cmpl-<uuid>``; the worker records ``<uuid>``), ``message`` the chat route's OpenAI
    message as the frontend's parsers left it (``content``, ``tool_calls``,
    ``reasoning_content``; None on the completion route).
    """

    prompt_index: int
    sample_index: int
    prompt_token_ids: torch.Tensor
    generation_token_ids: torch.Tensor
    generation_logprobs: torch.Tensor
    finish_reason: str
    weights_version: int | None
    worker_id: str | None
    text: str = ""
    request_id: str | None = None
    message: dict | None = None


@dataclass(frozen=True)
class ChatPrompt:
    """Chat messages plus, for turn N+1 of a conversation, either the verbatim ids of turn
    N's prompt + generation that our worker splices in place of the rendered history
    (``required_prefix_token_ids``; ``dynamo_rl.models.chat.splice_required_prefix``) or the
    whole prompt's ids (``token_ids``, sent as ``nvext.token_data``: any worker kind).
    ``tools``: OpenAI tool definitions (``[{"type": "function", "function": {...}}]``)."""

    messages: list[dict]
    required_prefix_token_ids: Sequence[int] | None = None
    tools: list[dict] | None = None
    token_ids: Sequence[int] | None = None


@dataclass
class _Req:
    key: tuple[int, int]
    path: str
    body: dict[str, Any]
    prompt_ids: list[int] | None  # known for completions; chat gets it from the worker
    chat: bool
    required_prefix: list[int] | None = None


@dataclass
class _Health:
    down_since: float | None = None
    last_error: str = ""
    last_status: int | None = None
    counts: dict = field(default_factory=lambda: {"requests": 0, "retries": 0})


class DynamoGeneration:
    """Async rollouts through a Dynamo frontend (OpenAI routes, token ids in and out).

    Args:
        cfg: ``recipe.generation`` (endpoint, sampling defaults, ``max_concurrency``,
            ``request_timeout_s`` per attempt, ``retry_deadline_s``).
        frontend_url: explicit base URL (e.g. the embedded stack's); see
            :func:`resolve_frontend_url` for which combinations are allowed.
    Raises:
        EndpointConfigError: the endpoint cannot be resolved (raised here, before any I/O).

    Use as ``async with DynamoGeneration(cfg) as gen: samples = await gen.generate(...)``.
    """

    def __init__(self, cfg: GenerationConfig, *, frontend_url: str | None = None):
        self.cfg = cfg
        self.base_url = resolve_frontend_url(cfg.dynamo, frontend_url=frontend_url)
        self._model: str | None = None
        self._model_lock: asyncio.Lock | None = None
        self._sem: asyncio.Semaphore | None = None
        self._health = _Health()
        self._http: aiohttp.ClientSession | None = None  # made on first use, inside the event loop
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------
    async def __aenter__(self) -> DynamoGeneration:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session and its connections (idempotent)."""
        self._closed = True
        if self._http is not None:
            await self._http.close()

    def _session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("this DynamoGeneration is closed")
        if self._http is None:
            # trust_env: HTTP(S)_PROXY / NO_PROXY are honoured, as httpx did before
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.cfg.max_concurrency),
                timeout=aiohttp.ClientTimeout(total=self.cfg.request_timeout_s), trust_env=True)
        return self._http

    async def _fetch(self, method: str, url: str, body: dict | None, timeout_s: float | None = None) -> _Reply:
        """One HTTP exchange, the whole body read. Raises the ``_RETRY_EXC`` transport errors."""
        kw = {} if timeout_s is None else {"timeout": aiohttp.ClientTimeout(total=timeout_s)}
        async with self._session().request(method, url, json=body, **kw) as resp:
            return _Reply(resp.status, await resp.read(), resp.reason or "")

    @property
    def stats(self) -> dict:
        """``{"requests": HTTP attempts, "retries": attempts that were retried}`` since construction."""
        return dict(self._health.counts)

    # -- model discovery -------------------------------------------------------------
    async def model(self) -> str:
        """The served model name: ``generation.dynamo.model``, checked against
        ``/v1/models``, or the only model listed there. Cached after the first call.

        Raises:
            ModelNotServedError: the named model is not served (lists the served ones),
                several are served and none is named, or none appears before the retry
                deadline.
            FrontendUnavailableError / RequestRejectedError: see :meth:`generate`.
        """
        if self._model is not None:
            return self._model
        if self._model_lock is None:
            self._model_lock = asyncio.Lock()
        async with self._model_lock:
            if self._model is not None:
                return self._model
            t0 = time.monotonic()
            attempt = 0
            while True:
                body = await self._call("GET", "/v1/models", None)
                name = choose_model(body, self.cfg.dynamo.model, self.base_url)
                if name is not None:
                    self._model = name
                    return name
                waited = time.monotonic() - t0
                if waited >= self.cfg.retry_deadline_s:
                    raise ModelNotServedError(
                        f"{self.base_url}/v1/models listed no model for {waited:.1f}s "
                        f"(generation.retry_deadline_s={self.cfg.retry_deadline_s}); are the workers "
                        "up and registered with this frontend?", served=[])
                await asyncio.sleep(self._backoff(attempt, self.cfg.retry_deadline_s - waited))
                attempt += 1

    # -- public API ----------------------------------------------------------------
    async def generate(self, prompts: Sequence[Any], *, n: int = 1, sampling: SamplingConfig | None = None,
                       seed: int | None = None) -> list[list[Sample]]:
        """Generate ``n`` samples for every prompt and return them as ``out[i][k]``.

        Args:
            prompts: each a token-id prompt (``list[int]`` or 1-D integer tensor →
                ``/v1/completions``), a list of chat messages (``[{"role", "content"}]`` →
                ``/v1/chat/completions``), or a :class:`ChatPrompt`.
            n: samples per prompt (separate requests; sample ``k`` uses seed ``seed + k``).
            sampling: temperature / top_p / top_k / max_tokens (default ``cfg.sampling``).
            seed: base seed; None lets the engine draw one per request.
        Returns:
            ``len(prompts)`` lists of ``n`` :class:`Sample`, ``out[i][k].prompt_index == i``,
            ``.sample_index == k``.
        Raises:
            FrontendUnavailableError: refused/timeouts/502/503/504 past the retry deadline.
            RequestRejectedError: a 4xx (or 500), with the server's message; not retried.
            ResponseFormatError: a response that cannot be read exactly (e.g. id ``1.5``).
            ModelNotServedError: see :meth:`model`.
            Each carries ``missing`` (pairs not returned) and ``completed`` (samples that were).
        """
        out: list[list[Sample | None]] = [[None] * n for _ in range(len(prompts))]
        done: list[Sample] = []
        try:
            async for s in self.stream(prompts, n=n, sampling=sampling, seed=seed):
                out[s.prompt_index][s.sample_index] = s
                done.append(s)
        except GenerationError as e:
            e.completed = done
            raise
        return out  # type: ignore[return-value]

    async def stream(self, prompts: Sequence[Any], *, n: int = 1, sampling: SamplingConfig | None = None,
                     seed: int | None = None) -> AsyncIterator[Sample]:
        """Yield every ``(prompt_index, sample_index)`` sample exactly once, as it finishes.

        Same arguments and errors as :meth:`generate`; on an error, samples already
        yielded are not repeated and ``error.missing`` lists the others. Closing the
        iterator early cancels the requests still in flight.
        """
        if n < 1:
            raise ValueError(f"n must be ≥ 1, got {n}")
        sampling = sampling or self.cfg.sampling
        reqs = [self._build(i, k, p, n, sampling, seed) for i, p in enumerate(prompts) for k in range(n)]
        if not reqs:
            return
        try:
            model = await self.model()
        except GenerationError as e:
            raise _with_batch_context(e, missing=[r.key for r in reqs]) from None
        for r in reqs:
            r.body["model"] = model
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.cfg.max_concurrency)
        queue: asyncio.Queue = asyncio.Queue()

        async def run(r: _Req) -> None:
            try:
                async with self._sem:
                    s = await self._one(r)
            except BaseException as e:  # noqa: BLE001  (delivered to the consumer)
                queue.put_nowait((r.key, e))
                if not isinstance(e, Exception):
                    raise
            else:
                queue.put_nowait((r.key, s))

        tasks = [asyncio.create_task(run(r)) for r in reqs]
        pending = {r.key for r in reqs}
        try:
            while pending:
                key, item = await queue.get()
                if isinstance(item, BaseException):
                    if isinstance(item, asyncio.CancelledError):
                        continue
                    if isinstance(item, GenerationError):
                        raise _with_batch_context(item, missing=sorted(pending))
                    raise item
                if key not in pending:  # cannot happen: one task per key
                    raise RuntimeError(f"sample {key} delivered twice")
                pending.discard(key)
                yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- one request -----------------------------------------------------------------
    def _build(self, i: int, k: int, prompt: Any, n: int, sampling: SamplingConfig, seed: int | None) -> _Req:
        body: dict[str, Any] = {
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stream": False,
            "nvext": {"extra_fields": list(EXTRA_FIELDS)},
        }
        if sampling.top_k:
            body["top_k"] = sampling.top_k
        if seed is not None:
            body["seed"] = seed + k
        messages, prefix = _as_chat(prompt, i)
        if isinstance(prompt, ChatPrompt):
            if prompt.tools:
                body["tools"] = [dict(t) for t in prompt.tools]
            if prompt.token_ids is not None:
                ids = _wire.ids_to_list(prompt.token_ids, f"prompts[{i}].token_ids")
                if not ids:
                    raise ValueError(f"prompts[{i}].token_ids is empty")
                body["nvext"]["token_data"] = ids
        if messages is None:
            ids = _wire.ids_to_list(prompt, f"prompts[{i}]")
            if not ids:
                raise ValueError(f"prompts[{i}] is empty; a prompt needs at least one token id")
            body["prompt"] = ids
            body["logprobs"] = 1
            return _Req((i, k), "/v1/completions", body, ids, chat=False)
        body["messages"] = messages
        body["logprobs"] = True
        if prefix is not None:
            body["nvext"]["annotations"] = [REQUIRED_PREFIX_ANNOTATION + ",".join(map(str, prefix))]
        return _Req((i, k), "/v1/chat/completions", body, None, chat=True, required_prefix=prefix)

    async def _one(self, r: _Req) -> Sample:
        what = f"{self.base_url}{r.path} (prompt {r.key[0]}, sample {r.key[1]})"
        body = await self._call("POST", r.path, r.body)
        choice = _wire.choice_of(body, what)
        nvext = body.get("nvext") or choice.get("nvext") or {}
        engine_data = nvext.get("engine_data") if isinstance(nvext, dict) else None
        if "completion_token_ids" not in (nvext or {}):
            raise ResponseFormatError(
                f"{what}: the response has no nvext.completion_token_ids although the request asked "
                f"for it (nvext.extra_fields={EXTRA_FIELDS}); the frontend must be Dynamo ≥ 1.6 "
                f"(got nvext keys {sorted(nvext) if isinstance(nvext, dict) else nvext!r})")
        gen = _wire.as_token_ids(nvext["completion_token_ids"], f"{what}: nvext.completion_token_ids")
        lps = _wire.completion_logprobs(choice, r.chat)
        if lps is None and isinstance(engine_data, dict):
            lps = engine_data.get("completion_logprobs")
        if lps is None:
            if len(gen):
                raise ResponseFormatError(
                    f"{what}: the response carries no logprobs for its {len(gen)} tokens; the worker "
                    "must return log_probs when the request asks for logprobs")
            lps = []
        logprobs = _wire.as_logprobs(lps, len(gen), f"{what}: logprobs")
        echoed = engine_data.get("prompt_token_ids") if isinstance(engine_data, dict) else None
        if r.prompt_ids is not None:
            prompt = torch.tensor(r.prompt_ids, dtype=torch.int64)
            if echoed is not None and echoed != r.prompt_ids and \
                    _wire.as_token_ids(echoed, f"{what}: nvext.engine_data.prompt_token_ids").tolist() != r.prompt_ids:
                raise ResponseFormatError(
                    f"{what}: the worker reports prompt ids that differ from the ids sent "
                    f"(first difference at {_wire.first_difference(r.prompt_ids, list(echoed))})")
        elif echoed is not None:
            prompt = _wire.as_token_ids(echoed, f"{what}: nvext.engine_data.prompt_token_ids")
        else:
            raise ResponseFormatError(
                f"{what}: a chat response must carry the prompt ids the engine saw "
                "(nvext.engine_data.prompt_token_ids, set by dynamo_rl.serving.worker); this worker "
                "does not send them")
        version = _wire.optional_int(engine_data.get("weights_version") if isinstance(engine_data, dict) else None,
                                     f"{what}: weights_version")
        finish = choice.get("finish_reason")
        if not isinstance(finish, str):
            raise ResponseFormatError(f"{what}: the choice has no finish_reason (got {finish!r})")
        message = choice.get("message") if r.chat and isinstance(choice.get("message"), dict) else None
        text = choice.get("text") if not r.chat else (message or {}).get("content")
        token_data = r.body["nvext"].get("token_data")
        if token_data is not None and prompt.tolist() != token_data:
            raise ResponseFormatError(
                f"{what}: the engine ran other prompt ids than nvext.token_data (first difference at "
                f"{_wire.first_difference(token_data, prompt.tolist())}); the frontend must be Dynamo ≥ 1.6.1")
        return Sample(
            prompt_index=r.key[0], sample_index=r.key[1],
            prompt_token_ids=prompt, generation_token_ids=gen, generation_logprobs=logprobs,
            finish_reason=finish, weights_version=version,
            worker_id=_wire.worker_id_of(nvext), text=text or "",
            request_id=body.get("id") if isinstance(body.get("id"), str) else None,
            message=message,
        )

    def _backoff(self, attempt: int, remaining: float) -> float:
        delay = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * (2 ** min(attempt, 16)))
        return max(0.0, min(delay * random.uniform(0.5, 1.0), remaining))

    async def _call(self, method: str, path: str, body: dict | None) -> Any:
        """One logical request with retries; returns the decoded JSON body.

        Raises:
            FrontendUnavailableError, RequestRejectedError, ResponseFormatError.
        """
        url = self.base_url + path
        h = self._health
        deadline = self.cfg.retry_deadline_s
        first_fail: float | None = None
        failed_at: float | None = None
        attempt = 0
        while True:
            h.counts["requests"] += 1
            try:
                resp = await self._fetch(method, url, body)
            except _RETRY_EXC as e:
                status, err = None, _transport_error(e, self.cfg.request_timeout_s)
            else:
                if resp.status_code < 400:
                    h.down_since = None
                    try:
                        return resp.json()
                    except ValueError:
                        raise ResponseFormatError(
                            f"{url}: HTTP {resp.status_code} with a body that is not JSON: {resp.text[:300]!r}") from None
                msg = _server_message(resp)
                if resp.status_code == 404 and method == "POST" and isinstance(body, dict) and "model" in body:
                    failed_at = time.monotonic()
                    model, served = body["model"], await self._served_models()
                    if served and model not in served:  # others are served, not this one: no outage
                        raise ModelNotServedError(
                            f"POST {url} → HTTP 404 ({msg}): model {model!r} is not served by "
                            f"{self.base_url}; served now: {', '.join(served)}. Not retried.", served=served)
                    # none is (every worker gone: the frontend deregisters a model ~15 s after
                    # its last one, e.g. while they restart), or it is back already: retried
                    why = ("/v1/models did not answer" if served is None else
                           f"{model!r} is listed again" if served else
                           "no model is registered with the frontend (workers down?)")
                    status, err = 404, f"HTTP 404: {msg}; {why}"
                elif resp.status_code not in RETRY_STATUSES:
                    raise RequestRejectedError(
                        f"{method} {url} → HTTP {resp.status_code}: {msg} (not retried)",
                        url=url, status=resp.status_code, server_message=msg)
                else:
                    status, err = resp.status_code, f"HTTP {resp.status_code}: {msg}"
            now = failed_at if failed_at is not None else time.monotonic()  # a probe's time counts too
            failed_at = None
            if first_fail is None:
                first_fail = now
            if h.down_since is None:
                h.down_since = now
            h.last_status, h.last_error = status, err
            waited = now - min(first_fail, h.down_since)
            if waited >= deadline:
                raise FrontendUnavailableError(
                    f"{method} {url} failed for {waited:.1f}s (generation.retry_deadline_s={deadline}); "
                    f"last error: {err}. Is the Dynamo frontend at {self.base_url} up and serving?",
                    url=url, last_status=status, last_error=err, waited_s=waited)
            h.counts["retries"] += 1
            await asyncio.sleep(self._backoff(attempt, deadline - waited))
            attempt += 1


    async def _served_models(self) -> list[str] | None:
        """The model ids ``/v1/models`` lists now, or None when it does not answer with a
        list (a short probe: it runs inside the retry deadline)."""
        try:
            r = await self._fetch("GET", self.base_url + "/v1/models", None, min(5.0, self.cfg.request_timeout_s))
            return [str(m["id"]) for m in r.json()["data"]] if r.status_code == 200 else None
        except Exception:  # noqa: BLE001 - unknown: the caller retries
            return None


@dataclass
class _Reply:
    """A whole HTTP response: ``status_code``, the raw ``content`` and the ``reason_phrase``."""

    status_code: int
    content: bytes
    reason_phrase: str

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON. Raises ValueError when it is not."""
        return json.loads(self.content)


def _transport_error(e: BaseException, timeout_s: float) -> str:
    """A transport failure in words, with the exception's type: "connect error", "timeout"
    or "connection dropped"."""
    detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if isinstance(e, asyncio.TimeoutError):
        return f"timeout: no whole response within generation.request_timeout_s={timeout_s} ({detail})"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"connect error ({detail})"
    return f"connection dropped ({detail})"


def _server_message(resp: _Reply) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body.get("message", body.get("detail")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)[:500]
    return str(body)[:500]


def _as_chat(prompt: Any, i: int) -> tuple[list[dict] | None, list[int] | None]:
    """(messages, required_prefix) for a chat prompt, (None, None) for a token-id prompt."""
    if isinstance(prompt, ChatPrompt):
        prefix = None
        if prompt.required_prefix_token_ids is not None:
            prefix = _wire.ids_to_list(prompt.required_prefix_token_ids, f"prompts[{i}].required_prefix_token_ids")
        return _check_messages(prompt.messages, i), prefix
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return _check_messages(prompt, i), None
    return None, None


def _check_messages(messages: Any, i: int) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"prompts[{i}]: chat messages must be a non-empty list of {{'role', 'content'}} dicts")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise ValueError(f"prompts[{i}][{j}] = {m!r:.80} is not a chat message ({{'role': ..., 'content': ...}})")
    return [dict(m) for m in messages]
