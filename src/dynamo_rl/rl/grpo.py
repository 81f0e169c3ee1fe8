"""GRPO as small pure functions: group advantages, token logprobs, the clipped loss.

Conventions:
- Logprobs are ``log_softmax`` of the raw logits (temperature 1), in fp32 — the same
  convention as ``dynamo_rl.serving.engine`` — so the trainer's recomputation and the
  engine's logprobs agree to float rounding and their difference is reported each step.
- Loss aggregation is token-level (DAPO, Yu et al. 2025): the sum over every generated
  token of the batch divided by the number of generated tokens, so long and short
  samples weigh the same per token.
- KL to the reference policy uses the k3 estimator ``exp(r) - r - 1`` with
  ``r = logp_ref - logp`` (Schulman, "Approximating KL divergence", 2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Per-group normalized advantages ``(r - mean_g) / (std_g + eps)``.

    Args:
        rewards: float32 ``[B]``, ``B = num_groups * group_size``, groups contiguous.
        group_size: samples per prompt (``G >= 2``).
    Returns:
        float32 ``[B]``; a group whose rewards are all equal gets advantage 0.
    Raises:
        ValueError: when ``B`` is not a multiple of ``group_size``.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.float().view(-1, group_size)
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)
    return adv.view(-1)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logprob of each token given its prefix, fp32.

    Args:
        input_ids: int64 ``[B, T]`` (right-padded).
        attention_mask: ``[B, T]``, 1 on real tokens.
    Returns:
        float32 ``[B, T]``; position ``t`` holds ``log p(input_ids[:, t] | input_ids[:, :t])``,
        position 0 holds 0.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logp = torch.gather(F.log_softmax(logits[:, :-1], -1), 2, input_ids[:, 1:, None]).squeeze(2)
    return F.pad(logp, (1, 0))


@dataclass
class LossOutput:
    loss: torch.Tensor          # scalar, differentiable
    clip_fraction: float        # share of tokens where the clipped term was active
    kl: float                   # mean k3 KL to the reference (0 when no reference)
    ratio_mean: float


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> LossOutput:
    """Clipped-ratio policy loss with optional KL, token-level aggregation.

    Args:
        logp: float32 ``[B, T]`` current policy logprobs (requires grad).
        old_logp: float32 ``[B, T]`` behaviour policy logprobs (the engine's).
        advantages: float32 ``[B]``, broadcast over tokens.
        mask: float32 ``[B, T]``, 1 on generated tokens that are trained on.
        clip_eps: PPO clip ε; the ratio is clipped to ``[1-ε, 1+ε]``.
        ref_logp: float32 ``[B, T]`` reference policy logprobs, or None.
        kl_coef: weight of the k3 KL term.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.min(unclipped, clipped)
    n = mask.sum().clamp(min=1)
    kl_value = 0.0
    if ref_logp is not None and kl_coef > 0:
        r = ref_logp - logp
        kl = torch.exp(r) - r - 1
        per_token = per_token + kl_coef * kl
        kl_value = float((kl * mask).sum() / n)
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
        clip_frac = float((((clipped < unclipped) & (mask > 0)).float().sum()) / n)
        ratio_mean = float((ratio * mask).sum() / n)
    return LossOutput(loss=loss, clip_fraction=clip_frac, kl=kl_value, ratio_mean=ratio_mean)


def logprob_mismatch(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the trainer's recomputed logprobs are from the engine's, over ``mask`` tokens.

    Returns:
        ``{"logprob_mae": mean |Δ|, "logprob_max_abs": max |Δ|, "mismatch_kl": k3 KL(engine‖trainer)}``.
    """
    trainer_logp, engine_logp, mask = trainer_logp.detach(), engine_logp.detach(), mask.detach()
    n = mask.sum().clamp(min=1)
    d = (trainer_logp - engine_logp) * mask
    r = (trainer_logp - engine_logp)
    k3 = (torch.exp(r) - r - 1) * mask
    return {
        "logprob_mae": float(d.abs().sum() / n),
        "logprob_max_abs": float(d.abs().max()) if mask.any() else 0.0,
        "mismatch_kl": float(k3.sum() / n),
    }
