"""Engine tests on the tiny Qwen3 (CPU, fp32): numerics against a plain HF forward and
``generate``, batching, sampling, stop conditions, pause/resume/flush, weight loading.
A CUDA variant of the numerics test runs on a GPU machine (``-m gpu``)."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
import torch

from dynamo_rl.models import build_tiny_model
from dynamo_rl.models.tiny import TinyModelSpec
from dynamo_rl.serving.engine import Engine, SamplingParams, TokenOutput, WeightsError

EOS = 2
PROMPTS = [[1, 10, 11, 12, 13], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 40]]


@pytest.fixture(scope="module")
def model_a():
    torch.set_num_threads(1)
    return build_tiny_model()


@pytest.fixture(scope="module")
def model_b():
    return build_tiny_model(TinyModelSpec(seed=1))


def fresh(model):
    """A private copy of ``model`` (engines may swap its weights)."""
    m = build_tiny_model(TinyModelSpec(seed=0))
    m.load_state_dict(model.state_dict())
    return m


@pytest_asyncio.fixture
async def engine(model_a):
    eng = Engine(fresh(model_a), eos_token_ids=[EOS], max_batch_size=48)
    await eng.start()
    yield eng
    await eng.stop()


def hf_logprobs(model, prompt, ids, device="cpu"):
    """log_softmax of a plain HF forward of ``prompt + ids``, at each generated token (fp32)."""
    with torch.no_grad():
        full = torch.tensor([prompt + ids], device=device)
        lp = torch.log_softmax(model(full).logits.float(), dim=-1)[0]
    return torch.stack([lp[len(prompt) - 1 + i, t] for i, t in enumerate(ids)]).cpu()


def hf_greedy(model, prompt, n, device="cpu", eos=EOS):
    """``model.generate(do_sample=False)`` ids after the prompt (stops at ``eos`` like the engine)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=device), do_sample=False,
                             max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def ids_of(outs: list[TokenOutput]) -> list[int]:
    return [o.token_id for o in outs]


def lps_of(outs: list[TokenOutput]) -> torch.Tensor:
    return torch.tensor([o.logprob for o in outs], dtype=torch.float32)


async def check_numerics(engine, model, device) -> list[list[int]]:
    """Greedy, filtered-sampled and plain-sampled requests of PROMPTS, all arriving together:
    logprobs equal a plain HF forward, greedy ids equal ``generate``. Returns the ids of the
    plain-sampled requests (seeds 11, 12, ...)."""
    greedy = SamplingParams(max_tokens=24, temperature=0)
    filtered = SamplingParams(max_tokens=24, temperature=0.9, top_k=20, top_p=0.95, seed=7, ignore_eos=True)
    plain = [SamplingParams(max_tokens=24, temperature=0.8, seed=11 + i, ignore_eos=True) for i in range(len(PROMPTS))]
    jobs = ([engine.complete(p, greedy) for p in PROMPTS] + [engine.complete(p, filtered) for p in PROMPTS]
            + [engine.complete(p, sp) for p, sp in zip(PROMPTS, plain)])
    results = await asyncio.gather(*jobs)  # arrive together: padded prefill + batched decode
    for prompt, outs in zip(PROMPTS * 3, results):
        ref = hf_logprobs(model, prompt, ids_of(outs), device)
        assert (lps_of(outs) - ref).abs().max().item() < 1e-5
    for prompt, outs in zip(PROMPTS, results[: len(PROMPTS)]):
        assert ids_of(outs) == hf_greedy(model, prompt, 24, device)
    assert engine.stats["max_decode_batch"] == 3 * len(PROMPTS)
    return [ids_of(o) for o in results[2 * len(PROMPTS):]]


@pytest.mark.asyncio
async def test_logprobs_and_greedy_match_hf(engine, model_a):
    await check_numerics(engine, model_a, "cpu")


@pytest.mark.gpu
@pytest.mark.asyncio
@pytest.mark.parametrize("cuda_graphs", [True, False])
async def test_logprobs_and_greedy_match_hf_cuda(model_a, model_b, cuda_graphs):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = fresh(model_a).to("cuda")
    eng = Engine(model, eos_token_ids=[EOS], device="cuda", max_batch_size=16, cuda_graphs=cuda_graphs,
                 prefill_chunk=4)  # chunked prefill too
    try:
        plain = await check_numerics(eng, model, "cuda")
        # the same seeds give the same ids on the CPU engine (noise is device independent)
        cpu = Engine(fresh(model_a), eos_token_ids=[EOS], max_batch_size=16)
        try:
            assert await check_numerics(cpu, cpu.model, "cpu") == plain
        finally:
            await cpu.stop()
        # adopt=True gives the parameters new storage: captured graphs must follow
        b = {n: t.to("cuda") for n, t in model_b.state_dict().items() if n in eng.param_specs()}
        await eng.load_weights(b, version=1, adopt=True)
        outs = await asyncio.gather(*[eng.complete(p, SamplingParams(max_tokens=16, temperature=0))
                                      for p in PROMPTS])
        for p, o in zip(PROMPTS, outs):
            assert ids_of(o) == hf_greedy(model_b, p, 16)
        # in place (the worker's refit path on CUDA): the parameters keep their addresses,
        # so the graphs captured above are kept and replay the new weights
        a = {n: t.to("cuda") for n, t in model_a.state_dict().items() if n in eng.param_specs()}
        for inline in (False, True):
            graphs = eng.stats["cuda_graphs"]
            assert graphs > 0 or not cuda_graphs
            res = await eng.load_weights_in_place(
                lambda params: [params[n].copy_(a[n]) for n in params], 2 + inline, inline=inline)
            assert res["version"] == eng.weights_version == 2 + inline
            assert eng.stats["cuda_graphs"] == graphs
            outs = await asyncio.gather(*[eng.complete(p, SamplingParams(max_tokens=16, temperature=0))
                                          for p in PROMPTS])
            for p, o in zip(PROMPTS, outs):
                assert ids_of(o) == hf_greedy(model_a, p, 16)
                assert {t.weights_version for t in o} == {2 + inline}
    finally:
        await eng.stop()


def _sdpa_settings() -> tuple:
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled(),
            list(torch._C._get_sdp_priority_order()))


@pytest.mark.gpu
def test_a_cuda_prefill_leaves_cudnn_attention_out_and_torch_settings_as_found(model_a):
    # cuDNN's attention builds a plan per new shape (37 against 9 ms for a new prefill shape on
    # an H100, benchmarks/results/forward_h100.json): the engine's eager forwards turn it off
    # for their own calls only
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from torch.profiler import ProfilerActivity, profile

    before = _sdpa_settings()
    eng = Engine(fresh(model_a).to(dtype=torch.bfloat16), eos_token_ids=[EOS], device="cuda", max_batch_size=4,
                 cuda_graphs=False)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        logits = eng._runner.prefill([PROMPTS[0], PROMPTS[1]], [0, 1], [0, 0])
    assert logits.shape == (2, eng.shape.vocab_size)
    ops = [e.key for e in prof.key_averages()]
    assert any("scaled_dot_product" in k for k in ops)
    assert not [k for k in ops if "cudnn_attention" in k]
    assert _sdpa_settings() == before


@pytest.mark.asyncio
async def test_from_pretrained_reads_eos_and_serves(tiny_model_dir, model_a):
    eng = Engine.from_pretrained(tiny_model_dir, max_batch_size=4)
    try:
        assert eng.eos_token_ids == (EOS,)
        assert eng.model_config["model_type"] == "qwen3"
        assert eng.layout == {"tp_rank": 0, "tp_size": 1}
        outs = await eng.complete(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0))
        assert ids_of(outs) == hf_greedy(model_a, PROMPTS[0], 12)
        assert all(o.weights_version == 0 for o in outs)
    finally:
        await eng.stop()


@pytest.mark.asyncio
async def test_seed_fixes_ids_whatever_the_batch(engine):
    params = lambda seed: SamplingParams(max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)  # noqa: E731
    alone = ids_of(await engine.complete(PROMPTS[0], params(123)))
    crowd = await asyncio.gather(
        engine.complete(PROMPTS[0], params(123)),
        engine.complete(PROMPTS[0], params(456)),
        *[engine.complete(p, params(9)) for p in PROMPTS[1:]],
    )
    assert ids_of(crowd[0]) == alone
    assert ids_of(crowd[1]) != alone


@pytest.mark.asyncio
async def test_a_finished_request_leaves_the_burst_and_the_others_go_on(engine):
    """A (2 tokens) and B (9) decode together: A finishes at the first decode step; its last
    token reaches its stream at once, before B's tokens of that burst, and B decodes on in
    the same hand-off. Hand-offs 4 + 4 steps (one per burst of B), not 1 + 4 + 3."""
    params = {"A": SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
              "B": SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)}
    arrivals: list[tuple[str, int]] = []

    async def consume(name):
        chunks = []
        async for chunk in engine.generate_chunks([1, 9, 8] if name == "A" else [1, 7, 6, 5], params[name]):
            arrivals.append((name, len(chunk)))
            chunks.append(chunk)
        return chunks

    engine.flush_cache()
    before = engine.stats
    a, b = await asyncio.gather(consume("A"), consume("B"))
    stats = engine.stats
    assert [len(c) for c in a] == [1, 1] and [len(c) for c in b] == [1, 4, 4]
    assert arrivals.index(("A", 1), 1) < arrivals.index(("B", 4))  # A's last token came first
    assert stats["decode_handoffs"] - before["decode_handoffs"] == 2
    assert stats["decode_batches"] - before["decode_batches"] == 8
    assert a[-1][-1].finish_reason == b[-1][-1].finish_reason == "length"
    alone = await engine.complete([1, 7, 6, 5], params["B"])
    assert [o.token_id for c in b for o in c] == [o.token_id for o in alone]


@pytest.mark.asyncio
async def test_chunks_hold_the_same_tokens_as_the_token_stream(engine):
    """generate_chunks: every token ready at a delivery in one list; the concatenation is
    exactly generate's ids and logprobs, the last list ends with the finish reason."""
    params = SamplingParams(max_tokens=11, temperature=1.0, seed=7, ignore_eos=True)
    single = [o async for o in engine.generate(PROMPTS[0], params)]
    chunks = [c async for c in engine.generate_chunks(PROMPTS[0], params)]
    flat = [o for c in chunks for o in c]
    assert [o.token_id for o in flat] == [o.token_id for o in single]
    # (the second request reuses the first one's cached prefix: sums in another order)
    torch.testing.assert_close(torch.tensor([o.logprob for o in flat]), torch.tensor([o.logprob for o in single]),
                               rtol=0, atol=1e-5)
    assert [len(c) for c in chunks] == [1, 4, 4, 2]   # prefill, then decode_steps=4 per hand-off
    assert flat[-1].finish_reason == "length" and all(o.finish_reason is None for o in flat[:-1])


def test_sampler_draws_from_the_filtered_distribution():
    """4000 rows x 25 steps, each row its own seeded generator: frequencies within 4 sigma;
    top-k / top-p never pick a token outside their set; logprobs are of the raw logits."""
    from dynamo_rl.serving import _sampling

    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    B = 4000
    logits = p.log()[None].expand(B, 5).contiguous()
    gens = [torch.Generator().manual_seed(i) for i in range(B)]
    counts = torch.zeros(5)
    for _ in range(25):
        ids, lps = _sampling.sample(logits, [1.0] * B, [0] * B, [1.0] * B, _sampling.draw_keys(gens))
        counts += torch.bincount(torch.tensor(ids), minlength=5)
        assert torch.allclose(torch.tensor(lps), p.log()[torch.tensor(ids)])
    n = counts.sum()
    sigma = (counts / n - p) / (p * (1 - p) / n).sqrt()
    assert sigma.abs().max().item() < 4, sigma
    half = [1.0] * B
    # softmax(0.5 * log p) = [.343, .243, .172, .121, .121]; top-p sees top-k's renormalized mass
    cases = ((2, 1.0, {0, 1}), (0, 0.7, {0, 1, 2}), (0, 0.5, {0, 1}), (0, 0.3, {0}), (3, 0.75, {0, 1}),
             (3, 0.8, {0, 1, 2}))
    for top_k, top_p, allowed in cases:
        ids, lps = _sampling.sample(logits * 0.5, half, [top_k] * B, [top_p] * B, _sampling.draw_keys(gens))
        assert set(ids) == allowed
        assert torch.allclose(torch.tensor(lps), torch.log_softmax(p.log() * 0.5, -1)[torch.tensor(ids)])


@pytest.mark.asyncio
async def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    greedy = ids_of(await engine.complete(PROMPTS[2], SamplingParams(max_tokens=16, temperature=0)))
    for params in (SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=1),
                   SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, seed=2)):
        assert ids_of(await engine.complete(PROMPTS[2], params)) == greedy


@pytest.mark.asyncio
async def test_32_concurrent_requests_are_decoded_together(engine):
    prompts = [[1] + [4 + (i * 7 + j) % 40 for j in range(1 + i % 9)] for i in range(32)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    alone = [await engine.complete(p, params) for p in prompts[:3]]
    before = engine.stats
    results = await asyncio.gather(*[engine.complete(p, params) for p in prompts])
    stats = engine.stats
    assert [len(r) for r in results] == [10] * 32
    assert all(r[-1].finish_reason == "length" for r in results)
    assert stats["max_decode_batch"] == 32
    assert stats["decode_batches"] - before["decode_batches"] == 9  # 1 prefill + 9 batched decode steps
    assert stats["decode_handoffs"] - before["decode_handoffs"] == 3  # 4 + 4 + 1 steps (decode_steps=4)
    assert stats["requests_running"] == 0 and stats["requests_waiting"] == 0
    for one, batched in zip(alone, results):  # batching does not change a request's result
        assert ids_of(one) == ids_of(batched)
        assert (lps_of(one) - lps_of(batched)).abs().max().item() < 1e-5


@pytest.mark.asyncio
@pytest.mark.parametrize("mix", [False, True], ids=["separate", "mixed"])
async def test_churn_slot_reuse_stays_exact(model_a, mix):
    """Requests of different lengths arrive while others run and finish; 5 slots are reused
    (prefix hits or evictions, as timing has it), arrivals prefilled alone or with the running
    rows (``mix_prefill_decode``). Every result equals a plain HF forward."""
    eng = Engine(fresh(model_a), eos_token_ids=[EOS], max_batch_size=5, mix_prefill_decode=mix)
    prompts = [[1] + [4 + (i * 5 + j * 3) % 45 for j in range(2 + i % 6)] for i in range(12)]
    prompts += [p + [7, 8] for p in prompts[:4]]  # extend earlier prompts: prefix hits
    jobs = []
    try:
        for i, p in enumerate(prompts):
            params = SamplingParams(max_tokens=2 + (i * 7) % 13, temperature=0.0 if i % 2 else 0.8,
                                    seed=i, ignore_eos=True)
            jobs.append(asyncio.create_task(eng.complete(p, params)))
            for _ in range(i % 3):
                await asyncio.sleep(0.005)  # let some steps run before the next arrival
        results = await asyncio.gather(*jobs)
        stats = eng.stats
    finally:
        await eng.stop()
    assert stats["max_decode_batch"] >= 2  # requests 0 and 1 arrive together, whatever the timing
    for i, (p, outs) in enumerate(zip(prompts, results)):
        assert len(outs) == 2 + (i * 7) % 13 and outs[-1].finish_reason == "length"
        assert (lps_of(outs) - hf_logprobs(model_a, p, ids_of(outs))).abs().max().item() < 1e-5
        if i % 2:
            assert ids_of(outs) == hf_greedy(model_a, p, len(outs), eos=None)


@pytest.mark.asyncio
@pytest.mark.parametrize("mix", [True, False])
async def test_an_arrival_rides_the_running_decode(model_a, mix):
    """B arrives while A decodes: with ``mix_prefill_decode`` A's next token is decoded in
    B's prefill forward (one forward fewer, ``mixed_batches`` 1); results equal HF either way."""
    eng = Engine(fresh(model_a), eos_token_ids=[EOS], max_batch_size=4, decode_steps=1,
                 mix_prefill_decode=mix)
    a_prompt, b_prompt = PROMPTS[0], PROMPTS[2]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    try:
        stream = eng.generate(a_prompt, params)
        a = [await anext(stream) for _ in range(3)]  # A is running (prefilled, 2 decodes)
        b_task = asyncio.create_task(eng.complete(b_prompt, params))
        a += [out async for out in stream]
        b = await b_task
        stats = eng.stats
    finally:
        await eng.stop()
    for prompt, outs in ((a_prompt, a), (b_prompt, b)):
        assert ids_of(outs) == hf_greedy(model_a, prompt, 8, eos=None)
        assert (lps_of(outs) - hf_logprobs(model_a, prompt, ids_of(outs))).abs().max().item() < 1e-5
    assert stats["mixed_batches"] == (1 if mix else 0)
    assert stats["prefill_batches"] == 2
    # 14 decoded tokens (7 each after its prefill): one of A's came from the mixed forward
    assert stats["forward_passes"] == stats["prefill_batches"] + stats["decode_batches"]
    assert stats["tokens_generated"] == 16
    assert 0 < stats["forward_seconds"] < 60   # wall time of the forward calls, in seconds


@pytest.mark.asyncio
async def test_more_requests_than_slots_all_complete(model_a):
    eng = Engine(fresh(model_a), eos_token_ids=[EOS], max_batch_size=4)
    try:
        params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        results = await asyncio.gather(*[eng.complete(PROMPTS[i % 4], params) for i in range(10)])
        wall = time.perf_counter() - t0
        assert [len(r) for r in results] == [5] * 10
        stats = eng.stats
        assert stats["max_decode_batch"] == 4
        # 6 of the 10 waited for a slot: time queued, within each request's time in the engine
        assert stats["requests_finished"] == 10
        assert 0 < stats["queue_seconds"] < stats["request_seconds"] <= 10 * wall
        assert stats["request_seconds"] >= 10 * 5 * stats["forward_seconds"] / stats["forward_passes"] / 4
    finally:
        await eng.stop()


@pytest.mark.asyncio
async def test_stop_ids_max_tokens_and_eos(model_a):
    eng = Engine(fresh(model_a), eos_token_ids=[EOS], max_batch_size=8)
    try:
        prompt = PROMPTS[2]
        free = ids_of(await eng.complete(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)))
        stop = free[3]
        first = free.index(stop)
        outs = await eng.complete(prompt, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop]))
        assert ids_of(outs) == free[: first + 1] and outs[-1].finish_reason == "stop"
        assert all(o.finish_reason is None for o in outs[:-1])
        outs = await eng.complete(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        assert ids_of(outs) == free[:5] and outs[-1].finish_reason == "length"
    finally:
        await eng.stop()
    # the same token as the engine's EOS: ends the stream unless ignore_eos
    eng = Engine(fresh(model_a), eos_token_ids=[stop], max_batch_size=8)
    try:
        outs = await eng.complete(prompt, SamplingParams(max_tokens=20, temperature=0))
        assert ids_of(outs) == free[: first + 1] and outs[-1].finish_reason == "stop"
        outs = await eng.complete(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        assert ids_of(outs) == free and outs[-1].finish_reason == "length"
    finally:
        await eng.stop()


@pytest.mark.asyncio
async def test_max_seq_len_ends_with_length(model_a):
    eng = Engine(fresh(model_a), eos_token_ids=[EOS], max_batch_size=2, max_seq_len=12)
    try:
        outs = await eng.complete(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        assert len(PROMPTS[0]) + len(outs) == 12 and outs[-1].finish_reason == "length"
        with pytest.raises(ValueError, match="max_seq_len=12"):
            eng.generate(list(range(1, 13)), SamplingParams())
    finally:
        await eng.stop()


@pytest.mark.asyncio
async def test_bad_requests_are_refused_at_call(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([1, engine.shape.vocab_size], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_unsupported_layout_is_refused_with_the_reason():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dynamo_rl.serving.engine import UnsupportedModelError

    cfg = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                      sliding_window=16, max_window_layers=1)
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        Engine(Qwen3ForCausalLM(cfg), eos_token_ids=[EOS])


@pytest.mark.asyncio
async def test_pause_drains_in_flight_and_holds_new_requests(engine):
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    stream = engine.generate(PROMPTS[0], long)
    first = await anext(stream)
    assert first.finish_reason is None
    res = await engine.pause()
    assert res["paused"] and res["drained"] == 1 and res["aborted"] == 0
    assert engine.stats["requests_running"] == 0
    rest = [o async for o in stream]  # already produced: the stream was not cut
    assert len(rest) == 39 and rest[-1].finish_reason == "length"

    got: list[TokenOutput] = []

    async def consume():
        async for out in engine.generate(PROMPTS[1], SamplingParams(max_tokens=6, temperature=0,
                                                                    ignore_eos=True)):
            got.append(out)

    task = asyncio.create_task(consume())
    for _ in range(50):  # the scheduler gets many chances to run; paused → no tokens
        await asyncio.sleep(0.002)
    assert got == [] and engine.stats["requests_waiting"] == 1 and engine.paused
    assert (await engine.resume())["paused"] is False
    await task
    assert len(got) == 6 and got[-1].finish_reason == "length"


@pytest.mark.asyncio
async def test_pause_timeout_aborts_running_requests(engine):
    stream = engine.generate(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    await anext(stream)
    res = await engine.pause(timeout_s=0.0)
    assert res["aborted"] == 1
    rest = [o async for o in stream]
    assert rest[-1].finish_reason == "abort" and len(rest) < 199
    await engine.resume()


@pytest.mark.asyncio
async def test_abort_and_closing_a_stream(engine):
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    stream = engine.generate(PROMPTS[0], long)
    await anext(stream)
    await stream.aclose()  # the consumer went away: the engine frees the slot
    await engine.pause()  # returns only when nothing runs
    assert engine.stats["requests_running"] == 0

    waiting = engine.generate(PROMPTS[1], long, request_id="w")
    task = asyncio.create_task(anext(waiting, "ended"))
    while engine.stats["requests_waiting"] == 0:
        await asyncio.sleep(0.001)
    assert engine.abort("w") and await task == "ended"  # no token, the iterator just stops
    assert engine.stats["requests_waiting"] == 0 and not engine.abort("w")
    await engine.resume()

    running = engine.generate(PROMPTS[1], long, request_id="r")
    await anext(running)
    assert engine.abort("r")
    rest = [o async for o in running]
    assert rest[-1].finish_reason == "abort" and len(rest) < 199
    first = engine.generate(PROMPTS[0], long, request_id="x")
    await anext(first)
    with pytest.raises(ValueError, match="already in flight"):
        engine.generate(PROMPTS[0], long, request_id="x")
    await first.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("family", ["llama3-rope-untied", "qwen2-qkv-bias"])
async def test_llama_and_qwen2_layouts_match_hf(family):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS, pad_token_id=0,
              bos_token_id=None)
    torch.manual_seed(0)
    if family.startswith("llama"):
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        model = LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=False, rope_parameters=rope)).eval()
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw, tie_word_embeddings=True)).eval()
    eng = Engine(model, eos_token_ids=[EOS], max_batch_size=4)
    try:
        assert ("lm_head.weight" in eng.param_specs()) == family.endswith("untied")
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        outs = await asyncio.gather(*[eng.complete(p, params) for p in PROMPTS[:2]])
        for p, o in zip(PROMPTS, outs):
            assert (lps_of(o) - hf_logprobs(model, p, ids_of(o))).abs().max().item() < 1e-5
            with torch.no_grad():
                ref = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=40, eos_token_id=None)
            assert ids_of(o) == ref[0, len(p):].tolist()
    finally:
        await eng.stop()


@pytest.mark.asyncio
async def test_flush_cache_empties_kv_cache(engine):
    await asyncio.gather(*[engine.complete(p, SamplingParams(max_tokens=8, temperature=0)) for p in PROMPTS])
    held = engine.stats["kv_cache_tokens"]
    assert held > 0
    assert engine.flush_cache() == {"freed_tokens": held}
    assert engine.stats["kv_cache_tokens"] == 0
    # a running request needs its cache: refused with the fix named
    stream = engine.generate(PROMPTS[0], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    await anext(stream)
    with pytest.raises(RuntimeError, match="pause"):
        engine.flush_cache()
    await stream.aclose()


@pytest.mark.asyncio
async def test_prefix_reuse_gives_the_same_result(model_a):
    """Turn 2 extends turn 1's prompt + generation: its prefill re-uses turn 1's KV slot."""
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    turn1 = PROMPTS[2]
    results = {}
    for caching in (True, False):
        eng = Engine(fresh(model_a), eos_token_ids=[EOS], max_batch_size=4, prefix_caching=caching)
        try:
            out1 = await eng.complete(turn1, params)
            turn2 = turn1 + ids_of(out1) + [2, 1, 40, 41]
            results[caching] = await eng.complete(turn2, params)
            hits = eng.stats["prefix_cache_hit_tokens"]
        finally:
            await eng.stop()
        assert hits == (len(turn1) + 9 if caching else 0)  # all but the last generated token
    assert ids_of(results[True]) == ids_of(results[False])
    assert (lps_of(results[True]) - lps_of(results[False])).abs().max().item() < 1e-5


@pytest.mark.asyncio
async def test_group_of_identical_prompts_is_prefilled_once(engine, model_a):
    """n samples of one prompt (a GRPO group) share one prefill; each is still exact."""
    sampled = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in range(4)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = await asyncio.gather(*[engine.complete(PROMPTS[2], p) for p in sampled],
                                engine.complete(PROMPTS[2], greedy), engine.complete(PROMPTS[2], greedy),
                                engine.complete(PROMPTS[0], greedy))
    assert engine.stats["prefill_shared_tokens"] == 5 * len(PROMPTS[2])
    assert engine.stats["prefill_batches"] == 1
    for p, o in zip([PROMPTS[2]] * 6 + [PROMPTS[0]], outs):
        assert (lps_of(o) - hf_logprobs(model_a, p, ids_of(o))).abs().max().item() < 1e-5
    assert ids_of(outs[4]) == ids_of(outs[5]) == hf_greedy(model_a, PROMPTS[2], 12)
    assert len({tuple(ids_of(o)) for o in outs[:4]}) == 4  # the seeds differ, so do the samples


@pytest.mark.asyncio
async def test_chunked_prefill_matches_hf(model_a):
    """Prompts longer than prefill_chunk are prefilled in pieces: same logprobs and ids."""
    eng = Engine(fresh(model_a), eos_token_ids=[EOS], max_batch_size=4, prefill_chunk=3)
    try:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        outs = await asyncio.gather(*[eng.complete(p, params) for p in PROMPTS])
        for p, o in zip(PROMPTS, outs):
            assert (lps_of(o) - hf_logprobs(model_a, p, ids_of(o))).abs().max().item() < 1e-5
            assert ids_of(o) == hf_greedy(model_a, p, 12)
    finally:
        await eng.stop()


def snapshot(eng):
    return {n: p.detach().clone() for n, p in eng.model.named_parameters()}


@pytest.mark.asyncio
async def test_load_weights_serves_the_new_model(engine, model_a, model_b):
    greedy = SamplingParams(max_tokens=16, temperature=0)
    specs = engine.param_specs()
    assert "lm_head.weight" not in specs and "model.embed_tokens.weight" in specs
    b = {n: t.clone() for n, t in model_b.state_dict().items() if n in specs}
    res = await engine.load_weights(b, version=1)
    assert res["version"] == 1 and res["tensors"] == len(specs)
    assert res["bytes"] == sum(t.numel() * 4 for t in b.values())
    assert engine.weights_version == 1
    outs = await asyncio.gather(*[engine.complete(p, greedy) for p in PROMPTS])
    for p, o in zip(PROMPTS, outs):
        assert ids_of(o) == hf_greedy(model_b, p, 16)
        assert all(t.weights_version == 1 for t in o)
    assert (await engine.load_weights(b, version=1))["noop"] is True

    # adopt: the given tensors become the parameters (no copy); the tied lm_head follows
    a = {n: t.clone() for n, t in model_a.state_dict().items() if n in specs}
    await engine.load_weights(a, version=2, adopt=True)
    embed = engine.model.model.embed_tokens.weight
    assert embed.data_ptr() == a["model.embed_tokens.weight"].data_ptr()
    assert engine.model.lm_head.weight.data_ptr() == embed.data_ptr()
    for p, o in zip(PROMPTS, await asyncio.gather(*[engine.complete(p, greedy) for p in PROMPTS])):
        assert ids_of(o) == hf_greedy(model_a, p, 16)
        assert {t.weights_version for t in o} == {2}


@pytest.mark.asyncio
async def test_load_weights_waits_for_in_flight_requests(engine, model_b):
    specs = engine.param_specs()
    b = {n: t.clone() for n, t in model_b.state_dict().items() if n in specs}
    stream = engine.generate(PROMPTS[0], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    first = await anext(stream)
    await engine.load_weights(b, version=5)
    rest = [o async for o in stream]
    assert {o.weights_version for o in [first, *rest]} == {0} and len(rest) == 29
    after = await engine.complete(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0))
    assert {o.weights_version for o in after} == {5}
    assert engine.stats["kv_cache_tokens"] == len(PROMPTS[0]) + 2  # old-version cache was dropped


@pytest.mark.asyncio
async def test_bad_weights_are_refused_and_nothing_changes(engine, model_b):
    specs = engine.param_specs()
    good = {n: t.clone() for n, t in model_b.state_dict().items() if n in specs}
    before = snapshot(engine)
    bad = dict(good)
    del bad["model.norm.weight"]
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 7)
    bad["model.layers.1.self_attn.q_norm.weight"] = good["model.layers.1.self_attn.q_norm.weight"].double()
    bad["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        await engine.load_weights(bad, version=1)
    msg = str(err.value)
    for name in ("model.norm.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.1.self_attn.q_norm.weight", "model.layers.9.mlp.up_proj.weight"):
        assert name in msg
    assert err.value.missing == ["model.norm.weight"]
    assert err.value.unexpected == ["model.layers.9.mlp.up_proj.weight"]
    assert sorted(err.value.mismatched) == ["model.layers.0.mlp.up_proj.weight",
                                            "model.layers.1.self_attn.q_norm.weight"]
    with pytest.raises(WeightsError, match="tied"):
        await engine.load_weights({**good, "lm_head.weight": good["model.embed_tokens.weight"]}, version=1)

    await engine.load_weights({n: t.clone() for n, t in before.items()}, version=3)
    with pytest.raises(WeightsError, match="older"):
        await engine.load_weights(good, version=2)
    assert engine.weights_version == 3
    after = snapshot(engine)
    assert all(torch.equal(before[n], after[n]) for n in before)
    outs = await engine.complete(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0))
    assert {o.weights_version for o in outs} == {3}


@pytest.mark.asyncio
async def test_load_weights_in_place_through_a_receiver(engine, model_a, model_b):
    """Refit in place: the receiver writes into the live parameters; the first (staged,
    adopted) pull makes them views of one buffer, so later pulls coalesce and keep the
    parameters' addresses. A pull that fails part-way leaves the engine refusing requests
    until a complete load."""
    from dynamo_rl.refit import Publisher, Receiver
    from dynamo_rl.serving.engine import PartialWeightsError

    greedy = SamplingParams(max_tokens=16, temperature=0)
    specs = engine.param_specs()
    cfg = model_a.config.to_dict()
    sd = {"a": {n: t.clone() for n, t in model_a.state_dict().items() if n in specs},
          "b": {n: t.clone() for n, t in model_b.state_dict().items() if n in specs}}
    with Publisher() as pub, Receiver.for_engine(engine) as recv:
        pub.publish(1, sd["b"], model_config=cfg)
        staged, rep = recv.pull(pub.url, 1)
        assert rep["control"] == "http"
        await engine.load_weights(staged, 1, adopt=True)
        ptrs = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
        for version, key in ((2, "a"), (3, "b")):
            pub.publish(version, sd[key], model_config=cfg)
            assert recv.ready(pub.url, version)  # published and this receiver holds the layout
            # version 3 on the event loop's thread (no hand-off to the engine thread)
            res = await engine.load_weights_in_place(
                lambda params: recv.pull(pub.url, version, into=params)[1], version, inline=version == 3)
            assert res["version"] == version == engine.weights_version
            assert res["fill"]["control"] == "shm_state"  # no HTTP round trip in steady state
            assert res["fill"]["copy_ops"] < len(specs) / 2  # coalesced into few runs
            assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == ptrs
            for n, p in engine.model.named_parameters():
                if n in specs:
                    assert torch.equal(p, sd[key][n]), n
            model = model_a if key == "a" else model_b
            for p, o in zip(PROMPTS, await asyncio.gather(*[engine.complete(p, greedy) for p in PROMPTS])):
                assert ids_of(o) == hf_greedy(model, p, 16)
                assert {t.weights_version for t in o} == {version}
        assert (await engine.load_weights_in_place(lambda params: None, 3))["noop"] is True

        # the publisher overwrites version 4 with 5 during the copy: partial weights, refused
        pub.publish(4, sd["a"], model_config=cfg)

        def torn(params):
            def progress(done, total):
                if pub.version == 4:
                    pub.publish(5, sd["a"], model_config=cfg)
            return recv.pull(pub.url, 4, into=params, progress=progress)

        from dynamo_rl.refit import StaleVersionError

        with pytest.raises(StaleVersionError, match="overwritten during the pull"):
            await engine.load_weights_in_place(torn, 4)
        assert engine.weights_version == 3 and "version 4 failed part-way" in engine.weights_partial
        with pytest.raises(PartialWeightsError, match="refuses requests"):
            await engine.complete(PROMPTS[0], greedy)
        # a complete load (in place too) makes it serve again
        res = await engine.load_weights_in_place(lambda params: recv.pull(pub.url, 5, into=params)[1], 5)
        assert engine.weights_partial is None and engine.weights_version == 5
        outs = await engine.complete(PROMPTS[1], greedy)
        assert ids_of(outs) == hf_greedy(model_a, PROMPTS[1], 16)

        # into= that does not match the layout is refused before anything is written
        from dynamo_rl.refit import MismatchError

        bad = {n: t.clone() for n, t in sd["a"].items()}
        bad["model.norm.weight"] = torch.zeros(3)
        with pytest.raises(MismatchError, match="model.norm.weight"):
            recv.pull(pub.url, 5, into=bad)


def test_engine_runs_under_uvloop(model_a):
    """The worker runs the engine on Dynamo's uvloop."""
    uvloop = pytest.importorskip("uvloop")

    async def main():
        eng = Engine(fresh(model_a), eos_token_ids=[EOS], max_batch_size=8)
        try:
            res = await asyncio.gather(*[eng.complete(p, SamplingParams(max_tokens=6, temperature=0))
                                         for p in PROMPTS])
            return [ids_of(r) for r in res]
        finally:
            await eng.stop()

    got = uvloop.run(main())
    assert got == [hf_greedy(model_a, p, 6) for p in PROMPTS]


def test_a_fresh_prefill_attends_causally_to_its_own_keys_as_the_masked_path_does(model_a):
    """A prefill whose rows all start at position 0 (``Batch.fresh``) runs one causal SDPA
    over the batch's own keys/values; the masked path over the slots' cache gives the same
    last-token logits (right-padded rows of different lengths) and leaves the same keys and
    values in the slots."""
    import dataclasses

    from dynamo_rl.serving import _qwen3
    from dynamo_rl.serving.model_runner import ModelRunner

    results = []
    for fresh_path in (True, False):
        runner = ModelRunner(fresh(model_a), device=torch.device("cpu"), slots=4, max_seq_len=64,
                             prefill_chunk=2048, cuda_graphs=False)
        batch = _qwen3.make_batch(PROMPTS, [0, 1, 2, 3], [0, 0, 0, 0], runner.device)
        assert batch.fresh
        batch = dataclasses.replace(batch, fresh=fresh_path)
        with torch.no_grad():
            logits = _qwen3.forward(runner.model, runner.cache, batch, runner._cos, runner._sin)
        results.append((logits, torch.stack(runner.cache.k), torch.stack(runner.cache.v)))
    (a, ka, va), (b, kb, vb) = results
    assert (a - b).abs().max().item() < 1e-5
    assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert not _qwen3.make_batch(PROMPTS[:2], [0, 1], [0, 3], torch.device("cpu")).fresh
