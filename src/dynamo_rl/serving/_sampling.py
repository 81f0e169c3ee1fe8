"""Token sampling: temperature, top-k, top-p, per-request seeded generators, raw logprobs.

Conventions (the trainer must compute the same):

* the logprob of a sampled token is ``log_softmax(logits.float())[token]``: the RAW
  distribution (temperature 1, before top-k / top-p), in fp32;
* ``temperature == 0`` is greedy: ``argmax`` of the logits (first index on ties, as
  ``torch.argmax`` and HF ``generate``);
* otherwise the logits are divided by the temperature, top-k keeps the ``k`` largest
  (ties at the k-th value kept), top-p keeps the smallest prefix of the sorted
  distribution whose mass reaches ``top_p`` (at least one token), and one token is drawn
  with ``torch.multinomial`` from the request's own ``torch.Generator``, so a request's
  draws do not depend on the other rows of the batch.

Must not import any other ``dynamo_rl`` module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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


def sample(logits: torch.Tensor, temperatures: Sequence[float], top_ks: Sequence[int],
           top_ps: Sequence[float], generators: Sequence[torch.Generator | None]
           ) -> tuple[list[int], list[float]]:
    """Pick one token per row and return it with its raw logprob.

    Sampled rows draw by the exponential race ``argmax(probs / E)``, ``E ~ Exp(1)`` per
    token from the row's generator (the same distribution as ``multinomial``, batched).

    Args:
        logits: ``[B, V]`` (any float dtype) for the rows' next token.
        temperatures, top_ks, top_ps, generators: per row; a generator may be ``None``
            only for a greedy row (temperature 0).
    Returns:
        ``(token_ids, logprobs)``: ``B`` ints and ``B`` floats, the logprob being
        ``log_softmax(logits.float())`` at the chosen token.
    """
    logits32 = logits.float()
    device = logits32.device
    logprobs = torch.log_softmax(logits32, dim=-1)  # [B, V]
    ids = torch.argmax(logits32, dim=-1)  # greedy rows keep this
    rows = [b for b, t in enumerate(temperatures) if t > 0]
    if rows:
        sel = torch.tensor(rows, device=device)
        temp = torch.tensor([temperatures[b] for b in rows], device=device)
        x = filter_logits(
            logits32.index_select(0, sel) / temp[:, None],
            torch.tensor([top_ks[b] for b in rows], device=device),
            torch.tensor([top_ps[b] for b in rows], device=device, dtype=torch.float32),
        )
        probs = torch.softmax(x, dim=-1)
        noise = torch.empty_like(probs)
        for i, b in enumerate(rows):
            noise[i].exponential_(generator=generators[b])
        noise.clamp_(min=torch.finfo(torch.float32).tiny)  # never divide by 0
        ids[sel] = torch.argmax(probs / noise, dim=-1)
    chosen = logprobs.gather(1, ids[:, None])[:, 0]
    return ids.tolist(), chosen.tolist()
