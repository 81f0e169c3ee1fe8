"""Weight refit, weight plane: descriptors and roles, slice planner, Megatron↔HF translation,
transports (shm / CUDA IPC, torch.distributed, NIXL), publisher and receiver.

Depends on ``config`` and ``models`` only (never on ``serving``, ``rl`` or ``k8s``); the
control plane (``refit/orchestrator.py``) lives beside it. Entry points::

    from dynamo_rl.refit import Publisher, Receiver, RefitError
"""

from dynamo_rl.refit.errors import (
    MismatchError,
    PublisherGoneError,
    RefitError,
    StaleVersionError,
    TransportError,
    VersionNotFoundError,
)
from dynamo_rl.refit.publisher import Publisher
from dynamo_rl.refit.receiver import FrozenTensors, Receiver

__all__ = [
    "FrozenTensors",
    "MismatchError",
    "Publisher",
    "PublisherGoneError",
    "Receiver",
    "RefitError",
    "StaleVersionError",
    "TransportError",
    "VersionNotFoundError",
]
