"""The rollout client at RL batch sizes: :class:`~dynamo_rl.generation.DynamoGeneration` on
aiohttp (what it uses) against the same client on httpx (what it used until 2026-12-07) and
against bare POSTs of the same bodies, side by side in one run.

Claim measured: at the hundreds of requests an RL step keeps in flight, the HTTP client's
connection pool is a cost of its own on the trainer's event loop. httpx 0.28–0.29 (httpcore
1.x) rescans every pooled connection for every request (encode/httpx#3215); aiohttp's
connector does not.

- ``canned``: a loopback HTTP server in a process of its own answers every request at once
  with a response captured from the real frontend, so the client's process time per request
  (``time.process_time``, this process only) is the client's own CPU cost: request building,
  the pool, JSON, exact tensors. Batches of ``--batches`` requests, all in flight
  (``max_concurrency`` = the batch); minimum over rounds (the least disturbed, as ``timeit``).
- ``frontend``: the same clients against a real :class:`~dynamo_rl.serving.stack.LocalStack`
  (tiny model, ``--workers`` of our workers), a batch of ``--frontend-batch`` requests of
  ``--max-tokens`` tokens as one GRPO step of ``examples/grpo_tiny.yaml`` sends them
  (16 prompts x 8 samples). Wall seconds per batch and client CPU per request; sides
  alternate every round, medians over rounds.

Run: ``python benchmarks/generation.py`` (about two minutes on 2 CPU cores) → JSON in
``benchmarks/results/generation.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
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


def httpx_generation(cfg):
    """DynamoGeneration with the httpx transport it had before (same limits, same timeout)."""
    import httpx

    from dynamo_rl.generation import DynamoGeneration
    from dynamo_rl.generation.client import _Reply

    class HttpxGeneration(DynamoGeneration):
        def __init__(self, cfg):
            super().__init__(cfg)
            self._httpx = httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout_s),
                                            limits=httpx.Limits(max_connections=cfg.max_concurrency,
                                                                max_keepalive_connections=cfg.max_concurrency))

        async def _fetch(self, method, url, body, timeout_s=None):
            r = await self._httpx.request(method, url, json=body)
            return _Reply(r.status_code, r.content, r.reason_phrase)

        async def aclose(self):
            await self._httpx.aclose()
            await super().aclose()

    return HttpxGeneration(cfg)


async def bare_batch(kind: str, session, url: str, model: str, ps, max_tokens: int) -> None:
    """POST every body at once and parse the JSON (no client of ours)."""
    async def one(i, p):
        if kind == "aiohttp":
            async with session.post(url, json=body(model, p, i, max_tokens)) as r:
                return await r.json()
        r = await session.post(url, json=body(model, p, i, max_tokens))
        return r.json()

    await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))


class Sides:
    """The four clients of one concurrency: ``ours_aiohttp``, ``ours_httpx``, ``bare_aiohttp``,
    ``bare_httpx``; :meth:`batch` runs one batch on one side and returns (wall s, CPU s)."""

    def __init__(self, base_url: str, model: str | None, concurrency: int):
        import aiohttp
        import httpx

        from dynamo_rl.config import DynamoConfig, GenerationConfig
        from dynamo_rl.generation import DynamoGeneration

        cfg = GenerationConfig(dynamo=DynamoConfig(frontend_url=base_url, model=model), max_concurrency=concurrency)
        self.url = base_url + "/v1/completions"
        self.ours = {"ours_aiohttp": DynamoGeneration(cfg), "ours_httpx": httpx_generation(cfg)}
        self.bare = {"bare_aiohttp": aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)),
                     "bare_httpx": httpx.AsyncClient(timeout=60, limits=httpx.Limits(
                         max_connections=concurrency, max_keepalive_connections=concurrency))}

    names = ("ours_aiohttp", "ours_httpx", "bare_aiohttp", "bare_httpx")

    async def batch(self, side: str, model: str, ps, sampling) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        if side in self.ours:
            await self.ours[side].generate(ps, sampling=sampling, seed=0)
        else:
            await bare_batch(side.removeprefix("bare_"), self.bare[side], self.url, model, ps, sampling.max_tokens)
        return time.perf_counter() - t0, time.process_time() - c0

    async def close(self) -> None:
        for g in self.ours.values():
            await g.aclose()
        await self.bare["bare_aiohttp"].close()
        await self.bare["bare_httpx"].aclose()


async def alternate(sides: Sides, model: str, ps, sampling, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """A warm-up batch on every side (connections open, engines warm), then ``rounds``
    rounds of one batch per side in turn; closes the sides. Returns (wall s, CPU s) per round."""
    rows: dict[str, list[tuple[float, float]]] = {s: [] for s in Sides.names}
    try:
        for s in Sides.names:
            await sides.batch(s, model, ps, sampling)
        for _ in range(rounds):
            for s in Sides.names:
                rows[s].append(await sides.batch(s, model, ps, sampling))
    finally:
        await sides.close()
    return rows


def _serve_canned(port: int, payload: bytes, ready) -> None:
    """A loopback server (own process) that answers every POST with ``payload``."""
    from aiohttp import web

    async def reply(request):
        await request.read()
        return web.Response(body=payload, content_type="application/json")

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": json.loads(payload)["model"]}]})

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", reply)
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def ms(x: float) -> float:
    return round(x * 1e3, 3)


async def measure(args) -> dict:
    from dynamo_rl.config import SamplingConfig
    from dynamo_rl.models import ensure_tiny_model
    from dynamo_rl.serving.stack import LocalStack, free_port

    work = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    model_dir = ensure_tiny_model(work / "tiny")
    sampling = SamplingConfig(temperature=1.0, max_tokens=args.max_tokens)
    res: dict = {}
    with LocalStack(model_dir, workers=args.workers, quiet=True, run_dir=work / "stack") as stack:
        sides = Sides(stack.frontend_url, None, args.frontend_batch)
        model = await sides.ours["ours_aiohttp"].model()
        import httpx

        captured = httpx.post(sides.url, json=body(model, prompts(1)[0], 0, args.max_tokens), timeout=60).content
        ps = prompts(args.frontend_batch)
        rows = await alternate(sides, model, ps, sampling, args.rounds)
        res["frontend"] = {
            "batch": args.frontend_batch, "workers": args.workers, "max_tokens": args.max_tokens,
            "estimator": "median over rounds",
            "batch_seconds": {s: round(statistics.median(w for w, _ in rows[s]), 4) for s in Sides.names},
            "client_cpu_ms_per_request": {s: ms(statistics.median(c for _, c in rows[s]) / len(ps))
                                          for s in Sides.names},
            "rounds": {s: [[round(w, 4), round(c, 4)] for w, c in rows[s]] for s in Sides.names},
        }
        load = os.getloadavg()[0]

    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=_serve_canned, args=(port, captured, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the canned-response server did not start")
        res["canned"] = {"estimator": "min over rounds", "client_cpu_ms_per_request": {},
                         "requests_per_s": {}}
        for n in args.batches:
            sides = Sides(f"http://127.0.0.1:{port}", model, n)
            ps = prompts(1) * n  # the captured response echoes this prompt's ids
            rows = await alternate(sides, model, ps, sampling, args.rounds)
            res["canned"]["client_cpu_ms_per_request"][str(n)] = {
                s: ms(min(c for _, c in rows[s]) / n) for s in Sides.names}
            res["canned"]["requests_per_s"][str(n)] = {
                s: round(n / min(w for w, _ in rows[s])) for s in Sides.names}
    finally:
        server.terminate()
        server.join(10)
    res["load_average_1m"] = round(load, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frontend-batch", type=int, default=128,
                    help="requests per batch against the real frontend, all in flight (grpo_tiny: 16 x 8)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[32, 128, 256],
                    help="batch sizes (= requests in flight) against the canned-response server")
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    res = asyncio.run(measure(args))
    res["config"] = vars(args)
    write_result("generation", res, args.out)
    print(json.dumps({k: v for k, v in res.items() if k not in ("config",)} | {"frontend": {
        k: v for k, v in res["frontend"].items() if k != "rounds"}}, indent=2))


if __name__ == "__main__":
    main()
