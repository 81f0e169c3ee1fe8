"""Acceptance against the real stack: Dynamo 1.6.1 frontend + our workers (tiny model).

Every sample is compared with the worker's own ``--record-file`` line (same request id):
ids, logprobs, prompt, finish reason, weights version, seed and worker must be identical.
The worker- and frontend-kill tests run last in this module, in that order (they leave the
stack with one worker, then without a frontend).
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from dynamo_rl.config import SamplingConfig
from dynamo_rl.generation import (
    ChatPrompt,
    Conversation,
    DynamoGeneration,
    FrontendUnavailableError,
    RequestRejectedError,
)
from dynamo_rl.models import load_tokenizer

from .conftest import gen_config, read_records, record_of

pytestmark = pytest.mark.stack


def assert_matches_record(s, rec, *, seed=None):
    assert s.prompt_token_ids.dtype == torch.int64 and s.generation_token_ids.dtype == torch.int64
    assert s.generation_logprobs.dtype == torch.float32
    assert torch.equal(s.prompt_token_ids, torch.tensor(rec["prompt_token_ids"], dtype=torch.int64))
    assert torch.equal(s.generation_token_ids, torch.tensor(rec["token_ids"], dtype=torch.int64))
    assert torch.equal(s.generation_logprobs, torch.tensor(rec["logprobs"], dtype=torch.float32))
    assert s.finish_reason == rec["finish_reason"]
    assert s.weights_version == rec["weights_version"]
    assert s.worker_id == rec["_instance_id"]
    if seed is not None:
        assert rec["sampling"]["seed"] == seed


@pytest.mark.asyncio
async def test_64_prompts_x_8_samples_equal_the_workers_records(stack):
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(4, 50) for _ in range(rng.randint(3, 20))] + [i % 46 + 4] for i in range(64)]
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, top_k=30, max_tokens=8)
    async with DynamoGeneration(gen_config(stack.frontend_url)) as gen:
        out = await gen.generate(prompts, n=8, sampling=sampling, seed=1000)
        assert gen.stats["retries"] == 0
    records = read_records(stack)
    used = set()
    finish = set()
    for i, row in enumerate(out):
        assert len(row) == 8
        for k, s in enumerate(row):
            assert (s.prompt_index, s.sample_index) == (i, k)
            assert s.prompt_token_ids.tolist() == prompts[i]
            rec = record_of(records, s)
            assert_matches_record(s, rec, seed=1000 + k)
            assert rec["sampling"]["top_k"] == 30 and rec["sampling"]["max_tokens"] == 8
            used.add(rec["request_id"])
            finish.add(s.finish_reason)
    assert len(used) == 512
    assert finish == {"stop", "length"}  # both endings occur; a stop keeps its EOS id (2)
    assert all(s.generation_token_ids[-1].item() == 2 for row in out for s in row if s.finish_reason == "stop")
    assert {s.worker_id for row in out for s in row} == {str(w.instance_id) for w in stack.workers}
    # the same seed gives the same ids (a seeded replay); logprobs then agree only to fp32
    # rounding, because the engine's numerics depend on the batch a request shares
    async with DynamoGeneration(gen_config(stack.frontend_url)) as gen:
        again = await gen.generate([prompts[5]], n=2, sampling=sampling, seed=1000)
    for k in range(2):
        assert torch.equal(again[0][k].generation_token_ids, out[5][k].generation_token_ids)
        assert torch.allclose(again[0][k].generation_logprobs, out[5][k].generation_logprobs, rtol=0, atol=1e-4)


@pytest.mark.asyncio
async def test_three_turns_contiguous_and_identical_through_completions_and_chat(stack, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    users = ["rev 472", "now add 15", "and 9?"]
    sampling = SamplingConfig(temperature=1.0, max_tokens=10)
    async with DynamoGeneration(gen_config(stack.frontend_url)) as gen:
        comp = Conversation(gen, endpoint="completions", tokenizer=tok)
        chat = Conversation(gen, endpoint="chat")
        for t, u in enumerate(users):
            history = comp.token_ids.tolist()
            assert history == chat.token_ids.tolist()
            a = await comp.step([{"role": "user", "content": u}], sampling=sampling, seed=77 + t)
            b = await chat.step([{"role": "user", "content": u}], sampling=sampling, seed=77 + t)
            # contiguity: the prompt extends the previous prompt + generation byte for byte
            assert a.prompt_token_ids[: len(history)].tolist() == history
            assert b.prompt_token_ids[: len(history)].tolist() == history
            # both routes give the same ids, and those are the engine's
            assert torch.equal(a.prompt_token_ids, b.prompt_token_ids)
            assert torch.equal(a.generation_token_ids, b.generation_token_ids)
            # the two requests may run on different workers, in different batches: the same
            # ids' logprobs agree to float round-off; exactness is checked right below against
            # the record of the worker that produced each one
            assert torch.allclose(a.generation_logprobs, b.generation_logprobs, atol=1e-5, rtol=0)
            records = read_records(stack)
            assert_matches_record(a, record_of(records, a), seed=77 + t)
            assert_matches_record(b, record_of(records, b), seed=77 + t)
            # the new tokens are exactly the new user message + generation prompt
            tail = tok.decode(a.prompt_token_ids[len(history):].tolist())
            assert tail.endswith(f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n")
        assert len(comp.samples) == len(chat.samples) == 3
        assert torch.equal(comp.token_ids, chat.token_ids)


@pytest.mark.asyncio
async def test_4xx_from_the_real_stack_are_not_retried_and_carry_the_workers_message(stack):
    msgs = [{"role": "user", "content": "hi"}]
    async with DynamoGeneration(gen_config(stack.frontend_url)) as gen:
        with pytest.raises(RequestRejectedError) as e:  # a prefix claiming more messages than sent
            await gen.generate([ChatPrompt(msgs, required_prefix_token_ids=[1, 2, 5, 2, 6, 2])])
        assert e.value.status == 400 and "end-of-message tokens" in e.value.server_message
        with pytest.raises(RequestRejectedError) as e:  # longer than the engine's context
            await gen.generate([[1] + [5] * 300])
        assert e.value.status == 400 and "max_seq_len" in e.value.server_message
        assert gen.stats["retries"] == 0


@pytest.mark.asyncio
async def test_worker_killed_mid_batch_every_sample_once_and_each_is_a_recorded_engine_output(stack):
    """SIGKILL one of the two workers while 48 requests run: the frontend answers 503 for
    the dead instance until discovery forgets it; the client retries; every sample comes
    back exactly once and equals the record of the worker that produced it."""
    workers = list(stack.workers)
    assert len(workers) == 2
    got = []
    cfg = gen_config(stack.frontend_url, retry_deadline_s=60.0)
    async with DynamoGeneration(cfg) as gen:
        async for s in gen.stream([[1, 7, 8, 9 + i] for i in range(24)], n=2,
                                  sampling=SamplingConfig(max_tokens=40), seed=3):
            got.append(s)
            if len(got) == 6:
                stack.kill_worker(0)
    keys = sorted((s.prompt_index, s.sample_index) for s in got)
    assert keys == [(i, k) for i in range(24) for k in range(2)]
    records = read_records(stack, workers)
    for s in got:
        assert_matches_record(s, record_of(records, s), seed=3 + s.sample_index)
    assert len(stack.workers) == 1


@pytest.mark.asyncio
async def test_frontend_killed_mid_batch_retries_then_clear_error_nothing_dropped_or_duplicated(stack):
    """SIGKILL the real frontend after 24 of 128 samples arrived: the client retries until
    the deadline, then raises naming the URL; yielded + missing = every key exactly once."""
    deadline = 3.0
    cfg = gen_config(stack.frontend_url, retry_deadline_s=deadline, request_timeout_s=30.0, max_concurrency=8)
    prompts = [[1, 4 + i % 40, 5, 6] for i in range(32)]
    got = []
    async with DynamoGeneration(cfg) as gen:
        with pytest.raises(FrontendUnavailableError) as e:
            async for s in gen.stream(prompts, n=4, sampling=SamplingConfig(max_tokens=8), seed=5):
                got.append(s)
                if len(got) == 24:
                    stack.frontend.expected_exit = True  # tell the stack's watcher this is on purpose
                    os.kill(stack.frontend.pid, signal.SIGKILL)
        assert gen.stats["retries"] > 0
    err = e.value
    keys = [(s.prompt_index, s.sample_index) for s in got]
    assert len(keys) == len(set(keys)) == len(got) >= 24
    assert len(err.missing) == len(set(err.missing)) and not set(keys) & set(err.missing)
    assert sorted(keys + err.missing) == [(i, k) for i in range(32) for k in range(4)]
    assert err.url == f"{stack.frontend_url}/v1/completions" and stack.frontend_url in str(err)
    assert err.last_status is None and "connect error" in err.last_error
    assert deadline <= err.waited_s < deadline + cfg.request_timeout_s
    records = read_records(stack)
    for s in got:
        assert_matches_record(s, record_of(records, s), seed=5 + s.sample_index)
