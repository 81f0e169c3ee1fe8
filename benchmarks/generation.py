"""Client overhead of :class:`~dynamo_rl.generation.DynamoGeneration` vs raw httpx, one run.

Claim measured: what our client adds per request on top of a bare ``httpx.AsyncClient``
POST + ``.json()`` of the same body to the same Dynamo frontend (request building, the
semaphore, retries bookkeeping, exact int64/float32 tensors, Sample objects).

- ``frontend``: a :class:`~dynamo_rl.serving.stack.LocalStack` (tiny model, 1 worker).
  Both sides send identical ``/v1/completions`` bodies (token-id prompt, ``max_tokens``,
  seed, ``logprobs``, ``nvext.extra_fields``). Sequential (one request in flight):
  per-request latency, median over requests; concurrent (``--concurrency`` in flight):
  wall seconds per request. Sides alternate every round (``--rounds``) in the same
  process; medians over rounds are reported. On a small shared machine the frontend
  latency is noisy (``load_average_1m`` is recorded): the in-memory figures below are the
  stable measure of the client's own cost.
- ``in_memory``: the same two code paths over ``httpx.MockTransport`` that returns a
  response captured from the real frontend, so the difference is the client's CPU cost
  alone (no network, no engine); minimum over rounds (the least disturbed, as ``timeit``).

Run: ``python benchmarks/generation.py`` (one to two minutes on 2 CPU cores) → JSON in
``benchmarks/results/generation.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


def body(model: str, prompt: list[int], seed: int, max_tokens: int) -> dict:
    """The body DynamoGeneration sends for a token-id prompt (see generation/client.py)."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "top_p": 1.0,
            "stream": False, "seed": seed, "logprobs": 1,
            "nvext": {"extra_fields": ["worker_id", "completion_token_ids", "engine_data"]}}


async def raw_sequential(client, url, model, ps, max_tokens) -> list[float]:
    lat = []
    for i, p in enumerate(ps):
        t0 = time.perf_counter()
        r = await client.post(f"{url}/v1/completions", json=body(model, p, i, max_tokens))
        r.raise_for_status()
        r.json()
        lat.append(time.perf_counter() - t0)
    return lat


async def client_sequential(gen, ps, sampling) -> list[float]:
    lat = []
    for i, p in enumerate(ps):
        t0 = time.perf_counter()
        await gen.generate([p], sampling=sampling, seed=i)
        lat.append(time.perf_counter() - t0)
    return lat


async def raw_concurrent(client, url, model, ps, max_tokens, c) -> float:
    sem = asyncio.Semaphore(c)

    async def one(i, p):
        async with sem:
            r = await client.post(f"{url}/v1/completions", json=body(model, p, i, max_tokens))
            r.raise_for_status()
            return r.json()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
    return (time.perf_counter() - t0) / len(ps)


async def client_concurrent(gen, ps, sampling) -> float:
    t0 = time.perf_counter()
    await gen.generate(ps, sampling=sampling, seed=0)
    return (time.perf_counter() - t0) / len(ps)


def us(x: float) -> float:
    return round(x * 1e6, 1)


async def measure(args) -> dict:
    import httpx

    from dynamo_rl.config import DynamoConfig, GenerationConfig, SamplingConfig
    from dynamo_rl.generation import DynamoGeneration
    from dynamo_rl.models import ensure_tiny_model
    from dynamo_rl.serving.stack import LocalStack

    work = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    model_dir = ensure_tiny_model(work / "tiny")
    sampling = SamplingConfig(temperature=1.0, max_tokens=args.max_tokens)
    ps = prompts(args.requests)
    seq_ps = ps[: args.sequential_requests]
    res: dict = {}
    with LocalStack(model_dir, workers=1, quiet=True, run_dir=work / "stack") as stack:
        url = stack.frontend_url
        cfg = GenerationConfig(dynamo=DynamoConfig(frontend_url=url), max_concurrency=args.concurrency)
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        async with httpx.AsyncClient(timeout=60, limits=limits) as raw, DynamoGeneration(cfg) as gen:
            model = await gen.model()
            captured = (await raw.post(f"{url}/v1/completions", json=body(model, ps[0], 0, args.max_tokens))).json()
            await client_sequential(gen, seq_ps[:2], sampling)  # warm-up both paths
            await raw_sequential(raw, url, model, seq_ps[:2], args.max_tokens)
            rows = []
            for _ in range(args.rounds):
                rs = await raw_sequential(raw, url, model, seq_ps, args.max_tokens)
                cs = await client_sequential(gen, seq_ps, sampling)
                rc = await raw_concurrent(raw, url, model, ps, args.max_tokens, args.concurrency)
                cc = await client_concurrent(gen, ps, sampling)
                rows.append({"raw_seq_median_s": statistics.median(rs), "client_seq_median_s": statistics.median(cs),
                             "raw_conc_per_req_s": rc, "client_conc_per_req_s": cc})
        load = os.getloadavg()[0]

    def med(key):
        return statistics.median(r[key] for r in rows)

    res["frontend"] = {
        "sequential": {"raw_httpx_latency_us": us(med("raw_seq_median_s")),
                       "client_latency_us": us(med("client_seq_median_s")),
                       "overhead_us": us(med("client_seq_median_s") - med("raw_seq_median_s"))},
        "concurrent": {"concurrency": args.concurrency,
                       "raw_httpx_wall_per_request_us": us(med("raw_conc_per_req_s")),
                       "client_wall_per_request_us": us(med("client_conc_per_req_s")),
                       "overhead_us": us(med("client_conc_per_req_s") - med("raw_conc_per_req_s"))},
        "rounds": rows,
    }

    # pure client cost: the same two paths over an in-memory transport with the captured reply
    payload = json.dumps(captured).encode()

    def reply(request):
        return httpx.Response(200, content=payload, headers={"content-type": "application/json"})

    n_mem = args.in_memory_requests
    async with httpx.AsyncClient(transport=httpx.MockTransport(reply)) as raw:
        cfg = GenerationConfig(dynamo=DynamoConfig(frontend_url="http://bench.invalid:1", model=captured["model"]),
                               max_concurrency=args.concurrency)
        gen = DynamoGeneration(cfg)
        await gen._client.aclose()
        gen._client = httpx.AsyncClient(transport=httpx.MockTransport(reply))
        gen._model = captured["model"]
        mem_ps = [ps[0]] * n_mem
        rows_mem = []
        async def raw_one(i, p):
            r = await raw.post("http://bench.invalid:1/v1/completions", json=body(captured["model"], p, i, args.max_tokens))
            return r.json()

        for _ in range(args.rounds):
            t0 = time.perf_counter()
            await asyncio.gather(*(raw_one(i, p) for i, p in enumerate(mem_ps)))
            t_raw = time.perf_counter() - t0
            t0 = time.perf_counter()
            await gen.generate(mem_ps, sampling=sampling, seed=0)
            t_cli = time.perf_counter() - t0
            rows_mem.append((t_raw / n_mem, t_cli / n_mem))
        await gen.aclose()
    # CPU cost on a shared machine: the minimum over rounds is the least disturbed figure (as timeit)
    raw_us = min(r[0] for r in rows_mem)
    cli_us = min(r[1] for r in rows_mem)
    res["in_memory"] = {"requests_per_round": n_mem, "estimator": "min over rounds",
                        "raw_httpx_per_request_us": us(raw_us), "client_per_request_us": us(cli_us),
                        "overhead_us": us(cli_us - raw_us),
                        "rounds_us": [[us(a), us(b)] for a, b in rows_mem]}
    res["load_average_1m"] = round(load, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=128, help="requests per concurrent round")
    ap.add_argument("--sequential-requests", type=int, default=32)
    ap.add_argument("--in-memory-requests", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    res = asyncio.run(measure(args))
    res["config"] = vars(args)
    write_result("generation", res, args.out)
    print(json.dumps({k: v for k, v in res.items() if k != "config"} | {"frontend": {
        k: v for k, v in res["frontend"].items() if k != "rounds"}}, indent=2))


if __name__ == "__main__":
    main()
