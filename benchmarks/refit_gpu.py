"""Refit of an 8 GB Qwen3-4B-shaped model into a live engine on ONE GPU, against the GPU's copy limit.

Processes (``spawn``), all on the same device:

- ``S`` trainer processes (one per Megatron TP rank). Each draws the Hugging Face tensors of
  the model ON the device from one seeded generator (so every rank sees the same model),
  turns them into its Megatron-Core TP shard with :func:`dynamo_rl.refit.megatron.hf_to_megatron`
  (fused QKV, gated fc1, padded vocabulary; layer by layer, to bound memory), and publishes
  them with ``Publisher(transport="shm")`` — on CUDA tensors this is the CUDA IPC path.
  Every refit publishes a new version (``final_layernorm`` is set to the version number, so
  the engine can prove it holds the latest one; the other tensors stay the same).
- one engine process: a ``transformers`` ``Qwen3ForCausalLM`` of the same shapes (built
  under ``torch.device(device)``), wrapped in :class:`dynamo_rl.serving.engine.Engine`,
  with ``Receiver.for_engine(engine)``.

Per refit the engine process times ``Receiver.pull`` (version check + plan (cached) +
transfer and translation into the engine's HF/TP layout + seqlock check) and the load into
the engine. Phases, each with a fresh Receiver (so each phase's first refit re-opens the
IPC handles, reads the full manifest over HTTP and re-plans):

- ``in_place`` (the fast path): refit 1 is a staged pull adopted by the engine
  (``load_weights(adopt=True)``), which makes the parameters the views of the receiver's
  one buffer; every later refit is ``await engine.load_weights_in_place(lambda p:
  recv.pull(url, N, into=p)[1], N, inline=recv.ready(url, N))``: drain, then the copies go
  straight into the live parameters (one pass over the bytes, CUDA graphs kept), with the
  version and seqlock read from the publisher's shared-memory state block (no HTTP), on
  the event loop's thread when the version is already published (as the worker does on
  a GPU);
- ``adopt_false``: ``load_weights(adopt=False)`` copies into the existing parameters (what
  the Dynamo worker does on CUDA by default, keeping captured decode graphs valid);
- ``adopt_true``: ``load_weights(adopt=True)`` makes the pulled tensors the parameters
  (no second copy; captured CUDA graphs are dropped and re-captured on next use — that
  re-capture is NOT timed here);
- ``pull_only``: ``Receiver.pull`` alone.

Refit 1 of a phase (handle opening, registration, planning, first allocation) is reported
apart; steady state = median of refits 2..N. The ceiling, in the same run and process: a
device-to-device ``copy_`` of the same number of bytes (and, for reference, one ``copy_``
per published bucket straight from the trainer's IPC-mapped arena, no translation).

Cases: S=T (1 trainer rank -> engine TP 1) and S!=T (2 -> 1: fused QKV / fc1 split from two
ranks, row-parallel o_proj / down_proj concatenated on dim 1 = strided copies) over shm,
then the same bytes over ``transport="dist"`` (NCCL between two processes on one GPU; on
CPU this is gloo). NCCL usually refuses two ranks on one device ("Duplicate GPU detected");
the case is bounded by timeouts and the JSON records what happened.

    timeout -k 20 560 python3 benchmarks/refit_gpu.py          # CUDA, Qwen3-4B shapes (~8 GB)
    python benchmarks/refit_gpu.py --device cpu --shape tiny   # CPU check of the code path

Writes ``benchmarks/results/refit_gpu.json`` (``--out``); on CPU the default name is
``refit_gpu_cpu_<shape>.json``. Without CUDA and without ``--device cpu`` it prints a
message and exits 0.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-6)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-6)
SHAPES = {"qwen3-4b": QWEN3_4B, "tiny": TINY}
NORM_MEG = "decoder.final_layernorm.weight"
NORM_HF = "model.norm.weight"

DEFINITIONS = {
    "bytes": "engine bytes: sum of numel*itemsize of every tensor of Engine.param_specs() "
             "(tied lm_head omitted), i.e. the payload delivered into the engine per refit",
    "GBps": "bytes / seconds / 1e9 (payload bytes delivered, each byte counted once)",
    "copy_GBps": "ceiling: N / t for dst.copy_(src) of N = bytes on the same device, same process, "
                 "same run (median); each copied byte counted once, so the HBM traffic is 2x "
                 "(hbm_traffic_GBps = read + write)",
    "ratio": "refit GBps / copy_GBps = copy seconds / refit seconds; 1.0 = the refit costs one "
             "device-to-device copy of its bytes. adopt=False copies every byte twice (pull into "
             "fresh tensors, then into the parameters), so its ideal is ~0.5",
    "total_s": "Receiver.pull + await Engine.load_weights, wall clock in the engine process",
    "pull_s": "Receiver.pull wall clock: version check (HTTP manifest GET, or the shm state block "
              "when control=shm_state) + plan (cached after refit 1) + transfer + seqlock check",
    "transfer_s": "the reader's data movement incl. translation into the engine layout "
                  "(report['transfer_seconds'])",
    "http_and_check_s": "pull_s - transfer_s: version + seqlock checks (HTTP round trips or shm state "
                        "block reads), plan lookup, fills",
    "load_s": "total_s - pull_s: await Engine.load_weights(...) (validate, drain, swap on the engine "
              "thread, cuda synchronize); for in_place the engine's own overhead around the pull "
              "(drain, hand-off to the engine thread unless the pull runs inline, synchronize)",
    "first": "refit 1 of a phase (fresh Receiver: full manifest, planning, IPC handle opening, "
             "copy-program build, first allocation)",
    "steady": "median over refits 2..N of the phase",
    "ipc_bucket_copy": "reference: one copy_ per published bucket straight from the trainer's "
                       "IPC-mapped arena into a local buffer (no translation, few launches)",
}


# ----------------------------------------------------------------------------- helpers


def _child_env(device: str | None = None) -> None:
    """Every child process: NVLink multicast stays off (the device machine's rule; other
    multicast variables untouched), NCCL warnings on stderr (a refusal says why), and its
    device: the current CUDA device, or one torch thread on CPU (steadier timings on small
    machines, and idle OpenMP workers do not steal the other processes' cores)."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    if device is None:
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def hf_groups(cfg: dict, dtype: torch.dtype, device: str, seed: int = 0):
    """Yield the model's HF tensors in groups (embedding, each layer, final norm), drawn ON
    ``device`` from one seeded generator: the same seed and device give the same tensors in
    every process."""
    g = torch.Generator(device=device).manual_seed(seed)
    H, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nq, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def r(*shape, scale=0.02, center=0.0):
        t = torch.empty(shape, dtype=dtype, device=device).uniform_(-scale, scale, generator=g)
        return t.add_(center) if center else t

    yield {"model.embed_tokens.weight": r(V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield {p + "input_layernorm.weight": r(H, scale=0.1, center=1.0),
               p + "self_attn.q_proj.weight": r(nq * hd, H), p + "self_attn.k_proj.weight": r(nkv * hd, H),
               p + "self_attn.v_proj.weight": r(nkv * hd, H), p + "self_attn.o_proj.weight": r(H, nq * hd),
               p + "self_attn.q_norm.weight": r(hd, scale=0.1, center=1.0),
               p + "self_attn.k_norm.weight": r(hd, scale=0.1, center=1.0),
               p + "post_attention_layernorm.weight": r(H, scale=0.1, center=1.0),
               p + "mlp.gate_proj.weight": r(F, H), p + "mlp.up_proj.weight": r(F, H),
               p + "mlp.down_proj.weight": r(H, F)}
    yield {NORM_HF: r(H, scale=0.1, center=1.0)}


def _wait(conn, procs, timeout_s: float, what: str):
    """Receive one message from a child; raise if a child died or ``timeout_s`` passed (never hang)."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.2):
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"{what}: child process(es) {[(p.name, p.exitcode) for p in dead]} exited "
                               "(see stderr)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: no answer within {timeout_s:.0f} s")
    msg = conn.recv()
    if isinstance(msg, tuple) and msg and msg[0] == "error":
        raise RuntimeError(f"{what}: {msg[1]}")
    return msg


# ----------------------------------------------------------------------------- trainer process


def trainer_main(conn, cfg, dtype_name, S, rank, url, device, seed, bucket_bytes):
    _child_env(device)
    try:
        dtype = getattr(torch, dtype_name)
        from dynamo_rl.refit import Publisher
        from dynamo_rl.refit.megatron import hf_to_megatron

        pub = Publisher(tp_rank=rank, tp_size=S, coordinator_url=url, transport="shm",
                        bucket_bytes=bucket_bytes)
        conn.send(("url", pub.url))
        t0 = time.perf_counter()
        shards: dict[str, torch.Tensor] = {}
        with torch.device(device):  # hf_to_megatron's vocabulary padding allocates on the default device
            for group in hf_groups(cfg, dtype, device, seed):
                shards.update(hf_to_megatron(group, cfg, S)[rank])
                del group
        shards = {k: v.to(device) for k, v in shards.items()}
        _sync(device)
        nbytes = sum(t.numel() * t.element_size() for t in shards.values())
        conn.send(("ready", {"build_s": time.perf_counter() - t0, "shard_bytes": nbytes,
                             "tensors": len(shards)}))
        while True:
            msg = conn.recv()
            if msg[0] == "publish":
                v = int(msg[1])
                shards[NORM_MEG].fill_(float(v % 256))  # the version, exactly representable in bf16
                _sync(device)
                t = time.perf_counter()
                pub.publish(v, shards, naming="megatron", model_config=cfg)
                conn.send(("published", time.perf_counter() - t))
            elif msg[0] == "exit":
                break
        pub.close()
        conn.send(("closed",))
    except Exception as e:  # noqa: BLE001 - the parent reports it
        try:
            conn.send(("error", f"trainer rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        except Exception:  # noqa: BLE001, S110
            pass


# ----------------------------------------------------------------------------- engine process


def engine_main(conn, cfg, dtype_name, device, seed):
    _child_env(device)
    try:
        import asyncio

        dtype = getattr(torch, dtype_name)
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from dynamo_rl.serving.engine import Engine

        t0 = time.perf_counter()
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # init straight in bf16 (no fp32 copy of 4B parameters)
        try:
            with torch.device(device):
                model = Qwen3ForCausalLM(Qwen3Config(**cfg, eos_token_id=2, pad_token_id=0))
        finally:
            torch.set_default_dtype(prev)
        model = model.to(dtype).eval()
        engine = Engine(model, eos_token_ids=[2], device=device, max_batch_size=1, max_seq_len=64)
        specs = engine.param_specs()
        nbytes = sum(torch.Size(s).numel() * dt.itemsize for s, dt in specs.values())
        nparams = sum(torch.Size(s).numel() for s, _ in specs.values())
        _sync(device)
        conn.send(("ready", {"build_s": time.perf_counter() - t0, "bytes": nbytes, "parameters": nparams,
                             "tensors": len(specs)}))
        asyncio.run(_engine_loop(conn, engine, cfg, dtype, device, seed))
        conn.send(("closed",))
    except Exception as e:  # noqa: BLE001
        try:
            conn.send(("error", f"engine: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        except Exception:  # noqa: BLE001, S110
            pass


async def _engine_loop(conn, engine, cfg, dtype, device, seed):
    import asyncio

    from dynamo_rl.refit import Receiver

    recv = None
    phase = {}
    last_loaded = None
    try:
        while True:
            msg = await asyncio.to_thread(conn.recv)
            kind = msg[0]
            try:
                if kind == "phase":
                    _, name, transport, adopt, timeout_s, options = msg
                    if recv is not None:
                        recv.close()
                    recv = Receiver.for_engine(engine, transport_options=options)
                    phase = {"name": name, "transport": transport, "adopt": adopt, "timeout_s": timeout_s}
                    conn.send(("ok",))
                elif kind == "refit":
                    _, url, version = msg
                    _sync(device)
                    t0 = time.perf_counter()
                    if phase["adopt"] == "in_place" and recv.last_version is not None:
                        # steady state of the in-place path: pull straight into the live parameters
                        def fill(params, recv=recv, url=url, version=version, ph=phase):
                            return recv.pull(url, version, ph["transport"], timeout_s=ph["timeout_s"],
                                             into=params)[1]

                        # as the worker does on a GPU: the version is already published, so
                        # the copies run on the event loop's thread (no thread hand-offs)
                        inline = phase.get("inline", True) and recv.ready(url, version)
                        load_rep = await engine.load_weights_in_place(fill, version, inline=inline)
                        rep = load_rep["fill"]
                        t2 = time.perf_counter()
                        t1 = t0 + rep["seconds"]
                        last_loaded = version
                    else:
                        tensors, rep = recv.pull(url, version, phase["transport"], timeout_s=phase["timeout_s"])
                        t1 = time.perf_counter()
                        load_rep = None
                        if phase["adopt"] is not None:
                            # in_place, refit 1: staged pull adopted once, so the parameters become
                            # the views of the receiver's one buffer (coalesced copies from then on)
                            adopt = phase["adopt"] in (True, "in_place")
                            load_rep = await engine.load_weights(tensors, version, adopt=adopt)
                            last_loaded = version
                        t2 = time.perf_counter()
                        del tensors
                    load_s = None if phase["adopt"] is None else t2 - t1
                    conn.send(("refit", {
                        "version": version, "pull_s": t1 - t0, "transfer_s": rep["transfer_seconds"],
                        "report_seconds": rep["seconds"], "http_and_check_s": (t1 - t0) - rep["transfer_seconds"],
                        "load_s": load_s, "load_report_s": None if load_rep is None else load_rep.get("seconds"),
                        "total_s": t2 - t0, "bytes": rep["bytes"], "moved_bytes": rep["moved_bytes"],
                        "copy_ops": rep.get("copy_ops"), "transport": rep["transport"],
                        "control": rep.get("control"),
                    }))
                elif kind == "end_phase":
                    conn.send(("stats", _reader_stats(recv)))
                    recv.close()
                    recv = None
                elif kind == "ceiling":
                    _, nbytes, url, version, repeat = msg
                    conn.send(("ceiling", _ceilings(nbytes, url, version, repeat, device)))
                elif kind == "verify":
                    conn.send(("verify", _verify(engine, cfg, dtype, device, seed, last_loaded)))
                elif kind == "decode":
                    conn.send(("decode", await _decode(engine, fresh=msg[1])))
                elif kind == "exit":
                    break
                else:
                    conn.send(("error", f"unknown message {kind!r}"))
            except Exception as e:  # noqa: BLE001 - report and keep serving (the parent decides)
                conn.send(("failed", f"{type(e).__name__}: {e}", traceback.format_exc()[-2000:]))
    finally:
        if recv is not None:
            recv.close()
        await engine.stop()


def _reader_stats(recv) -> dict:
    """Shape of the shm reader's cached copy program (launch counts) — internal, best effort."""
    out = {}
    try:
        reader = recv._readers.get("shm")
        if reader is not None and reader._programs:
            (_, prog), = reader._programs.values()
            small, small_bytes = prog["small"]
            out = {"big_run_bytes_threshold": reader.big_run,
                   "big_copies": len(prog["big"]),
                   "big_bytes": sum(p for _, _, p in prog["big"]),
                   "small_runs": {str(dt): len(v[0]) for dt, v in small.items()},
                   "small_foreach_launch_groups": len(small),
                   "small_bytes": small_bytes,
                   "strided_copies": len(prog["strided"]),
                   "grids": len(prog.get("grids", ())),
                   "grid_bytes": sum(g[-1] for g in prog.get("grids", ())),
                   "runs": prog.get("runs"),
                   "strided_bytes": sum(s[3] for s in prog["strided"]),
                   "ops": prog["ops"],
                   "source_buckets": sum(len(c[2]) for c in reader._cache.values())}
        dreader = recv._readers.get("dist")
        if dreader is not None:
            out["dist_groups"] = len(dreader._pgs)
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _timed(fn, device, repeat: int) -> list[float]:
    fn()  # warm-up
    fn()
    secs = []
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        secs.append(time.perf_counter() - t)
    return secs


def _ceilings(nbytes: int, url: str, version: int, repeat: int, device: str) -> dict:
    from dynamo_rl.refit._http import request
    from dynamo_rl.refit.transport.shm import ShmReader

    out = {}
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(7)
    dst = torch.empty_like(src)
    secs = _timed(lambda: dst.copy_(src), device, repeat)
    med = statistics.median(secs)
    out["d2d_copy"] = {"bytes": nbytes, "launches": 1, "median_s": med, "seconds": secs,
                       "copy_GBps": nbytes / med / 1e9, "hbm_traffic_GBps": 2 * nbytes / med / 1e9}
    src = dst = None  # free before the next allocation
    try:  # one copy_ per published bucket, straight from the IPC-mapped arenas
        status, m = request(url.rstrip("/") + f"/manifest?version={int(version)}", timeout=30)
        if status != 200:
            raise RuntimeError(f"manifest {status}: {m}")
        reader = ShmReader(device=device)
        bufs = []
        for r, addr in sorted(m["sources"].items(), key=lambda kv: int(kv[0])):
            bufs += reader._open(int(r), addr)
        local = [torch.empty_like(b, device=device) for b in bufs]
        total = sum(b.numel() for b in bufs)

        def run():
            for d, s in zip(local, bufs):
                d.copy_(s, non_blocking=True)

        secs = _timed(run, device, repeat)
        med = statistics.median(secs)
        out["ipc_bucket_copy"] = {"bytes": total, "launches": len(bufs), "median_s": med, "seconds": secs,
                                  "copy_GBps": total / med / 1e9,
                                  "fraction_of_d2d_copy": (total / med) / (nbytes / out["d2d_copy"]["median_s"])}
        local = bufs = None
        reader.close()
    except Exception as e:  # noqa: BLE001
        out["ipc_bucket_copy"] = {"error": f"{type(e).__name__}: {e}"}
    return out


async def _decode(engine, fresh: bool) -> dict:
    """Greedy ids and logprobs of one prompt through the engine (decode steps replay CUDA
    graphs on CUDA); ``fresh`` drops the captured graphs first, so they are captured anew."""
    from dynamo_rl.serving.engine import SamplingParams

    if fresh and engine._runner.graphs is not None:
        engine._runner.graphs.clear()
    graphs_before = engine.stats["cuda_graphs"]
    outs = await engine.complete([1, 5, 9, 13], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    return {"ids": [o.token_id for o in outs], "logprobs": [o.logprob for o in outs],
            "weights_version": outs[-1].weights_version, "graphs_before": graphs_before,
            "graphs_after": engine.stats["cuda_graphs"]}


def _verify(engine, cfg, dtype, device, seed, last_loaded) -> dict:
    """Every engine parameter equals the trainer's HF tensor (regenerated from the seed);
    the final norm holds the last loaded version number."""
    params = dict(engine.model.named_parameters())
    bad, checked = [], 0
    with torch.no_grad():
        for group in hf_groups(cfg, dtype, device, seed):
            for name, t in group.items():
                p = params.get(name)
                if name == NORM_HF:
                    want = torch.full_like(t, float((last_loaded or 0) % 256))
                    ok = p is not None and torch.equal(p, want)
                else:
                    ok = p is not None and torch.equal(p, t)
                checked += 1
                if not ok:
                    bad.append(name)
    return {"ok": not bad and last_loaded is not None, "checked_tensors": checked, "mismatched": bad[:20],
            "last_loaded_version": last_loaded}


# ----------------------------------------------------------------------------- orchestration


def _summ(recs: list[dict], nbytes: int) -> dict:
    first, steady = recs[0], recs[1:] or recs[:1]

    def med(k):
        vals = [r[k] for r in steady if r.get(k) is not None]
        return statistics.median(vals) if vals else None

    sm = {k: med(k) for k in ("total_s", "pull_s", "transfer_s", "http_and_check_s", "load_s")}
    return {"refits": len(recs), "first": first, "steady_median": sm,
            "steady_GBps": nbytes / sm["total_s"] / 1e9,
            "steady_pull_GBps": nbytes / sm["pull_s"] / 1e9,
            "steady_transfer_GBps": nbytes / sm["transfer_s"] / 1e9,
            "first_total_s": first["total_s"], "first_GBps": nbytes / first["total_s"] / 1e9,
            "all": recs}


def run_case(ctx, a, cfg, S: int, transport: str, phases: list[str], device: str, deadline: float,
             case: dict) -> dict:
    """Fill ``case`` (already in the result document, so an interrupted run still writes it)."""
    name = f"S{S}_T1_{transport}"
    case.update({"name": name, "S": S, "T": 1, "transport": transport, "phases": {}, "errors": []})
    trainers: list[tuple] = []
    eng = None
    t_case = time.perf_counter()
    try:
        url = None
        for r in range(S):
            pa, pb = ctx.Pipe()
            p = ctx.Process(target=trainer_main, name=f"trainer{r}",
                            args=(pb, cfg, a.dtype, S, r, url, device, a.seed, a.bucket_mb << 20), daemon=True)
            p.start()
            trainers.append((p, pa))
            u = _wait(pa, [p], 120, f"trainer {r} start")[1]
            url = url or u
            if r == 0 and eng is None:  # build the engine while the trainers draw their weights
                ea, eb = ctx.Pipe()
                ep = ctx.Process(target=engine_main, name="engine", args=(eb, cfg, a.dtype, device, a.seed),
                                 daemon=True)
                ep.start()
                eng = (ep, ea)
        procs = [p for p, _ in trainers] + [eng[0]]
        case["trainers"] = [_wait(c, procs, a.build_timeout, f"trainer {r} build")[1] for r, (_, c) in enumerate(trainers)]
        case["engine"] = _wait(eng[1], procs, a.build_timeout, "engine build")[1]
        nbytes = case["engine"]["bytes"]
        version = 0
        timeout_s = a.dist_timeout if transport == "dist" else a.refit_timeout
        for ph in phases:
            if time.monotonic() > deadline:
                case["errors"].append(f"phase {ph} skipped: --budget-s reached")
                continue
            base_ph, _, kernel = ph.partition("@")   # e.g. in_place@triton: the reader's copy_kernel
            adopt = {"adopt_false": False, "adopt_true": True, "pull_only": None, "in_place": "in_place"}[base_ph]
            shm_opts = {} if a.big_run_kb is None else {"big_run_bytes": int(a.big_run_kb) << 10}
            if a.grid_runs:
                shm_opts["grid_runs"] = True
            if kernel:
                shm_opts["copy_kernel"] = kernel
            options = {"shm": shm_opts} if shm_opts else None
            eng[1].send(("phase", ph, transport, adopt, timeout_s, options))
            _wait(eng[1], procs, 60, "engine phase")
            recs, pub_s = [], []
            for _ in range(a.refits):
                version += 1
                for _, c in trainers:
                    c.send(("publish", version))
                pub_s.append(max(_wait(c, procs, 120, "publish")[1] for _, c in trainers))
                eng[1].send(("refit", url, version))
                msg = _wait(eng[1], procs, timeout_s + 30, f"{name} {ph} refit {version}")
                if msg[0] == "failed":
                    case["errors"].append(f"{ph} refit {version}: {msg[1]}")
                    case.setdefault("tracebacks", []).append(msg[2])
                    break
                recs.append(msg[1])
                if adopt == "in_place" and len(recs) == 1:  # capture decode graphs on the adopted storage
                    eng[1].send(("decode", False))
                    case["decode_after_first_refit"] = _wait(eng[1], procs, 120, "decode")[1]
                if a.verbose:
                        print(f"  {name} {ph:<11} v{version}: total {msg[1]['total_s'] * 1e3:8.2f} ms  pull "
                          f"{msg[1]['pull_s'] * 1e3:8.2f} ms (transfer {msg[1]['transfer_s'] * 1e3:8.2f})  load "
                          f"{(msg[1]['load_s'] or 0) * 1e3:8.2f} ms", flush=True)
            if adopt == "in_place" and len(recs) > 1:
                # the graphs captured after refit 1 survived the in-place refits and read the new
                # weights: they give exactly what graphs captured now give (the final norm, set to
                # the version number, changes every logprob between versions)
                eng[1].send(("decode", False))
                kept = _wait(eng[1], procs, 120, "decode")[1]
                eng[1].send(("decode", True))
                fresh = _wait(eng[1], procs, 120, "decode")[1]
                case["cuda_graphs_kept"] = {
                    "graphs_captured_after_refit_1": case["decode_after_first_refit"]["graphs_after"],
                    "graphs_before_decode_after_last_refit": kept["graphs_before"],
                    "same_as_fresh_capture": kept["ids"] == fresh["ids"] and kept["logprobs"] == fresh["logprobs"],
                    "logprobs_changed_since_refit_1": kept["logprobs"] != case["decode_after_first_refit"]["logprobs"],
                    "kept": kept, "fresh": fresh}
            eng[1].send(("end_phase",))
            stats = _wait(eng[1], procs, 60, "engine end_phase")[1]
            if recs:
                case["phases"][ph] = {"adopt": adopt, **_summ(recs, nbytes), "publish_s": pub_s,
                                      "reader_program": stats}
            if len(recs) < a.refits:
                break  # a failed transport (e.g. NCCL on one GPU): later phases would fail the same way
        if case["phases"]:
            eng[1].send(("ceiling", nbytes, url, version, a.copy_repeat))
            case["ceiling"] = _wait(eng[1], procs, 300, "ceiling")[1]
            copy = case["ceiling"]["d2d_copy"]["copy_GBps"]
            for ph in case["phases"].values():
                ph["ratio_to_copy"] = ph["steady_GBps"] / copy
                ph["pull_ratio_to_copy"] = ph["steady_pull_GBps"] / copy
                ph["transfer_ratio_to_copy"] = ph["steady_transfer_GBps"] / copy
                ph["first_ratio_to_copy"] = ph["first_GBps"] / copy
            eng[1].send(("verify",))
            case["verify"] = _wait(eng[1], procs, 300, "verify")[1]
    except Exception as e:  # noqa: BLE001 - recorded; the next case still runs
        case["errors"].append(f"{type(e).__name__}: {e}")
    except BaseException as e:  # SIGTERM from `timeout`: record, clean up, stop
        case["errors"].append(f"interrupted: {e}")
        raise
    finally:
        for p, c in trainers + ([eng] if eng else []):
            try:
                if p.is_alive():
                    c.send(("exit",))
            except Exception:  # noqa: BLE001, S110
                pass
        for p, _ in trainers + ([eng] if eng else []):
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
                case["errors"].append(f"{p.name} did not exit; killed")
        case["wall_s"] = time.perf_counter() - t_case
    return case


def _limits(doc: dict) -> tuple[list[str], dict]:
    """What limits the steady-state figure, in words, from this run's numbers."""
    out, nums = [], {}
    cases = {c["name"]: c for c in doc["cases"]}
    c = cases.get("S1_T1_shm")
    if not c or not c.get("phases") or "ceiling" not in c:
        return ["S1_T1_shm did not complete; no breakdown"], nums
    copy_s = c["ceiling"]["d2d_copy"]["median_s"]
    ph = c["phases"]
    ref_name = next((p for p in ("in_place", "pull_only") if p in ph), next(iter(ph)))
    ref = ph[ref_name]
    sm = ref["steady_median"]
    nums["reference_phase"] = ref_name
    nums["copy_s"] = copy_s
    nums["total_s"] = sm["total_s"]
    nums["transfer_s"] = sm["transfer_s"]
    nums["http_and_check_s"] = sm["http_and_check_s"]
    nums["transfer_over_copy"] = sm["transfer_s"] / copy_s
    prog = ref.get("reader_program") or {}
    n_small = sum((prog.get("small_runs") or {}).values())
    why = ""
    if n_small or prog.get("strided_copies") or prog.get("grids"):
        why = ("; Megatron's fused QKV is split per KV group into q/k/v pieces that are not adjacent in the "
               "engine layout, so they cannot merge into bucket-sized copies: short runs through "
               "_foreach_copy_ on a second CUDA stream (or, with --grid-runs, one strided copy per q/k/v per layer)")
    out.append(
        f"{ref_name} transfer (shm/CUDA IPC reader incl. translation): {sm['transfer_s'] * 1e3:.2f} ms = "
        f"{sm['transfer_s'] / copy_s:.2f}x one d2d copy of the same bytes ({copy_s * 1e3:.2f} ms); the copy "
        f"program has {prog.get('big_copies')} big copies (runs >= {prog.get('big_run_bytes_threshold')} B, "
        f"{(prog.get('big_bytes') or 0) / 1e9:.2f} GB), {n_small} short runs in "
        f"{prog.get('small_foreach_launch_groups')} _foreach_copy_ calls ({(prog.get('small_bytes') or 0) / 1e9:.2f} GB) "
        f", {prog.get('grids')} strided 2-D copies of equal runs at a fixed stride ({(prog.get('grid_bytes') or 0) / 1e9:.2f} GB) "
        f"and {prog.get('strided_copies')} other strided copies{why} (shm.py ShmReader._program / pull)")
    ipc = c["ceiling"].get("ipc_bucket_copy") or {}
    if "copy_GBps" in ipc:
        out.append(f"CUDA IPC itself: one copy_ per published bucket ({ipc['launches']}) from the mapped arena "
                   f"runs at {ipc['fraction_of_d2d_copy']:.2f} of the d2d copy")
    controls = {r.get("control") for r in ref["all"][1:]}
    if controls == {"shm_state"}:
        out.append(f"{ref_name} control: version + seqlock read from the publishers' shared-memory state "
                   f"blocks (no HTTP), with plan lookup and fills: {sm['http_and_check_s'] * 1e3:.3f} ms per refit")
    else:
        out.append(
            f"{ref_name} control ({sorted(map(str, controls))}): manifest GET + seqlock /state GET and plan "
            f"lookup: {sm['http_and_check_s'] * 1e3:.2f} ms per refit (receiver.py pull)")
    if ref_name == "in_place" and sm.get("load_s") is not None:
        nums["in_place_engine_overhead_s"] = sm["load_s"]
        out.append(f"in_place engine overhead around the pull (drain, engine-thread hand-off unless inline, "
                   f"synchronize): {sm['load_s'] * 1e3:.3f} ms (engine.py load_weights_in_place)")
    if "adopt_false" in ph and "adopt_true" in ph:
        lf, lt = ph["adopt_false"]["steady_median"]["load_s"], ph["adopt_true"]["steady_median"]["load_s"]
        nums["load_adopt_false_s"], nums["load_adopt_true_s"] = lf, lt
        out.append(
            f"load_weights(adopt=False) = {lf * 1e3:.2f} ms vs adopt=True {lt * 1e3:.2f} ms: adopt=False copies "
            "every byte a second time into the existing parameters (engine.py _swap param.data.copy_), which "
            "the worker does on CUDA to keep captured decode graphs (worker.py _load); adopt=True skips it "
            "but drops the graphs (re-capture on next decode, not timed here)")
        out.append(
            f"load_weights(adopt=True) fixed cost {lt * 1e3:.2f} ms: validation of every name/shape/dtype, "
            "drain, run_in_executor hop to the engine thread, torch.cuda.synchronize (engine.py load_weights)")
    s2 = cases.get("S2_T1_shm")
    if s2 and s2.get("phases") and ref_name in s2["phases"]:
        r2 = s2["phases"][ref_name]["steady_median"]["transfer_s"] / sm["transfer_s"]
        nums["reshard_transfer_ratio"] = r2
        out.append(f"S!=T (2->1): transfer {r2:.2f}x the S=T transfer (strided copies of the row-parallel "
                   "o_proj/down_proj halves, more short runs)")
    return out, nums


def model_args(doc: str, device_help: str, *, refits: int, what: str) -> argparse.ArgumentParser:
    """The options every refit benchmark takes: device, model shape and refit count."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help=device_help)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: qwen3-4b (cuda), tiny (cpu)")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--refits", type=int, default=refits, help=f"refits per {what} (1 first + N-1 steady)")
    return ap


def main(argv=None) -> int:
    ap = model_args(__doc__, "cuda | cuda:N | cpu", refits=8, what="phase")
    ap.add_argument("--cases", default="shm:1,shm:2,dist:1", help="transport:S, comma separated")
    ap.add_argument("--phases", default="in_place,adopt_false,adopt_true,pull_only",
                    help="comma separated; PHASE@KERNEL runs it with the shm reader's copy_kernel "
                         "(foreach | triton | triton_all), e.g. in_place,in_place@triton,in_place@triton_all")
    ap.add_argument("--bucket-mb", type=int, default=256, help="Publisher arena bucket size (MiB)")
    ap.add_argument("--big-run-kb", type=int, default=None,
                    help="shm reader: runs of at least this many KiB get their own copy_, shorter ones "
                         "go through _foreach_copy_ (default: the reader's, 16 MiB on CUDA)")
    ap.add_argument("--grid-runs", action="store_true",
                    help="shm reader: short runs at a fixed stride as one strided 2-D copy each instead of "
                         "_foreach_copy_ (comparison)")
    ap.add_argument("--copy-repeat", type=int, default=10)
    ap.add_argument("--refit-timeout", type=float, default=120.0, help="Receiver.pull timeout (s), shm")
    ap.add_argument("--dist-timeout", type=float, default=60.0, help="Receiver.pull timeout (s), dist/NCCL")
    ap.add_argument("--build-timeout", type=float, default=240.0)
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no new phase after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--verbose", action="store_true", help="print every refit")
    a = ap.parse_args(argv)

    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("refit_gpu: SKIP - no CUDA device here; run with --device cpu --shape tiny to check the code path")
            return 0
        device = "cuda:0" if a.device == "cuda" else a.device
    else:
        device = a.device
    shape = a.shape or ("qwen3-4b" if device.startswith("cuda") else "tiny")
    cfg = dict(SHAPES[shape])
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # inherited by every spawned child
    t_start = time.monotonic()
    deadline = t_start + a.budget_s
    ctx = mp.get_context("spawn")
    doc: dict = {"device": device, "shape": shape, "dtype": a.dtype, "config": cfg, "refits_per_phase": a.refits,
                 "big_run_kb": a.big_run_kb, "grid_runs": a.grid_runs,
                 "definitions": DEFINITIONS, "cases": [], "skipped": {}}
    if device.startswith("cuda"):
        doc["gpu"] = torch.cuda.get_device_name(torch.device(device))
    out = a.out or (None if device.startswith("cuda") else str(ROOT / f"benchmarks/results/refit_gpu_cpu_{shape}.json"))

    def _term(signum, frame):  # `timeout` sends SIGTERM: still write what we have
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, _term)
    try:
        for spec in a.cases.split(","):
            tr, s = spec.split(":")
            left = deadline - time.monotonic()
            if left <= 0 or (tr == "dist" and left < a.dist_timeout + 90):
                doc["skipped"][spec] = f"--budget-s: {left:.0f} s left"
                continue
            phases = a.phases.split(",")
            if tr == "dist":  # the NCCL attempt: bounded, last; two phases are enough to compare
                phases = [p for p in phases if p != "adopt_false"] or phases
            print(f"case {spec}: {phases}", flush=True)
            case: dict = {}
            doc["cases"].append(case)
            run_case(ctx, a, cfg, int(s), tr, phases, device, deadline, case)
            for ph_name, ph in case["phases"].items():
                print(f"{case['name']:<11} {ph_name:<11} first {ph['first_total_s'] * 1e3:9.2f} ms  steady "
                      f"{ph['steady_median']['total_s'] * 1e3:8.2f} ms = {ph['steady_GBps']:9.4g} GB/s  "
                      f"(pull {ph['steady_median']['pull_s'] * 1e3:7.2f}, transfer "
                      f"{ph['steady_median']['transfer_s'] * 1e3:7.2f}, load {(ph['steady_median']['load_s'] or 0) * 1e3:7.2f} ms)  "
                      f"ratio {ph.get('ratio_to_copy', float('nan')):.3f}", flush=True)
            if "ceiling" in case:
                c = case["ceiling"]
                ipc = c.get("ipc_bucket_copy", {})
                print(f"{case['name']:<11} d2d copy_ {c['d2d_copy']['copy_GBps']:9.4g} GB/s "
                      f"({c['d2d_copy']['median_s'] * 1e3:.2f} ms); IPC bucket copy "
                      f"{ipc.get('copy_GBps', float('nan')):9.4g} GB/s; verify {case.get('verify', {}).get('ok')}",
                      flush=True)
            if "cuda_graphs_kept" in case:
                g = case["cuda_graphs_kept"]
                print(f"{case['name']:<11} in_place: {g['graphs_before_decode_after_last_refit']} decode graphs kept "
                      f"through the in-place refits, same tokens and logprobs as a fresh capture: "
                      f"{g['same_as_fresh_capture']}", flush=True)
            for e in case["errors"]:
                print(f"{case['name']}: {e.splitlines()[0][:300]}", flush=True)
    finally:
        dist_case = next((c for c in doc["cases"] if c["transport"] == "dist"), None)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if dist_case is None:
            doc["nccl"] = {"attempted": False, "backend": backend, "why": "dist case not run (see skipped)"}
        elif dist_case["phases"] and not dist_case["errors"]:
            doc["nccl"] = {"attempted": True, "backend": backend, "ok": True,
                           "note": "two processes, one device" if device.startswith("cuda") else "CPU: gloo"}
        else:
            err = " | ".join(dist_case["errors"])[:2000]
            why = ("NCCL refuses two ranks of one communicator on the same CUDA device ('Duplicate GPU "
                   "detected'); it needs a distinct device per rank, so on one GPU the dist transport cannot "
                   "run: use shm (CUDA IPC)") if "Duplicate GPU" in err else \
                  "the dist transport failed or timed out between two processes on one device; see error"
            doc["nccl"] = {"attempted": True, "backend": backend, "ok": False, "error": err, "why": why}
        s1 = next((c for c in doc["cases"] if c["name"] == "S1_T1_shm"), None)
        if s1 and s1.get("phases") and "ceiling" in s1:
            doc["ceiling"] = s1["ceiling"]
            best = max(s1["phases"], key=lambda p: s1["phases"][p].get("ratio_to_copy") or -1)
            r = s1["phases"].get(best, {}).get("ratio_to_copy")
            doc["acceptance"] = {
                "target": "steady-state refit (pull + load_weights) >= 0.90 of the d2d copy, S=T, in place, CUDA IPC",
                "variant": best, "ratio": r, "met": (r is not None and r >= 0.90),
                "ratios": {p: v.get("ratio_to_copy") for p, v in s1["phases"].items()},
                "first_refit_s": {p: v["first_total_s"] for p, v in s1["phases"].items()}}
        doc["limits"], doc["limits_numbers"] = _limits(doc)
        doc["wall_s"] = time.monotonic() - t_start
        write_result("refit_gpu", doc, out)
        for line in doc["limits"]:
            print("limit:", line)
        if "acceptance" in doc:
            print("acceptance:", json.dumps({k: doc["acceptance"][k] for k in ("variant", "ratio", "met")}))
        print("nccl:", json.dumps({k: v for k, v in doc["nccl"].items() if k != "error"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
