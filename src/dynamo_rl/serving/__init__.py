"""Serving: our inference engine, the Dynamo worker around it, and the local stack.

- :mod:`dynamo_rl.serving.engine` — batched PyTorch engine (KV cache, sampling, logprobs);
  :mod:`~dynamo_rl.serving.scheduler` decides which requests hold its KV slots,
  :mod:`~dynamo_rl.serving.model_runner` runs its forwards.
- :mod:`dynamo_rl.serving.worker` — ``python -m dynamo_rl.serving.worker``: a Dynamo 1.6.1
  worker (``register_model`` + ``serve_endpoint``) with ``/engine/*`` control routes; its
  docstring documents the request/response channels through the frontend.
- :mod:`dynamo_rl.serving.engine_process` — the engine, its control routes and the refit
  receiver in a process of their own beside the worker (the worker's default).
- :mod:`dynamo_rl.serving.stack` — :class:`LocalStack`: ZMQ broker + ``dynamo.frontend`` +
  N workers on 127.0.0.1, readiness, logs, teardown.
- :mod:`dynamo_rl.serving.cli` — ``dynamo-rl serve``.

Imports are lazy (``from dynamo_rl.serving import LocalStack`` does not load torch).
Depends on ``config``, ``models``, ``refit``; never imports ``generation``, ``rl``, ``k8s``.
"""

from __future__ import annotations

_EXPORTS = {
    "LocalStack": "dynamo_rl.serving.stack",
    "StackError": "dynamo_rl.serving.stack",
    "WorkerProcess": "dynamo_rl.serving.stack",
    "Engine": "dynamo_rl.serving.engine",
    "SamplingParams": "dynamo_rl.serving.engine",
    "TokenOutput": "dynamo_rl.serving.engine",
    "WeightsError": "dynamo_rl.serving.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dynamo_rl.serving' has no attribute {name!r}")
