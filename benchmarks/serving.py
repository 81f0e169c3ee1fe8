"""Output tokens/s through the Dynamo frontend vs the same engine called in-process.

Claim measured: the cost of serving through Dynamo 1.6.1 (HTTP + preprocessing + request
plane + our worker) relative to the bare :class:`~dynamo_rl.serving.engine.Engine`, at
concurrency 1, 8 and 32, in ONE run (same machine state, levels interleaved).

- frontend: a :class:`~dynamo_rl.serving.stack.LocalStack` (``--workers``, default 1) whose
  workers get ``--worker-args`` (default ``--stream-interval 16``: what ``dynamo-rl train``
  gives its workers, ``cluster.stream_interval``; the engine runs in a process of its own,
  :mod:`dynamo_rl.serving.engine_process`), non-streaming ``/v1/completions`` with
  token-id prompts, ``ignore_eos`` so every request yields exactly ``--max-tokens`` tokens
  (with ``--max-tokens-spread s``, lengths spread over ``max_tokens x [1 - s, 1 + s]``, the same
  per request index on every side: see :func:`lengths`);
  ``c`` requests in flight at all times, sent by aiohttp (``--client``).
- in-process: ``Engine.from_pretrained`` of the same checkpoint in this process, same torch
  threads and event loop (uvloop) as the worker, ``c`` concurrent ``Engine.complete`` calls.

- handler in-process: our Dynamo handler ``Worker.generate`` over that engine, without
  Dynamo: separates the worker's own Python cost from Dynamo's per-chunk cost.
- variants (``--variants``): more stacks of the same worker with other arguments, measured
  alternately with the first: ``engine_in_worker_process`` (``--no-engine-process
  --stream-interval 16``: the engine's forwards share the worker's process, and its GIL,
  with Dynamo), ``mix_prefill_decode`` (``--mix-prefill-decode``: running requests
  decode in the prefill forward of arrivals) and ``engine_pinned`` (``--engine-cpus <last
  CPU>``: the engine process on a core of its own, the frontend and the worker on the others;
  see :func:`stack_args`), and ``engine_pinned_mix`` (both). E.g. ``--variants
  "worker_defaults=;one_token_per_message=--tokens-per-message 1"``.
- ``--max-batch-size`` below the concurrency: requests queue in the engine, as the rollouts
  of a GRPO step sent at once do (``--concurrency 256 --max-batch-size 32 --rounds 1``:
  ``serving_rl_batch.json``); by default the engine has as many KV slots as requests in
  flight, so through the frontend each slot waits one client round trip between requests.
- ``cpu_ms_per_request_last_repeat``: CPU time per request of each process (frontend,
  worker, engine process, this load generator) and the cores they used together.
- ``request_ms_by_layer_last_repeat``: where a request's time through the frontend goes, as
  the mean time of a request seen by each layer: this client, the frontend and the worker's
  handler (Dynamo's own ``/metrics``), our engine (``Engine.stats`` ``request_seconds``),
  and the differences between neighbours (see :func:`hops`).
  Every stack also serves streamed requests for the time to the first token (TTFT).
- ``--device cuda --dtype bfloat16 --tiny '{"hidden_size": 1024, ...}'``: the same on a GPU
  (both sides' engine on it), with a larger model of the tiny family.
- ``--engine vllm`` (run it with the vLLM environment's Python, ``.venv-vllm/bin/python``,
  built by ``make vllm``): the same ratio for Dynamo's stock worker, ``python -m dynamo.vllm``
  (what users deploy in DGDs), against vLLM's own ``AsyncLLM`` in this process with the
  worker's engine arguments (``--max-num-seqs``, ``--dtype``, ``--enforce-eager`` on CPU,
  ``--max-model-len``, the same ``VLLM_CPU_*`` environment). No handler-in-process figure
  and no variants there. Its default stream interval is 16 too (``cluster.stream_interval``
  reaches both worker kinds).

tokens/s = generated tokens / wall seconds of the level (after one warm-up request per
side). ``ratio`` = frontend / in-process. Each level is measured ``--repeats`` times,
alternating the two sides; the median is reported. The frontend side spreads over several
processes (frontend, worker) while the in-process side is one process; on a small shared
machine the figures are noisy (``load_average_1m`` is recorded), so read the ratios, not
single runs.

Run: ``python benchmarks/serving.py`` (about 6 minutes on 2 CPU cores, 9 repeats) → JSON in
``benchmarks/results/serving.json``; ``.venv-vllm/bin/python benchmarks/serving.py --engine
vllm`` (about 4 minutes) → ``benchmarks/results/serving_vllm.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402


def prompts(n: int) -> list[list[int]]:
    """``n`` distinct 12-token prompts of the tiny character vocabulary (ids 4..49)."""
    return [[1] + [4 + (i * 7 + j * 3) % 46 for j in range(11)] for i in range(n)]


TRAIN_WORKER_ARGS = "--stream-interval 16"  # what `dynamo-rl train` gives its workers (cluster.stream_interval)
DEFAULT_VARIANTS = ("engine_in_worker_process=--no-engine-process --stream-interval 16;"
                    "mix_prefill_decode=--stream-interval 16 --mix-prefill-decode"
                    # the engine process on this machine's last CPU, the frontend and the worker on the others
                    + (f";engine_pinned=--stream-interval 16 --engine-cpus {max(os.sched_getaffinity(0))}"
                       f";engine_pinned_mix=--stream-interval 16 --engine-cpus {max(os.sched_getaffinity(0))}"
                       " --mix-prefill-decode"
                       if len(os.sched_getaffinity(0)) > 1 else ""))


def parse_variants(text: str) -> dict[str, list[str]]:
    """``"a=--x 1;b=--y 2"`` → ``{"a": ["--x", "1"], "b": ["--y", "2"]}``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, argv = part.partition("=")
        out[name.strip()] = argv.split()
    return out


def stack_args(argv: list[str], engine_cpus: str | None) -> dict:
    """LocalStack arguments of a side: ``--engine-cpus X`` among a variant's worker arguments
    becomes the stack's ``engine_cpus`` (the engine process on X, the frontend and the worker on
    the other CPUs), else ``--engine-cpus`` of this benchmark applies."""
    argv = list(argv)
    if "--engine-cpus" in argv:
        i = argv.index("--engine-cpus")
        engine_cpus = argv[i + 1]
        del argv[i:i + 2]
    return {"worker_args": argv, "engine_cpus": engine_cpus}


def lengths(n: int, max_tokens: int, spread: float) -> list[int]:
    """Tokens to generate per request: ``max_tokens`` each, or with ``spread`` s > 0 spread
    evenly over ``[max_tokens (1 - s), max_tokens (1 + s)]`` (a golden-ratio sequence by request
    index: the same lengths on every side and run, mean ~``max_tokens``), as completions of
    an RL batch end at different lengths."""
    if spread <= 0:
        return [max_tokens] * n
    return [max(1, round(max_tokens * (1 - spread + 2 * spread * ((i * 0.6180339887498949) % 1.0))))
            for i in range(n)]


def _completion(i: int, p: list[int], max_tokens: int, stream: bool) -> dict:
    body = {"model": "tiny", "prompt": p, "max_tokens": max_tokens, "temperature": 1.0, "seed": i,
            "ignore_eos": True}
    if stream:
        body.update(stream=True, nvext={"extra_fields": ["completion_token_ids"]},
                    stream_options={"include_usage": True})
    return body


async def run_frontend(url: str, ps: list[list[int]], concurrency: int, lens: list[int], client: str = "aiohttp",
                       times: list[float] | None = None) -> tuple[int, float]:
    """Non-streaming completions, ``concurrency`` in flight: (generated tokens, wall seconds).
    ``times``: each request's seconds from sending it to its whole response are appended."""
    sem = asyncio.Semaphore(concurrency)
    times = [] if times is None else times
    if client == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as session:
            async def one(i, p):
                async with sem:
                    t = time.perf_counter()
                    r = await session.post(f"{url}/v1/completions", json=_completion(i, p, lens[i], False))
                    r.raise_for_status()
                    times.append(time.perf_counter() - t)
                    return r.json()["usage"]["completion_tokens"]

            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
            return sum(counts), time.perf_counter() - t0
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def one(i, p):
            async with sem:
                t = time.perf_counter()
                async with session.post(f"{url}/v1/completions", json=_completion(i, p, lens[i], False)) as r:
                    r.raise_for_status()
                    body = await r.json()
                times.append(time.perf_counter() - t)
                return body["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
        return sum(counts), time.perf_counter() - t0


async def run_frontend_stream(url: str, ps: list[list[int]], concurrency: int, lens: list[int]
                              ) -> tuple[int, float, float]:
    """Streaming completions (aiohttp): (tokens, seconds, mean time to the first token in seconds).

    The first token is the first chunk that carries text or token ids; the tokens are
    counted from the final usage chunk (``stream_options.include_usage``).

    A connection per request: on a reused (keep-alive) connection the first chunk waits a
    fixed ~40 ms (the signature of Nagle's algorithm meeting a delayed ACK on the frontend's
    HTTP socket; httpx and aiohttp alike), which would measure TCP, not serving."""
    import json as _json

    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4, force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def one(i, p):
            async with sem:
                t0, first, n = time.perf_counter(), None, 0
                async with session.post(f"{url}/v1/completions", json=_completion(i, p, lens[i], True)) as r:
                    r.raise_for_status()
                    async for raw in r.content:
                        line = raw.decode().strip()
                        if not line.startswith("data:") or line == "data: [DONE]":
                            continue
                        doc = _json.loads(line[5:])
                        ids = (doc.get("nvext") or {}).get("completion_token_ids") or []
                        if first is None and (ids or any(c.get("text") for c in doc.get("choices") or [])):
                            first = time.perf_counter() - t0
                        if doc.get("usage"):
                            n = doc["usage"]["completion_tokens"]
                ttfts.append(first if first is not None else float("nan"))
                return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
        return sum(counts), time.perf_counter() - t0, statistics.mean(ttfts)


async def run_engine(engine, ps: list[list[int]], concurrency: int, lens: list[int]) -> tuple[int, float]:
    from dynamo_rl.serving.engine import SamplingParams

    sem = asyncio.Semaphore(concurrency)

    async def one(i, p):
        async with sem:
            out = await engine.complete(p, SamplingParams(max_tokens=lens[i], temperature=1.0, seed=i,
                                                          ignore_eos=True))
            return len(out)

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
    return sum(counts), time.perf_counter() - t0


async def run_vllm(engine, ps: list[list[int]], concurrency: int, lens: list[int]) -> tuple[int, float]:
    """vLLM's ``AsyncLLM`` in this process, ``concurrency`` requests in flight (final
    outputs only, no detokenization: the engine's own cost)."""
    import uuid

    from vllm import SamplingParams as VllmSamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    sem = asyncio.Semaphore(concurrency)
    tag = uuid.uuid4().hex[:8]

    async def one(i, p):
        params = VllmSamplingParams(max_tokens=lens[i], temperature=1.0, seed=i, ignore_eos=True,
                                    detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
        async with sem:
            final = None
            async for out in engine.generate(TokensPrompt(prompt_token_ids=p), params, request_id=f"{tag}-{i}"):
                final = out
            return len(final.outputs[0].token_ids)

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
    return sum(counts), time.perf_counter() - t0


def start_vllm(model_dir: Path, max_batch_size: int, dtype: str, device: str):
    """vLLM's ``AsyncLLM`` with the engine arguments LocalStack gives ``dynamo.vllm``."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from dynamo_rl.serving.worker_kinds import max_position_embeddings

    return AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(model_dir), dtype=dtype, max_num_seqs=max_batch_size, enforce_eager=device == "cpu",
        max_model_len=max_position_embeddings(model_dir), disable_log_stats=True))


async def run_handler(worker, ps: list[list[int]], concurrency: int, lens: list[int]) -> tuple[int, float]:
    """Our Dynamo handler (``Worker.generate``) called in-process: the worker's own Python cost."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i, p):
        request = {"token_ids": p, "eos_token_ids": [], "stop_conditions": {"max_tokens": lens[i], "ignore_eos": True},
                   "sampling_options": {"temperature": 1.0, "seed": i}}
        async with sem:
            return sum([len(chunk["token_ids"]) async for chunk in worker.generate(request)])

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
    return sum(counts), time.perf_counter() - t0


def prometheus_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of series ``name`` whose labels include ``labels``, in Prometheus
    text (what Dynamo's ``/metrics`` serve)."""
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        series, _, rest = head.partition("{")
        if series == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


async def request_times(http, stack, engine_stats: list[dict]) -> dict[str, float]:
    """Sums (seconds) and counts of the request times that Dynamo measures itself: the
    frontend's (``dynamo_frontend_request_duration_seconds``: the HTTP request in the
    frontend), the workers' handlers (``dynamo_component_request_duration_seconds`` of
    ``generate``), the frontend→worker request transit
    (``dynamo_work_handler_network_transit_seconds``) and the wait for a permit of the
    worker's handler pool (``dynamo_work_handler_permit_wait_seconds``); and our engines' (``request_seconds``,
    ``queue_seconds``, ``requests_finished`` of ``engine_stats``). ``http``: an
    ``httpx.AsyncClient``."""
    out = dict.fromkeys(("frontend", "frontend_n", "worker", "worker_n", "transit", "transit_n", "permit",
                         "permit_n"), 0.0)
    text = (await http.get(f"{stack.frontend_url}/metrics")).text
    out["frontend"] = prometheus_sum(text, "dynamo_frontend_request_duration_seconds_sum")
    out["frontend_n"] = prometheus_sum(text, "dynamo_frontend_request_duration_seconds_count")
    for w in stack.workers:
        text = (await http.get(f"{w.system_url}/metrics")).text
        out["worker"] += prometheus_sum(text, "dynamo_component_request_duration_seconds_sum", dynamo_endpoint="generate")
        out["worker_n"] += prometheus_sum(text, "dynamo_component_request_duration_seconds_count",
                                          dynamo_endpoint="generate")
        out["transit"] += prometheus_sum(text, "dynamo_work_handler_network_transit_seconds_sum")
        out["transit_n"] += prometheus_sum(text, "dynamo_work_handler_network_transit_seconds_count")
        out["permit"] += prometheus_sum(text, "dynamo_work_handler_permit_wait_seconds_sum")
        out["permit_n"] += prometheus_sum(text, "dynamo_work_handler_permit_wait_seconds_count")
    for key, stat in (("engine", "request_seconds"), ("queue", "queue_seconds"), ("engine_n", "requests_finished")):
        out[key] = sum(s.get(stat, 0) for s in engine_stats)
    return out


def hops(client_times: list[float], before: dict, after: dict) -> dict[str, float | None]:
    """Mean milliseconds of a request at each layer (the last repeat), outermost first, and the
    differences between neighbours: where a request's time through the frontend goes. None
    where a layer measured nothing (no engine figures for vLLM)."""
    def mean(key: str, count: str | None = None) -> float | None:
        n = after[count or f"{key}_n"] - before[count or f"{key}_n"]
        return 1e3 * (after[key] - before[key]) / n if n else None

    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    client = 1e3 * statistics.mean(client_times)
    frontend, worker, engine = mean("frontend"), mean("worker"), mean("engine")
    out = {"client": client, "frontend": frontend, "worker_handler": worker, "engine": engine,
           "engine_queued": mean("queue", "engine_n"),
           "http_and_client": minus(client, frontend),
           "frontend_to_worker_and_back": minus(frontend, worker),
           "frontend_to_worker_transit": mean("transit"),
           "worker_permit_wait": mean("permit"),
           "worker_to_engine_and_back": minus(worker, engine)}
    return {k: None if v is None else round(v, 2) for k, v in out.items()}


async def main_async(args) -> dict:
    import psutil
    import torch

    from dynamo_rl.models import ensure_tiny_model
    from dynamo_rl.serving.engine import Engine
    from dynamo_rl.serving.stack import LocalStack
    from dynamo_rl.serving.worker import Worker

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    if args.model_path:
        model_dir = Path(args.model_path)
    else:
        from dynamo_rl.models.tiny import TinyModelSpec

        model_dir = ensure_tiny_model(tmp / "tiny", TinyModelSpec(**json.loads(args.tiny)) if args.tiny else None)
    levels = [int(c) for c in args.concurrency.split(",")]
    slots = args.max_batch_size or max(levels)
    vllm = args.engine == "vllm"
    if vllm:
        from dynamo_rl.serving.worker_kinds import VLLM_CPU_ENV

        for key, value in VLLM_CPU_ENV.items():  # as LocalStack gives its dynamo.vllm workers
            os.environ.setdefault(key, value)
        engine = start_vllm(model_dir, slots, args.dtype, args.device)
        run_in_process, handler = run_vllm, None
        variants = {}
        stacks = {"default": LocalStack(model_dir, workers=args.workers, worker_threads=args.threads,
                                        run_dir=tmp / "run-default", max_batch_size=slots, quiet=True,
                                        device=args.device, dtype=args.dtype, engine="vllm",
                                        vllm_python=sys.executable, stream_interval=args.vllm_stream_interval)}
    else:
        engine = Engine.from_pretrained(model_dir, max_batch_size=slots, device=args.device, dtype=args.dtype)
        await engine.start()
        run_in_process = run_engine
        handler = Worker(engine, served_model_name="tiny", model_path=str(model_dir), message_eos_id=None)
        variants = parse_variants(args.variants)
        stacks = {name: LocalStack(model_dir, workers=args.workers, worker_threads=args.threads,
                                   run_dir=tmp / f"run-{name}", max_batch_size=slots, quiet=True,
                                   device=args.device, dtype=args.dtype, **stack_args(argv, args.engine_cpus))
                  for name, argv in {"default": args.worker_args.split(), **variants}.items()}
    for stack in stacks.values():
        await asyncio.to_thread(stack.start)
    import httpx

    http = httpx.AsyncClient(timeout=30)   # the stacks' /metrics and /engine/info, between levels

    async def engine_stats(side) -> list[dict]:
        """Our engines' ``stats``: the in-process engine's, or each worker's (``/engine/info``;
        an engine process reports them with its health messages, so a fresh one is awaited)."""
        if vllm:
            return []
        if side is engine:
            return [dict(engine.stats)]
        from dynamo_rl.serving.engine_process import HEALTH_INTERVAL_S

        await asyncio.sleep(2 * HEALTH_INTERVAL_S)
        return [(await http.get(f"{w.system_url}/engine/info")).json()["stats"] for w in side.workers]

    async def counters(side) -> tuple[dict | None, dict | None]:
        """Our engines' counters summed over the side's engines (None for vLLM), and, for a
        stack, the request times of :func:`request_times`."""
        stats = await engine_stats(side)
        summed = {k: sum(s[k] for s in stats) for k in stats[0]} if stats else None
        return summed, (await request_times(http, side, stats) if side is not engine else None)

    def cpu(procs) -> float:
        """CPU seconds (user + system) so far of ``procs`` (psutil processes) together."""
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:  # exited: a worker restarted mid-level is not ours to count
                pass
        return total

    def cpu_seconds(stack) -> dict[str, float]:
        """CPU seconds so far of the stack's processes by role, and of this process (the load
        generator; the in-process engine is idle while the frontend is measured)."""
        workers = [psutil.Process(w.pid) for w in stack.workers]
        children = [c for w in workers for c in w.children(recursive=True)]
        return {"frontend": cpu([psutil.Process(stack.frontend.pid)]), "worker": cpu(workers),
                "engine_process": cpu(children), "client": cpu([psutil.Process()])}

    def work(before: tuple, after: tuple, seconds: float) -> dict | None:
        (before, _), (after, _) = before, after
        if before is None:
            return None
        d = {k: after[k] - before[k] for k in ("forward_passes", "prefill_batches", "tokens_generated",
                                               "forward_seconds", "decode_batches", "decode_handoffs")}
        forwards = max(d["forward_passes"], 1)
        return {"forwards": d["forward_passes"], "prefill_forwards": d["prefill_batches"],
                "tokens_per_forward": round(d["tokens_generated"] / forwards, 2),
                "decode_steps_per_handoff": round(d["decode_batches"] / max(d["decode_handoffs"], 1), 2),
                "forward_ms": round(1e3 * d["forward_seconds"] / forwards, 3),
                "engine_thread_busy": round(d["forward_seconds"] / seconds, 3)}

    rows = []
    try:
        # warm-up, untimed: a full batch on every side (the first passes of a fresh engine run slower)
        warm = prompts(max(levels))
        warm_lens = lengths(len(warm), args.max_tokens, 0.0)
        for stack in stacks.values():
            await run_frontend(stack.frontend_url, warm, max(levels), warm_lens, args.client)
        await run_in_process(engine, warm, max(levels), warm_lens)
        for c in levels:
            n = max(c * args.rounds, args.min_requests)
            ps = prompts(n)
            lens = lengths(n, args.max_tokens, args.max_tokens_spread)
            want = sum(lens)
            fe = {name: [] for name in stacks}
            ttft = {name: [] for name in stacks}
            forwards = {}
            cpu_ms = {}
            where = {}
            ip, hd = [], []
            for _ in range(args.repeats):
                for name, stack in stacks.items():
                    before, cpu_before = await counters(stack), cpu_seconds(stack)
                    client_times = []
                    tok, sec = await run_frontend(stack.frontend_url, ps, c, lens, args.client, client_times)
                    assert tok == want, (tok, want)
                    cpu_after = cpu_seconds(stack)
                    cpu_ms[name] = {role: round(1e3 * (cpu_after[role] - cpu_before[role]) / n, 3)
                                    for role in cpu_before}
                    cpu_ms[name]["cores_used"] = round(sum(cpu_after[r] - cpu_before[r] for r in cpu_before) / sec, 2)
                    after = await counters(stack)
                    forwards[name] = work(before, after, sec)
                    where[name] = hops(client_times, before[1], after[1])
                    fe[name].append(tok / sec)
                    tok, sec, first = await run_frontend_stream(stack.frontend_url, ps, c, lens)
                    assert tok == want, (tok, want)
                    ttft[name].append(first)
                before, cpu_before = await counters(engine), cpu([psutil.Process()])
                tok, sec = await run_in_process(engine, ps, c, lens)
                assert tok == want, (tok, want)
                spent = cpu([psutil.Process()]) - cpu_before
                cpu_ms["in_process"] = {"client_and_engine": round(1e3 * spent / n, 3), "cores_used": round(spent / sec, 2)}
                after = await counters(engine)
                forwards["in_process"] = work(before, after, sec)
                if after[0] is not None:
                    done = after[0]["requests_finished"] - before[0]["requests_finished"]
                    where["in_process"] = {k: round(1e3 * (after[0][f"{k}_seconds"] - before[0][f"{k}_seconds"]) / done, 2)
                                           for k in ("request", "queue")}
                ip.append(tok / sec)
                if handler is not None:
                    tok, sec = await run_handler(handler, ps, c, lens)
                    assert tok == want, (tok, want)
                    hd.append(tok / sec)
            med = {name: statistics.median(v) for name, v in fe.items()}
            in_process = statistics.median(ip)
            row = {"concurrency": c, "requests": n, "tokens_per_request": args.max_tokens,
                   "tokens_per_request_range": [min(lens), max(lens)],
                   "frontend_tokens_per_s": round(med["default"], 1),
                   "in_process_tokens_per_s": round(in_process, 1),
                   "ratio": round(med["default"] / in_process, 3),
                   "ttft_ms_streaming": round(1e3 * statistics.median(ttft["default"]), 2)}
            if hd:
                row["handler_in_process_tokens_per_s"] = round(statistics.median(hd), 1)
            for name in variants:
                row[f"frontend_{name}_tokens_per_s"] = round(med[name], 1)
                row[f"ratio_{name}"] = round(med[name] / in_process, 3)
                row[f"ttft_ms_streaming_{name}"] = round(1e3 * statistics.median(ttft[name]), 2)
            # c requests always in flight: mean request time = c x wall / requests (Little's law)
            mean_len = want / n
            row["request_ms"] = {"in_process": round(1e3 * c * mean_len / in_process, 1),
                                 **{name: round(1e3 * c * mean_len / v, 1) for name, v in med.items()}}
            if not vllm:
                row["engine_work_last_repeat"] = forwards
            row["cpu_ms_per_request_last_repeat"] = cpu_ms
            row["request_ms_by_layer_last_repeat"] = where
            row["ratio_runs"] = [round(f / i, 3) for f, i in zip(fe["default"], ip)]
            # each repeat's two sides ran next to each other: their ratio is blind to the machine's drift
            row["ratio_runs_median"] = round(statistics.median(f / i for f, i in zip(fe["default"], ip)), 3)
            row["frontend_runs"] = {name: [round(x, 1) for x in v] for name, v in fe.items()}
            row["in_process_runs"] = [round(x, 1) for x in ip]
            print(f"c={c:>3}: in-process {in_process:>8.1f} tok/s; through the frontend: " + "; ".join(
                f"{name} {med[name]:.1f} tok/s ({med[name] / in_process:.3f}, TTFT "
                f"{1e3 * statistics.median(ttft[name]):.1f} ms)" for name in stacks), flush=True)
            rows.append(row)
    finally:
        await http.aclose()
        for stack in stacks.values():
            await asyncio.to_thread(stack.stop)
        if vllm:
            engine.shutdown()
            engine = None  # AsyncLLM.__del__ now, not at interpreter exit (where it fails)
        else:
            await engine.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # the tiny model and the stacks' run dirs
    try:
        import importlib.metadata as md

        dynamo_version = md.version("ai-dynamo")
    except Exception:  # noqa: BLE001
        dynamo_version = None
    note = ("ratio = frontend / in-process at the same concurrency; all sides measured alternately in "
            "this run. handler_in_process isolates our worker's Python cost; the rest of the gap is "
            "Dynamo's cost per request and per message (pyo3 generator bridge, msgpack, TCP response "
            "stream, HTTP) and, on a machine of few cores, the CPU that the frontend, the worker and "
            "this client share. frontend_* is our worker with worker_args (those dynamo-rl train "
            "gives its workers; the engine in a process of its own), frontend_<variant>_* the same "
            "worker with the variant's arguments, a stack of its own measured alternately; "
            "ttft_ms_* = mean time to the first token of streamed requests (a connection per "
            "request: see run_frontend_stream). request_ms = concurrency x wall / requests (Little's law: "
            "the mean time of a request; through the frontend, the difference to in_process is the time a "
            "request's KV slot waits for its replacement). engine_work_last_repeat = our engine's "
            "forwards, prefill forwards, generated tokens per forward, wall ms of a forward call on the engine "
            "thread (forward_ms) and the share of the level's wall time the engine thread was in forward calls "
            "(engine_thread_busy), in the last repeat (Engine.stats, through /engine/info): in-process, all c "
            "requests start and end together. cpu_ms_per_request_last_repeat = CPU milliseconds (user + "
            "system) per request of each process role through the frontend (frontend, worker, the worker's "
            "engine process, this load generator), and the CPU cores they used together (cores_used), in the "
            "last repeat; in_process: this process's (the engine and the load generator). "
            "request_ms_by_layer_last_repeat = a request's mean milliseconds as each layer sees it, outermost "
            "first: client (this load generator, send to whole response), frontend "
            "(dynamo_frontend_request_duration_seconds), worker_handler (the worker's "
            "dynamo_component_request_duration_seconds of generate), engine (Engine.stats request_seconds: "
            "queued to last token; engine_queued: to its KV slot), and the differences between neighbours: "
            "http_and_client, frontend_to_worker_and_back (of which frontend_to_worker_transit, Dynamo's "
            "dynamo_work_handler_network_transit_seconds; worker_permit_wait: dynamo_work_handler_permit_wait_seconds, "
            "the wait for a slot of the worker's handler pool), worker_to_engine_and_back; in_process: the "
            "engine's request and queue ms. ratio_runs = "
            "each repeat's frontend / in-process (measured next to each other), ratio_runs_median their median. The load generator is "
            "aiohttp (as vLLM's benchmark_serving.py); httpx costs ~1.6 ms of CPU per request here, "
            "which put the client on the critical path (--client httpx measures it)")
    extra = {}
    if vllm:
        note = ("ratio = frontend / in-process at the same concurrency, measured alternately in this run: "
                "Dynamo's stock vLLM worker (python -m dynamo.vllm --enable-rl, --stream-interval "
                "vllm_stream_interval) through the Dynamo frontend vs vLLM's AsyncLLM (its engine core in "
                "a child process, as in the worker) called from this process with the same engine "
                "arguments; ttft_ms_streaming = mean time to the first streamed token (a connection per "
                "request). The load generator is aiohttp")
        import vllm as vllm_module

        extra = {"engine": "vllm", "vllm": vllm_module.__version__,
                 "vllm_env": {k: os.environ[k] for k in VLLM_CPU_ENV},
                 "vllm_stream_interval": args.vllm_stream_interval,
                 "in_process": "vllm.v1.engine.async_llm.AsyncLLM (FINAL_ONLY outputs, detokenize=False)",
                 "frontend_side": "python -m dynamo.vllm --enable-rl (LocalStack engine='vllm')"}
    return {
        **extra,
        "unit": "generated tokens per second (wall clock)",
        "model": str(args.model_path) if args.model_path else
                 f"tiny Qwen3 (dynamo_rl.models.ensure_tiny_model, spec {args.tiny or 'default'})",
        "dynamo": dynamo_version, "workers": args.workers, "max_batch_size": slots, "engine_cpus": args.engine_cpus,
        "torch_threads": args.threads,
        "load_average_1m": os.getloadavg()[0],
        "device": args.device, "dtype": args.dtype, "client": args.client,
        "max_tokens": args.max_tokens, "max_tokens_spread": args.max_tokens_spread,
        "worker_args": [] if vllm else args.worker_args.split(), "variants": variants,
        "note": note,
        "levels": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-tokens-spread", type=float, default=0.0,
                   help="s > 0: request lengths spread over max_tokens x [1 - s, 1 + s] (see lengths()); "
                        "0: every request max_tokens long, so in-process all c start and end together")
    p.add_argument("--rounds", type=int, default=8,
                   help="requests per level = concurrency x rounds (at least --min-requests); 8: the steady state "
                        "dominates (requests reach the worker staggered, so the ramp up and down of a short "
                        "level weighs on the frontend side only)")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9,
                   help="measurements per side and level, alternating the sides; the median is reported (this "
                        "machine kind is noisy: see ratio_runs)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="KV slots of each engine (both sides); default: the largest concurrency. Below the "
                        "concurrency, requests queue in the engine, as a GRPO step's rollouts do when the whole "
                        "batch is sent at once (e.g. --concurrency 256 --max-batch-size 32 --rounds 1)")
    p.add_argument("--engine-cpus", default=None, metavar="CPULIST",
                   help="the frontend side's engine processes on these CPUs, the frontend and workers on the "
                        "others (LocalStack(engine_cpus=)); the in-process side is not pinned")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-path", default=None)
    p.add_argument("--tiny", default=None, help="JSON of TinyModelSpec fields for a larger tiny-family model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--worker-args", default=TRAIN_WORKER_ARGS,
                   help="arguments of the measured worker (default: those dynamo-rl train gives its workers)")
    p.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp",
                   help="HTTP client of the non-streaming load (streaming: aiohttp)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="NAME=worker args, separated by ';' (empty: the default stack alone)")
    p.add_argument("--engine", choices=["dynamo-rl", "vllm"], default="dynamo-rl",
                   help="whose engine both sides run: ours, or vLLM's (dynamo.vllm through the frontend; run "
                        "with .venv-vllm/bin/python)")
    p.add_argument("--vllm-stream-interval", type=int, default=16,
                   help="--stream-interval of the dynamo.vllm worker (what dynamo-rl train gives it)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # as the workers get it (before torch loads)
    try:  # the worker runs its engine under uvloop: do the same for the in-process side
        import uvloop

        payload = uvloop.run(main_async(args))
        payload["event_loop"] = "uvloop"
    except ImportError:  # pragma: no cover
        payload = asyncio.run(main_async(args))
        payload["event_loop"] = "asyncio"
    write_result("serving_vllm" if args.engine == "vllm" else "serving", payload, args.out)


if __name__ == "__main__":
    main()
