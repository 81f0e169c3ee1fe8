"""What training produces, kept: the policy as a Hugging Face checkpoint, and apart from it
the trainer state that ``--resume`` needs.

Layout in the run directory::

    checkpoints/step-000004/      the policy: save_pretrained (safetensors, config.json,
                                  generation_config.json) + tokenizer files + chat template.
                                  `dynamo-rl serve --model-path` serves it; any HF tool loads it.
    trainer_state/step-000004/    trainer.pt: {"optimizer": AdamW state_dict, "reference":
                                  the KL reference's state_dict or None}; state.json: step,
                                  weights version, Python and torch RNG states, the run's
                                  extra summary figures, and the SHA-256 of the policy's bytes.

The two are kept apart because a Dynamo worker publishes every file of its model directory
(and serving needs none of the optimizer's). Each directory is written under a temporary
name and renamed into place, so a crash never leaves a half checkpoint that resume would
take. Conventions: steps count GRPO steps (1-based, the ``step`` of ``metrics.jsonl``);
``weights_sha256`` hashes every parameter's raw bytes in ``named_parameters`` order
(tied parameters once), name included.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def weights_sha256(named: Any) -> str:
    """SHA-256 over ``(name, dtype, shape, raw bytes)`` of every tensor of ``named``
    (a module's ``named_parameters()`` or a ``{name: tensor}`` mapping, in its order)."""
    items = named.items() if hasattr(named, "items") else named
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def optimizer_sha256(state: dict) -> str:
    """SHA-256 of an optimizer ``state_dict`` (its tensors' bytes and its plain values)."""
    h = hashlib.sha256()

    def walk(x, path=""):
        if isinstance(x, torch.Tensor):
            t = x.detach().contiguous().cpu()
            h.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k], f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        else:
            h.update(f"{path}={x!r}".encode())

    walk(state)
    return h.hexdigest()


@dataclass
class Saved:
    """One saved checkpoint: ``policy`` (HF dir) and ``state`` (trainer state dir)."""

    step: int
    policy: Path
    state: Path


#: written into the policy checkpoint: which step and weights version it holds (a worker
#: serving the directory declares that version; see ``serving.worker``)
CHECKPOINT_INFO = "dynamo_rl_checkpoint.json"
#: recipe keys a resumed run must share with the run it resumes (else it trains another thing)
RESUME_MUST_MATCH = ("name", "task", "policy.model_path", "policy.tiny", "policy.dtype")


def save(run_dir: Path, step: int, trainer, tokenizer, *, weights_version: int, rng: random.Random,
         extra: dict[str, Any] | None = None, recipe: dict | None = None) -> Saved:
    """Write the policy and the trainer state after ``step``; returns where.

    Raises:
        OSError: the run directory cannot be written (nothing half-written is left).
    """
    from dynamo_rl.models import save_checkpoint

    run_dir = Path(run_dir)
    name = step_name(step)
    policy = run_dir / CHECKPOINTS / name
    state = run_dir / TRAINER_STATE / name
    tmp_policy = policy.with_name(f".{name}.tmp")
    tmp_state = state.with_name(f".{name}.tmp")
    for d in (tmp_policy, tmp_state):
        shutil.rmtree(d, ignore_errors=True)
    save_checkpoint(trainer.model, tmp_policy, tokenizer)
    (tmp_policy / CHECKPOINT_INFO).write_text(json.dumps({"step": step, "weights_version": weights_version}) + "\n")
    tmp_state.mkdir(parents=True)
    opt_state = trainer.opt.state_dict()
    torch.save({"optimizer": opt_state,
                "reference": trainer.ref.state_dict() if trainer.ref is not None else None}, tmp_state / "trainer.pt")
    meta = {
        "step": step,
        "weights_version": weights_version,
        "checkpoint": str(policy.resolve()),
        "weights_sha256": weights_sha256(trainer.model.named_parameters()),
        "optimizer_sha256": optimizer_sha256(opt_state),
        "python_rng": _encode_rng(rng.getstate()),
        "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "extra": extra or {},
        "recipe": recipe,
    }
    (tmp_state / "state.json").write_text(json.dumps(meta, indent=2))
    for tmp, final in ((tmp_policy, policy), (tmp_state, state)):
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    return Saved(step, policy, state)


def _encode_rng(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_rng(obj) -> tuple:
    version, internal, gauss = obj
    return (version, tuple(internal), gauss)


@dataclass
class Resume:
    """What ``--resume`` found: the run directory, the policy checkpoint and its trainer state."""

    run_dir: Path
    policy: Path
    state_dir: Path
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def recipe_differences(self, recipe: dict) -> list[str]:
        """The :data:`RESUME_MUST_MATCH` keys on which ``recipe`` differs from the checkpoint's
        (none when the checkpoint recorded no recipe)."""
        saved = self.state.get("recipe")
        if not saved:
            return []

        def get(d, dotted):
            for part in dotted.split("."):
                d = d.get(part) if isinstance(d, dict) else None
            return d

        return [k for k in RESUME_MUST_MATCH if get(saved, k) != get(recipe, k)]

    def restore(self, trainer, rng: random.Random) -> str:
        """Load the optimizer, the KL reference and the RNG states into ``trainer`` / ``rng``.
        Returns the SHA-256 of the optimizer state as loaded (equal to the saved one)."""
        blob = torch.load(self.state_dir / "trainer.pt", map_location="cpu", weights_only=True)
        trainer.opt.load_state_dict(blob["optimizer"])
        if blob.get("reference") is not None:
            trainer.freeze_reference()
            if trainer.ref is not None:
                trainer.ref.load_state_dict(blob["reference"])
        rng.setstate(_decode_rng(self.state["python_rng"]))
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(self.state["torch_rng"])), dtype=torch.uint8))
        return optimizer_sha256(trainer.opt.state_dict())


def find(path: str | Path) -> Resume:
    """The checkpoint to resume from: a run directory (its latest checkpoint) or one
    ``checkpoints/step-N`` directory of a run.

    Raises:
        FileNotFoundError: no such directory, no checkpoint in the run, or the checkpoint's
            trainer state is missing (the message names what was looked for).
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--resume {str(path)!r}: no such directory; give a run directory "
                                "(runs/<name>-<time>) or one of its checkpoints/step-N directories")
    if (p / CHECKPOINTS).is_dir():
        steps = sorted(d for d in (p / CHECKPOINTS).iterdir() if d.is_dir() and d.name.startswith("step-"))
        if not steps:
            raise FileNotFoundError(f"--resume {str(path)!r}: the run has no checkpoint in {p / CHECKPOINTS}")
        run_dir, policy = p, steps[-1]
    elif p.parent.name == CHECKPOINTS and p.name.startswith("step-"):
        run_dir, policy = p.parent.parent, p
    else:
        raise FileNotFoundError(f"--resume {str(path)!r} is neither a run directory (with {CHECKPOINTS}/) nor a "
                                f"{CHECKPOINTS}/step-N directory of one")
    state_dir = run_dir / TRAINER_STATE / policy.name
    if not (state_dir / "state.json").is_file() or not (state_dir / "trainer.pt").is_file():
        raise FileNotFoundError(f"--resume: {policy} has no trainer state at {state_dir} (state.json, trainer.pt); "
                                "the policy alone can be served or fine-tuned anew (policy.model_path), not resumed")
    state = json.loads((state_dir / "state.json").read_text())
    return Resume(run_dir=run_dir, policy=policy, state_dir=state_dir, state=state)


def set_aside_after(run_dir: Path, step: int) -> list[Path]:
    """Move the run's checkpoints (and trainer states) of steps after ``step`` into
    ``<dir>/superseded-<time>/``, and its ``summary.json`` to ``summary-<time>.json``: a run
    resumed from an earlier checkpoint writes those anew, and what was trained before is
    never overwritten. Returns the new paths."""
    import time as _time

    stamp = _time.strftime("%Y%m%d-%H%M%S")
    moved = []
    summary = Path(run_dir) / "summary.json"
    if summary.exists():  # the run before this resume is summarized there
        moved.append(summary.rename(summary.with_name(f"summary-{stamp}.json")))
    for sub in (CHECKPOINTS, TRAINER_STATE):
        base = Path(run_dir) / sub
        for d in sorted(base.glob("step-*")) if base.is_dir() else []:
            if d.is_dir() and int(d.name.split("-", 1)[1]) > step:
                dest = base / f"superseded-{stamp}" / d.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                d.rename(dest)
                moved.append(dest)
    return moved


class Checkpointer:
    """When to save during a run, and what: tracks which GRPO step's update the policy holds.

    Args:
        run_dir: the run directory.
        every: save after every ``every``-th step (0: only :meth:`final`).
        trainer, tokenizer, rng: what is saved.
        start_step, start_version: where the policy stands at the start (a resumed run's
            saved step and weights version; else 0 and 0).
        trained: the policy was already trained at the start (warm start or resume), so
            :meth:`final` saves it even when no GRPO step completed.
    """

    def __init__(self, run_dir: Path, every: int, trainer, tokenizer, rng: random.Random, *,
                 start_step: int = 0, start_version: int = 0, trained: bool = False, recipe: dict | None = None):
        self.run_dir, self.every, self.recipe = Path(run_dir), every, recipe
        self.trainer, self.tokenizer, self.rng = trainer, tokenizer, rng
        self.model_step, self.model_version = start_step, start_version
        self.saved_step: int | None = start_step if trained and start_step else None
        self.trained = trained
        self.last: Saved | None = None

    def updated(self, step: int, version: int) -> None:
        """The policy now holds ``step``'s update, to be published as weights ``version``."""
        self.model_step, self.model_version, self.trained = step, version, True

    def step_done(self, step: int, extra: dict) -> Saved | None:
        """Save after ``step`` when it is a multiple of ``every``."""
        if self.every and step % self.every == 0:
            return self._save(extra)
        return None

    def final(self, extra: dict) -> Saved | None:
        """Save what the policy holds unless that was saved already (or nothing was trained)."""
        if not self.trained or self.saved_step == self.model_step:
            return self.last
        return self._save(extra)

    def _save(self, extra: dict) -> Saved:
        self.last = save(self.run_dir, self.model_step, self.trainer, self.tokenizer,
                         weights_version=self.model_version, rng=self.rng, extra=extra, recipe=self.recipe)
        self.saved_step = self.model_step
        return self.last
