"""Same-host shared-memory transport: POSIX shared memory on CPU, CUDA IPC on GPU.

The receiver maps each source rank's arena buckets once (cached per rank and bucket set,
re-opened only when the publisher re-allocates) and copies every planned slice straight
from the mapping into its destination tensor: one copy per byte, strided reads allowed,
so no over-pull. Works only when publisher and receiver share the host (``boot_id``
check) — else use ``dist`` or ``nixl``.

Each source rank also keeps a :class:`StateBlock`: its seqlock state (epoch, version,
layout generation) in a 64-byte shared-memory segment, with the publisher's liveness as a
``flock``. A receiver that already holds the layout reads it instead of asking the
publisher's HTTP server, so a steady-state same-host refit makes no network round trip.
"""

from __future__ import annotations

import base64
import fcntl
import math
import os
import pickle
import struct
import time

import torch

from dynamo_rl.refit.errors import PublisherGoneError, TransportError
from dynamo_rl.refit.roles import dtype_from_name
from dynamo_rl.refit.transport.base import Arena, Reader, boot_id, contiguous_runs


def shm_address(arena: Arena) -> dict:
    """The ``shm`` part of a source rank's transport address."""
    if arena.device.type == "cpu":
        return {"boot_id": boot_id(), "kind": "posix", "buckets": arena.shm_names(),
                "sizes": [int(b.numel()) for b in arena.buffers]}
    from torch.multiprocessing.reductions import reduce_tensor

    handles = [base64.b64encode(pickle.dumps(reduce_tensor(b))).decode() for b in arena.buffers]
    return {"boot_id": boot_id(), "kind": "cuda_ipc", "handles": handles,
            "sizes": [int(b.numel()) for b in arena.buffers]}


def _map(name: str, size: int, rank: int, what: str = "shared memory"):
    """``(fd, mmap)`` of an existing POSIX shared-memory segment, mapped without registering
    it with Python's resource tracker (``SharedMemory(name=...)`` would, and the tracker would
    then unlink the publisher's segment when this process exits, or double-unregister it
    when the tracker is shared by a spawn family). The caller closes ``fd``.

    Raises: PublisherGoneError when the segment no longer exists."""
    import _posixshmem
    import mmap

    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    except FileNotFoundError:
        raise PublisherGoneError(
            f"{what} {name!r} of source rank {rank} is gone: the publisher closed or died; "
            "re-publish and retry"
        ) from None
    try:
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


def _attach(name: str, size: int, rank: int):
    """The mmap of an arena bucket (see :func:`_map`)."""
    fd, mm = _map(name, size, rank)
    os.close(fd)
    return mm


_WIDE = (torch.complex128, torch.int64, torch.int32, torch.int16, torch.uint8)


def _widest(*values: int) -> torch.dtype:
    """The widest element type (16, 8, 4, 2, 1 bytes) dividing every offset, stride, size and
    address: a strided copy then moves that many bytes per element (a bit-exact move; no
    arithmetic is done on the values)."""
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    return next(dt for dt in _WIDE if g % dt.itemsize == 0)


def _grid(buf: torch.Tensor, off: int, stride: int, n: int, count: int, dt: torch.dtype) -> torch.Tensor:
    """``count`` rows of ``n`` bytes starting at byte ``off`` of the 1-D uint8 ``buf``, one every
    ``stride`` bytes, as a 2-D view of element type ``dt``."""
    e = dt.itemsize
    return buf.view(dt)[off // e :].as_strided((count, n // e), (stride // e, 1))


def _on(stream):
    """``torch.cuda.stream(stream)``, or nothing when ``stream`` is None."""
    import contextlib

    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _progressions(runs: list, idx: list[int]) -> list[list[int]]:
    """Groups (of 2 or more) of the byte runs ``runs[i]`` (``[rank, bucket, s_off, d_off, n, ...]``,
    ``i`` in ``idx``) of one source bucket and one length whose source and destination offsets
    both advance by a fixed positive stride, at least ``n``, in destination order."""
    by_key: dict[tuple, list[int]] = {}
    for i in idx:
        r = runs[i]
        by_key.setdefault((r[0], r[1], r[4]), []).append(i)
    out = []
    for (_, _, n), members in by_key.items():
        members.sort(key=lambda i: runs[i][3])
        cur: list[int] = []
        for i in members:
            if len(cur) >= 2:
                a, b = runs[cur[-2]], runs[cur[-1]]
                if runs[i][2] - b[2] == b[2] - a[2] and runs[i][3] - b[3] == b[3] - a[3]:
                    cur.append(i)
                    continue
            elif len(cur) == 1:
                a = runs[cur[0]]
                if runs[i][2] - a[2] >= n and runs[i][3] - a[3] >= n:
                    cur.append(i)
                    continue
            if len(cur) >= 2:
                out.append(cur)
            cur = [i]
        if len(cur) >= 2:
            out.append(cur)
    return out


class StateBlock:
    """One source rank's refit state in a small POSIX shared-memory segment (seqlock).

    Layout (little-endian int64 at byte offsets 0, 8, 16): ``epoch`` (odd while the arena is
    being written, the same counter as ``GET /state``), ``version`` (the last complete one;
    -1 before the first), ``gen`` (bumped whenever the arena is re-allocated or the tensor
    layout changes: a receiver's cached plan and mappings are valid only for the ``gen`` they
    were built for). The publisher holds a shared ``flock`` on the segment for its lifetime;
    a reader that can take an exclusive one knows the publisher is gone (the kernel drops
    the lock of a dead process, whatever PID namespace it ran in).

    Publisher side: ``StateBlock.create()``, :meth:`begin` / :meth:`commit`, :meth:`close`.
    Receiver side: ``StateBlock.attach(name, rank)``, :meth:`read`, :meth:`alive`, :meth:`close`.
    """

    SIZE = 64

    def __init__(self, name: str, fd: int, mm, owner: bool):
        self.name, self._fd, self._mm, self._owner = name, fd, mm, owner

    @classmethod
    def create(cls) -> "StateBlock":
        import _posixshmem
        import mmap
        from multiprocessing import resource_tracker

        name = f"drl_state_{os.getpid()}_{time.monotonic_ns() & 0xFFFFFFFF:x}_{os.urandom(3).hex()}"
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, cls.SIZE)
            mm = mmap.mmap(fd, cls.SIZE)
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            _posixshmem.shm_unlink("/" + name)
            raise
        resource_tracker.register("/" + name, "shared_memory")  # unlinked if this process dies
        block = cls(name, fd, mm, owner=True)
        struct.pack_into("<qqq", mm, 0, 0, -1, 0)
        return block

    @classmethod
    def attach(cls, name: str, rank: int) -> "StateBlock":
        """Map a publisher's block (never written by a receiver).

        Raises: PublisherGoneError when the segment no longer exists."""
        fd, mm = _map(name, cls.SIZE, rank, "state block")
        return cls(name, fd, mm, owner=False)

    # publisher side ---------------------------------------------------------------
    def begin(self, epoch: int) -> None:
        """Mark the arena as being written (``epoch`` odd)."""
        struct.pack_into("<q", self._mm, 0, epoch)

    def commit(self, epoch: int, version: int, gen: int) -> None:
        """Publish ``version`` complete: data fields first, then the (even) epoch."""
        struct.pack_into("<qq", self._mm, 8, version, gen)
        struct.pack_into("<q", self._mm, 0, epoch)

    # receiver side ----------------------------------------------------------------
    def read(self) -> tuple[int, int, int]:
        """``(epoch, version, gen)``, a consistent snapshot (``epoch`` may be odd: writing)."""
        mm = self._mm
        while True:
            (e1,) = struct.unpack_from("<q", mm, 0)
            version, gen = struct.unpack_from("<qq", mm, 8)
            (e2,) = struct.unpack_from("<q", mm, 0)
            if e1 == e2:
                return e1, version, gen

    def alive(self) -> bool:
        """True while the publisher process holds its lock (i.e. is running and not closed)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self._mm.close()
        except BufferError:
            pass
        os.close(self._fd)  # releases the publisher's lock
        self._fd = -1
        if self._owner:
            import _posixshmem
            from multiprocessing import resource_tracker

            try:
                _posixshmem.shm_unlink("/" + self.name)
            except FileNotFoundError:
                pass
            resource_tracker.unregister("/" + self.name, "shared_memory")


class ShmReader(Reader):
    name = "shm"

    def __init__(self, device="cpu", big_run_bytes: int | None = None, grid_runs: bool = False,
                 copy_kernel: str = "auto"):
        if copy_kernel not in ("auto", "foreach", "triton", "triton_all"):
            raise ValueError(f"copy_kernel {copy_kernel!r}: use 'auto', 'foreach', 'triton' or 'triton_all'")
        self.device = torch.device(device)
        self.grid_runs = grid_runs
        if self.device.type != "cuda":
            copy_kernel = "foreach"
        elif copy_kernel == "auto":
            from dynamo_rl.refit.transport._segcopy import available

            copy_kernel = "triton_all" if available() else "foreach"
        self.copy_kernel = copy_kernel
        if big_run_bytes is None:  # CPU: every run its own (multi-threaded) copy_
            big_run_bytes = self.BIG_RUN if self.device.type == "cuda" else 0
        self.big_run = int(big_run_bytes)
        self._cache: dict[int, tuple[tuple, list, list[torch.Tensor]]] = {}
        self._programs: dict = {}

    def _open(self, rank: int, address: dict) -> list[torch.Tensor]:
        a = address.get("shm")
        if not a:
            raise TransportError(f"source rank {rank} offers no 'shm' transport; use 'dist'")
        if a["boot_id"] != boot_id():
            raise TransportError(
                f"source rank {rank} is on another host (boot_id differs): shared memory cannot "
                "reach it; use transport='dist' or 'nixl'"
            )
        key = tuple(a.get("buckets") or a.get("handles"))
        hit = self._cache.get(rank)
        if hit and hit[0] == key:
            return hit[2]
        if hit:
            self._drop(rank)
        keep: list = []
        bufs: list[torch.Tensor] = []
        if a["kind"] == "posix":
            for name, size in zip(a["buckets"], a["sizes"]):
                mm = _attach(name, size, rank)
                keep.append(mm)
                bufs.append(torch.frombuffer(mm, dtype=torch.uint8, count=size))
        else:
            for h in a["handles"]:
                fn, args = pickle.loads(base64.b64decode(h))
                bufs.append(fn(*args))
        self._cache[rank] = (key, keep, bufs)
        return bufs

    def _drop(self, rank: int) -> None:
        self._programs.clear()  # programs hold views of the mappings
        key, keep, bufs = self._cache.pop(rank)
        bufs.clear()
        for mm in keep:
            try:
                mm.close()
            except BufferError:  # a tensor view is still alive; the mapping goes with it
                pass

    #: coalesced runs at least this long get their own copy (a cudaMemcpy at full bandwidth);
    #: shorter ones go through multi-tensor ``torch._foreach_copy_`` calls (few launches),
    #: viewed as int64 when 8-byte aligned (wide loads). On CUDA those run on a second stream
    #: beside the big copies. ``grid_runs=True`` instead turns short runs at a fixed stride
    #: into one strided copy each: measured slower on an H200 (benchmarks/refit_gpu.py), kept
    #: for comparison. Column ranges of 2-D tensors (row-parallel halves when S != T) are
    #: always one strided copy each, moved in the widest aligned element type.
    #: ``copy_kernel="triton_all"`` (the default on CUDA with Triton, ``"auto"``): every
    #: 8-byte-aligned run, bucket-sized ones too, in ONE Triton launch (``_segcopy``): 0.95 of
    #: a d2d copy for an in-place S=T refit of Qwen3-4B on an H100, against 0.85 with
    #: ``"foreach"`` (cudaMemcpy per big run + ``_foreach_copy_`` for the ~800 short q/k/v
    #: runs) and 0.87 with ``"triton"`` (short runs only), side by side in one run
    #: (``benchmarks/results/refit_gpu_kernels_h100.json``).
    BIG_RUN = 16 << 20

    def _program(self, plan, descs, sources, dst, flat, dst_key):
        """Build (once per plan, source arenas and destination layout) the copy program:
        coalesced byte runs split into big / small, plus strided copies, with every source
        view precomputed. Offsets into ``flat`` are relative, so the program is reused for
        every pull into the same layout (``dst_key`` names it)."""
        for r in plan.source_ranks:
            self._open(r, sources[r])  # cached mapping / IPC handle (re-opened if re-allocated)
        keys = tuple((r, self._cache[r][0]) for r in plan.source_ranks)
        key = (id(plan), keys, flat is not None and flat.numel(), dst_key)
        hit = self._programs.get(key)
        if hit is not None and hit[0] is plan:
            return hit[1]
        merged, strided_copies = contiguous_runs(plan, descs, dst, flat)
        grids: list[tuple] = []  # (rank, bucket, s_off, s_stride, d_off, d_stride, n, count, payload)
        strided = []
        base = flat.data_ptr() if flat is not None else None
        for c in strided_copies:
            d = descs[c.src]
            pl = next(p for p in d.placement if p.rank == c.src_rank)
            dt = dtype_from_name(d.dtype)
            shape = d.local_shape(pl)
            out_t = dst[c.dst]
            if base is not None and len(shape) == 2 and out_t.dim() == 2 and out_t.is_contiguous():
                # a column range of rows: ``count`` equal byte runs at a fixed stride on each side
                (r0, r1), (c0, c1) = c.src_box
                (q0, _), (k0, _) = c.dst_box
                isz = dt.itemsize
                s_row, d_row = shape[1] * isz, out_t.shape[1] * isz
                grids.append((c.src_rank, pl.bucket, pl.offset + r0 * s_row + c0 * isz, s_row,
                              out_t.data_ptr() - base + q0 * d_row + k0 * isz, d_row,
                              (c1 - c0) * isz, r1 - r0, c.numel * isz))
                continue
            nbytes = torch.Size(shape).numel() * dt.itemsize
            src = self._cache[c.src_rank][2][pl.bucket][pl.offset : pl.offset + nbytes].view(dt).view(shape)
            src = src[tuple(slice(x, y) for x, y in c.src_box)]
            strided.append((src, c.dst, tuple(slice(x, y) for x, y in c.dst_box), c.numel * dt.itemsize))
        # with ``grid_runs``: short runs at a fixed stride on both sides (Megatron's fused QKV
        # split per KV group into q / k / v: one run per group) become one strided copy each
        small_idx = [i for i, r in enumerate(merged) if r[4] < self.big_run]
        in_grid = set()
        if self.grid_runs:
            for rows in _progressions(merged, small_idx):
                first, second = merged[rows[0]], merged[rows[1]]
                grids.append((first[0], first[1], first[2], second[2] - first[2], first[3],
                              second[3] - first[3], first[4], len(rows), sum(merged[i][5] for i in rows)))
                in_grid.update(rows)
        # destination segments: flat.split(sizes) yields every run's view in one call
        order = sorted(range(len(merged)), key=lambda i: merged[i][3])
        sizes, seg_of, pos = [], {}, 0
        for i in order:
            d_off, n = merged[i][3], merged[i][4]
            if d_off > pos:
                sizes.append(d_off - pos)
            seg_of[i] = len(sizes)
            sizes.append(n)
            pos = d_off + n
        if flat is not None and flat.numel() > pos:
            sizes.append(flat.numel() - pos)
        big, small, small_bytes = [], {}, 0
        kernel_runs, kernel_bytes = [], 0   # (src uint8 view, destination segment) for _segcopy
        for i, (rank, bucket, s_off, d_off, n, payload, _) in enumerate(merged):
            if i in in_grid:
                continue
            src = self._cache[rank][2][bucket][s_off : s_off + n]
            aligned = src.data_ptr() % 8 == 0 and d_off % 8 == 0 and n % 8 == 0 and base is not None \
                and base % 8 == 0
            if aligned and (self.copy_kernel == "triton_all" or (self.copy_kernel == "triton" and n < self.big_run)):
                kernel_runs.append((src, seg_of[i]))
                kernel_bytes += payload
                continue
            if n >= self.big_run:
                big.append((src, seg_of[i], payload))
            else:
                wide = s_off % 8 == 0 and d_off % 8 == 0 and n % 8 == 0
                dt = torch.int64 if wide else torch.uint8
                g = small.setdefault(dt, ([], []))
                g[0].append(src.view(dt))
                g[1].append(seg_of[i])
                small_bytes += payload
        prog = {"sizes": sizes, "big": big, "small": (small, small_bytes), "grids": grids,
                "strided": strided, "kernel": (kernel_runs, kernel_bytes),
                "ops": len(big) + len(small) + len(grids) + len(strided) + bool(kernel_runs),
                "runs": len(merged), "bound": None}
        self._programs = {key: (plan, prog)}
        return prog

    def _bind(self, prog, dst, flat):
        """The program's destination views for this ``flat`` (kept while ``flat`` is the same
        buffer, e.g. pulls into an engine's live parameters: no per-pull view building)."""
        ptr = None if flat is None else flat.data_ptr()
        b = prog["bound"]
        if b is not None and b[0] == ptr and b[1] is dst:
            return b[2]
        segs = flat.split(prog["sizes"]) if flat is not None and prog["sizes"] else ()
        big = [(segs[i], src, payload) for src, i, payload in prog["big"]]
        small = [([segs[i].view(dt) for i in idx], srcs) for dt, (srcs, idx) in prog["small"][0].items()]
        grids = []
        for rank, bucket, s_off, s_stride, d_off, d_stride, n, count, payload in prog["grids"]:
            sbuf = self._cache[rank][2][bucket]
            dt = _widest(n, s_off, s_stride, d_off, d_stride, sbuf.numel(), flat.numel(),
                         sbuf.data_ptr(), flat.data_ptr())
            grids.append((_grid(flat, d_off, d_stride, n, count, dt),
                          _grid(sbuf, s_off, s_stride, n, count, dt), payload))
        strided = [(dst[name][idx], src, nbytes) for src, name, idx, nbytes in prog["strided"]]
        runs, _ = prog["kernel"]
        if runs:
            from dynamo_rl.refit.transport._segcopy import SegmentCopy

            small = small + [SegmentCopy([segs[i] for _, i in runs], [src for src, _ in runs], self.device)]
        bound = (big, small, grids + strided)
        prog["bound"] = (ptr, dst, bound)
        return bound

    def pull(self, plan, descs, sources, dst, *, version, deadline, progress=None, flat=None,
             dst_key=None) -> int:
        """Copy every planned slice from the mapped arenas into ``dst``.

        When ``flat`` (the uint8 buffer backing every ``dst`` tensor) is given, copies that
        are byte-contiguous on both sides (row ranges of contiguous tensors) and adjacent in
        both the source bucket and ``flat`` are merged: with an unchanged layout (S = T, same
        order) a whole bucket moves in a single ``copy_``. Short runs are batched into
        ``torch._foreach_copy_`` calls; the program is cached per layout (``dst_key``: what
        identifies the destination layout relative to ``flat``), its destination views per
        ``flat`` buffer.
        """
        prog = self._program(plan, descs, sources, dst, flat, dst_key)
        big, small, strided = self._bind(prog, dst, flat)  # strided: 2-D grids first, then others
        total = plan.needed_bytes
        done = 0
        # On CUDA the short runs (one _foreach_copy_ per element type: SM kernels) run on a
        # second stream beside the bucket copies (cudaMemcpy) and the strided copies; running
        # the strided copies there too was measured slower (benchmarks/refit_gpu.py).
        side = self._side_stream() if self.device.type == "cuda" and small and (big or strided) else None
        main = torch.cuda.current_stream(self.device) if side is not None else None
        if side is not None:
            side.wait_stream(main)
        with _on(side if self.copy_kernel != "triton_all" else None):
            for op in small:
                if callable(op):   # the one-launch gather of _segcopy
                    op()
                else:
                    torch._foreach_copy_(op[0], op[1], non_blocking=True)
        if small:
            done += prog["small"][1] + prog["kernel"][1]
            if progress is not None:
                progress(done, total)
        for d, src, nbytes in big + strided:
            d.copy_(src, non_blocking=True)
            done += nbytes
            if progress is not None:
                progress(done, total)
        if side is not None:
            main.wait_stream(side)
        if self.device.type == "cuda":
            # only our stream: an engine decoding on other streams of the GPU is not stalled
            torch.cuda.current_stream(self.device).synchronize()
        elif any(b.is_cuda for _, _, bufs in self._cache.values() for b in bufs[:1]):
            torch.cuda.synchronize()
        self.last_ops = prog["ops"]
        return done

    def _side_stream(self):
        stream = getattr(self, "_side", None)
        if stream is None:
            stream = self._side = torch.cuda.Stream(self.device)
        return stream

    def close(self) -> None:
        for rank in list(self._cache):
            self._drop(rank)
