"""Refit over NCCL between GPUs: a Megatron TP=2 trainer → engines with TP=1 and TP=2.

Processes (``spawn``):

- 2 trainer processes, one per Megatron TP rank (``refit_gpu.trainer_main``): each draws
  the Qwen3-4B-shaped model (random bf16, ~8 GB) from one seeded generator on its GPU,
  keeps its Megatron-Core TP shard (fused QKV, gated fc1, padded vocabulary) and publishes
  it with a :class:`~dynamo_rl.refit.Publisher`.
- receiver processes, one per engine TP rank, each with a
  :class:`~dynamo_rl.refit.Receiver` pulling over ``transport="dist"``: ``torch.distributed``
  point-to-point over NCCL, a private 2-process group per (trainer rank, receiver), in
  messages of at most ``--msg-mb`` (bucketed). The first pull allocates the engine-layout
  buffer; later pulls go into it (``into=``, as an engine's live parameters).

GPU placement: with 4 or more GPUs the trainer ranks sit on GPUs 0 and 1 and the engines on
GPUs 2 (TP=1) and 2, 3 (TP=2): every byte crosses GPUs. With 2 GPUs the two trainer ranks
share GPU 0 and the engine ranks share GPU 1 (NCCL only needs the two ranks of each pair on
distinct GPUs). One GPU cannot run this (NCCL refuses two ranks on one device).

Every received tensor is checked byte for byte against the reference sharder
(:func:`dynamo_rl.refit.megatron.hf_to_engine` of the same seeded tensors, drawn on the
trainer's GPU). Ceiling, in each receiver process and the same run: a peer-to-peer
``copy_`` of the same number of bytes from the trainer's GPU into the receiver's GPU.

    timeout -k 20 560 python3 benchmarks/refit_multigpu.py           # needs >= 2 GPUs
    python benchmarks/refit_multigpu.py --device cpu --shape tiny    # gloo on CPU: the code path

Writes ``benchmarks/results/refit_multigpu.json`` (``--out``). With fewer than 2 GPUs and no
``--device cpu`` it prints why and exits 0.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from refit_gpu import (  # noqa: E402
    NORM_HF,
    SHAPES,
    _child_env,
    _sync,
    _wait,
    hf_groups,
    model_args,
    trainer_main,
)

ROOT = Path(__file__).resolve().parents[1]

DEFINITIONS = {
    "bytes": "this receiver's engine-layout bytes per refit (sum of numel*itemsize of its tensors)",
    "GBps": "bytes / steady-state pull seconds / 1e9, per receiving process (= per receiving GPU when "
            "each engine rank has its own GPU)",
    "p2p_GBps": "ceiling: dst.copy_(src) of the same bytes from the trainer's GPU to the receiver's GPU, "
                "same process and run (median)",
    "ratio": "GBps / p2p_GBps",
    "steady": "median over refits 2..N (refit 1 forms the NCCL groups and allocates)",
}


def receiver_main(conn, cfg, dtype_name, T, t, device, ref_device, url, seed, msg_bytes, refits, copy_repeat,
                  direct_min_bytes=0):
    _child_env(device)
    try:
        from dynamo_rl.refit import Receiver
        from dynamo_rl.refit.megatron import engine_param_specs, hf_to_engine

        dtype = getattr(torch, dtype_name)
        specs = {}
        for group in hf_groups(cfg, dtype, ref_device, seed):  # shapes only
            specs.update(engine_param_specs({n: (tuple(v.shape), v.dtype) for n, v in group.items()}, cfg, T))
            del group
        specs.pop("lm_head.weight", None)  # tied: the engine has none
        recv = Receiver(tp_rank=t, tp_size=T, param_specs=specs, device=device,
                        transport_options={"dist": {"msg_bytes": msg_bytes, "direct_min_bytes": direct_min_bytes}})
        conn.send(("ready", {"tensors": len(specs)}))
        into, recs = None, []
        for _ in range(refits):
            msg = conn.recv()
            version = int(msg[1])
            _sync(device)
            t0 = time.perf_counter()
            out, rep = recv.pull(url, version, "dist", timeout_s=120, into=into)
            _sync(device)
            secs = time.perf_counter() - t0
            into = out
            recs.append({"version": version, "seconds": secs, "transfer_seconds": rep["transfer_seconds"],
                         "bytes": rep["bytes"], "moved_bytes": rep["moved_bytes"],
                         "overpull_factor": rep["overpull_factor"]})
            conn.send(("pulled", recs[-1]))
        # byte-identical check against the reference sharder, group by group
        bad, checked = [], 0
        with torch.no_grad():
            for group in hf_groups(cfg, dtype, ref_device, seed):
                if NORM_HF in group:
                    group[NORM_HF] = torch.full_like(group[NORM_HF], float(version % 256))
                ref = hf_to_engine(group, cfg, t, T)
                for n, v in ref.items():
                    checked += 1
                    if not torch.equal(out[n].to(v.device), v):
                        bad.append(n)
                del group, ref
        nbytes = recs[-1]["bytes"]
        # ceiling: a peer-to-peer copy of the same bytes from the trainer's GPU
        src = torch.empty(nbytes, dtype=torch.uint8, device=ref_device).fill_(3)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src)
        secs = []
        for _ in range(copy_repeat):
            _sync(device), _sync(ref_device)
            t0 = time.perf_counter()
            dst.copy_(src)
            _sync(device), _sync(ref_device)
            secs.append(time.perf_counter() - t0)
        del src, dst
        p2p = statistics.median(secs)
        reader = recv._readers.get("dist")  # the copy program's shape (internal, best effort)
        progs = [v[1] for k, v in (reader._programs.items() if reader else []) if len(k) == 4]
        messages = {"direct": sum(len(p[0]) for p in progs), "staged": sum(len(p[1]) for p in progs)}
        recv.close()
        conn.send(("done", {"verify": {"ok": not bad, "checked_tensors": checked, "mismatched": bad[:20],
                                       "version": version},
                            "messages_per_pull": messages,
                            "p2p": {"bytes": nbytes, "median_s": p2p, "seconds": secs,
                                    "p2p_GBps": nbytes / p2p / 1e9,
                                    "from": ref_device, "to": device}}))
    except Exception as e:  # noqa: BLE001 - the parent reports it
        try:
            conn.send(("error", f"receiver t={t}/{T}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        except Exception:  # noqa: BLE001, S110
            pass


def placement(device: str) -> dict:
    if device == "cpu":
        return {"trainer": ["cpu", "cpu"], "T1": ["cpu"], "T2": ["cpu", "cpu"], "layout": "cpu (gloo)"}
    n = torch.cuda.device_count()
    if n >= 4:
        return {"trainer": ["cuda:0", "cuda:1"], "T1": ["cuda:2"], "T2": ["cuda:2", "cuda:3"],
                "layout": "trainer ranks on GPUs 0, 1; engines on GPU 2 (TP=1) and GPUs 2, 3 (TP=2)"}
    return {"trainer": ["cuda:0", "cuda:0"], "T1": ["cuda:1"], "T2": ["cuda:1", "cuda:1"],
            "layout": "2 GPUs: both trainer ranks on GPU 0, every engine rank on GPU 1"}


def run_engine(ctx, a, cfg, T: int, devices: list[str], trainers, url, ref_devices, version0: int) -> dict:
    """Start T receivers, run ``a.refits`` publishes + concurrent pulls, collect their results."""
    recvs = []
    case = {"T": T, "devices": devices, "ranks": [], "errors": []}
    try:
        for t in range(T):
            pa, pb = ctx.Pipe()
            p = ctx.Process(target=receiver_main, name=f"engine_T{T}_{t}", daemon=True,
                            args=(pb, cfg, a.dtype, T, t, devices[t], ref_devices[t % len(ref_devices)], url,
                                  a.seed, a.msg_mb << 20, a.refits, a.copy_repeat, a.direct_min_mb << 20))
            p.start()
            recvs.append((p, pa))
        procs = [p for p, _ in recvs] + [p for p, _ in trainers]
        for t, (_, c) in enumerate(recvs):
            _wait(c, procs, a.build_timeout, f"receiver {t}/{T} start")
        per = [[] for _ in range(T)]
        for k in range(a.refits):
            v = version0 + k
            for _, c in trainers:
                c.send(("publish", v))
            for _, c in trainers:
                _wait(c, procs, 120, "publish")
            for _, c in recvs:
                c.send(("pull", v))
            for t, (_, c) in enumerate(recvs):
                per[t].append(_wait(c, procs, 180, f"T={T} rank {t} pull v{v}")[1])
            if a.verbose:
                print(f"  T={T} v{v}: " + ", ".join(f"{r[-1]['seconds'] * 1e3:.1f} ms" for r in per), flush=True)
        for t, (_, c) in enumerate(recvs):
            done = _wait(c, procs, 300, f"T={T} rank {t} verify")[1]
            steady = per[t][1:] or per[t]
            med = statistics.median(r["seconds"] for r in steady)
            nbytes = per[t][-1]["bytes"]
            gbps = nbytes / med / 1e9
            case["ranks"].append({
                "tp_rank": t, "device": devices[t], "bytes": nbytes, "first_s": per[t][0]["seconds"],
                "steady_median_s": med, "GBps": gbps,
                "steady_transfer_median_s": statistics.median(r["transfer_seconds"] for r in steady),
                "overpull_factor": per[t][-1]["overpull_factor"], "p2p": done["p2p"],
                "ratio_to_p2p": gbps / done["p2p"]["p2p_GBps"], "verify": done["verify"],
                "messages_per_pull": done["messages_per_pull"], "all": per[t]})
    except Exception as e:  # noqa: BLE001 - recorded
        case["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        for p, _ in recvs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
    return case


def main(argv=None) -> int:
    ap = model_args(__doc__, "cuda (needs >= 2 GPUs) | cpu (gloo, code path check)", refits=5, what="engine")
    ap.add_argument("--msg-mb", type=int, default=256, help="dist transport message size (MiB)")
    ap.add_argument("--direct-min-mb", type=int, default=0,
                    help="dist reader: runs shorter than this travel staged in whole-row messages (0: every "
                         "run its own message, the default)")
    ap.add_argument("--bucket-mb", type=int, default=256, help="Publisher arena bucket size (MiB)")
    ap.add_argument("--copy-repeat", type=int, default=10)
    ap.add_argument("--build-timeout", type=float, default=240.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < 2:
            print(f"refit_multigpu: SKIP - needs 2 or more GPUs, found {n} (NCCL refuses two ranks on one "
                  "GPU; run --device cpu --shape tiny to check the code path)")
            return 0
        device = "cuda"
    else:
        device = "cpu"
    shape = a.shape or ("qwen3-4b" if device == "cuda" else "tiny")
    cfg = dict(SHAPES[shape])
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off (the device machine's rule)
    place = placement(device)
    out = a.out or (None if device == "cuda" else str(ROOT / f"benchmarks/results/refit_multigpu_cpu_{shape}.json"))
    doc: dict = {"shape": shape, "dtype": a.dtype, "config": cfg, "S": 2, "transport": "dist",
                 "backend": "nccl" if device == "cuda" else "gloo", "msg_bytes": a.msg_mb << 20,
                 "direct_min_bytes": a.direct_min_mb << 20,
                 "placement": place, "definitions": DEFINITIONS, "engines": []}
    if device == "cuda":
        doc["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    ctx = mp.get_context("spawn")
    trainers = []
    t_start = time.monotonic()
    try:
        url = None
        for r in range(2):
            pa, pb = ctx.Pipe()
            p = ctx.Process(target=trainer_main, name=f"trainer{r}", daemon=True,
                            args=(pb, cfg, a.dtype, 2, r, url, place["trainer"][r], a.seed, a.bucket_mb << 20))
            p.start()
            trainers.append((p, pa))
            u = _wait(pa, [p], 120, f"trainer {r} start")[1]
            url = url or u
        doc["trainers"] = [_wait(c, [p for p, _ in trainers], a.build_timeout, f"trainer {r} build")[1]
                           for r, (_, c) in enumerate(trainers)]
        version = 1
        for T in (1, 2):
            print(f"engine TP={T} on {place[f'T{T}']}", flush=True)
            case = run_engine(ctx, a, cfg, T, place[f"T{T}"], trainers, url, place["trainer"], version)
            version += a.refits
            doc["engines"].append(case)
            for r in case["ranks"]:
                print(f"  T={T} rank {r['tp_rank']} ({r['device']}): first {r['first_s'] * 1e3:8.1f} ms, steady "
                      f"{r['steady_median_s'] * 1e3:7.2f} ms = {r['GBps']:7.1f} GB/s; p2p copy "
                      f"{r['p2p']['p2p_GBps']:7.1f} GB/s; ratio {r['ratio_to_p2p']:.3f}; byte-identical "
                      f"{r['verify']['ok']} ({r['verify']['checked_tensors']} tensors)", flush=True)
            for e in case["errors"]:
                print(f"  T={T}: {e.splitlines()[0][:300]}", flush=True)
    finally:
        for p, c in trainers:
            try:
                if p.is_alive():
                    c.send(("exit",))
            except Exception:  # noqa: BLE001, S110
                pass
        for p, _ in trainers:
            p.join(10)
            if p.is_alive():
                p.kill()
        ranks = [r for e in doc["engines"] for r in e["ranks"]]
        doc["acceptance"] = {
            "target": "byte-identical for TP 2->1 and 2->2 over NCCL on GPUs, with GB/s and ratios",
            "byte_identical": {f"T{e['T']}": (bool(e["ranks"]) and not e["errors"]
                                              and all(r["verify"]["ok"] for r in e["ranks"]))
                               for e in doc["engines"]},
            "ratios": {f"T{e['T']}_rank{r['tp_rank']}": r["ratio_to_p2p"] for e in doc["engines"] for r in e["ranks"]},
        }
        doc["acceptance"]["met"] = (len(doc["engines"]) == 2 and all(doc["acceptance"]["byte_identical"].values())
                                    and device == "cuda")
        doc["limits"] = [
            f"T={e['T']} rank {r['tp_rank']}: {r['messages_per_pull']['direct']} direct + "
            f"{r['messages_per_pull']['staged']} staged NCCL messages per pull, one send/recv pair each, "
            f"issued from Python on both sides (dist.py); {r['bytes'] / 1e9:.2f} GB in "
            f"{r['steady_median_s'] * 1e3:.1f} ms vs {r['p2p']['median_s'] * 1e3:.1f} ms for one p2p copy"
            for e in doc["engines"] for r in e["ranks"]]
        if device == "cuda" and torch.cuda.device_count() < 4:
            doc["limits"].append("2 GPUs: both engine ranks of TP=2 share GPU 1 and its NVLink with each other")
        doc["wall_s"] = time.monotonic() - t_start
        write_result("refit_multigpu", doc, out)
        print("acceptance:", doc["acceptance"])
        del ranks
    return 0


if __name__ == "__main__":
    sys.exit(main())
