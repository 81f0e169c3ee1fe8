"""The policy's side of GRPO: optimizer, reference policy, warm start and one update step."""

from __future__ import annotations

import copy
import random
import time

import torch

from dynamo_rl.config import Recipe
from dynamo_rl.rl.grpo import group_advantages, grpo_loss, logprob_mismatch, token_logprobs
from dynamo_rl.rl.rollouts import Episode, to_batch
from dynamo_rl.rl.tasks import load_task, sample_problems, supervised_example


class Trainer:
    """The policy, its optimizer and (optionally) a frozen reference for the KL term."""

    def __init__(self, model, cfg: Recipe):
        self.model = model
        self.cfg = cfg
        o = cfg.policy.optimizer
        self.opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.ref = None

    def _on_device(self, tensors):
        """A batch (CPU tensors from ``to_batch``) on the policy's device."""
        device = next(self.model.parameters()).device
        return tuple(t.to(device, non_blocking=True) for t in tensors)

    def freeze_reference(self) -> None:
        if self.cfg.grpo.kl_coef > 0:
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)

    def warm_start(self, tokenizer, rng: random.Random) -> dict:
        """Supervised steps on reference answers (loss on answer tokens only)."""
        ws = self.cfg.policy.warm_start
        opt = torch.optim.AdamW(self.model.parameters(), lr=ws.lr)
        self.model.train()
        t0, loss = time.perf_counter(), float("nan")
        for _ in range(ws.steps):
            tcfg = ws.task or self.cfg.task
            task = load_task(tcfg)
            exs = [supervised_example(tokenizer, p, task) for p in sample_problems(tcfg, rng, ws.batch_size)]
            eps = [Episode(0, ids=i, mask=m, engine_logp=[0.0] * len(i)) for i, m in exs]
            ids, attn, mask, _ = self._on_device(to_batch(eps, tokenizer.pad_token_id))
            logp = token_logprobs(self.model, ids, attn)
            l = -(logp * mask).sum() / mask.sum()
            l.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = l.item()
        return {"warm_start_steps": ws.steps, "warm_start_loss": loss, "warm_start_seconds": time.perf_counter() - t0}

    def step(self, episodes: list[Episode], pad_id: int, current_version: int) -> dict:
        """One GRPO update on a batch of complete groups. Returns metrics."""
        g = self.cfg.grpo
        ids, attn, mask, elp = self._on_device(to_batch(episodes, pad_id))
        rewards = torch.tensor([e.reward for e in episodes], device=ids.device)
        adv = group_advantages(rewards, g.samples_per_prompt)
        self.model.train()
        t0 = time.perf_counter()
        with torch.no_grad():
            tlp = token_logprobs(self.model, ids, attn)
            on_policy = torch.tensor([float(e.version == current_version) for e in episodes], device=ids.device)[:, None]
            mm = logprob_mismatch(tlp, elp, mask * on_policy) if on_policy.any() else {}
            ref = token_logprobs(self.ref, ids, attn) if self.ref is not None else None
        stats = {}
        for _ in range(g.updates_per_batch):
            logp = token_logprobs(self.model, ids, attn)
            out = grpo_loss(logp, elp, adv, mask, g.clip_eps, ref, g.kl_coef)
            out.loss.backward()
            clip = self.cfg.policy.optimizer.grad_clip
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else float("inf"))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            stats = {"loss": out.loss.item(), "kl": out.kl, "clip_fraction": out.clip_fraction,
                     "ratio_mean": out.ratio_mean, "grad_norm": float(gn)}
        stats.update(mm)
        stats["train_seconds"] = time.perf_counter() - t0
        return stats
