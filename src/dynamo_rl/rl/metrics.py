"""Run outputs: ``metrics.jsonl`` (one line per step), TensorBoard events, ``reward.png``,
``summary.json``; W&B when enabled and installed.

Summary fields: ``steps``, ``reward_first`` / ``reward_last`` (mean rollout reward over the
first and last 3 steps), ``exact_match_first`` / ``exact_match_last`` (the same for the
task's exact match), ``refits`` (one after each step; the refit before step 1, which serves
weights version 1, is not counted), ``weights_version`` (the version the last step's refit
served), ``stale_samples``, ``version_mismatches``,
``logprob_mae`` (mean over steps of the trainer-vs-engine mean |Δlogprob| on on-policy
samples), ``wall_seconds``, ``completed`` (false when the run was interrupted or failed),
``eval_reward_initial`` (greedy, after the warm start, before GRPO) and ``eval_reward_last``,
plus warm-start figures.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Append step records to JSONL and TensorBoard; render the reward plot at the end."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "dynamo-rl", config: dict | None = None, keep_until: int | None = None):
        """``keep_until``: a resumed run's last checkpointed step: the file's records up to it
        are kept (and summarized with the new ones); later ones, from the part of the old run
        that the checkpoint does not hold, leave ``metrics.jsonl``: the whole file as it was
        is kept as ``metrics-superseded-<time>.jsonl`` first (:attr:`superseded`)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self.superseded: Path | None = None
        if keep_until is not None and self.path.exists():
            text = self.path.read_text()
            every = [json.loads(line) for line in text.splitlines() if line.strip()]
            self.records = [rec for rec in every if int(rec["step"]) <= keep_until]
            if len(self.records) < len(every):
                self.superseded = self.run_dir / f"metrics-superseded-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
                self.superseded.write_text(text)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._wandb = None
        if wandb:
            try:
                import wandb as _wandb
            except ImportError:
                raise RuntimeError("logging.wandb is true but wandb is not installed: pip install wandb") from None
            self._wandb = _wandb.init(project=wandb_project, dir=str(self.run_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        """Write one step's record (must hold an int ``step``)."""
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record["step"])
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                if self._tb is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def plot_rewards(records: list[dict[str, Any]], path: Path, title: str = "",
                 initial_eval: float | None = None) -> Path:
    """Rollout reward per step (mean ± std band) and greedy eval reward when present
    (``initial_eval``: the greedy eval before the first GRPO step, drawn at step 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    mean = [r["reward_mean"] for r in records]
    std = [r.get("reward_std", 0.0) for r in records]
    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=110)
    ax.plot(steps, mean, label="rollout reward (mean)", color="tab:blue")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color="tab:blue", alpha=0.15, label="± std")
    em = [(r["step"], r["exact_match"]) for r in records if r.get("exact_match") is not None]
    if em:
        ax.plot(*zip(*em), color="tab:green", label="exact match (rollouts)")
    ev = [(r["step"], r["eval_reward"]) for r in records if "eval_reward" in r]
    if ev and initial_eval is not None:
        ev.insert(0, (0, initial_eval))
    if ev:
        ax.plot(*zip(*ev), "o-", color="tab:orange", label="greedy eval reward")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward / exact match")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    # below the axes: a learning curve may pass through any corner of them
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize(records: list[dict[str, Any]], figures: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The ``summary.json`` dict from the step records (see module docstring); for each name
    in ``figures`` (what the task reports beside the reward, e.g. an environment's
    ``success``), its mean over the first and the last 3 steps as ``<name>_first`` /
    ``<name>_last``."""
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    rewards = [r["reward_mean"] for r in records]
    mae = [r["logprob_mae"] for r in records if r.get("logprob_mae") is not None]
    out = {
        "steps": len(records),
        "reward_first": mean(rewards[:3]),
        "reward_last": mean(rewards[-3:]),
        "exact_match_first": mean([r.get("exact_match") for r in records[:3]]),
        "exact_match_last": mean([r.get("exact_match") for r in records[-3:]]),
        "refits": sum(1 for r in records if r.get("refit_seconds") is not None),
        "weights_version": records[-1].get("weights_version") if records else None,
        "stale_samples": sum(r.get("stale_samples", 0) for r in records),
        "dropped_samples": sum(r.get("dropped_samples", 0) for r in records),
        "version_mismatches": sum(r.get("version_mismatches", 0) for r in records),
        "unversioned_samples": sum(r.get("unversioned_samples", 0) for r in records),
        "logprob_mae": mean(mae),
        "logprob_max_abs": max((r.get("logprob_max_abs", 0.0) for r in records), default=None),
        "mismatch_kl": mean([r.get("mismatch_kl") for r in records]),
    }
    for k in figures or ():
        if k != "exact_match":
            out[f"{k}_first"] = mean([r.get(k) for r in records[:3]])
            out[f"{k}_last"] = mean([r.get(k) for r in records[-3:]])
    evals = [r["eval_reward"] for r in records if "eval_reward" in r]
    if evals:
        out["eval_reward_last"] = evals[-1]
    out.update(extra)
    return out
