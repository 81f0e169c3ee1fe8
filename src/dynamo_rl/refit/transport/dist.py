"""torch.distributed transport (placeholder until the full implementation lands)."""

from __future__ import annotations

from dynamo_rl.refit.errors import TransportError
from dynamo_rl.refit.transport.base import Reader


class DistServer:
    def __init__(self, publisher):
        self.publisher = publisher

    def routes(self):
        return {}

    def reset(self):
        pass

    def close(self):
        pass


class DistReader(Reader):
    name = "dist"

    def __init__(self, device="cpu"):
        raise TransportError("the 'dist' transport is not implemented yet; use 'shm'")
