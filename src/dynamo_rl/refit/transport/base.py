"""Arena (publisher-side flat buckets) and the receiver-side Reader interface."""

from __future__ import annotations

import functools
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


@functools.cache
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
        flat: optional uint8 tensor backing every ``dst`` tensor (enables coalesced copies).
        dst_key: hashable naming the layout of ``dst`` inside ``flat`` (same key = same byte
            offsets), so a reader may reuse a copy program built for it; None: no reuse
            across different ``dst`` layouts is assumed safe beyond the plan itself.
    Returns: bytes moved over the transport.
    """

    name = "base"

    def pull(self, plan, descs, sources, dst, *, version, deadline, progress=None, flat=None,
             dst_key=None) -> int:  # pragma: no cover
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
        from dynamo_rl.refit.transport.nixl import NixlReader  # raises TransportError if absent

        return NixlReader(device=device, **options)
    raise TransportError(f"unknown transport {name!r}; use 'shm', 'dist' or 'nixl'")


# ----------------------------------------------------------------------------- row-granular helpers
# Shared by the transports that move contiguous byte ranges (dist, nixl).


def row_messages(plan, descs, rank: int, msg_bytes: int) -> list[list[tuple]]:
    """Messages of whole-row byte ranges of source ``rank`` that ``plan`` needs.

    Each item is ``(src, row_lo, row_hi, bucket, byte_offset, nbytes)``; a range longer than
    ``msg_bytes`` is split on row boundaries; items are packed greedily into messages of at
    most ``msg_bytes`` (a single row larger than that forms its own message).
    """
    from dynamo_rl.refit.roles import dtype_from_name

    items = []
    for (r, src), ivs in plan.row_ranges().items():
        if r != rank:
            continue
        d = descs[src]
        pl = next(p for p in d.placement if p.rank == rank)
        shape = d.local_shape(pl)
        isz = dtype_from_name(d.dtype).itemsize
        rowb = isz * (math.prod(shape[1:]) if len(shape) > 1 else 1)
        step = max(1, msg_bytes // rowb)
        for lo, hi in ivs:
            for a in range(lo, hi, step):
                b = min(hi, a + step)
                items.append((src, a, b, pl.bucket, pl.offset + a * rowb, (b - a) * rowb))
    msgs, cur, size = [], [], 0
    for it in items:
        if cur and size + it[5] > msg_bytes:
            msgs.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += it[5]
    if cur:
        msgs.append(cur)
    return msgs


def scatter_message(buf: torch.Tensor, msg, descs, copies_by, rank: int, dst) -> None:
    """Copy the planned slices out of a received message ``buf`` (uint8) into ``dst``."""
    from dynamo_rl.refit.roles import dtype_from_name

    pos = 0
    for src, a, b, _, _, nb in msg:
        d = descs[src]
        pl = next(p for p in d.placement if p.rank == rank)
        shape = d.local_shape(pl)
        view = buf[pos : pos + nb].view(dtype_from_name(d.dtype)).view((b - a, *shape[1:]))
        for c in copies_by[(rank, src)]:
            lo, hi = max(a, c.src_box[0][0]), min(b, c.src_box[0][1])
            if lo >= hi:
                continue
            sidx = (slice(lo - a, hi - a),) + tuple(slice(x, y) for x, y in c.src_box[1:])
            d0 = c.dst_box[0][0] + (lo - c.src_box[0][0])
            didx = (slice(d0, d0 + hi - lo),) + tuple(slice(x, y) for x, y in c.dst_box[1:])
            dst[c.dst][didx].copy_(view[sidx])
        pos += nb


def copies_by_source(plan) -> dict[tuple[int, str], list]:
    out: dict[tuple[int, str], list] = {}
    for c in plan.copies:
        out.setdefault((c.src_rank, c.src), []).append(c)
    return out


def _rows_only(box, shape) -> bool:
    """True when ``box`` restricts only dim 0 of a row-major tensor (a contiguous byte range)."""
    return all(lo == 0 and hi == shape[d] for d, (lo, hi) in enumerate(box) if d > 0)


def contiguous_runs(plan, descs, dst, flat):
    """Split a plan into byte runs and strided copies.

    A copy that is a row range of a contiguous tensor on both sides is a byte run
    ``source arena [s_off, s_off+n)`` → ``flat [d_off, d_off+n)`` (``flat``: the uint8 buffer
    backing every ``dst`` tensor). Runs adjacent on both sides merge; a gap is allowed only
    when it is alignment padding (the previous run ends its destination tensor and the next
    starts its own), copied along and unused.

    Returns:
        ``(runs, strided)``: runs as ``[rank, bucket, s_off, d_off, span, payload, _]``
        (payload = real bytes), sorted by source; ``strided`` = the remaining
        :class:`~dynamo_rl.refit.planner.Copy` objects. Without ``flat`` every copy is strided.
    """
    from dynamo_rl.refit.roles import dtype_from_name

    if flat is None:
        return [], list(plan.copies)
    base = flat.data_ptr()
    runs: list[list] = []
    strided = []
    for c in plan.copies:
        d = descs[c.src]
        pl = next(p for p in d.placement if p.rank == c.src_rank)
        dt = dtype_from_name(d.dtype)
        shape = d.local_shape(pl)
        out_t = dst[c.dst]
        if _rows_only(c.src_box, shape) and _rows_only(c.dst_box, out_t.shape):
            rowb = dt.itemsize * (math.prod(shape[1:]) if len(shape) > 1 else 1)
            drowb = dt.itemsize * (math.prod(out_t.shape[1:]) if out_t.dim() > 1 else 1)
            n = (c.src_box[0][1] - c.src_box[0][0]) * rowb
            s_off = pl.offset + c.src_box[0][0] * rowb
            t_start = out_t.data_ptr() - base
            d_off = t_start + c.dst_box[0][0] * drowb
            t_end = t_start + out_t.numel() * dt.itemsize
            runs.append([c.src_rank, pl.bucket, s_off, d_off, n, d_off == t_start, d_off + n == t_end])
        else:
            strided.append(c)
    runs.sort()
    merged: list[list] = []
    for r in runs:
        m = merged[-1] if merged else None
        gap = r[2] - (m[2] + m[4]) if m else -1
        if (m and m[0] == r[0] and m[1] == r[1] and r[3] - (m[3] + m[4]) == gap
                and (gap == 0 or (0 < gap < ALIGN and m[6] and r[5]))):
            m[4] += gap + r[4]
            m[5] += r[4]
            m[6] = r[6]
        else:
            merged.append([r[0], r[1], r[2], r[3], r[4], r[4], r[6]])
    return merged, strided
