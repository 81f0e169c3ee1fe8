"""The engine thread's side of the engine: the model, its KV cache and its weights.

Owns: the forward passes (prefill, in chunks, mixed prefill/decode, CUDA-graph decode
replays), sampling a step's tokens, and the parameters' bytes (validating and swapping
a new set, filling them in place). It knows nothing of requests, queues or the event
loop: :class:`~dynamo_rl.serving.engine.Engine` schedules, this runs what it is given
(vLLM's scheduler / model-runner split). Every method except the constructor runs on the
engine thread, or while that thread is idle.

Must not import ``dynamo_rl.serving.engine`` or anything above it in the module map;
it uses :mod:`dynamo_rl.serving._qwen3` (the forward), :mod:`~dynamo_rl.serving._graphs`
and :mod:`~dynamo_rl.serving._sampling`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dynamo_rl.serving import _graphs, _qwen3, _sampling
from dynamo_rl.serving.engine_types import WeightsError

__all__ = ["PREFILL_SDPA_BACKENDS", "ModelRunner"]

#: The ``scaled_dot_product_attention`` backends an eager forward on CUDA may use: all but
#: cuDNN's, which torch 2.11 tries first on an H100 and which builds an execution plan for
#: every new (rows, length) shape on its first call. On an H100
#: (``benchmarks/results/forward_h100.json``) a prefill of a new shape took 37 ms through
#: cuDNN against 9 ms for its second call, and the staggered arrivals of requests through a
#: frontend bring new shapes all the time; flash attention (then first) needs nothing per
#: shape. Set per forward with ``torch.nn.attention.sdpa_kernel`` (its enable flags are
#: restored on exit; the priority order is left alone).
PREFILL_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    """A HF Qwen3/Qwen2/Llama causal LM with a slot-based KV cache, run by one thread.

    Args:
        model: a ``transformers`` ``<Family>ForCausalLM``; moved to ``device``, eval mode.
        device: ``torch.device`` of the model, the cache and the graphs.
        slots: KV slots (the most requests decoded at once).
        max_seq_len: positions per slot; default ``min(config.max_position_embeddings, 4096)``.
        prefill_chunk: the longest piece of a row prefilled in one forward.
        cuda_graphs: replay decode steps from captured CUDA graphs (one extra scratch
            slot is allocated for their padded rows).
    Raises:
        UnsupportedModelError (a ``ValueError``): the model's layout is not supported.
        ValueError: ``cuda_graphs`` on a non-CUDA device.
    """

    def __init__(self, model, *, device: torch.device, slots: int, max_seq_len: int | None, prefill_chunk: int,
                 cuda_graphs: bool):
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got device={str(device)!r}")
        self.device = device
        self.model = model.to(device).eval()
        self.shape = _qwen3.describe_decoder(model)
        self.dtype = model.model.embed_tokens.weight.dtype
        self.max_seq_len = int(max_seq_len or min(self.shape.max_position_embeddings, 4096))
        self.prefill_chunk = int(prefill_chunk)
        self.params = dict(model.named_parameters())  # deduplicated: a tied lm_head is omitted
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.params.values())
        self._cos, self._sin = _qwen3.rope_tables(model, self.max_seq_len)
        # one slot more than requests when graphs pad their batches (the scratch slot)
        self.cache = _qwen3.KVCache(self.shape, slots + int(cuda_graphs), self.max_seq_len, self.dtype, device)
        self.graphs = (_graphs.DecodeGraphs(model, self.cache, self._cos, self._sin, slots, scratch_slot=slots)
                       if cuda_graphs else None)
        self._views = None  # FrozenTensors of detached parameter views, for in-place loads
        # eager forwards on CUDA use the attention backends of PREFILL_SDPA_BACKENDS
        self._attention_backends = (
            (lambda: sdpa_kernel(PREFILL_SDPA_BACKENDS)) if device.type == "cuda" else contextlib.nullcontext)

    # ------------------------------------------------------------------ forwards

    def forward_and_sample(self, rows: list[list[int]], slots: list[int], starts: list[int],
                           temps: list[float], top_ks: list[int], top_ps: list[float], keys: torch.Tensor,
                           leaders: list[int] | None = None) -> tuple[list[int], list[float]]:
        """One forward of ``rows`` (row i: the token ids to write into slot ``slots[i]`` from
        position ``starts[i]``), then one token sampled per row.

        ``leaders[i]`` (prefill only): index of the row whose prefill row ``i`` shares (itself
        when it leads); a follower gets its leader's keys/values copied into its slot and its
        logits. ``keys``: the rows' noise keys (:func:`~dynamo_rl.serving._sampling.draw_keys`).
        Decode steps (every row one token, no leaders) replay a CUDA graph when there are graphs.

        Returns:
            ``(token ids, logprobs)``, one per row; logprobs as
            :func:`~dynamo_rl.serving._sampling.sample` defines them (fp32 raw distribution).
        """
        with torch.no_grad():
            if self.graphs is not None and leaders is None and all(len(row) == 1 for row in rows):
                logits, packed = self.graphs.run([row[0] for row in rows], slots, starts, temps, keys)
                if not _sampling.needs_filter(self.shape.vocab_size, temps, top_ks, top_ps):
                    return _sampling.unpack(packed)  # sampled inside the graph
            elif leaders is not None and any(lead != i for i, lead in enumerate(leaders)):
                own = sorted(set(leaders))
                lead_logits = self.prefill([rows[i] for i in own], [slots[i] for i in own], [starts[i] for i in own])
                for i, lead in enumerate(leaders):
                    if lead != i:  # the whole prompt: the leader's slot holds it after its prefill
                        self.cache.copy_slot(slots[lead], slots[i], starts[i] + len(rows[i]))
                row_of = {lead: j for j, lead in enumerate(own)}
                logits = lead_logits[torch.tensor([row_of[lead] for lead in leaders], device=lead_logits.device)]
            else:
                logits = self.prefill(rows, slots, starts)
            return _sampling.sample(logits, temps, top_ks, top_ps, keys)

    def prefill(self, rows: list[list[int]], slots: list[int], starts: list[int]) -> torch.Tensor:
        """Eager forward of the rows in chunks of ``prefill_chunk`` tokens (bounded activation
        memory for long prompts); returns each row's last logits ``[B, vocab]`` in the model's
        dtype. On CUDA, attention uses the backends of :data:`PREFILL_SDPA_BACKENDS`."""
        with self._attention_backends():
            return self._prefill(rows, slots, starts)

    def _prefill(self, rows: list[list[int]], slots: list[int], starts: list[int]) -> torch.Tensor:
        chunk = self.prefill_chunk
        if max(len(r) for r in rows) <= chunk:
            single = [i for i, r in enumerate(rows) if len(r) == 1]
            if not single or len(single) == len(rows):
                batch = _qwen3.make_batch(rows, slots, starts, self.device)
                return _qwen3.forward(self.model, self.cache, batch, self._cos, self._sin)
            # prompts and one-token rows (decoding requests riding along): one forward, the
            # one-token rows not padded to the prompts' width
            wide = [i for i, r in enumerate(rows) if len(r) > 1]
            batches = [_qwen3.make_batch([rows[i] for i in part], [slots[i] for i in part],
                                         [starts[i] for i in part], self.device) for part in (wide, single)]
            logits = _qwen3.forward_groups(self.model, self.cache, batches, self._cos, self._sin)
            order = torch.empty(len(rows), dtype=torch.long)
            order[torch.tensor(wide + single)] = torch.arange(len(rows))
            return logits[order.to(logits.device)]
        last: list[torch.Tensor | None] = [None] * len(rows)
        for offset in range(0, max(len(r) for r in rows), chunk):
            part = [i for i, r in enumerate(rows) if len(r) > offset]
            batch = _qwen3.make_batch([rows[i][offset:offset + chunk] for i in part], [slots[i] for i in part],
                                      [starts[i] + offset for i in part], self.device)
            logits = _qwen3.forward(self.model, self.cache, batch, self._cos, self._sin)
            for j, i in enumerate(part):
                if offset + chunk >= len(rows[i]):
                    last[i] = logits[j]
        return torch.stack(last)

    # ------------------------------------------------------------------ weights

    def param_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """HF parameter names → ``(shape, dtype)`` (a tied ``lm_head`` omitted)."""
        return {name: (tuple(p.shape), p.dtype) for name, p in self.params.items()}

    def validate(self, tensors: Mapping[str, torch.Tensor], version: int, served_version: int, adopt: bool) -> None:
        """Check that ``tensors`` are exactly :meth:`param_specs` (and, with ``adopt``, on the
        parameters' devices).

        Raises:
            WeightsError: every missing, unexpected and mismatched name, in one message that
                names ``version`` and ``served_version`` (the weights stay as they are)."""
        specs = self.param_specs()
        missing = sorted(set(specs) - set(tensors))
        unexpected = sorted(set(tensors) - set(specs))
        mismatched, problems = [], []
        for name in sorted(set(specs) & set(tensors)):
            t = tensors[name]
            shape, dtype = specs[name]
            if not isinstance(t, torch.Tensor):
                problems.append(f"{name}: not a torch.Tensor ({type(t).__name__})")
            elif tuple(t.shape) != shape:
                problems.append(f"{name}: shape {tuple(t.shape)}, expected {shape}")
            elif t.dtype != dtype:
                problems.append(f"{name}: dtype {t.dtype}, expected {dtype}")
            elif adopt and t.device != self.params[name].device:
                problems.append(f"{name}: on {t.device}, expected {self.params[name].device} "
                                "(adopt=True takes the tensor as is; move it or use adopt=False)")
            else:
                continue
            mismatched.append(name)
        if not (missing or unexpected or mismatched):
            return
        lines = [f"weights for version {version} refused, served weights unchanged (version {served_version}):"]
        if missing:
            lines.append(f"missing ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            hint = (" (lm_head.weight is tied to model.embed_tokens.weight here: omit it)"
                    if "lm_head.weight" in unexpected else "")
            lines.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected) + hint)
        if problems:
            lines.append(f"mismatched ({len(problems)}): " + "; ".join(problems))
        lines.append("send exactly the names, shapes and dtypes of Engine.param_specs()")
        raise WeightsError("\n  ".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched)

    def swap(self, tensors: Mapping[str, torch.Tensor], adopt: bool) -> int:
        """Make ``tensors`` (validated) the parameters: copied in, or with ``adopt`` taken as
        their storage (captured CUDA graphs are then dropped). Returns the bytes loaded."""
        nbytes = 0
        with torch.inference_mode():  # also copies into adopted inference-mode tensors
            for name, param in self.params.items():
                t = tensors[name]
                if adopt:
                    param.data = t.detach()  # new storage: captured CUDA graphs are stale
                else:
                    param.data.copy_(t)
                nbytes += t.numel() * t.element_size()
        if adopt:
            self._views = None  # new storage: views for fill are rebuilt
            if self.graphs is not None:
                self.graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return nbytes

    def fill(self, fill: Callable[[Mapping[str, torch.Tensor]], object]) -> object:
        """``fill(views)`` under ``torch.inference_mode()``, where ``views`` is one read-only
        :class:`~dynamo_rl.refit.receiver.FrozenTensors` of detached views sharing the
        parameters' storage (kept until :meth:`swap` adopts new storage); then waits for the
        device. Returns what ``fill`` returned; re-raises what it raised."""
        if self._views is None:  # read-only, plain tensors: a receiver checks it in O(1)
            from dynamo_rl.refit.receiver import FrozenTensors

            self._views = FrozenTensors({n: p.detach() for n, p in self.params.items()})
        with torch.inference_mode():
            out = fill(self._views)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return out

    @property
    def graph_count(self) -> int:
        """Decode CUDA graphs captured now (0 without graphs)."""
        return 0 if self.graphs is None else len(self.graphs)

