"""DynamoGeneration against a scripted stand-in *frontend* (float/empty ids, 4xx/5xx,
refused connections) and endpoint resolution. The real stack is in test_stack.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dynamo_rl.config import DynamoConfig, GenerationConfig, SamplingConfig
from dynamo_rl.generation import (
    ChatPrompt,
    DynamoGeneration,
    EndpointConfigError,
    FrontendUnavailableError,
    ModelNotServedError,
    RequestRejectedError,
    ResponseFormatError,
    resolve_frontend_url,
)

from .fake_frontend import FakeFrontend, default_generation, default_handler, ok_response


def _cfg(url: str | None = None, **kw) -> GenerationConfig:
    kw.setdefault("retry_deadline_s", 2.0)
    kw.setdefault("request_timeout_s", 10.0)
    return GenerationConfig(dynamo=DynamoConfig(frontend_url=url), **kw)


@pytest.fixture
def fake():
    with FakeFrontend() as f:
        yield f


# -- endpoint resolution ---------------------------------------------------------------

def test_dgd_name_in_pod_gives_the_frontend_service_url():
    cfg = DynamoConfig(dgd_name="rl-gen", namespace="team-a", frontend_port=8123)
    url = resolve_frontend_url(cfg, environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert url == "http://rl-gen-frontend.team-a.svc.cluster.local:8123"
    assert resolve_frontend_url(DynamoConfig(dgd_name="x"), environ={"KUBERNETES_SERVICE_HOST": "h"}) == \
        "http://x-frontend.default.svc.cluster.local:8000"


def test_dgd_name_outside_a_pod_says_to_use_frontend_url():
    with pytest.raises(EndpointConfigError) as e:
        resolve_frontend_url(DynamoConfig(dgd_name="rl-gen", namespace="team-a"), environ={})
    msg = str(e.value)
    assert "rl-gen-frontend.team-a.svc.cluster.local" in msg
    assert "frontend_url" in msg and "KUBERNETES_SERVICE_HOST" in msg and "port-forward" in msg


def test_endpoint_sources_are_exclusive_and_checked():
    assert resolve_frontend_url(DynamoConfig(frontend_url="http://127.0.0.1:9/"), environ={}) == "http://127.0.0.1:9"
    with pytest.raises(EndpointConfigError, match="neither dgd_name nor frontend_url"):
        resolve_frontend_url(DynamoConfig(), environ={})
    with pytest.raises(EndpointConfigError, match="dgd_name='a'.*explicit frontend_url"):
        resolve_frontend_url(DynamoConfig(dgd_name="a"), frontend_url="http://h:1")
    with pytest.raises(EndpointConfigError, match="differs"):
        resolve_frontend_url(DynamoConfig(frontend_url="http://h:1"), frontend_url="http://h:2")
    with pytest.raises(EndpointConfigError, match="without a path"):
        resolve_frontend_url(DynamoConfig(frontend_url="http://h:1/v1"))
    with pytest.raises(EndpointConfigError, match="not an http"):
        resolve_frontend_url(DynamoConfig(frontend_url="h:1"))
    with pytest.raises(EndpointConfigError, match="not a valid Kubernetes name"):
        resolve_frontend_url(DynamoConfig(dgd_name="RL_gen"), environ={"KUBERNETES_SERVICE_HOST": "h"})
    with pytest.raises(ValueError, match="not both"):  # the recipe schema itself
        DynamoConfig(dgd_name="a", frontend_url="http://h:1")
    # the DynamoGeneration constructor resolves before any I/O
    with pytest.raises(EndpointConfigError):
        DynamoGeneration(GenerationConfig(dynamo=DynamoConfig(dgd_name="a")))


@pytest.mark.asyncio
async def test_model_discovered_or_clear_error_listing_served(fake):
    fake.models = ["tiny"]
    async with DynamoGeneration(_cfg(fake.url)) as gen:
        assert await gen.model() == "tiny"
    cfg = _cfg()
    cfg.dynamo = DynamoConfig(frontend_url=fake.url, model="policy")
    fake.models = ["tiny", "other"]
    async with DynamoGeneration(cfg) as gen:
        with pytest.raises(ModelNotServedError) as e:
            await gen.generate([[1, 2]])
        assert "'policy' is not served" in str(e.value) and "tiny, other" in str(e.value)
        assert e.value.missing == [(0, 0)]
    async with DynamoGeneration(_cfg(fake.url)) as gen:
        with pytest.raises(ModelNotServedError, match="several models"):
            await gen.model()


# -- exact tensors -------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_requests_carry_ids_sampling_seeds_and_extra_fields(fake):
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, top_k=5, max_tokens=3)
    async with DynamoGeneration(_cfg(fake.url)) as gen:
        out = await gen.generate([[5, 6, 7], torch.tensor([8, 9])], n=3, sampling=sampling, seed=100)
    assert [[(s.prompt_index, s.sample_index) for s in row] for row in out] == \
        [[(0, 0), (0, 1), (0, 2)], [(1, 0), (1, 1), (1, 2)]]
    bodies = sorted((tuple(b["prompt"]), b["seed"]) for p, b in fake.requests if p == "/v1/completions")
    assert bodies == [((5, 6, 7), 100), ((5, 6, 7), 101), ((5, 6, 7), 102), ((8, 9), 100), ((8, 9), 101), ((8, 9), 102)]
    b = fake.requests[-1][1]
    assert b["model"] == "tiny" and b["max_tokens"] == 3 and b["temperature"] == 0.7 and b["top_p"] == 0.9
    assert b["top_k"] == 5 and b["logprobs"] == 1 and b["stream"] is False
    assert set(b["nvext"]["extra_fields"]) >= {"worker_id", "completion_token_ids"}
    s = out[1][2]
    ids, lps = default_generation([8, 9], {"seed": 102, "max_tokens": 3})
    assert torch.equal(s.prompt_token_ids, torch.tensor([8, 9], dtype=torch.int64))
    assert s.generation_token_ids.dtype == torch.int64 and s.generation_token_ids.tolist() == ids
    assert s.generation_logprobs.dtype == torch.float32
    assert torch.equal(s.generation_logprobs, torch.tensor(lps, dtype=torch.float32))
    assert (s.finish_reason, s.weights_version, s.worker_id) == ("length", 7, "1234")


@pytest.mark.asyncio
async def test_float_ids_become_int64_and_empty_generation_is_empty_tensors(fake):
    def handler(path, body):
        if body["prompt"] == [1]:
            return 200, ok_response(path, body, [1], [17.0, 2.0, 4.0], [-1.0, -2, -0.25], weights_version=3.0)
        return 200, ok_response(path, body, body["prompt"], [], [], finish_reason="stop")
    fake.handler = handler
    async with DynamoGeneration(_cfg(fake.url)) as gen:
        (a,), (b,) = await gen.generate([[1], [2, 3]])
    assert a.generation_token_ids.dtype == torch.int64 and a.generation_token_ids.tolist() == [17, 2, 4]
    assert torch.equal(a.generation_logprobs, torch.tensor([-1.0, -2.0, -0.25]))
    assert a.weights_version == 3
    assert b.generation_token_ids.dtype == torch.int64 and b.generation_token_ids.shape == (0,)
    assert b.generation_logprobs.dtype == torch.float32 and b.generation_logprobs.shape == (0,)
    assert b.finish_reason == "stop"


@pytest.mark.asyncio
@pytest.mark.parametrize("bad, where", [([3, 4.5], "[1] = 4.5"), ([True], "[0] = True"), (["7"], "[0] = '7'"),
                                        ([-1], "[0] = -1")])
async def test_non_integral_ids_are_a_clear_error(fake, bad, where):
    fake.handler = lambda path, body: (200, ok_response(path, body, body["prompt"], bad, [-1.0] * len(bad)))
    async with DynamoGeneration(_cfg(fake.url)) as gen:
        with pytest.raises(ResponseFormatError) as e:
            await gen.generate([[1, 2]])
    assert f"completion_token_ids{where}" in str(e.value) and "/v1/completions" in str(e.value)
    assert e.value.missing == [(0, 0)]


@pytest.mark.asyncio
async def test_misaligned_or_missing_logprobs_are_an_error(fake):
    fake.handler = lambda path, body: (200, ok_response(path, body, body["prompt"], [1, 2], [-1.0]))
    async with DynamoGeneration(_cfg(fake.url)) as gen:
        with pytest.raises(ResponseFormatError, match="1 logprobs for 2 token ids"):
            await gen.generate([[1]])


@pytest.mark.asyncio
async def test_chat_prompt_reads_engine_prompt_ids_and_sends_required_prefix(fake):
    def handler(path, body):
        return 200, ok_response(path, body, [1, 9, 9, 2], [4, 5], [-0.1, -0.2], finish_reason="stop")
    fake.handler = handler
    msgs = [{"role": "user", "content": "hi"}]
    async with DynamoGeneration(_cfg(fake.url)) as gen:
        (s,), (t,) = await gen.generate([msgs, ChatPrompt(msgs, required_prefix_token_ids=[1, 9])])
    assert s.prompt_token_ids.tolist() == [1, 9, 9, 2] and s.generation_token_ids.tolist() == [4, 5]
    assert torch.equal(s.generation_logprobs, torch.tensor([-0.1, -0.2]))
    paths = [p for p, _ in fake.requests if p.startswith("/v1/chat")]
    assert paths == ["/v1/chat/completions"] * 2
    bodies = [b for p, b in fake.requests if p.startswith("/v1/chat")]
    assert sorted(b["nvext"].get("annotations", []) for b in bodies) == [[], ["required_prefix_token_ids:1,9"]]
    assert all(b["messages"] == msgs and b["logprobs"] is True for b in bodies)


# -- failures --------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_4xx_is_not_retried_and_shows_the_server_message(fake):
    fake.handler = lambda path, body: (400, {"error": {"message": "prompt is longer than max_model_len 256"}})
    async with DynamoGeneration(_cfg(fake.url, retry_deadline_s=30.0)) as gen:
        t0 = time.monotonic()
        with pytest.raises(RequestRejectedError) as e:
            await gen.generate([[1, 2]])
    assert e.value.status == 400 and "prompt is longer than max_model_len 256" in str(e.value)
    assert len([p for p, _ in fake.requests if p == "/v1/completions"]) == 1
    assert time.monotonic() - t0 < 30.0


@pytest.mark.asyncio
async def test_502_503_are_retried_then_succeed_with_each_sample_once(fake):
    calls: dict[tuple, int] = {}

    def handler(path, body):
        key = (tuple(body["prompt"]), body["seed"])
        calls[key] = calls.get(key, 0) + 1
        if calls[key] <= 2:
            return (502 if calls[key] == 1 else 503), {"error": {"message": "no instances"}}
        ids, lps = default_generation(body["prompt"], body)
        return 200, ok_response(path, body, body["prompt"], ids, lps)
    fake.handler = handler
    async with DynamoGeneration(_cfg(fake.url, retry_deadline_s=20.0)) as gen:
        out = await gen.generate([[1], [2], [3]], n=2, seed=0)
        assert gen.stats["retries"] == 12
    assert sorted(calls.values()) == [3] * 6
    assert [[(s.prompt_index, s.sample_index) for s in row] for row in out] == [[(i, 0), (i, 1)] for i in range(3)]


@pytest.mark.asyncio
async def test_connection_refused_retries_until_the_deadline_then_names_url_and_error():
    f = FakeFrontend().start()
    url = f.url
    f.stop()
    async with DynamoGeneration(_cfg(url, retry_deadline_s=1.5)) as gen:
        gen._model = "tiny"  # skip discovery: the frontend is gone
        t0 = time.monotonic()
        with pytest.raises(FrontendUnavailableError) as e:
            await gen.generate([[1], [2]], n=2)
        took = time.monotonic() - t0
    assert 1.5 <= took < 10.0
    msg = str(e.value)
    assert f"{url}/v1/completions" in msg and "connect error" in msg and "retry_deadline_s=1.5" in msg
    assert e.value.last_status is None and e.value.url == f"{url}/v1/completions"
    assert sorted(e.value.missing) == [(0, 0), (0, 1), (1, 0), (1, 1)] and e.value.completed == []


@pytest.mark.asyncio
async def test_503_past_the_deadline_names_the_last_status(fake):
    fake.handler = lambda path, body: (503, {"error": {"message": "service overloaded"}})
    async with DynamoGeneration(_cfg(fake.url, retry_deadline_s=1.0)) as gen:
        with pytest.raises(FrontendUnavailableError) as e:
            await gen.generate([[1]])
    assert e.value.last_status == 503 and "HTTP 503: service overloaded" in str(e.value)


@pytest.mark.asyncio
async def test_frontend_gone_mid_batch_every_sample_returned_or_named(fake):
    """The stand-in answers (at most) 4 requests and dies during the 5th: the error lists exactly the
    samples that did not come back; the returned + missing ones cover every key once."""
    served = []

    def handler(path, body):
        served.append(body["seed"])
        if len(served) >= 5:
            fake.stop()  # requests from the 5th on get no answer; later connections are refused
        ids, lps = default_generation(body["prompt"], body)
        return 200, ok_response(path, body, body["prompt"], ids, lps)
    fake.handler = handler
    async with DynamoGeneration(_cfg(fake.url, retry_deadline_s=1.5, max_concurrency=2)) as gen:
        with pytest.raises(FrontendUnavailableError) as e:
            await gen.generate([[1], [2], [3], [4]], n=4, seed=10)
    got = [(s.prompt_index, s.sample_index) for s in e.value.completed]
    missing = e.value.missing
    assert len(got) == len(set(got)) and len(missing) == len(set(missing))
    assert not set(got) & set(missing)
    assert sorted(got + missing) == [(i, k) for i in range(4) for k in range(4)]
    assert 1 <= len(got) <= 4 and "sample(s) not returned" in str(e.value)  # ≤ 4 answers were sent


@pytest.mark.asyncio
async def test_frontend_back_before_the_deadline_loses_nothing(fake):
    """Stopped after 3 answers, listening again 0.5 s later: all 12 samples come back once."""
    n_done = []

    def restart():
        fake.stop()
        time.sleep(0.5)
        fake.start()

    def handler(path, body):
        n_done.append(1)
        if len(n_done) == 3:
            threading.Thread(target=restart).start()
        ids, lps = default_generation(body["prompt"], body)
        return 200, ok_response(path, body, body["prompt"], ids, lps)
    fake.handler = handler
    async with DynamoGeneration(_cfg(fake.url, retry_deadline_s=20.0, max_concurrency=2)) as gen:
        seen = [(s.prompt_index, s.sample_index) async for s in gen.stream([[1], [2], [3]], n=4, seed=0)]
        assert gen.stats["retries"] >= 1
    assert sorted(seen) == [(i, k) for i in range(3) for k in range(4)]


@pytest.mark.asyncio
async def test_bad_prompts_fail_before_any_request(fake):
    async with DynamoGeneration(_cfg(fake.url)) as gen:
        with pytest.raises(ValueError, match=r"prompts\[1\]\[0\] = 1.5"):
            await gen.generate([[1], [1.5]])
        with pytest.raises(ValueError, match="empty"):
            await gen.generate([[]])
    assert fake.requests == []


@pytest.mark.asyncio
async def test_read_timeouts_are_retried_then_reported(fake):
    calls = []

    def handler(path, body):
        calls.append(1)
        time.sleep(1.0)  # longer than request_timeout_s
        return 200, ok_response(path, body, body["prompt"], [1], [-1.0])
    fake.handler = handler
    async with DynamoGeneration(_cfg(fake.url, retry_deadline_s=0.5, request_timeout_s=0.3)) as gen:
        with pytest.raises(FrontendUnavailableError) as e:
            await gen.generate([[1]])
    assert "timeout: no whole response within generation.request_timeout_s=0.3" in e.value.last_error and e.value.last_status is None
    assert len(calls) >= 2 and e.value.missing == [(0, 0)]


@pytest.mark.asyncio
async def test_404_while_other_models_are_served_is_model_not_served_listing_them(fake):
    fake.handler = lambda path, body: (404, b"")
    async with DynamoGeneration(_cfg(fake.url)) as gen:
        await gen.model()
        fake.models = ["other", "tiny-v2"]
        with pytest.raises(ModelNotServedError) as e:
            await gen.generate([[1], [2]])
    assert "HTTP 404" in str(e.value) and "'tiny' is not served" in str(e.value)
    assert "served now: other, tiny-v2" in str(e.value) and e.value.served == ["other", "tiny-v2"]
    assert sorted(e.value.missing) == [(0, 0), (1, 0)]
    assert len([p for p, _ in fake.requests if p == "/v1/completions"]) <= 2  # not retried


@pytest.mark.asyncio
async def test_404_while_no_model_is_registered_is_retried_as_an_outage(fake):
    """All workers gone (the frontend deregistered the model, lists none): retried like a
    503; back before the deadline, every sample comes once; not back, a clear error."""
    def down(path, body):
        return 404, {"error": {"message": "Model not found: tiny"}}

    async with DynamoGeneration(_cfg(fake.url, retry_deadline_s=20.0)) as gen:
        await gen.model()
        fake.models, fake.handler = [], down

        def back():  # the workers re-register 0.5 s later
            time.sleep(0.5)
            fake.models, fake.handler = ["tiny"], default_handler
        threading.Thread(target=back).start()
        samples = await gen.generate([[1], [2]], n=2, seed=0)
        assert [[(s.prompt_index, s.sample_index) for s in row] for row in samples] == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]
        assert gen.stats["retries"] >= 1
    ok = [b for p, b in fake.requests if p == "/v1/completions"]
    assert len(ok) > 4  # the 404s were resent

    async with DynamoGeneration(_cfg(fake.url, retry_deadline_s=0.5)) as gen:
        await gen.model()
        fake.models, fake.handler = [], down  # not back before the deadline
        with pytest.raises(FrontendUnavailableError) as e:
            await gen.generate([[1]])
    assert e.value.last_status == 404 and "Model not found: tiny" in e.value.last_error
    assert "no model is registered with the frontend" in e.value.last_error and e.value.missing == [(0, 0)]


@pytest.mark.asyncio
async def test_404_while_the_model_is_listed_again_is_retried(fake):
    """The race of a restart: the POST got 404, the model re-registered before the probe."""
    calls = []

    def flaky(path, body):
        calls.append(path)
        if len(calls) <= 2:
            return 404, {"error": {"message": "Model not found: tiny"}}
        return default_handler(path, body)

    async with DynamoGeneration(_cfg(fake.url, retry_deadline_s=20.0)) as gen:
        await gen.model()
        fake.handler = flaky
        samples = await gen.generate([[1]])
        assert len(samples[0]) == 1 and gen.stats["retries"] == 2


@pytest.mark.asyncio
async def test_404_with_an_unreadable_model_listing_is_retried_within_the_deadline(fake):
    async with DynamoGeneration(_cfg(fake.url, retry_deadline_s=1.0, request_timeout_s=3.0)) as gen:
        await gen.model()
        fake.handler = lambda path, body: (404, {"error": {"message": "Model not found: tiny"}})
        fake.models = None  # /v1/models now drops the connection (the fake cannot list None)
        t0 = time.monotonic()
        with pytest.raises(FrontendUnavailableError) as e:
            await gen.generate([[1]])
        assert time.monotonic() - t0 < 5.0
    assert e.value.last_status == 404 and "/v1/models did not answer" in e.value.last_error


@pytest.mark.asyncio
async def test_stream_closed_early_cancels_the_rest_and_the_client_stays_usable(fake):
    async with DynamoGeneration(_cfg(fake.url, max_concurrency=2)) as gen:
        agen = gen.stream([[i + 1] for i in range(20)], n=2, seed=0)
        first = await agen.__anext__()
        await agen.aclose()
        assert first.generation_token_ids.dtype == torch.int64
        assert len([p for p, _ in fake.requests if p == "/v1/completions"]) < 40
        (s,), = await gen.generate([[3]])
    assert s.prompt_token_ids.tolist() == [3]


@pytest.mark.asyncio
async def test_requests_in_flight_never_exceed_max_concurrency(fake):
    state = {"now": 0, "max": 0}

    def handler(path, body):
        with fake.lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        with fake.lock:
            state["now"] -= 1
        ids, lps = default_generation(body["prompt"], body)
        return 200, ok_response(path, body, body["prompt"], ids, lps)
    fake.handler = handler
    async with DynamoGeneration(_cfg(fake.url, max_concurrency=3)) as gen:
        out = await gen.generate([[i + 1] for i in range(8)], n=2, seed=0)
    assert sum(len(r) for r in out) == 16
    assert 1 < state["max"] <= 3
