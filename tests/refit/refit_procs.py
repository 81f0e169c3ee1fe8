"""Child-process entry points for the cross-process refit tests (spawned, torch threads 1)."""

from __future__ import annotations

import os
import signal
import time
import traceback

import torch


def _shards(key, naming, S, rank, seed):
    from dynamo_rl.refit.megatron import hf_to_megatron

    from refit_models import hf_shard, model

    hf, cfg = model(key, seed)
    if naming == "megatron":
        return hf_to_megatron(hf, cfg, S, pad_value=9.0)[rank], cfg
    return hf_shard(hf, cfg, rank, S), cfg


def publisher_main(conn, key, naming, S, rank, coordinator_url, device="cpu", nixl=False):
    """Commands: ("publish", version, seed) → ("ok",); ("exit",) → ("bye",)."""
    torch.set_num_threads(1)
    from dynamo_rl.refit import Publisher

    pub = Publisher(tp_rank=rank, tp_size=S, coordinator_url=coordinator_url,
                    transport="nixl" if nixl else "shm")
    conn.send(("url", pub.url, pub.http_url, os.getpid()))
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "publish":
                shards, cfg = _shards(key, naming, S, rank, msg[2])
                if device != "cpu":
                    shards = {k: v.to(device) for k, v in shards.items()}
                pub.publish(msg[1], shards, naming=naming, model_config=cfg)
                conn.send(("ok",))
            elif msg[0] == "nixl":
                pub.enable_nixl()
                conn.send(("ok",))
            elif msg[0] == "exit":
                pub.close()
                conn.send(("bye",))
                return
        except Exception as e:  # noqa: BLE001
            conn.send(("err", type(e).__name__, f"{e}\n{traceback.format_exc()}"))


def receiver_main(conn, key, T, t, options=None, device="cpu"):
    """Commands: ("pull", url, version, transport, seed, kill_pid) → ("ok", report, bad_names)
    | ("err", type, message); ("exit",)."""
    torch.set_num_threads(1)
    from dynamo_rl.refit import Receiver, RefitError
    from dynamo_rl.refit.megatron import engine_specs, hf_to_engine

    from refit_models import model

    recv = None
    conn.send(("ready", os.getpid()))
    while True:
        msg = conn.recv()
        if msg[0] == "exit":
            if recv:
                recv.close()
            conn.send(("bye",))
            return
        _, url, version, transport, seed, kill_pid = msg
        hf, cfg = model(key, seed)
        ref = hf_to_engine(hf, cfg, t, T)
        if recv is None:
            recv = Receiver(tp_rank=t, tp_size=T, param_specs=engine_specs(ref), device=device,
                            transport_options=options)
        killed = []

        def progress(done, total):
            if kill_pid and not killed:
                os.kill(kill_pid, signal.SIGKILL)
                killed.append(1)
                time.sleep(0.5)  # SIGKILL is asynchronous: let it land before the copies finish

        try:
            out, rep = recv.pull(url, version, transport, timeout_s=60, progress=progress)
            bad = [n for n in ref if not torch.equal(out[n].cpu(), ref[n])]
            conn.send(("ok", rep, bad))
        except RefitError as e:
            conn.send(("err", type(e).__name__, str(e)))
        except Exception as e:  # noqa: BLE001
            conn.send(("err", type(e).__name__, f"{e}\n{traceback.format_exc()}"))
