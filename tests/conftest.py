"""Shared test fixtures. ``SHARED`` is ``../shared`` beside the repository (cases, CRDs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the real-world cases and CRDs live there")
    return SHARED


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The seeded tiny Qwen3 checkpoint (HF format), built once per test session."""
    from dynamo_rl.models import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory) -> Path:
    """The tiny model with the ``tools`` vocabulary after 150 supervised steps on the
    ``tool_lookup`` environment's demonstrations (~15 s): it writes well-formed
    ``<tool_call>`` blocks (the keys and values it copies are often wrong), so that
    Dynamo's tool-call parser has real calls to parse."""
    import random

    import torch

    from dynamo_rl.config import Recipe
    from dynamo_rl.models import ensure_tiny_model, load_model, load_tokenizer, save_checkpoint
    from dynamo_rl.rl.trainer import Trainer

    cfg = Recipe.model_validate({"task": {"name": "tool_lookup"}, "policy": {
        "tiny": {"vocab": "tools"}, "warm_start": {"steps": 150, "batch_size": 32, "lr": 3e-3}}})
    base = ensure_tiny_model(tmp_path_factory.mktemp("models") / "tools-base", cfg.policy.tiny)
    model, tok = load_model(base), load_tokenizer(base)
    torch.manual_seed(0)
    Trainer(model, cfg).warm_start(tok, random.Random(0))
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp("models") / "tools", tokenizer=tok)


# -- Dynamo's stock vLLM worker (python -m dynamo.vllm from .venv-vllm, built by `make vllm`):
# without it the tests marked vllm are skipped with the reason, except under CI=true, where
# they fail (CI must prove they ran). The terminal summary counts them.
_outcomes: dict[str, int] = {}


@pytest.fixture(scope="session")
def vllm_python() -> str:
    from dynamo_rl.serving.worker_kinds import find_vllm_python

    try:
        return find_vllm_python()
    except FileNotFoundError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the dynamo.vllm tests: {e}")
        pytest.skip(str(e))


def pytest_runtest_logreport(report):
    if "vllm" in report.keywords and (report.when == "call" or report.outcome == "skipped"):
        _outcomes[report.outcome] = _outcomes.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter):
    if _outcomes:
        terminalreporter.write_line("real dynamo.vllm workers: " + ", ".join(
            f"{n} {k}" for k, n in sorted(_outcomes.items())))
