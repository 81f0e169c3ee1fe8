"""One GRPO step's breakdown on a GPU, and our engine against ``transformers.generate``.

Model: Qwen3-0.6B shapes (hidden 1024, 28 layers, 16 q / 8 kv heads, head_dim 128,
vocab 151936, tied), random bf16 weights. Measures, in one run:
- generation tokens/s of our :class:`~dynamo_rl.serving.engine.Engine` at batch 64 and 256
  (prompt 128 tokens, 128 new tokens, ignore_eos), and of ``model.generate`` (sampling,
  same batch / lengths) → ratio;
- one GRPO training step (logprob recompute + ``updates_per_batch`` clipped-loss
  backward + AdamW) on 64 × 256-token sequences;
- refit into the engine in-process (``load_weights`` copy of every tensor; the
  cross-process CUDA IPC refit is ``benchmarks/refit_gpu.py``).

Run: ``python benchmarks/step_gpu.py`` (CUDA); ``--tiny`` runs the same code on CPU with
the tiny model, to check the script. JSON: ``benchmarks/results/step_gpu.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-6)
TINY = dict(vocab_size=53, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=True)


def build(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(Qwen3Config(**shape, eos_token_id=2, pad_token_id=0)).to(dtype)
    return model.eval()


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


async def engine_tps(engine, batch: int, prompt_len: int, new: int, vocab: int) -> dict:
    from dynamo_rl.serving.engine import SamplingParams

    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = [SamplingParams(max_tokens=new, temperature=1.0, ignore_eos=True, seed=i) for i in range(batch)]
    await asyncio.gather(*(engine.complete(p, sp) for p, sp in zip(prompts[:4], params[:4])))  # warm-up
    engine.flush_cache()
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.complete(p, sp) for p, sp in zip(prompts, params)))
    sync(engine.device)
    dt = time.perf_counter() - t0
    n = sum(len(o) for o in outs)
    engine.flush_cache()
    return {"batch": batch, "tokens": n, "seconds": dt, "tokens_per_s": n / dt}


def hf_tps(model, batch: int, prompt_len: int, new: int, vocab: int, device) -> dict:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
              pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(input_ids=ids[:4], attention_mask=torch.ones_like(ids[:4]), **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        sync(device)
    dt = time.perf_counter() - t0
    n = (out.shape[1] - prompt_len) * batch
    return {"batch": batch, "tokens": n, "seconds": dt, "tokens_per_s": n / dt}


def train_step(model, batch: int, seq: int, gen: int, updates: int, device) -> dict:
    from dynamo_rl.rl.grpo import group_advantages, grpo_loss, token_logprobs

    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), device=device)
    attn = torch.ones_like(ids)
    mask = torch.zeros(batch, seq, device=device)
    mask[:, seq - gen:] = 1
    adv = group_advantages(torch.rand(batch), 8).to(device)
    times = []
    model.train()
    for it in range(3):  # first is warm-up
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            old = token_logprobs(model, ids, attn)
        for _ in range(updates):
            logp = token_logprobs(model, ids, attn)
            grpo_loss(logp, old, adv, mask, 0.2).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    model.eval()
    del opt
    return {"batch": batch, "seq_len": seq, "updates": updates, "seconds": min(times[1:]), "all_seconds": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with the tiny model")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for a CPU check")
    dtype = torch.float32 if a.tiny else torch.bfloat16
    shape = TINY if a.tiny else QWEN3_0_6B
    batches = [int(b) for b in a.batches.split(",")]
    if a.tiny:
        batches, a.prompt_len, a.new_tokens = [8, 16], 16, 16
    from dynamo_rl.serving.engine import Engine

    trainer = build(shape, device, dtype, seed=0)
    served = build(shape, device, dtype, seed=1)
    nparams = sum(p.numel() for p in trainer.parameters())
    engine = Engine(served, eos_token_ids=[2], device=device, max_batch_size=max(batches),
                    max_seq_len=a.prompt_len + a.new_tokens + 8)

    async def gen_all():
        await engine.start()
        try:
            return [await engine_tps(engine, b, a.prompt_len, a.new_tokens, shape["vocab_size"]) for b in batches]
        finally:
            await engine.stop()

    ours = asyncio.run(gen_all())
    for r in ours:
        print(f"engine    batch {r['batch']:>4}: {r['tokens_per_s']:>10,.0f} tok/s")
    hf = [hf_tps(served, b, a.prompt_len, a.new_tokens, shape["vocab_size"], device) for b in batches]
    for r in hf:
        print(f"hf.generate batch {r['batch']:>4}: {r['tokens_per_s']:>10,.0f} tok/s")
    tr = train_step(trainer, min(64, max(batches)), a.prompt_len + a.new_tokens, a.new_tokens, 2, device)
    print(f"train step (64 x {tr['seq_len']}, 2 updates): {tr['seconds']:.3f} s")

    async def refit():
        await engine.start()
        try:
            tensors = {n: p.detach() for n, p in trainer.named_parameters()}
            times = []
            for v in (1, 2, 3):
                sync(device)
                t0 = time.perf_counter()
                rep = await engine.load_weights(tensors, v, adopt=False)
                sync(device)
                times.append(time.perf_counter() - t0)
            return {"bytes": rep["bytes"], "seconds": min(times[1:]), "all_seconds": times,
                    "gb_per_s": rep["bytes"] / min(times[1:]) / 1e9}
        finally:
            await engine.stop()

    rf = asyncio.run(refit())
    print(f"refit in-process copy: {rf['bytes'] / 1e9:.2f} GB in {rf['seconds'] * 1e3:.1f} ms ({rf['gb_per_s']:.0f} GB/s)")
    ratio = {str(o["batch"]): o["tokens_per_s"] / h["tokens_per_s"] for o, h in zip(ours, hf)}
    write_result("step_gpu" if not a.tiny else "step_gpu_tiny_cpu", {
        "model": {"shape": "Qwen3-0.6B" if not a.tiny else "tiny", "parameters": nparams, "dtype": str(dtype)},
        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
        "engine_generation": ours, "hf_generate": hf, "engine_over_hf_generate": ratio,
        "train_step": tr, "refit_in_process": rf,
        "step_seconds_estimate_batch64": (64 * a.new_tokens / ours[0]["tokens_per_s"]) + tr["seconds"] + rf["seconds"],
    }, a.out)


if __name__ == "__main__":
    main()
