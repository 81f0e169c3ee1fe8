"""The stepping of :class:`~dynamo_rl.serving.engine.Engine`: its scheduling loop.

Owns: what each step runs (admit waiting requests and prefill them in one forward, with
running rows riding along under ``mix_prefill_decode``; else a burst of up to
``decode_steps`` decode forwards in one hand-off to the engine thread), the hand-offs to
that thread (``run_in_executor``; a row that finishes mid-burst is delivered at once with
``call_soon_threadsafe``), and the delivery of each step's tokens to the requests' queues in
order, with the engine's counters. Who holds which KV slot is
:mod:`dynamo_rl.serving.scheduler`'s; the forward and sampling are
:class:`~dynamo_rl.serving.model_runner.ModelRunner`'s.

:class:`EngineSteps` is a mixin of :class:`~dynamo_rl.serving.engine.Engine`, as
:class:`~dynamo_rl.serving.engine_weights.EngineWeights` is: it reads these attributes of
the engine: ``_runner``, ``_sched``, ``_counters``, ``_loop``, ``_executor``, ``_wake``,
``_stopping``, ``_busy``, ``_died``, ``_requests``, ``paused``, ``_hold``, ``_partial``,
``mix_prefill_decode``, ``decode_steps``, ``weights_version`` and the time sums
(``_forward_seconds``, ``_request_seconds``, ``_queue_seconds``), and calls its
``_notify()``, ``_release(request)`` and ``_fail(request, error)``. Must not import
``dynamo_rl.serving.engine``.
"""

from __future__ import annotations

import time

from dynamo_rl.serving import _sampling
from dynamo_rl.serving.engine_types import EngineStoppedError, TokenOutput
from dynamo_rl.serving.scheduler import Request

__all__ = ["EngineSteps"]


class EngineSteps:
    """The scheduling loop of :class:`~dynamo_rl.serving.engine.Engine` (see the module docstring)."""

    async def _schedule(self) -> None:
        try:
            await self._schedule_steps()
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            self._died = f"the scheduling loop died: {type(exc).__name__}: {exc}"
            self._counters["loop_deaths"] += 1
            error = EngineStoppedError(self._died)
            for req in list(self._requests.values()):
                self._fail(req, error)
            raise

    async def _schedule_steps(self) -> None:
        while not self._stopping:
            running = self._sched.running()
            admitted = self._sched.admit() if self._admissible() else []
            if admitted:
                now = time.perf_counter()
                for r in admitted:
                    r.admitted = now
                # running requests ride along in the prefill forward (one token each) where
                # the padded batch stays within the prefill budget: an arrival then costs no
                # forward of its own (as vLLM's mixed prefill/decode batches)
                ride = running if running and self.mix_prefill_decode and self._sched.can_mix(admitted, running) else []
                await self._step(admitted + ride, prefill=True, decoding=len(ride))
                if ride:
                    continue
            running = self._sched.running()
            if running:
                await self._step(running, prefill=False)
            if not admitted and not running:
                await self._notify()
                self._wake.clear()
                if self._stopping or self._admissible():
                    continue
                await self._wake.wait()

    def _admissible(self) -> bool:
        return bool(self._sched.waiting) and not self.paused and not self._hold and self._partial is None

    async def _step(self, reqs: list[Request], prefill: bool, decoding: int = 0) -> None:
        """Prefill ``reqs`` (one forward) or decode them (up to ``decode_steps`` forwards in one
        call to the engine thread, :meth:`_decode`), then deliver the tokens in order. With
        ``prefill``, the last ``decoding`` of ``reqs`` are running requests decoded in the same
        forward."""
        n_new = len(reqs) - decoding
        starts = [self._sched.start_of(r) for r in reqs]
        if prefill:
            rows = [r.prompt[start:] for r, start in zip(reqs[:n_new], starts)]
            rows += [[r.output[-1]] for r in reqs[n_new:]]
        # identical prompts admitted together (n samples of one prompt) are prefilled once
        leader_of: dict[tuple[int, ...], int] = {}
        leaders = None
        if prefill:
            leaders = [leader_of.setdefault(tuple(r.prompt), i) for i, r in enumerate(reqs[:n_new])]
            leaders += list(range(n_new, len(reqs)))
        self._busy = True
        t0 = time.perf_counter()
        try:
            if prefill:
                ids, logprobs = await self._loop.run_in_executor(
                    self._executor, self._forward_and_sample, reqs, rows, starts, leaders)
            else:
                unfinished = await self._loop.run_in_executor(self._executor, self._decode, reqs, starts)
        except Exception as exc:  # a failed forward ends these requests, the engine goes on
            error = EngineStoppedError(f"forward failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            for r in reqs:
                self._sched.forget(r)
                self._fail(r, error)
            self._busy = False
            await self._notify()
            return
        self._busy = False
        self._forward_seconds += time.perf_counter() - t0
        c = self._counters
        if prefill:
            c["forward_passes"] += 1
            c["prefill_batches"] += 1
            c["prefill_shared_tokens"] += sum(len(rows[i]) for i, lead in enumerate(leaders) if lead != i)
            if decoding:
                c["mixed_batches"] += 1
                c["max_decode_batch"] = max(c["max_decode_batch"], decoding)
            self._deliver(reqs, [[(t, lp)] for t, lp in zip(ids, logprobs)], rows)
        else:
            self._deliver([r for r, _ in unfinished], [outs for _, outs in unfinished])
        await self._notify()

    def _deliver(self, reqs: list[Request], per_row: list[list[tuple[int, float]]],
                 fed_rows: list[list[int]] | None = None) -> None:
        """On the event loop: hand each request its new (token, logprob)s in order, record
        the tokens whose keys/values its slot now holds (``fed_rows[i]`` for the first
        token, a prefill row; else the request's last token), and release the finished."""
        c = self._counters
        self._sched.tick()
        for i, (r, outs) in enumerate(zip(reqs, per_row)):
            if r.done:  # failed meanwhile (the engine stopped): its tokens are dropped
                continue
            fed = fed_rows[i] if fed_rows is not None else [r.output[-1]]
            for tok, lp in outs:
                self._sched.record(r, fed, tok)
                c["tokens_generated"] += 1
                reason = self._sched.finish_reason(r, tok)
                r.queue.put_nowait(TokenOutput(tok, lp, reason, self.weights_version))
                if reason is not None:
                    self._release(r)
                    c["requests_finished"] += 1
                    self._request_seconds += time.perf_counter() - r.arrived
                    self._queue_seconds += r.admitted - r.arrived
                    break  # (an abort seen here first drops the rest of this row's tokens)
                fed = [tok]

    def _decode(self, reqs: list[Request], starts: list[int]) -> list[tuple[Request, list[tuple[int, float]]]]:
        """Runs on the engine thread: decode steps until every row finished, a waiting
        request could be admitted, or ``decode_steps`` steps are done (fewer hand-offs
        between threads per token).

        A row that finishes while others go on leaves the burst: its tokens go to the event
        loop at once (``call_soon_threadsafe`` → :meth:`_deliver`, so its last token and its
        free slot are not held back by the others). Returns the rows not delivered so far
        with their (token, logprob)s (the unfinished ones, or the last to finish), which the
        caller delivers once the engine thread is idle (after the early deliveries, which
        the loop runs first: both are FIFO callbacks). The decode
        counters are kept here, before any delivery (the loop touches them only between
        hand-offs), so a request's last token never outruns the counts of its steps."""
        c = self._counters
        c["decode_handoffs"] += 1
        c["max_decode_batch"] = max(c["max_decode_batch"], len(reqs))
        out: list[list[tuple[int, float]]] = [[] for _ in reqs]
        tokens = [r.output[-1] for r in reqs]
        generated = [len(r.output) for r in reqs]
        starts = list(starts)
        active = list(range(len(reqs)))
        for _ in range(self.decode_steps):
            ids, logprobs = self._forward_and_sample([reqs[i] for i in active], [[tokens[i]] for i in active],
                                                     [starts[i] for i in active])
            c["forward_passes"] += 1
            c["decode_batches"] += 1
            finished = []
            for i, tok, lp in zip(active, ids, logprobs):
                out[i].append((tok, lp))
                tokens[i] = tok
                starts[i] += 1
                generated[i] += 1
                if self._sched.finish_reason(reqs[i], tok, generated[i]) is not None:
                    finished.append(i)
            if len(finished) == len(active):  # the burst ends with them: the caller delivers
                break
            if finished:
                self._loop.call_soon_threadsafe(self._deliver, [reqs[i] for i in finished],
                                                [out[i] for i in finished])
                gone = set(finished)
                active = [i for i in active if i not in gone]
            if self._could_admit() or self._stopping:
                break
        return [(reqs[i], out[i]) for i in active]

    def _could_admit(self) -> bool:
        return self._admissible() and self._sched.has_free_slot()

    def _forward_and_sample(self, reqs, rows, starts, leaders=None) -> tuple[list[int], list[float]]:
        """Runs on the engine thread: one forward of ``reqs``' rows, then sampling
        (:meth:`ModelRunner.forward_and_sample`; ``leaders`` as there)."""
        keys = _sampling.draw_keys([r.generator for r in reqs])  # one draw per request and step
        return self._runner.forward_and_sample(
            rows, [r.slot for r in reqs], starts, [r.params.temperature for r in reqs],
            [r.params.top_k for r in reqs], [r.params.top_p for r in reqs], keys, leaders)
