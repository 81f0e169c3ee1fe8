"""Fixtures for the serving tests: one real Dynamo stack per test module.

``serving_stack`` starts a :class:`~dynamo_rl.serving.stack.LocalStack` (ZMQ broker +
``dynamo.frontend`` + our workers on 127.0.0.1) serving the tiny model, once per module;
a module sets ``STACK_WORKERS = n`` (default 2) and ``STACK_RECORD = True`` to change it.
Self-contained apart from ``tiny_model_dir`` (tests/conftest.py).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def serving_stack(request, tiny_model_dir, tmp_path_factory):
    from dynamo_rl.serving.stack import LocalStack

    workers = getattr(request.module, "STACK_WORKERS", 2)
    record = getattr(request.module, "STACK_RECORD", False)
    stack = LocalStack(tiny_model_dir, served_model_name="tiny", workers=workers, record=record,
                       run_dir=tmp_path_factory.mktemp("stack"), quiet=True, startup_timeout_s=240)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def hf_tiny(tiny_model_dir):
    """The served tiny model loaded the ordinary HF way (fp32, CPU, eval), for references."""
    import torch

    from dynamo_rl.models import load_model

    torch.set_num_threads(1)
    return load_model(tiny_model_dir)
