"""NIXL transport (optional extra: ``pip install --no-deps nixl-cu13==1.5.1``): one-sided
READs of the publisher's registered arena over UCX (DRAM on CPU, VRAM on GPU).

Registration happens once: the publisher registers its arena buckets with its agent when
the arena is allocated (again only if the arena is re-allocated); the receiver registers
one reusable staging buffer (grown when a larger message is needed). Agents exchange
metadata through the manifest (``sources[r]["nixl"]["meta"]``, base64), so no side
channel is needed. Each message (whole-row byte ranges, see ``base.row_messages``) is one
READ request of several descriptors; the receiver polls its state until DONE, an error,
or the deadline (→ PublisherGoneError), then copies the planned slices out.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid

import torch

from dynamo_rl.refit.errors import PublisherGoneError, TransportError
from dynamo_rl.refit.transport.base import Arena, Reader, copies_by_source, row_messages, scatter_message

DEFAULT_MSG_BYTES = 256 << 20


def _agent(name: str):
    try:
        from nixl_cu13._api import nixl_agent, nixl_agent_config
    except ImportError:
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except ImportError:
            raise TransportError(
                "NIXL is not installed: pip install --no-deps nixl-cu13==1.5.1 (or use 'shm' / 'dist')"
            ) from None
    import logging

    logging.getLogger("nixl").setLevel(logging.WARNING)
    agent = nixl_agent(name, nixl_agent_config(backends=[]))
    # shared-memory-only UCX transports (no NIC here) need error handling off
    agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
    return agent


def _mem(t: torch.Tensor) -> tuple[str, int]:
    return ("VRAM", t.device.index or 0) if t.is_cuda else ("DRAM", 0)


class NixlServer:
    """Publisher side: an agent with the arena's buckets registered."""

    def __init__(self, arena: Arena, name: str):
        self.name = name
        self.agent = _agent(name)
        self.arena = None
        self.reg = None
        self.bind(arena)

    def bind(self, arena: Arena) -> None:
        if arena is self.arena:
            return
        if self.reg is not None:
            self.agent.deregister_memory(self.reg)
        self.arena = arena
        self.reg = self.agent.register_memory(list(arena.buffers))

    def address(self) -> dict:
        mem, dev = _mem(self.arena.buffers[0])
        return {"agent": self.name, "mem": mem,
                "meta": base64.b64encode(self.agent.get_agent_metadata()).decode(),
                "buckets": [[b.data_ptr(), b.numel(), dev] for b in self.arena.buffers]}

    def close(self) -> None:
        if self.reg is not None:
            try:
                self.agent.deregister_memory(self.reg)
            except Exception:  # noqa: BLE001
                pass
            self.reg = None


class NixlReader(Reader):
    name = "nixl"

    def __init__(self, device="cpu", msg_bytes: int = DEFAULT_MSG_BYTES):
        self.device = torch.device(device)
        self.msg_bytes = msg_bytes
        self.agent = _agent(f"recv-{uuid.uuid4().hex[:12]}")
        self._remote: dict[str, str] = {}
        self._stage: torch.Tensor | None = None
        self._stage_reg = None

    def _staging(self, n: int, mem: str) -> torch.Tensor:
        dev = self.device if (mem == "VRAM" and self.device.type == "cuda") else torch.device("cpu")
        if self._stage is None or self._stage.numel() < n or self._stage.device != dev:
            if self._stage_reg is not None:
                self.agent.deregister_memory(self._stage_reg)
            self._stage = torch.empty(max(n, 1), dtype=torch.uint8, device=dev)
            self._stage_reg = self.agent.register_memory([self._stage])
        return self._stage

    def _peer(self, a: dict) -> str:
        key = hashlib.sha1(a["meta"].encode()).hexdigest()
        name = self._remote.get(key)
        if name is None:
            name = self.agent.add_remote_agent(base64.b64decode(a["meta"]))
            name = name.decode() if isinstance(name, bytes) else name
            self._remote[key] = name
        return name

    def pull(self, plan, descs, sources, dst, *, version, deadline, progress=None, flat=None,
             dst_key=None) -> int:
        copies_by = copies_by_source(plan)
        moved, total = 0, plan.row_bytes
        for rank in plan.source_ranks:
            a = sources[rank].get("nixl")
            if not a:
                raise TransportError(
                    f"source rank {rank} did not register with NIXL; construct its Publisher with "
                    "transport='nixl' (or call enable_nixl()) and publish again"
                )
            peer = self._peer(a)
            msgs = row_messages(plan, descs, rank, self.msg_bytes)
            big = max((sum(it[5] for it in m) for m in msgs), default=1)
            stage = self._staging(big, a["mem"])
            smem, sdev = _mem(stage)
            for m in msgs:
                n = sum(it[5] for it in m)
                local, remote, pos = [], [], 0
                for it in m:
                    ptr, _, dev = a["buckets"][it[3]]
                    local.append((stage.data_ptr() + pos, it[5], sdev))
                    remote.append((ptr + it[4], it[5], dev))
                    pos += it[5]
                h = self.agent.initialize_xfer(
                    "READ", self.agent.get_xfer_descs(local, smem),
                    self.agent.get_xfer_descs(remote, a["mem"]), peer)
                try:
                    st = self.agent.transfer(h)
                    while st == "PROC":
                        if time.monotonic() > deadline:
                            raise PublisherGoneError(f"source rank {rank}: NIXL READ timed out")
                        st = self.agent.check_xfer_state(h)
                    if st != "DONE":
                        raise PublisherGoneError(f"source rank {rank}: NIXL READ failed ({st})")
                finally:
                    h.release()
                scatter_message(stage[:n], m, descs, copies_by, rank, dst)
                moved += n
                if progress is not None:
                    progress(moved, total)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return moved

    def close(self) -> None:
        if self._stage_reg is not None:
            try:
                self.agent.deregister_memory(self._stage_reg)
            except Exception:  # noqa: BLE001
                pass
            self._stage_reg = None
