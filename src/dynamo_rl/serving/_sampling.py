"""Token sampling: temperature, top-k, top-p, per-request seeded generators, raw logprobs.

Conventions (the trainer must compute the same):

* the logprob of a sampled token is ``log_softmax(logits.float())[token]``: the RAW
  distribution (temperature 1, before top-k / top-p), in fp32;
* ``temperature == 0`` is greedy: ``argmax`` of the logits (first index on ties, as
  ``torch.argmax`` and HF ``generate``);
* otherwise the logits are divided by the temperature, top-k keeps the ``k`` largest
  (ties at the k-th value kept), top-p keeps the smallest prefix of the sorted
  distribution whose mass reaches ``top_p`` (at least one token), and one token is drawn
  by the exponential race ``argmax(probs / E)`` (``E ~ Exp(1)`` per token; the same
  distribution as ``torch.multinomial``). The randomness of a request comes from its own
  CPU ``torch.Generator`` (seeded by the request): each step draws two 32-bit keys from
  it, and :func:`uniform_noise` hashes (keys, token index) into the uniforms behind
  ``E`` for all rows in one batched op. So a request's draws depend on its seed and step
  only, never on the other rows of the batch or on the device.

Must not import any other ``dynamo_rl`` module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (xor-shift-multiply), on int64 holding values < 2**32.

    The multipliers are below 2**31 so that no product overflows int64.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def uniform_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms in ``(0, 1)`` for every (row, token), a pure function of the row's keys.

    Args:
        keys: int64 ``[B, 2]``, values in ``[0, 2**32)``.
    Returns:
        fp32 ``[B, vocab_size]`` on ``keys.device``, 24-bit resolution, never 0 or 1.
    """
    idx = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)[None]  # [1, V]
    x = _mix32(idx ^ keys[:, :1])
    x = _mix32(x ^ keys[:, 1:])
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def draw_keys(generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Two 32-bit keys per row from each row's CPU generator (zeros, no draw, for ``None``:
    a greedy row): int64 ``[B, 2]`` on the CPU."""
    zeros = torch.zeros(2, dtype=torch.int64)
    return torch.stack([zeros if g is None else torch.randint(0, 1 << 32, (2,), generator=g)
                        for g in generators])


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to ``-inf`` the tokens outside each row's top-k and top-p.

    Args:
        logits: fp32 ``[B, V]`` (already divided by the temperature).
        top_k: int64 ``[B]``; keep the ``k`` largest (ties at the k-th value kept);
            ``<= 0`` is off.
        top_p: fp32 ``[B]``; keep the smallest prefix of the sorted distribution (after
            top-k) whose mass reaches ``p``, at least one token; ``>= 1`` is off.
    Returns:
        fp32 ``[B, V]``.
    """
    B, V = logits.shape
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V) - 1  # index of the k-th largest
    kth = sorted_logits.gather(1, k[:, None])  # [B, 1]
    drop_sorted = sorted_logits < kth
    probs = torch.softmax(sorted_logits.masked_fill(drop_sorted, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_tensors(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor,
                   top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Choose one token per row, tensors in, tensors out (no host sync: CUDA-graph safe).

    Args:
        logits: fp32 ``[B, V]``.
        temperatures: fp32 ``[B]``; ``0`` → greedy (argmax of ``logits``).
        keys: int64 ``[B, 2]`` from :func:`draw_keys`.
        top_k, top_p: ``[B]`` (see :func:`filter_logits`), or ``None`` for no filtering.
    Returns:
        float64 ``[2, B]``: row 0 the token ids (exact in float64), row 1 their logprobs
        ``log_softmax(logits)[id]``, packed so that one copy brings both to the host.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = torch.argmax(logits, dim=-1)
    x = logits / temperatures.clamp(min=1e-5)[:, None]  # greedy rows: computed, then unused
    if top_k is not None:
        x = filter_logits(x, top_k, top_p)
    race = torch.softmax(x, dim=-1) / -torch.log(uniform_noise(keys, x.shape[-1]))  # probs / Exp(1)
    ids = torch.where(temperatures > 0, torch.argmax(race, dim=-1), greedy)
    return torch.stack([ids.to(torch.float64), logprobs.gather(1, ids[:, None])[:, 0].to(torch.float64)])


def unpack(packed: torch.Tensor) -> tuple[list[int], list[float]]:
    """``[2, B]`` from :func:`sample_tensors` → ``(token_ids, logprobs)`` on the host (one copy)."""
    ids, logprobs = packed.tolist()
    return [int(t) for t in ids], logprobs


def needs_filter(vocab_size: int, temperatures: Sequence[float], top_ks: Sequence[int],
                 top_ps: Sequence[float]) -> bool:
    """True when some sampled row uses top-k or top-p."""
    return any(t > 0 and (0 < k < vocab_size or p < 1.0) for t, k, p in zip(temperatures, top_ks, top_ps))


def sample(logits: torch.Tensor, temperatures: Sequence[float], top_ks: Sequence[int],
           top_ps: Sequence[float], keys: torch.Tensor) -> tuple[list[int], list[float]]:
    """Pick one token per row and return it with its raw logprob.

    Args:
        logits: ``[B, V]`` (any float dtype) for the rows' next token.
        temperatures, top_ks, top_ps: per row.
        keys: int64 ``[B, 2]`` from :func:`draw_keys` (one draw per row and step).
    Returns:
        ``(token_ids, logprobs)``: ``B`` ints and ``B`` floats, the logprob being
        ``log_softmax(logits.float())`` at the chosen token.
    """
    logits32 = logits.float()
    device = logits32.device
    temps = torch.tensor(temperatures, dtype=torch.float32).to(device, non_blocking=True)
    top_k = top_p = None
    if needs_filter(logits32.shape[-1], temperatures, top_ks, top_ps):
        top_k = torch.tensor(top_ks, dtype=torch.int64).to(device, non_blocking=True)
        top_p = torch.tensor(top_ps, dtype=torch.float32).to(device, non_blocking=True)
    return unpack(sample_tensors(logits32, temps, keys.to(device, non_blocking=True), top_k, top_p))
