"""Refit throughput: a full refit of a ~1 GB model, publisher process → receiver process.

For each transport (shm [CPU shared memory / CUDA IPC], dist [gloo / NCCL], nixl if
installed) it spawns Megatron-layout publisher rank processes and one receiver process,
publishes once, then times ``Receiver.pull`` (manifest + plan (cached) + transfer +
translation to the HF engine layout + seqlock check) ``--repeat`` times after one warm-up
pull (reported as ``first_pull_s``); GB/s = engine bytes / median seconds, end to end and
for the transfer phase alone (``transfer_GBps``: data movement + translation, without the
HTTP manifest fetch and the seqlock check). The receiver double-buffers (as a worker that
adopts every pull would), so page faults of fresh allocations are not timed. The ceiling is an in-process ``copy_`` of the same bytes in the
same run (on ``--device cuda``: a device-to-device copy). The resharding overhead is the
ratio of seconds per byte with S≠T (S=2 sources → T=1 receiver, fused QKV/gate-up split
from two ranks) to S=T (S=1 → T=1), both over shm.

    python benchmarks/refit.py [--device cpu|cuda] [--size-gb 1.0] [--dtype bfloat16]
                               [--transports shm,dist,nixl] [--repeat 3]
    (``shm@N``: the shm reader with big-run threshold N bytes, to compare copy strategies)

Writes ``benchmarks/results/refit.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402


def config_for(size_gb: float, dtype: torch.dtype) -> dict:
    """A Qwen3-like dense config whose weights take about ``size_gb`` GB."""
    H, F, V, nq, nkv, hd = 2048, 5632, 32000, 16, 8, 128
    isz = torch.empty((), dtype=dtype).element_size()
    per_layer = (nq * hd * H * 2 + 2 * nkv * hd * H + 3 * F * H + 2 * H + 2 * hd) * isz
    layers = max(1, round((size_gb * 1e9 - V * H * isz) / per_layer))
    return dict(num_attention_heads=nq, num_key_value_heads=nkv, head_dim=hd, hidden_size=H,
                intermediate_size=F, vocab_size=V, num_hidden_layers=layers, tie_word_embeddings=True)


def hf_tensors(cfg: dict, dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    H, V, nq, nkv, hd, F = (cfg[k] for k in ("hidden_size", "vocab_size", "num_attention_heads",
                                              "num_key_value_heads", "head_dim", "intermediate_size"))

    def r(*s):
        return torch.empty(*s, dtype=dtype).uniform_(-1, 1, generator=g)

    sd = {"model.embed_tokens.weight": r(V, H), "model.norm.weight": r(H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": r(H), p + "post_attention_layernorm.weight": r(H),
                   p + "self_attn.q_proj.weight": r(nq * hd, H), p + "self_attn.k_proj.weight": r(nkv * hd, H),
                   p + "self_attn.v_proj.weight": r(nkv * hd, H), p + "self_attn.o_proj.weight": r(H, nq * hd),
                   p + "self_attn.q_norm.weight": r(hd), p + "self_attn.k_norm.weight": r(hd),
                   p + "mlp.gate_proj.weight": r(F, H), p + "mlp.up_proj.weight": r(F, H),
                   p + "mlp.down_proj.weight": r(H, F)})
    return sd


def publisher_main(conn, cfg, dtype, S, rank, url, device, nixl):
    torch.set_num_threads(1)
    from dynamo_rl.refit import Publisher
    from dynamo_rl.refit.megatron import hf_to_megatron

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    shards = hf_to_megatron(hf_tensors(cfg, dtype), cfg, S)[rank]
    shards = {k: v.to(device) for k, v in shards.items()}
    pub = Publisher(tp_rank=rank, tp_size=S, coordinator_url=url, transport="nixl" if nixl else "shm")
    conn.send(pub.url)
    pub.publish(1, shards, naming="megatron", model_config=cfg)
    del shards
    conn.send("published")
    conn.recv()
    pub.close()


def receiver_main(conn, cfg, dtype, url, version, transport, T, device, repeat):
    torch.set_num_threads(1)
    from dynamo_rl.refit import Receiver
    from dynamo_rl.refit.megatron import engine_param_specs

    one = {n: (tuple(t.shape), t.dtype) for n, t in hf_tensors({**cfg, "num_hidden_layers": 1}, dtype).items()}
    full = {}
    for i in range(cfg["num_hidden_layers"]):
        for n, st in one.items():
            full[n.replace("layers.0.", f"layers.{i}.")] = st
    full = engine_param_specs(full, cfg, T)
    opts = {}
    if "@" in transport:  # e.g. shm@16777216: big-run threshold of the shm reader
        transport, big = transport.split("@")
        opts = {"shm": {"big_run_bytes": int(big)}}
    recv = Receiver(tp_rank=0, tp_size=T, param_specs=full, device=device, double_buffer=True,
                    transport_options=opts)
    secs, xfer, rep = [], [], None
    for _ in range(repeat + 1):  # the first pull (plan, connections, registration) is reported apart
        out, rep = recv.pull(url, version, transport, timeout_s=600)
        secs.append(rep["seconds"])
        xfer.append(rep["transfer_seconds"])
        del out
    recv.close()
    conn.send({"seconds": secs, "transfer_seconds": xfer, "bytes": rep["bytes"],
               "moved_bytes": rep["moved_bytes"], "overpull_factor": rep["overpull_factor"],
               "copy_ops": rep.get("copy_ops")})


def run_case(ctx, cfg, dtype, S, T, transport, device, repeat, nixl=False):
    pubs, url = [], None
    for r in range(S):
        a, b = ctx.Pipe()
        p = ctx.Process(target=publisher_main, args=(b, cfg, dtype, S, r, url, device, nixl), daemon=True)
        p.start()
        url = url or _wait(a, [p])
        if r:
            _wait(a, [p])
        pubs.append((p, a))
    for p, a in pubs:
        assert _wait(a, [p]) == "published"
    a, b = ctx.Pipe()
    rdev = device if not device.startswith("cuda") or transport != "dist" or torch.cuda.device_count() < 2 else "cuda:1"
    rp = ctx.Process(target=receiver_main, args=(b, cfg, dtype, url, 1, transport, T, rdev, repeat), daemon=True)
    rp.start()
    res = _wait(a, [rp] + [p for p, _ in pubs])
    rp.join()
    for p, c in pubs:
        c.send("exit")
    for p, c in pubs:
        p.join(30)
    med = statistics.median(res["seconds"][1:])
    xmed = statistics.median(res["transfer_seconds"][1:])
    return {"S": S, "T": T, "transport": transport, "bytes": res["bytes"], "median_s": med,
            "GBps": res["bytes"] / med / 1e9, "transfer_median_s": xmed,
            "transfer_GBps": res["bytes"] / xmed / 1e9, "first_pull_s": res["seconds"][0],
            "seconds": res["seconds"][1:], "overpull_factor": res["overpull_factor"],
            "copy_ops": res["copy_ops"]}


def _wait(conn, procs, timeout_s=600):
    """Receive from a child; raise if any of ``procs`` died first (never hang)."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.5):
        dead = [p for p in procs if not p.is_alive()]
        if dead or time.monotonic() > deadline:
            for p in procs:
                if p.is_alive():
                    p.kill()
            raise RuntimeError(f"child process(es) {[p.pid for p in dead]} exited (see stderr) or timed out")
    return conn.recv()


def memcpy_ceiling(nbytes: int, device: str, repeat: int) -> dict:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    secs = []
    for _ in range(repeat + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t)
    med = statistics.median(secs[1:])
    return {"bytes": nbytes, "median_s": med, "GBps": nbytes / med / 1e9,
            "note": "in-process copy_ of the same bytes (read+write each counted once)"}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--transports", default="shm,dist,nixl")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/refit.json"))
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    device = "cuda:0" if a.device == "cuda" else a.device
    cfg = config_for(a.size_gb, dtype)
    ctx = mp.get_context("spawn")
    results = {"device": device, "dtype": a.dtype, "config": cfg, "host": platform.node(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "runs": [], "skipped": {}}
    if device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(0)
    for tr in a.transports.split(","):
        if tr.startswith("nixl"):
            try:
                import nixl_cu13  # noqa: F401
            except Exception as e:  # noqa: BLE001
                results["skipped"]["nixl"] = f"{type(e).__name__}: {e}"
                continue
        try:
            r = run_case(ctx, cfg, dtype, 1, 1, tr, device, a.repeat, nixl=tr.startswith("nixl"))
        except Exception as e:  # noqa: BLE001
            results["skipped"][tr] = f"{type(e).__name__}: {e}"
            continue
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
    same = next((r for r in results["runs"] if r["transport"].startswith("shm")), None)
    if same:
        results["ceiling"] = memcpy_ceiling(same["bytes"], device, a.repeat)
        for r in results["runs"]:
            r["fraction_of_ceiling"] = r["GBps"] / results["ceiling"]["GBps"]
            r["transfer_fraction_of_ceiling"] = r["transfer_GBps"] / results["ceiling"]["GBps"]
        resh = run_case(ctx, cfg, dtype, 2, 1, "shm", device, a.repeat)
        results["reshard_run"] = resh
        results["resharding_overhead_ratio"] = (resh["median_s"] / resh["bytes"]) / (same["median_s"] / same["bytes"])
        print(json.dumps({"ceiling": results["ceiling"], "resharding_overhead_ratio": results["resharding_overhead_ratio"]}), flush=True)
    write_result("refit", results, a.out)  # with the date, the command and the machine


if __name__ == "__main__":
    main()
