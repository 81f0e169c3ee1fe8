"""Fixtures for the tests against Dynamo's stock vLLM worker (``python -m dynamo.vllm``).

The vLLM environment is built by ``make vllm`` (``.venv-vllm``; ``make test`` builds it).
Without it the tests are skipped with the reason — except under ``CI=true``, where they
fail: CI must prove they ran. The terminal summary counts them.
"""

from __future__ import annotations

import os

import pytest

_outcomes: dict[str, int] = {}


@pytest.fixture(scope="session")
def vllm_python() -> str:
    from dynamo_rl.serving.stack import find_vllm_python

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
