"""Decode steps (one token per row) replayed from captured CUDA graphs.

A decode step of a small model is hundreds of small kernels; launching them costs more
than running them. :class:`DecodeGraphs` captures forward + sampling of a decode step
once per (batch bucket, width bucket) and replays it: one launch, one host→device copy of
the step's inputs and one device→host copy of the packed results per step.

Must not import any ``dynamo_rl`` module outside ``dynamo_rl.serving``.
"""

from __future__ import annotations

import torch

from dynamo_rl.serving import _qwen3, _sampling


def buckets(limit: int, small: list[int], step: int | None) -> list[int]:
    """``small`` below ``limit``, then ``+step`` (or doubling when ``step`` is None), then ``limit``."""
    sizes = [s for s in small if s < limit]
    s = small[-1]
    while s < limit:
        s = s + step if step else s * 2
        if s < limit:
            sizes.append(s)
    return sizes + [limit]


class DecodeGraphs:
    """Captured decode steps for one engine's model and KV cache.

    Rows are padded to the batch bucket (1, 2, 4, 8, 16, 24, ... ``max_rows``) with idle rows
    that write only into the scratch slot (index ``scratch_slot``, which the cache must have
    beyond the request slots); attention reads the width bucket (64, 128, ... max_seq_len)
    of cache positions, masked. Graphs are captured lazily on first use of a bucket.

    The graphs hold the addresses of the weights: call :meth:`clear` after the parameters
    get new storage (``param.data = t``); in-place copies need nothing.
    """

    def __init__(self, model, cache: _qwen3.KVCache, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 max_rows: int, scratch_slot: int):
        self.model, self.cache, self.cos, self.sin = model, cache, cos_table, sin_table
        self.scratch_slot = scratch_slot
        self.batch_sizes = buckets(max_rows, [1, 2, 4, 8], 8)
        self.widths = buckets(cache.max_seq_len, [64], None)
        self.device = cos_table.device
        # (rows, width) -> _Captured; everything in it must stay alive: the graph reads its memory
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every captured graph (they are captured again on next use)."""
        self._graphs.clear()
        self._pool = None

    def run(self, tokens: list[int], slots: list[int], starts: list[int], temperatures: list[float],
            keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token for each row.

        Args:
            tokens, slots, starts: per row (see :class:`~dynamo_rl.serving._qwen3.Batch`).
            temperatures: per row, for the in-graph sampling (no top-k/top-p).
            keys: int64 ``[n, 2]`` CPU, from :func:`~dynamo_rl.serving._sampling.draw_keys`.
        Returns:
            ``(logits [n, vocab], packed [2, n])``: the packed ids/logprobs of
            :func:`~dynamo_rl.serving._sampling.sample_tensors` without filtering; both are
            views of static buffers, valid until the next run.
        """
        n = len(tokens)
        rows = next(b for b in self.batch_sizes if b >= n)
        width = next(w for w in self.widths if w >= max(starts) + 1)
        cap = self._graphs.get((rows, width))
        if cap is None:
            cap = self._graphs[(rows, width)] = self._capture(rows, width)
        pad = rows - n
        ints = torch.zeros((5, rows), dtype=torch.long)
        ints[0, :n] = torch.tensor(tokens)
        ints[1, :n] = torch.tensor(slots)
        ints[1, n:] = self.scratch_slot
        ints[2, :n] = torch.tensor(starts)
        ints[3:, :n] = keys.T
        cap.ints.copy_(ints)
        cap.temps.copy_(torch.tensor(temperatures + [0.0] * pad, dtype=torch.float32))
        cap.graph.replay()
        return cap.logits[:n], cap.packed[:, :n]

    def _capture(self, rows: int, width: int) -> _Captured:
        cap = _Captured(rows, width, self.scratch_slot, self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()

        def step():
            logits = _qwen3.forward(self.model, self.cache, cap.batch, self.cos, self.sin)
            return logits, _sampling.sample_tensors(logits.float(), cap.temps, cap.ints[3:].T)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # warm up (allocator, kernel selection) outside the capture
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        cap.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cap.graph, pool=self._pool, capture_error_mode="thread_local"), torch.no_grad():
            cap.logits, cap.packed = step()
        return cap


class _Captured:
    """Static buffers of one graph: ``ints`` int64 ``[5, rows]`` (tokens, slots, starts, key0,
    key1), ``temps`` fp32 ``[rows]``, the :class:`~dynamo_rl.serving._qwen3.Batch` over them,
    and the outputs ``logits`` ``[rows, vocab]`` and ``packed`` ``[2, rows]``."""

    def __init__(self, rows: int, width: int, scratch_slot: int, device):
        self.ints = torch.zeros((5, rows), dtype=torch.long, device=device)
        self.ints[1] = scratch_slot  # idle rows write only into the scratch slot
        self.temps = torch.zeros(rows, dtype=torch.float32, device=device)
        tokens, slots, starts = self.ints[0], self.ints[1], self.ints[2]
        self.batch = _qwen3.Batch(
            tokens=tokens.view(rows, 1), slots=slots, starts=starts,
            n_new=torch.ones(rows, dtype=torch.long, device=device), width=width,
            write_rows=torch.arange(rows, device=device), write_slots=slots, write_pos=starts,
            slot_range=None)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
