"""The reference decoder of the serving and refit tests (importable from any test directory)."""

from __future__ import annotations

import torch


def greedy_decode(model, prompt, n: int) -> tuple[list[int], list[float]]:
    """``model``'s own greedy ids and their logprobs (``log_softmax`` of the raw logits, fp32).

    Full forward per step, no KV cache, ``n`` tokens (no stop at EOS): the oracle a served
    model's greedy output must equal.
    """
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            ids.append(int(torch.argmax(logp)))
            lps.append(float(logp[ids[-1]]))
    return ids[len(prompt):], lps
