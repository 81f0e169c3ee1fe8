"""Transports across REAL processes: spawned publisher ranks and receiver ranks.

shm and gloo always; NIXL when ``nixl`` imports (else skipped with the reason); CUDA IPC and
NCCL under ``@pytest.mark.gpu``. A publisher SIGKILLed mid-pull gives PublisherGoneError,
never a hang (every wait has a deadline)."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

import refit_procs

CTX = mp.get_context("spawn")
WAIT_S = 120


class Child:
    def __init__(self, target, *args):
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()

    def ask(self, *msg):
        if msg:
            self.conn.send(msg)
        if not self.conn.poll(WAIT_S):
            raise TimeoutError(f"child {self.proc.pid} did not answer {msg!r}")
        return self.conn.recv()

    def stop(self):
        if self.proc.is_alive():
            try:
                self.conn.send(("exit",))
                self.conn.poll(10) and self.conn.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def start_publishers(key, naming, S, device="cpu", nixl=False):
    pubs, url = [], None
    for r in range(S):
        p = Child(refit_procs.publisher_main, key, naming, S, r, url, device, nixl)
        kind, u, http, pid = p.ask()
        url = url or u
        p.pid = pid
        pubs.append(p)
    return pubs, url


def publish(pubs, version, seed):
    for p in pubs:
        p.conn.send(("publish", version, seed))
    for p in pubs:
        assert p.ask() == ("ok",)


@pytest.fixture()
def children():
    made = []
    yield made
    for c in made:  # ask all to exit first, then reap
        try:
            c.conn.send(("exit",))
        except (BrokenPipeError, OSError):
            pass
    for c in made:
        c.stop()


def test_shm_and_gloo_megatron_S2_to_T2_across_processes(children):
    pubs, url = start_publishers("gqa16_8", "megatron", 2)
    children.extend(pubs)
    recvs = [Child(refit_procs.receiver_main, "gqa16_8", 2, t, {"dist": {"msg_bytes": 16 << 10}}) for t in range(2)]
    children.extend(recvs)
    for r in recvs:
        assert r.ask()[0] == "ready"
    publish(pubs, 1, seed=1)
    for transport in ("shm", "dist"):
        for r in recvs:
            r.conn.send(("pull", url, 1, transport, 1, None))
        for r in recvs:
            kind, rep, bad = r.ask()
            assert kind == "ok" and bad == [], (transport, rep, bad)
            assert rep["transport"] == transport and rep["version"] == 1
    # version 2 over dist reuses the process groups (registration once); values change
    publish(pubs, 2, seed=2)
    for r in recvs:
        r.conn.send(("pull", url, 2, "dist", 2, None))
    for r in recvs:
        kind, rep, bad = r.ask()
        assert kind == "ok" and bad == [], rep


def test_publisher_killed_mid_pull_is_an_error_not_a_hang(children):
    recv = Child(refit_procs.receiver_main, "gqa16_8", 1, 0,
                 {"dist": {"msg_bytes": 8 << 10}, "nixl": {"msg_bytes": 8 << 10}})
    children.append(recv)
    try:
        import nixl_cu13  # noqa: F401

        transports = ("shm", "dist", "nixl")
    except ImportError:
        transports = ("shm", "dist")
    for transport in transports:
        pubs, url = start_publishers("gqa16_8", "hf", 1, nixl=transport == "nixl")
        children.extend(pubs)
        if transport == "shm":
            assert recv.ask()[0] == "ready"
        publish(pubs, 1, seed=0)
        # the receiver SIGKILLs the publisher at its first progress callback
        kind, name, msg = recv.ask("pull", url, 1, transport, 0, pubs[0].pid)
        assert kind == "err" and name == "PublisherGoneError", (transport, name, msg)
        assert "version 1" in msg


def test_nixl_across_processes(children):
    from dynamo_rl.refit import TransportError
    from dynamo_rl.refit.transport import get_reader

    try:
        get_reader("nixl")
    except TransportError as e:
        pytest.skip(f"nixl transport unavailable: {e}")
    pubs, url = start_publishers("gqa32_4", "megatron", 2)
    children.extend(pubs)
    publish(pubs, 1, seed=3)
    for p in pubs:
        assert p.ask("nixl")[0] == "ok", "enable_nixl failed"
    publish(pubs, 2, seed=4)  # the registration survives a new version
    recv = Child(refit_procs.receiver_main, "gqa32_4", 4, 1)
    children.append(recv)
    assert recv.ask()[0] == "ready"
    kind, rep, bad = recv.ask("pull", url, 2, "nixl", 4, None)
    assert kind == "ok" and bad == [], rep


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["shm", "dist"])  # CUDA IPC / NCCL
def test_cuda_ipc_and_nccl(children, transport):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if transport == "dist" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL between two processes needs two GPUs (one GPU: use shm / CUDA IPC)")
    pubs, url = start_publishers("gqa16_8", "megatron", 2, "cuda:0")
    children.extend(pubs)
    publish(pubs, 1, seed=5)
    dev = "cuda:0" if transport == "shm" or torch.cuda.device_count() < 2 else "cuda:1"
    recv = Child(refit_procs.receiver_main, "gqa16_8", 1, 0, None, dev)
    children.append(recv)
    assert recv.ask()[0] == "ready"
    kind, rep, bad = recv.ask("pull", url, 1, transport, 5, None)
    assert kind == "ok" and bad == [], rep
    # the same TP=2 trainer into a TP=2 engine (both ranks on the receiving GPU)
    recvs = [Child(refit_procs.receiver_main, "gqa16_8", 2, t, None, dev) for t in range(2)]
    children.extend(recvs)
    for r in recvs:
        assert r.ask()[0] == "ready"
        r.conn.send(("pull", url, 1, transport, 5, None))
    for r in recvs:
        kind, rep, bad = r.ask()
        assert kind == "ok" and bad == [], rep
