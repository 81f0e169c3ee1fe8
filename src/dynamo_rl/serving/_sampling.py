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


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask to ``-inf`` the tokens outside top-k and top-p.

    Args:
        logits: fp32 ``[V]`` (already divided by the temperature).
        top_k: keep the ``top_k`` largest; ``<= 0`` or ``>= V`` is off.
        top_p: keep the smallest set whose probability mass reaches ``top_p``; ``1.0`` is off.
    Returns:
        fp32 ``[V]``.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(logits: torch.Tensor, temperatures: Sequence[float], top_ks: Sequence[int],
           top_ps: Sequence[float], generators: Sequence[torch.Generator | None]
           ) -> tuple[list[int], list[float]]:
    """Pick one token per row and return it with its raw logprob.

    Args:
        logits: ``[B, V]`` (any float dtype) for the rows' next token.
        temperatures, top_ks, top_ps, generators: per row; a generator may be ``None``
            only for a greedy row (temperature 0).
    Returns:
        ``(token_ids, logprobs)``: ``B`` ints and ``B`` floats, the logprob being
        ``log_softmax(logits.float())`` at the chosen token.
    """
    logits32 = logits.float()
    logprobs = torch.log_softmax(logits32, dim=-1)  # [B, V]
    ids = torch.argmax(logits32, dim=-1)  # greedy rows keep this
    for b, temperature in enumerate(temperatures):
        if temperature <= 0:
            continue
        row = filter_logits(logits32[b] / temperature, top_ks[b], top_ps[b])
        probs = torch.softmax(row, dim=-1)
        ids[b] = torch.multinomial(probs, 1, generator=generators[b])[0]
    chosen = logprobs.gather(1, ids[:, None])[:, 0]
    return ids.tolist(), chosen.tolist()
