"""Which requests hold the engine's KV slots: the waiting queue, admission, prefix reuse.

Owns: the requests' scheduling state (:class:`Request`), the KV slots (:class:`Slot`: which
request holds a slot, which token ids its keys/values are of), the FIFO of waiting
requests, the admission policy (free slots, the prefill token budget, mixing arrivals
with running requests), prefix reuse (a free slot whose cached tokens start a new
prompt), and why a request ends (:meth:`Scheduler.finish_reason`). vLLM's scheduler /
engine split: :class:`~dynamo_rl.serving.engine.Engine` drives the loop, streams tokens
and changes weights; this decides who runs, and
:class:`~dynamo_rl.serving.model_runner.ModelRunner` runs it.

Plain bookkeeping, used on the engine's event-loop thread, except :meth:`finish_reason`
and :meth:`Scheduler.has_free_slot`, which the engine thread also calls (reads only). Must
not import torch, asyncio, or any ``dynamo_rl`` module but
:mod:`~dynamo_rl.serving.engine_types`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from dynamo_rl.serving.engine_types import SamplingParams

__all__ = ["Request", "Scheduler", "Slot", "common_prefix"]


@dataclass(eq=False)
class Request:
    """One request's scheduling state.

    ``queue`` (an ``asyncio.Queue`` of the engine's) and ``generator`` (the request's CPU
    ``torch.Generator``, None when greedy) belong to the engine; ``slot`` is the index of
    the KV slot it holds (-1 while waiting); ``output`` its generated ids so far;
    ``arrived`` and ``admitted`` the engine's ``time.perf_counter()`` (seconds) when it was
    queued and when it got its slot (0.0 before)."""

    id: str
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    queue: Any = None
    generator: Any = None
    slot: int = -1
    output: list[int] = field(default_factory=list)
    abort_requested: bool = False
    done: bool = False
    arrived: float = 0.0
    admitted: float = 0.0


@dataclass(eq=False)
class Slot:
    """A KV slot: ``tokens`` are the ids whose keys/values it holds (kept after its owner
    finishes, for prefix reuse), ``owner`` the request decoding in it (None when free),
    ``last_used`` the delivery count when it last got tokens (least recently used goes first)."""

    tokens: list[int] = field(default_factory=list)
    owner: Request | None = None
    last_used: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (list compares run in C: O(n log n), no Python loop)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Scheduler:
    """KV slots and the waiting queue of one engine.

    Args:
        slots: KV slots (the engine's ``max_batch_size``).
        max_seq_len: positions per slot; a generation reaching it ends with ``"length"``.
        max_prefill_tokens: padded tokens (rows x longest new row) per prefill forward; the
            first waiting request is always admitted.
        prefill_chunk: the longest piece of a prompt prefilled in one forward (a wider
            admission is not mixed with decoding rows).
        prefix_caching: give a prompt the free slot that holds the longest prefix of it.
        counters: the engine's counters; ``prompt_tokens`` and ``prefix_cache_hit_tokens``
            are counted here at admission.
    """

    def __init__(self, slots: int, *, max_seq_len: int, max_prefill_tokens: int, prefill_chunk: int,
                 prefix_caching: bool, counters: dict[str, int]):
        self.slots = [Slot() for _ in range(slots)]
        self.waiting: collections.deque[Request] = collections.deque()
        self.max_seq_len = max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk = prefill_chunk
        self.prefix_caching = prefix_caching
        self._counters = counters
        self._clock = 0

    # ------------------------------------------------------------------ state

    def running(self) -> list[Request]:
        """The requests holding slots, in slot order."""
        return [s.owner for s in self.slots if s.owner is not None]

    def has_free_slot(self) -> bool:
        return any(s.owner is None for s in self.slots)

    def cached_tokens(self) -> int:
        """Tokens whose keys/values the slots hold now."""
        return sum(len(s.tokens) for s in self.slots)

    def start_of(self, req: Request) -> int:
        """The position of ``req``'s next new token in its slot (the tokens it holds)."""
        return len(self.slots[req.slot].tokens)

    # ------------------------------------------------------------------ admission

    def admit(self) -> list[Request]:
        """Give waiting requests (FIFO) free slots, within the prefill token budget; each
        admitted request's slot keeps the prefix of its prompt that it holds already."""
        admitted: list[Request] = []
        width = 0
        free = [i for i, s in enumerate(self.slots) if s.owner is None]
        while self.waiting and free:
            req = self.waiting[0]
            index, reuse = self.choose_slot(req.prompt, free)
            new_width = max(width, len(req.prompt) - reuse)
            if admitted and (len(admitted) + 1) * new_width > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            free.remove(index)
            slot = self.slots[index]
            slot.tokens = slot.tokens[:reuse]
            slot.owner = req
            req.slot = index
            width = new_width
            admitted.append(req)
            self._counters["prefix_cache_hit_tokens"] += reuse
            self._counters["prompt_tokens"] += len(req.prompt)
        return admitted

    def choose_slot(self, prompt: list[int], free: list[int]) -> tuple[int, int]:
        """Free slot for ``prompt`` and how many of its cached tokens to keep (≤ len(prompt) - 1)."""
        best, best_len = None, 0
        if self.prefix_caching:
            for i in free:
                n = min(common_prefix(self.slots[i].tokens, prompt), len(prompt) - 1)
                if n > best_len:
                    best, best_len = i, n
        if best is None:  # an empty slot, else the least recently used one
            best = min(free, key=lambda i: (len(self.slots[i].tokens) > 0, self.slots[i].last_used))
        return best, best_len

    def can_mix(self, admitted: list[Request], running: list[Request]) -> bool:
        """Whether ``running`` (one new token each) fit into the prefill forward of
        ``admitted``: the padded batch (rows x widest row) stays within ``max_prefill_tokens``
        and no prompt is long enough to be prefilled in chunks."""
        width = max(len(r.prompt) - self.start_of(r) for r in admitted)
        return width <= self.prefill_chunk and len(admitted) * width + len(running) <= self.max_prefill_tokens

    # ------------------------------------------------------------------ tokens and ends

    def record(self, req: Request, fed: list[int], token: int) -> None:
        """``req`` got ``token``; its slot now holds the keys/values of ``fed`` (the ids the
        forward wrote: a prompt's new part, or the previous token)."""
        slot = self.slots[req.slot]
        slot.last_used = self._clock
        slot.tokens.extend(fed)
        req.output.append(token)

    def tick(self) -> None:
        """One delivery of tokens happened (the clock of least-recently-used slots)."""
        self._clock += 1

    def finish_reason(self, req: Request, token: int, generated: int | None = None) -> str | None:
        """Why ``req`` ends with ``token`` (its ``generated``-th token; default: the length of
        its output), or None: ``"abort"``, ``"stop"`` (a stop id) or ``"length"`` (``max_tokens``,
        or the slot is full)."""
        n = len(req.output) if generated is None else generated
        if req.abort_requested:
            return "abort"
        if token in req.stop_ids:
            return "stop"
        if n >= req.params.max_tokens or len(req.prompt) + n >= self.max_seq_len:
            return "length"
        return None

    def release(self, req: Request) -> None:
        """``req`` is done: it leaves the waiting queue or frees its slot (the slot keeps its
        tokens for prefix reuse)."""
        req.done = True
        if req.slot >= 0:
            self.slots[req.slot].owner = None
        elif req in self.waiting:
            self.waiting.remove(req)

    def forget(self, req: Request) -> None:
        """Drop what ``req``'s slot holds (its keys/values were not written: a failed forward)."""
        if req.slot >= 0:
            self.slots[req.slot].tokens = []

    def drop_cached(self) -> int:
        """Forget the keys/values of every free slot; returns the tokens dropped."""
        freed = 0
        for slot in self.slots:
            if slot.owner is None:
                freed += len(slot.tokens)
                slot.tokens = []
        return freed
