"""torch.distributed transport: gloo (CPU) / NCCL (CUDA) point-to-point between a publisher
rank and a receiver, over a private 2-process group per pair.

Handshake (once per pair, reused across versions): the receiver POSTs
``{publisher_rank_http}/dist/connect``; the publisher starts a ``TCPStore`` (port 0) and,
in a background thread, builds its side of a ``ProcessGroupGloo``/``ProcessGroupNCCL``
(rank 0 of 2); the receiver builds rank 1 with the returned store address.

Transfer: the receiver splits its plan (``base.contiguous_runs``) into byte runs — row
ranges contiguous on both sides, merged when adjacent — and strided copies. Each run of at
least ``direct_min_bytes`` (cut at ``msg_bytes``) is a single-range message that the
publisher sends straight from its arena and the receiver receives straight into its flat
destination buffer: one copy per byte, no staging; all of them are posted before the first
wait. Strided copies (row-parallel tensors resharded) and the copies of shorter runs
(Megatron's fused QKV split per KV group), when ``direct_min_bytes`` is set, move as whole rows (``TargetPlan.row_ranges``)
packed into messages of at most ``msg_bytes``, received into one reusable buffer and copied
out: a few large messages instead of one send/recv pair per short run. The message list is POSTed to ``/dist/pull``; the
publisher's connection thread sends them in order. Timeouts come from the receiver's deadline; a
dead publisher surfaces as a gloo/NCCL error which the Receiver reports as
``PublisherGoneError``.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist

from dynamo_rl.refit._http import HTTPStatus, request
from dynamo_rl.refit.errors import PublisherGoneError, StaleVersionError, TransportError
from dynamo_rl.refit.planner import TargetPlan
from dynamo_rl.refit.transport.base import (
    Reader,
    _rows_only,
    contiguous_runs,
    copies_by_source,
    row_messages,
    scatter_message,
)

DEFAULT_MSG_BYTES = 256 << 20


def _make_pg(store, rank: int, backend: str, timeout_s: float, host: str, device=None):
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, 2, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    pg = dist.ProcessGroupNCCL(store, rank, 2, opts)
    return pg


class _Conn:
    def __init__(self, server: "DistServer", cid: str, backend: str, host: str, timeout_s: float):
        self.server, self.cid, self.backend = server, cid, backend
        self.store = dist.TCPStore(host, 0, world_size=2, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=timeout_s))
        self.port = self.store.port
        self.jobs: queue.Queue = queue.Queue()
        self.pg = None
        self.error: str | None = None
        self.sendbuf: torch.Tensor | None = None
        self.thread = threading.Thread(target=self._run, args=(host, timeout_s), daemon=True,
                                       name=f"refit-dist-{cid[:8]}")
        self.thread.start()

    def _run(self, host, timeout_s):
        try:
            arena = self.server.publisher.arena
            device = arena.device if arena is not None else torch.device("cpu")
            if self.backend == "nccl":
                torch.cuda.set_device(device)
            self.pg = _make_pg(self.store, 0, self.backend, timeout_s, host)
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                for msg in job:
                    self._send(msg)
        except Exception as e:  # noqa: BLE001 - the receiver sees the failure on its side
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.pg = None  # destroy the group in its own thread, before interpreter exit

    def _send(self, msg):
        pub = self.server.publisher
        with pub._lock:
            arena = pub.arena
            if len(msg) == 1:
                b, off, n = msg[0]
                t = arena.buffers[b][off : off + n]
            else:
                total = sum(n for _, _, n in msg)
                if self.sendbuf is None or self.sendbuf.numel() < total or self.sendbuf.device != arena.device:
                    self.sendbuf = torch.empty(max(total, DEFAULT_MSG_BYTES // 16), dtype=torch.uint8,
                                               device=arena.device)
                pos = 0
                for b, off, n in msg:
                    self.sendbuf[pos : pos + n].copy_(arena.buffers[b][off : off + n])
                    pos += n
                t = self.sendbuf[:total]
            self.pg.send([t], 1, 0).wait()

    def close(self):
        self.jobs.put(None)
        self.thread.join(timeout=5.0)


class DistServer:
    """Publisher-side ``/dist/connect`` and ``/dist/pull`` routes."""

    def __init__(self, publisher):
        self.publisher = publisher
        self.conns: dict[str, _Conn] = {}
        self._lock = threading.Lock()

    def routes(self):
        return {("POST", "/dist/connect"): self._connect, ("POST", "/dist/pull"): self._pull}

    def _connect(self, q, body):
        arena = self.publisher.arena
        if arena is None:
            raise HTTPStatus(404, {"error": "nothing published yet"})
        backend = "nccl" if arena.device.type == "cuda" else "gloo"
        host = self.publisher.http_url.split("//")[1].rsplit(":", 1)[0]
        cid = body.get("receiver_id") or uuid.uuid4().hex
        conn = _Conn(self, cid, backend, host, float(body.get("timeout_s", 120.0)))
        with self._lock:
            old = self.conns.pop(cid, None)
            self.conns[cid] = conn
        if old:
            old.close()
        return {"host": host, "port": conn.port, "backend": backend, "receiver_id": cid}

    def _pull(self, q, body):
        pub = self.publisher
        conn = self.conns.get(body["receiver_id"])
        if conn is None:
            raise HTTPStatus(404, {"error": "unknown receiver_id; connect first"})
        if conn.error:
            raise HTTPStatus(500, {"error": f"connection failed: {conn.error}"})
        if body["version"] != pub.version or body.get("epoch") != pub.epoch:
            raise HTTPStatus(409, {"error": f"version {body['version']} (epoch {body.get('epoch')}) "
                                            f"is not current ({pub.version}, epoch {pub.epoch})"})
        conn.jobs.put(body["messages"])
        return {"ok": True, "messages": len(body["messages"])}

    def reset(self):
        pass

    def close(self):
        with self._lock:
            for c in self.conns.values():
                c.close()
            self.conns.clear()


def _in_runs(c, descs, dst, spans: dict[int, list[tuple[int, int]]]) -> bool:
    """True when copy ``c`` is a row range (on both sides) whose source bytes lie in one of
    ``spans`` (``{bucket: [(start, end)]}``, byte offsets in the source arena)."""
    from dynamo_rl.refit.roles import dtype_from_name

    d = descs[c.src]
    pl = next(p for p in d.placement if p.rank == c.src_rank)
    shape = d.local_shape(pl)
    if not (_rows_only(c.src_box, shape) and _rows_only(c.dst_box, dst[c.dst].shape)):
        return False
    rowb = dtype_from_name(d.dtype).itemsize * (math.prod(shape[1:]) if len(shape) > 1 else 1)
    s_off = pl.offset + c.src_box[0][0] * rowb
    return any(a <= s_off < b for a, b in spans.get(pl.bucket, ()))


class DistReader(Reader):
    """Receiver side of ``dist``. ``msg_bytes`` bounds each message (and the reusable buffer)."""

    name = "dist"

    #: byte runs shorter than this travel inside whole-row messages and are copied out
    #: locally instead of one send/recv pair each. Megatron's fused QKV split per KV group
    #: makes ~1,000 runs of 0.6-2.6 MB for a 4B model, and over NCCL the message count is
    #: what limits (benchmarks/results/refit_multigpu.json, measured with 0). 8 MiB staging
    #: (refit_multigpu_direct8.json) sped a TP=1 engine up 1.4x but slowed two TP=2 ranks
    #: sharing a GPU 1.7x, so the default stays 0
    DIRECT_MIN = 0

    def __init__(self, device="cpu", msg_bytes: int = DEFAULT_MSG_BYTES, direct_min_bytes: int | None = None):
        self.device = torch.device(device)
        self.msg_bytes = msg_bytes
        self.direct_min = self.DIRECT_MIN if direct_min_bytes is None else int(direct_min_bytes)
        self.id = uuid.uuid4().hex
        self._pgs: dict[str, tuple] = {}
        self._buf: dict[str, torch.Tensor] = {}
        self._programs: dict = {}

    def _pg(self, rank: int, addr: dict, deadline: float):
        key = addr["http"]
        hit = self._pgs.get(key)
        if hit is not None:
            return hit
        remaining = max(1.0, deadline - time.monotonic())
        status, body = request(addr["http"] + "/dist/connect",
                               {"receiver_id": self.id, "timeout_s": remaining}, timeout=remaining)
        if status != 200:
            raise TransportError(f"source rank {rank}: /dist/connect failed: {body.get('error', body)}")
        store = dist.TCPStore(body["host"], body["port"], world_size=2, is_master=False,
                              timeout=timedelta(seconds=remaining))
        if body["backend"] == "nccl":
            torch.cuda.set_device(self.device)
        pg = _make_pg(store, 1, body["backend"], remaining, body["host"])
        self._pgs[key] = (pg, store, body["backend"])
        return self._pgs[key]

    def _recvbuf(self, backend: str, n: int) -> torch.Tensor:
        dev = torch.device("cpu") if backend == "gloo" else self.device
        key = str(dev)
        b = self._buf.get(key)
        if b is None or b.numel() < n:
            b = self._buf[key] = torch.empty(max(n, 1), dtype=torch.uint8, device=dev)
        return b

    def _program(self, plan, descs, dst, flat, rank, dst_key=None):
        """Per source rank: direct messages (byte runs of at least ``direct_min`` bytes received
        straight into ``flat``: one copy per byte, sent straight from the arena) and staged
        messages (whole rows, for strided copies and the copies of shorter runs, received into
        one buffer and copied out). Cached per plan and layout."""
        key = (id(plan), flat is not None and flat.numel(), rank, dst_key)
        hit = self._programs.get(key)
        if hit is not None and hit[0] is plan:
            return hit[1]
        rkey = (id(plan), "runs", dst_key)
        if rkey not in self._programs or self._programs[rkey][0] is not plan:
            self._programs = {rkey: (plan, contiguous_runs(plan, descs, dst, flat))}
        runs, strided = self._programs[rkey][1]
        direct = []  # (bucket, s_off, n, d_off)
        short: dict[int, list[tuple[int, int]]] = {}  # bucket -> [(s_off, end)] of short runs
        for r_rank, bucket, s_off, d_off, span, _, _ in runs:
            if r_rank != rank:
                continue
            if span < self.direct_min:
                short.setdefault(bucket, []).append((s_off, s_off + span))
                continue
            for k in range(0, span, self.msg_bytes):
                n = min(self.msg_bytes, span - k)
                direct.append((bucket, s_off + k, n, d_off + k))
        if short:  # the copies making up short runs travel staged, with the strided ones
            strided = list(strided) + [c for c in plan.copies if c.src_rank == rank
                                       and _in_runs(c, descs, dst, short)]
        sub = TargetPlan(plan.tp_rank, plan.tp_size, copies=[c for c in strided if c.src_rank == rank])
        staged = row_messages(sub, descs, rank, self.msg_bytes) if sub.copies else []
        prog = (direct, staged, copies_by_source(sub))
        self._programs[key] = (plan, prog)
        return prog

    def pull(self, plan, descs, sources, dst, *, version, deadline, progress=None, flat=None,
             dst_key=None) -> int:
        moved, total = 0, plan.needed_bytes
        for rank in plan.source_ranks:
            addr = sources[rank]
            direct, staged, copies_by = self._program(plan, descs, dst, flat, rank, dst_key)
            try:
                pg, _, backend = self._pg(rank, addr, deadline)
                if backend == "gloo" and flat is not None and flat.is_cuda:
                    direct_ok = False  # gloo cannot receive into CUDA memory: stage instead
                else:
                    direct_ok = True
                if not direct_ok and direct:
                    raise TransportError("gloo (CPU publisher) into a CUDA receiver: use transport='shm' "
                                         "or publish from CUDA (NCCL)")
                messages = [[[b, off, n]] for b, off, n, _ in direct]
                messages += [[[it[3], it[4], it[5]] for it in m] for m in staged]
                status, body = request(addr["http"] + "/dist/pull", {
                    "receiver_id": self.id, "version": version, "epoch": addr.get("epoch"),
                    "messages": messages,
                }, timeout=max(1.0, deadline - time.monotonic()))
                if status == 409:
                    raise StaleVersionError(f"source rank {rank}: {body.get('error')}; retry with the newer version")
                if status != 200:
                    raise TransportError(f"source rank {rank}: /dist/pull failed: {body.get('error', body)}")

                def wait(work):
                    if not work.wait(timedelta(seconds=max(1.0, deadline - time.monotonic()))):
                        raise PublisherGoneError(f"source rank {rank}: receive timed out")

                # every direct receive is posted before the first wait: with NCCL a wait with a
                # timeout blocks the host, and one round trip per short run (the QKV pieces)
                # would dominate; ops of one pair complete in the order they were posted
                works = [pg.recv([flat[d_off : d_off + n]], 0, 0) for _, _, n, d_off in direct]
                for w in works:
                    wait(w)
                if direct:
                    moved += sum(n for _, _, n, _ in direct)
                    if progress is not None:
                        progress(moved, total)
                for m in staged:
                    n = sum(it[5] for it in m)
                    buf = self._recvbuf(backend, n)[:n]
                    wait(pg.recv([buf], 0, 0))
                    scatter_message(buf, m, descs, copies_by, rank, dst)
                    moved += n
                    if progress is not None:
                        progress(moved, total)
            except Exception:
                self._drop(addr["http"])  # a broken group is never reused
                raise
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return moved

    def _drop(self, key):
        self._pgs.pop(key, None)

    def close(self) -> None:
        self._pgs.clear()
        self._buf.clear()
