"""The inference engine behind our Dynamo workers: continuous batching over a KV cache.

Owns: the request lifecycle (streams, aborts), pause/resume/flush and the counters. The
scheduling loop, what each step runs and its hand-offs to the engine thread are
:mod:`dynamo_rl.serving.engine_steps`'; weight loading (copied or in place) and the weights
version's rules are :mod:`dynamo_rl.serving.engine_weights`' (both mixins of
:class:`Engine`). Who holds which KV slot is :mod:`dynamo_rl.serving.scheduler`'s; the
forwards and the weights' bytes are :class:`~dynamo_rl.serving.model_runner.ModelRunner`'s.
Must not import ``dynamo_rl.serving.worker``/``stack`` or anything below ``serving`` in the
module map (``generation``, ``rl``, ``k8s``, ``cli``); it uses ``dynamo_rl.models`` only in
:meth:`Engine.from_pretrained`.

How a request flows
    :meth:`Engine.generate` validates the prompt and returns an async iterator. The
    request waits in a FIFO queue. The scheduling loop (an asyncio task on the caller's
    event loop) admits waiting requests at step boundaries: each gets a KV slot
    (``max_batch_size`` slots) and all admitted together are prefilled in ONE forward
    (right-padded, at most ``max_prefill_tokens`` padded tokens). Then every running
    request is decoded in ONE batched forward per step (``stats["max_decode_batch"]``
    shows the largest); requests that arrive meanwhile join at the next step boundary (with
    ``mix_prefill_decode``, the running ones decode their next token in that prefill forward).
    Forwards run on a dedicated thread (``run_in_executor``) so the event loop (Dynamo's
    uvloop in the worker) stays responsive; one hand-off runs up to ``decode_steps``
    decode steps, ending early when every row finished or a waiting one can be admitted;
    a row that finishes while others go on leaves the burst, its tokens delivered at once.
    Tokens reach each request through its own ``asyncio.Queue``. What runs on the engine
    thread (the model, KV cache, forwards, sampling, the weights' bytes) is
    :class:`~dynamo_rl.serving.model_runner.ModelRunner`; the forward itself is
    :mod:`dynamo_rl.serving._qwen3` (a functional Qwen3/Qwen2/Llama decoder over the HF
    module's own parameters). On CUDA,
    decode steps replay captured CUDA graphs (``cuda_graphs``), one per (batch, width)
    bucket; prefill runs eagerly.

Prefix reuse
    A finished request's slot keeps its keys/values until the slot is needed again. A new
    prompt that starts with the tokens held by a free slot takes that slot and prefills
    only the rest (``stats["prefix_cache_hit_tokens"]``): turn N+1 of a multi-turn rollout
    re-uses turn N. :meth:`Engine.flush_cache` drops all of them
    (``stats["kv_cache_tokens"]`` becomes 0); :meth:`Engine.load_weights` drops them too,
    since keys/values computed by old weights must not serve a new version. Identical
    prompts admitted together (a GRPO group: n samples of one prompt) are prefilled once;
    the others get a copy of its keys/values (``stats["prefill_shared_tokens"]``).

Logprobs
    The logprob of every sampled token is ``log_softmax(logits.float())`` at that token:
    the RAW distribution of the model (temperature 1, before top-k/top-p), in fp32, where
    ``logits`` is the model's output in its own dtype. The trainer computes the same
    quantity. Sampling conventions are in :mod:`dynamo_rl.serving._sampling`.

Determinism
    Each sampling request owns a CPU ``torch.Generator`` seeded with
    ``SamplingParams.seed`` (random when ``None``); every step draws the request's noise
    keys from it (see :mod:`dynamo_rl.serving._sampling`). So the same seed gives the same
    ids whatever else is in the batch, up to float round-off of batched matmuls (a
    near-tie may flip), and a different seed gives other ids.

Pause (drain) and weights versions
    :meth:`Engine.pause` stops admitting and waits until every in-flight request has
    finished its whole stream; requests that arrive while paused wait without tokens
    until :meth:`Engine.resume`. With ``timeout_s``, requests still running at the
    deadline are ended at the next step with ``finish_reason="abort"`` (their last token
    carries it). :meth:`Engine.load_weights` drains the same way before it swaps, so every
    token of a response carries one ``weights_version``. ``load_weights(adopt=True)``
    drops the captured CUDA graphs (they hold the old weights' addresses); they are
    captured again on first use. :meth:`Engine.load_weights_in_place` writes the new
    version into the parameters themselves (one pass over the bytes, graphs kept); if it
    fails part-way the engine refuses requests (:class:`PartialWeightsError`) until a later
    load completes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import torch

from dynamo_rl.serving._qwen3 import UnsupportedModelError
from dynamo_rl.serving.engine_types import (
    EngineStoppedError,
    PartialWeightsError,
    SamplingParams,
    TokenOutput,
    WeightsError,
    check_stream_interval,
    validate_prompt,
)
from dynamo_rl.serving.engine_steps import EngineSteps
from dynamo_rl.serving.engine_weights import EngineWeights
from dynamo_rl.serving.model_runner import ModelRunner
from dynamo_rl.serving.scheduler import Request, Scheduler

__all__ = ["Engine", "EngineStoppedError", "PartialWeightsError", "SamplingParams", "TokenOutput",
           "UnsupportedModelError", "WeightsError", "validate_prompt"]


class Engine(EngineSteps, EngineWeights):
    """Continuous-batching engine for a HF Qwen3/Qwen2/Llama causal LM (CPU or CUDA).

    Args:
        model: a ``transformers`` ``<Family>ForCausalLM`` (eval mode; moved to ``device``).
        eos_token_ids: ids that end a stream with ``"stop"`` unless ``ignore_eos``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        max_batch_size: KV slots = the most requests decoded at once.
        weights_version: version of the weights ``model`` holds now.
        max_seq_len: positions per slot (prompt + generation); default
            ``min(config.max_position_embeddings, 4096)``. A longer prompt is refused; a
            generation reaching it ends with ``"length"``.
        max_prefill_tokens: padded tokens (rows x longest row) per prefill forward; at
            least one request is always admitted.
        prefix_caching: re-use a free slot's keys/values for a prompt that extends them.
        prefill_chunk: the longest piece of a prompt prefilled in one forward; longer
            prompts are prefilled in several (same result, bounded activation memory).
        decode_steps: decode steps per hand-off to the engine thread (fewer thread switches;
            tokens then reach the streams in bursts of up to this many). A burst ends early
            when every row finished or a waiting one can be admitted, so admission still
            happens at the next step boundary; a row that finishes before the others leaves
            the burst and its tokens reach its stream at once.
        cuda_graphs: replay decode steps from captured CUDA graphs (default: on for CUDA).
        mix_prefill_decode: running requests decode one token in the forward that prefills
            newly admitted ones, where ``admitted x prompt width + running`` tokens fit
            ``max_prefill_tokens`` (``stats["mixed_batches"]``): with staggered arrivals
            (requests through a frontend) an admission then costs no forward of its own. The
            one-token rows are packed beside the prompts, not padded to their width
            (:func:`dynamo_rl.serving._qwen3.forward_groups`); the mixed forward runs
            eagerly (no CUDA graph).
    Raises:
        UnsupportedModelError (a ``ValueError``): the model's layout is not supported.
    """

    def __init__(self, model, *, eos_token_ids: Sequence[int], device="cpu", max_batch_size=64,
                 weights_version: int = 0, max_seq_len: int | None = None,
                 max_prefill_tokens: int = 8192, prefix_caching: bool = True,
                 prefill_chunk: int = 2048, decode_steps: int = 4, cuda_graphs: bool | None = None,
                 mix_prefill_decode: bool = False):
        self.device = torch.device(device)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.max_batch_size = int(max_batch_size)
        self.prefill_chunk = int(prefill_chunk)
        self.decode_steps = max(1, int(decode_steps))
        self.mix_prefill_decode = bool(mix_prefill_decode)
        self.weights_version = int(weights_version)
        self.paused = False
        self.layout = {"tp_rank": 0, "tp_size": 1}
        # the model, its KV cache, graphs and weights: run on the engine thread
        self._runner = ModelRunner(model, device=self.device, slots=self.max_batch_size, max_seq_len=max_seq_len,
                                   prefill_chunk=self.prefill_chunk,
                                   cuda_graphs=self.device.type == "cuda" if cuda_graphs is None else cuda_graphs)
        self.shape = self._runner.shape
        self.max_seq_len = self._runner.max_seq_len
        self.model = self._runner.model
        self.dtype = self._runner.dtype
        self.model_config = model.config.to_dict()
        self._requests: dict[str, Request] = {}
        self._hold = 0  # >0 while load_weights drains/swaps (admission stopped)
        self._partial: str | None = None  # why the weights are partial (failed in-place load)
        self._died: str | None = None  # why the scheduling loop died (until it is started again)
        self._counters = dict(forward_passes=0, prefill_batches=0, decode_batches=0, decode_handoffs=0,
                              max_decode_batch=0, tokens_generated=0, prompt_tokens=0,
                              prefix_cache_hit_tokens=0, prefill_shared_tokens=0, requests_finished=0,
                              loop_deaths=0, mixed_batches=0)
        # the KV slots, the waiting queue and the admission policy
        self._sched = Scheduler(self.max_batch_size, max_seq_len=self.max_seq_len,
                                max_prefill_tokens=int(max_prefill_tokens), prefill_chunk=self.prefill_chunk,
                                prefix_caching=prefix_caching, counters=self._counters)
        self._forward_seconds = 0.0  # wall time of the engine thread's forward calls (stats)
        self._request_seconds = self._queue_seconds = 0.0  # of the finished requests (stats)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._changed: asyncio.Condition | None = None
        self._load_lock: asyncio.Lock | None = None
        self._busy = False
        self._stopping = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype="float32", **kw) -> Engine:
        """Load a HF checkpoint directory with :func:`dynamo_rl.models.load_model`.

        ``eos_token_ids`` defaults to ``generation_config.eos_token_id`` (else
        ``config.eos_token_id``); other keywords go to :class:`Engine`.

        Raises:
            FileNotFoundError: ``path`` has no ``config.json``.
            ValueError: no EOS id is known (pass ``eos_token_ids=``), or the layout is unsupported.
        """
        from dynamo_rl.models import load_model

        model = load_model(path, dtype=dtype, device=device)
        if "eos_token_ids" not in kw:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            if eos is None:
                eos = model.config.eos_token_id
            if eos is None:
                raise ValueError(f"{path}: no eos_token_id in generation_config.json or config.json; "
                                 "pass eos_token_ids=[...]")
            kw["eos_token_ids"] = [eos] if isinstance(eos, int) else list(eos)
        return cls(model, device=device, **kw)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the scheduling loop on the running event loop (idempotent)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._loop is loop:
            return
        self._loop = loop
        self._died = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._load_lock = asyncio.Lock()
        self._stopping = False
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-forward")
        self._task = loop.create_task(self._schedule(), name="engine-scheduler")

    async def stop(self) -> None:
        """Stop the loop after the current step; unfinished requests raise :class:`EngineStoppedError`."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.gather(self._task, return_exceptions=True)  # a crashed loop failed its requests
        self._task = None
        error = EngineStoppedError("the engine was stopped before this request finished")
        for req in list(self._requests.values()):
            self._fail(req, error)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------ requests

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                 request_id: str | None = None) -> AsyncIterator[TokenOutput]:
        """Stream the generated tokens of one request as :class:`TokenOutput`.

        Args:
            prompt_ids: ``len >= 1`` token ids, each in ``[0, vocab_size)``, fewer than ``max_seq_len``.
            params: sampling settings (default :class:`SamplingParams()`).
            request_id: unique among in-flight requests; a uuid when ``None``.
        Returns:
            an async iterator; its last item has ``finish_reason`` set. Closing it early
            aborts the request.
        Raises:
            ValueError: (at call time) empty/too long prompt, id out of vocabulary, duplicate id.
            EngineStoppedError: (while iterating) the engine stopped or its forward failed.
        """
        return self._stream(self._new_request(prompt_ids, params, request_id))

    def generate_chunks(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                        request_id: str | None = None, stream_interval: int = 1
                        ) -> AsyncIterator[list[TokenOutput]]:
        """Like :meth:`generate`, but each item is every token of the request ready at that
        moment, in order (one decode hand-off delivers up to ``decode_steps`` tokens per
        request): a server sends one message per list instead of one per token.

        With ``stream_interval`` n > 1, after the first list (the first token, at once) a
        list is held until it has at least n tokens or the request ends (vLLM's
        ``--stream-interval``): fewer, larger messages, burstier streams. Same other
        arguments and errors as :meth:`generate`; the last list ends with the token whose
        ``finish_reason`` is set.

        Raises:
            ValueError: as :meth:`generate`, or ``stream_interval`` < 1.
        """
        interval = check_stream_interval(stream_interval)
        return self._stream(self._new_request(prompt_ids, params, request_id), chunked=True, interval=interval)

    def _new_request(self, prompt_ids, params, request_id) -> Request:
        params = params or SamplingParams()
        prompt = validate_prompt(prompt_ids, max_seq_len=self.max_seq_len, vocab_size=self.shape.vocab_size)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in flight; use a unique id")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        return Request(request_id, prompt, params, frozenset(stop_ids))

    async def _stream(self, req: Request, chunked: bool = False, interval: int = 1) -> AsyncIterator:
        if req.id in self._requests:  # registered when iteration starts, so an unused iterator leaks nothing
            raise ValueError(f"request_id {req.id!r} is already in flight; use a unique id")
        if self._partial is not None:
            raise PartialWeightsError(self._partial)
        self._requests[req.id] = req
        try:
            await self.start()
            req.queue = asyncio.Queue()
            if req.params.temperature > 0:
                req.generator = torch.Generator()  # CPU: keys for the batched noise
                seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)
                req.generator.manual_seed(seed)
            req.arrived = time.perf_counter()
            self._sched.waiting.append(req)
            self._wake.set()
            held: list[TokenOutput] = []  # chunked: tokens not yet due (stream_interval)
            started = False  # chunked: the first list (the first token) went out
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:  # aborted before its first token
                    return
                if not chunked:
                    yield item
                    if item.finish_reason is not None:
                        return
                    continue
                held.append(item)
                while item.finish_reason is None and not req.queue.empty():
                    item = req.queue.get_nowait()
                    if isinstance(item, BaseException):
                        raise item
                    held.append(item)
                if not started or len(held) >= interval or item.finish_reason is not None:
                    chunk, held, started = held, [], True
                    yield chunk
                if item.finish_reason is not None:
                    return
        finally:
            self._abort(req)  # no-op when it finished; else the consumer closed it early

    async def complete(self, prompt_ids: Sequence[int], params: SamplingParams | None = None
                       ) -> list[TokenOutput]:
        """Run one request to the end and return all of its :class:`TokenOutput`."""
        return [out async for out in self.generate(prompt_ids, params)]

    def abort(self, request_id: str) -> bool:
        """End a request. A waiting one ends now, without tokens (its iterator stops); a
        running one ends at the next step, its last token carrying ``finish_reason="abort"``.
        Returns False when no such request is in flight."""
        req = self._requests.get(request_id)
        if req is None or req.done:
            return False
        self._abort(req)
        return True

    def _abort(self, req: Request) -> None:
        if req.done:
            return
        if req.slot < 0:  # not admitted yet
            self._finish_unstarted(req)
        else:  # the scheduler ends it after the step in progress
            req.abort_requested = True
            if self._wake is not None:
                self._wake.set()

    # ------------------------------------------------------------------ control

    async def pause(self, timeout_s: float | None = None) -> dict:
        """Stop admitting requests and wait until no request is mid-stream (drain).

        Requests still running after ``timeout_s`` seconds end at the next step with
        ``finish_reason="abort"``. Returns ``{"paused": True, "drained": n_finished,
        "aborted": n_aborted, "seconds": s}``.
        """
        await self.start()
        t0 = time.perf_counter()
        self.paused = True
        running = self._sched.running()
        aborted = 0
        try:
            await asyncio.wait_for(self._wait_idle(), timeout_s)
        except asyncio.TimeoutError:  # builtin TimeoutError from 3.11 on
            still = self._sched.running()
            for req in still:
                req.abort_requested = True
            aborted = len(still)
            self._wake.set()
            await self._wait_idle()
        return {"paused": True, "drained": len(running) - aborted, "aborted": aborted,
                "seconds": time.perf_counter() - t0}

    async def resume(self) -> dict:
        """Admit requests again. Returns ``{"paused": False, "waiting": n}``."""
        await self.start()
        self.paused = False
        self._wake.set()
        return {"paused": False, "waiting": len(self._sched.waiting)}

    def flush_cache(self) -> dict:
        """Drop every cached key/value; ``stats["kv_cache_tokens"]`` is 0 afterwards.

        Returns ``{"freed_tokens": n}``.
        Raises:
            RuntimeError: requests are running (their keys/values are needed); call
                :meth:`pause` first.
        """
        running = len(self._sched.running())
        if running or self._busy:
            raise RuntimeError(f"flush_cache: {running} requests are running and need their KV cache; "
                               "call pause() first (it waits for them), then flush_cache()")
        return {"freed_tokens": self._sched.drop_cached()}

    @property
    def stats(self) -> dict:
        """Counters (ints): forward_passes, prefill_batches, decode_batches, decode_handoffs
        (calls to the engine thread that ran decode steps: ``decode_batches / decode_handoffs``
        steps per hand-off, at most ``decode_steps``), max_decode_batch,
        mixed_batches (prefill forwards that also decoded running requests),
        tokens_generated, prompt_tokens, loop_deaths (times the scheduling loop died, see
        :attr:`loop_died`), prefix_cache_hit_tokens (prompt tokens whose keys/values
        a free slot already held), prefill_shared_tokens (prompt tokens not computed because an
        identical prompt was prefilled in the same batch), requests_finished,
        requests_running, requests_waiting, kv_cache_tokens (tokens whose keys/values the
        cache holds now), kv_cache_capacity_tokens, kv_cache_bytes (allocated, bytes),
        cuda_graphs (decode graphs captured now); and forward_seconds (float, seconds): the
        wall time of the engine thread's forward calls (forwards and sampling, with their
        synchronization), so that ``forward_seconds / forward_passes`` is the time of a forward
        and the rest of a period's wall time is the scheduling loop between them;
        request_seconds and queue_seconds (floats, seconds, summed over the finished requests:
        from :meth:`generate` queuing it to its last token, and to its admission into a KV
        slot), so that ``request_seconds / requests_finished`` is a request's mean time in
        the engine, as vLLM's e2e and queued request times."""
        return {
            **self._counters,
            "forward_seconds": round(self._forward_seconds, 6),
            "request_seconds": round(self._request_seconds, 6),
            "queue_seconds": round(self._queue_seconds, 6),
            "requests_running": len(self._sched.running()),
            "requests_waiting": len(self._sched.waiting),
            "kv_cache_tokens": self._sched.cached_tokens(),
            "kv_cache_capacity_tokens": self.max_batch_size * self.max_seq_len,
            "kv_cache_bytes": self._runner.cache.nbytes,
            "cuda_graphs": self._runner.graph_count,
        }

    @property
    def loop_died(self) -> str | None:
        """Why the scheduling loop died (an exception escaped it, or its task was cancelled
        from outside :meth:`stop`), else None. Requests in flight then were failed with
        :class:`EngineStoppedError`; the next request or :meth:`start` starts a new loop
        and clears this (``stats["loop_deaths"]`` keeps the count). It is a bug: a server
        should treat it as fatal (the Dynamo worker exits, so that its supervisor restarts
        it)."""
        return self._died

    @property
    def unhealthy(self) -> str | None:
        """Why this engine cannot serve requests now, else None: its scheduling loop died
        (:attr:`loop_died`) or its weights are partial (:attr:`weights_partial`). A paused or
        not yet started engine is healthy (requests wait)."""
        return self._died or self._partial

    # ------------------------------------------------------------------ scheduling

    async def _wait_idle(self) -> None:
        async with self._changed:
            await self._changed.wait_for(
                lambda: not self._busy and not self._sched.running())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _release(self, req: Request) -> None:
        self._sched.release(req)
        self._requests.pop(req.id, None)

    def _finish_unstarted(self, req: Request) -> None:
        self._release(req)
        if req.queue is not None:
            req.queue.put_nowait(None)  # ends the consumer's iterator

    def _fail(self, req: Request, error: BaseException) -> None:
        if req.done:
            return
        self._release(req)
        if req.queue is not None:
            req.queue.put_nowait(error)
