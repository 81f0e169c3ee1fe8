"""Arena (publisher-side flat buckets) and the receiver-side Reader interface."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from dynamo_rl.refit.errors import TransportError

ALIGN = 256  # bytes; every tensor starts at a multiple (dtype views need alignment)
#: shared-memory names created by Arenas of THIS process (readers must not untrack them)
CREATED_SHM: set[str] = set()


def boot_id() -> str:
    """Identifies this host (+ boot): shared memory works only when publisher and receiver agree."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:  # not Linux
        import socket

        return socket.gethostname()


@dataclass
class Slot:
    bucket: int
    offset: int  # bytes
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def layout(tensors: Mapping[str, torch.Tensor], bucket_bytes: int) -> tuple[dict[str, Slot], list[int]]:
    """Pack tensors (in order) into buckets of ``bucket_bytes``; a larger tensor gets its own.

    Returns: ``({name: Slot}, [bucket sizes in bytes])``.
    """
    slots: dict[str, Slot] = {}
    sizes: list[int] = []
    cur = -1
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        need = max(nbytes, 1)
        if cur < 0 or sizes[cur] + need > bucket_bytes:
            sizes.append(0)
            cur = len(sizes) - 1
        off = sizes[cur]
        slots[name] = Slot(cur, off, nbytes, tuple(t.shape), t.dtype)
        sizes[cur] = off + math.ceil(need / ALIGN) * ALIGN
    return slots, sizes


class Arena:
    """One source rank's flat buckets. ``buffers[i]`` is a 1-D uint8 tensor (CPU shared
    memory or CUDA memory). Allocated once; :meth:`fits` says whether a new version with
    the same names/shapes/dtypes can reuse it (registration reused across versions)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, bucket_bytes: int = 256 << 20,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.slots, sizes = layout(tensors, bucket_bytes)
        self.bucket_sizes = sizes
        self._shm = []
        self.buffers: list[torch.Tensor] = []
        for i, n in enumerate(sizes):
            n = max(n, ALIGN)
            if self.device.type == "cpu":
                from multiprocessing import shared_memory

                shm = shared_memory.SharedMemory(create=True, size=n, name=f"drl_{os.getpid()}_{id(self) & 0xFFFFFF:x}_{i}_{time.monotonic_ns() & 0xFFFFFF:x}")
                self._shm.append(shm)
                CREATED_SHM.add(shm.name)
                buf = torch.frombuffer(shm.buf, dtype=torch.uint8, count=n)
                buf.zero_()  # pre-touch: first-touch page faults otherwise land on the pull path
            else:
                buf = torch.zeros(n, dtype=torch.uint8, device=self.device)
            self.buffers.append(buf)
        self.signature = self._signature(tensors)

    @staticmethod
    def _signature(tensors):
        return tuple((n, tuple(t.shape), t.dtype) for n, t in tensors.items())

    def fits(self, tensors: Mapping[str, torch.Tensor], device) -> bool:
        return torch.device(device) == self.device and self._signature(tensors) == self.signature

    def view(self, name: str) -> torch.Tensor:
        s = self.slots[name]
        return self.buffers[s.bucket][s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)

    def write(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """Copy every tensor into its slot; returns bytes written."""
        total = 0
        for name, t in tensors.items():
            self.view(name).copy_(t.detach())
            total += self.slots[name].nbytes
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return total

    def shm_names(self) -> list[str]:
        return [s.name for s in self._shm]

    def close(self) -> None:
        self.buffers = []
        for s in self._shm:
            try:
                s.close()
            except BufferError:  # a view is still alive somewhere in this process
                pass
            try:
                s.unlink()
            except FileNotFoundError:
                pass
            CREATED_SHM.discard(s.name)
        self._shm = []


class Reader:
    """Receiver side of one transport. ``pull`` executes a plan's copies into ``dst``.

    Args of ``pull``:
        plan: :class:`~dynamo_rl.refit.planner.TargetPlan`.
        descs: ``{src_name: TensorDescriptor}`` (placements carry bucket/offset).
        sources: ``{rank: address dict}`` from the manifest.
        dst: destination tensors (already allocated, fills done).
        deadline: ``time.monotonic()`` limit; exceeding it raises PublisherGoneError.
        progress: optional ``callable(done_bytes, total_bytes)`` after each unit of work.
    Returns: bytes moved over the transport.
    """

    name = "base"

    def pull(self, plan, descs, sources, dst, *, version, deadline, progress=None) -> int:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass


def get_reader(name: str, *, device="cpu", **options) -> Reader:
    """The receiver-side reader of transport ``name`` (``shm`` | ``dist`` | ``nixl``)."""
    if name == "shm":
        from dynamo_rl.refit.transport.shm import ShmReader

        return ShmReader(device=device, **options)
    if name == "dist":
        from dynamo_rl.refit.transport.dist import DistReader

        return DistReader(device=device, **options)
    if name == "nixl":
        raise TransportError(
            "the 'nixl' transport is not implemented in this build (nixl-cu13 1.5.1 installs and "
            "imports here; the reader/registration are future work); use 'shm' or 'dist'"
        )
    raise TransportError(f"unknown transport {name!r}; use 'shm', 'dist' or 'nixl'")
