"""One engine's prefill forward against its decode step, and where the prefill's time goes.

Claim measured: what a prefill forward costs relative to a decode step, per prompt count.
Through the frontend, requests reach the engine staggered, so it runs more prefill forwards
than in-process for the same work (on an H100, `serving_gpu_h100_c32*.json`: 12 against 6
in 396 against 384 forwards). A py-spy of that run (2026-12-07) put the engine thread's
prefill calls at 38% of its samples for 3% of its forwards, most of it inside
``_qwen3.attend``: a prefill then costs some 20 decode steps, which a plain eager forward of
this model should not. This benchmark times both in one process, side by side, and lists
the top operators of a prefill by self CPU and self device time (``torch.profiler``), so
that one run on the GPU machine says which call it is. It did (H100, 2026-12-07,
``forward_h100.json``): a prefill of a known shape costs 3 decode steps (9.1 against 3.0 ms),
but one of a new shape 37 ms, in cuDNN's attention, which builds a plan per new shape.

- prefill: ``ModelRunner.prefill`` of ``k`` prompts of ``--prompt-len`` tokens into slots
  ``0..k-1`` (eager, as the engine runs it), then the logits to the host (the
  synchronisation the engine's sampling does); ``new_shape_first_call`` against
  ``new_shape_second_call``: prompt lengths not used before, each run twice (a cost per new
  shape, such as a kernel plan built on first use, shows in the first call only).
- prefill_default_order: the same prefill with every ``scaled_dot_product_attention``
  backend enabled, in torch's default order (cuDNN first on an H100), instead of the
  engine's (:data:`~dynamo_rl.serving.model_runner.PREFILL_SDPA_BACKENDS`: cuDNN's off, so
  flash attention runs), same and new shapes: cuDNN builds a plan per new shape (on CPU
  both are the same call).
- prefill_masked: the same prefill with ``Batch.fresh`` off: attention over the slots'
  cached keys/values under a mask, as a prefill after a cached prefix runs (and every
  prefill before the fresh path), against the one fused causal call of a fresh batch.
- decode: ``ModelRunner.forward_and_sample`` of ``k`` one-token rows (the CUDA graph on
  CUDA, as the engine; greedy).

Run: ``python benchmarks/forward.py`` (CPU, the tiny model) or on the GPU machine
``python benchmarks/forward.py --device cuda --dtype bfloat16 --tiny '{...}'`` (the spec
of ``serving_gpu_*.json``) → ``benchmarks/results/forward[_<device>].json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402


def _ms(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def _top(prof, key: str, n: int = 12) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:n]
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
             "self_device_ms": round(getattr(e, "self_device_time_total", 0.0) / 1e3, 3)} for e in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tiny", default="{}", help="JSON of TinyModelSpec fields (default: the tiny model)")
    ap.add_argument("--rows", default="1,8,32", help="prompt counts k, comma separated")
    ap.add_argument("--prompt-len", type=int, default=21)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    from torch.nn.attention import SDPBackend
    from torch.profiler import ProfilerActivity, profile

    from dynamo_rl.models import TinyModelSpec, ensure_tiny_model
    from dynamo_rl.serving import _qwen3, _sampling
    from dynamo_rl.serving.engine import Engine
    from dynamo_rl.serving.model_runner import PREFILL_SDPA_BACKENDS

    rows = [int(x) for x in args.rows.split(",")]
    model_dir = ensure_tiny_model(Path(tempfile.mkdtemp(prefix="forward-")) / "model",
                                  TinyModelSpec(**json.loads(args.tiny)))
    engine = Engine.from_pretrained(model_dir, device=args.device, dtype=args.dtype, max_batch_size=max(rows))
    runner = engine._runner
    vocab = engine.shape.vocab_size
    on_cuda = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    torch.set_num_threads(1)

    def prompts(k: int, length: int) -> list[list[int]]:
        return [[1 + (7 * i + 3 * j) % (vocab - 1) for j in range(length)] for i in range(k)]

    def prefill(k: int, length: int) -> None:
        with torch.no_grad():  # as the engine (ModelRunner.forward_and_sample)
            runner.prefill(prompts(k, length), list(range(k)), [0] * k).float().cpu()

    def prefill_default_order(k: int, length: int) -> None:
        # runner.prefill's forward without its choice of attention backends: torch's default
        batch = _qwen3.make_batch(prompts(k, length), list(range(k)), [0] * k, engine.device)
        with torch.no_grad():
            _qwen3.forward(runner.model, runner.cache, batch, runner._cos, runner._sin).float().cpu()

    def prefill_masked(k: int, length: int) -> None:
        # the same forward with fresh=False: attention over the slots' cached keys/values with
        # a mask (the path of every prefill before the fresh-batch path), in the engine's order
        batch = dataclasses.replace(_qwen3.make_batch(prompts(k, length), list(range(k)), [0] * k, engine.device),
                                    fresh=False)
        with torch.no_grad(), runner._attention_backends():
            _qwen3.forward(runner.model, runner.cache, batch, runner._cos, runner._sin).float().cpu()

    def decode(k: int, start: int) -> None:
        runner.forward_and_sample([[5]] * k, list(range(k)), [start] * k, [0.0] * k, [0] * k, [1.0] * k,
                                  _sampling.draw_keys([None] * k))

    results = []
    unused_lengths = iter(range(args.prompt_len + 1, engine.max_seq_len // 2))
    for k in rows:
        prefill(k, args.prompt_len)  # warm-up (and the cache holds the prompts for decode)
        decode(k, args.prompt_len)
        same = [_ms(lambda: prefill(k, args.prompt_len), sync) for _ in range(args.repeats)]
        lengths = [next(unused_lengths) for _ in range(min(args.repeats, 5))]
        first = [_ms(lambda: prefill(k, n), sync) for n in lengths]
        again = [_ms(lambda: prefill(k, n), sync) for n in lengths]
        same_default = [_ms(lambda: prefill_default_order(k, args.prompt_len), sync) for _ in range(args.repeats)]
        lengths = [next(unused_lengths) for _ in range(min(args.repeats, 5))]
        first_default = [_ms(lambda: prefill_default_order(k, n), sync) for n in lengths]
        again_default = [_ms(lambda: prefill_default_order(k, n), sync) for n in lengths]
        masked = [_ms(lambda: prefill_masked(k, args.prompt_len), sync) for _ in range(args.repeats)]
        dec = [_ms(lambda: decode(k, args.prompt_len), sync) for _ in range(args.repeats)]
        row = {"rows": k, "prefill_same_shape_ms": round(statistics.median(same), 3),
               "prefill_new_shape_first_call_ms": round(statistics.median(first), 3),
               "prefill_new_shape_second_call_ms": round(statistics.median(again), 3),
               "prefill_default_order_same_shape_ms": round(statistics.median(same_default), 3),
               "prefill_default_order_new_shape_first_call_ms": round(statistics.median(first_default), 3),
               "prefill_default_order_new_shape_second_call_ms": round(statistics.median(again_default), 3),
               "prefill_masked_ms": round(statistics.median(masked), 3),
               "decode_step_ms": round(statistics.median(dec), 3)}
        row["prefill_over_decode"] = round(row["prefill_same_shape_ms"] / row["decode_step_ms"], 2)
        results.append(row)
        print(json.dumps(row), flush=True)

    k = max(rows)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            prefill(k, args.prompt_len)
            sync()
    payload = {  # write_result adds the benchmark's name, the date, the command and the machine
        "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "dtype": args.dtype, "tiny": json.loads(args.tiny), "prompt_len": args.prompt_len,
        "repeats": args.repeats, "cuda_graphs": runner.graph_count,
        "sdp_default_order": [SDPBackend(int(b)).name for b in torch._C._get_sdp_priority_order()],
        "sdp_engine_backends": [b.name for b in PREFILL_SDPA_BACKENDS] if on_cuda else "all",
        "unit": "milliseconds of wall time per call, synchronised",
        "levels": results,
        "prefill_profile_rows": k,
        "prefill_top_self_cpu": _top(prof, "self_cpu_time_total"),
        "prefill_top_self_device": _top(prof, "self_device_time_total") if on_cuda else [],
    }
    suffix = "" if not on_cuda else "_" + payload["device"].split()[1].lower()
    write_result("forward" + suffix, payload, args.out)


if __name__ == "__main__":
    main()
