"""The worker's request mapping, on preprocessed requests as Dynamo 1.6.1's frontend sends them.

REQUEST is a real request dumped from the frontend (``/v1/completions`` with
``prompt=[5,6,7], max_tokens=2, logprobs=1, seed=3, temperature=0.5, top_k=4``).
"""

from __future__ import annotations

import pytest

from dynamo_rl.serving.engine import SamplingParams
from dynamo_rl.serving.worker import parse_required_prefix, sampling_params_from_request

REQUEST = {
    "model": "tiny", "token_ids": [5, 6, 7],
    "stop_conditions": {"max_tokens": 2, "stop": None, "stop_token_ids": None, "stop_token_ids_visible": None,
                        "stop_token_ids_hidden": [2], "min_tokens": None, "ignore_eos": None,
                        "max_thinking_tokens": None},
    "sampling_options": {"n": None, "best_of": None, "presence_penalty": None, "frequency_penalty": None,
                         "repetition_penalty": None, "temperature": 0.5, "top_p": None, "top_k": 4, "min_p": None,
                         "use_beam_search": None, "length_penalty": None, "seed": 3,
                         "include_stop_str_in_output": None, "guided_decoding": None},
    "output_options": {"logprobs": 1, "prompt_logprobs": None, "skip_special_tokens": None,
                       "formatted_prompt": None, "return_tokens_as_token_ids": None},
    "eos_token_ids": [2], "mdc_sum": "131871ce", "annotations": [], "routing": {},
    "router_config_override": None,
    "extra_args": {"nvext": {"extra_fields": ["worker_id", "completion_token_ids", "engine_data"]}},
}


def with_(section, **kw):
    return {**REQUEST, section: {**REQUEST[section], **kw}}


def test_real_request_maps_to_sampling_params():
    assert sampling_params_from_request(REQUEST) == SamplingParams(
        max_tokens=2, temperature=0.5, top_p=1.0, top_k=4, seed=3, stop_token_ids=(2,), ignore_eos=False)


def test_openai_defaults_and_context_window():
    req = with_("sampling_options", temperature=None, top_k=-1, seed=None)
    req = {**req, "stop_conditions": {**req["stop_conditions"], "max_tokens": None}}
    p = sampling_params_from_request(req, context_window=256)
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (1.0, 1.0, 0, None, 253)


def test_ignore_eos_drops_eos_from_stop_ids_but_keeps_others():
    req = with_("stop_conditions", ignore_eos=True, stop_token_ids=[9], stop_token_ids_visible=[11])
    p = sampling_params_from_request(req)
    assert p.ignore_eos and p.stop_token_ids == (9, 11)


@pytest.mark.parametrize("kw", [{"n": 2}, {"best_of": 3}, {"use_beam_search": True}])
def test_unsupported_sampling_is_refused(kw):
    with pytest.raises(ValueError, match="not supported"):
        sampling_params_from_request(with_("sampling_options", **kw))


def test_required_prefix_channels():
    assert parse_required_prefix(REQUEST) is None
    assert parse_required_prefix({**REQUEST, "annotations": ["x", "required_prefix_token_ids:1,5, 6,2"]}) == [1, 5, 6, 2]
    assert parse_required_prefix({**REQUEST, "annotations": ["required_prefix_token_ids:[1, 5]"]}) == [1, 5]
    assert parse_required_prefix({**REQUEST, "extra_args": {"required_prefix_token_ids": [7, 8]}}) == [7, 8]
    with pytest.raises(ValueError, match="comma-separated token ids"):
        parse_required_prefix({**REQUEST, "annotations": ["required_prefix_token_ids:1,x"]})


@pytest.mark.asyncio
@pytest.mark.parametrize("interval, sizes", [(1, [1] * 11), (4, [1, 4, 4, 2]), (32, [1, 10])])
async def test_stream_interval_coalesces_messages_and_keeps_ids(interval, sizes):
    """The handler over a real engine (one token per decode hand-off): after the first token,
    messages hold ``stream_interval`` tokens (the last what is left); ids, logprobs and the
    weights version are those of one token per message."""
    import torch

    from dynamo_rl.models import build_tiny_model
    from dynamo_rl.serving.engine import Engine
    from dynamo_rl.serving.worker import Worker

    torch.manual_seed(0)
    engine = Engine(build_tiny_model(), eos_token_ids=[2], decode_steps=1)
    request = with_("stop_conditions", max_tokens=11, ignore_eos=True)
    try:
        got = {}
        for n in (1, interval):
            engine.flush_cache()  # no prefix reuse: the same forwards both times
            handler = Worker(engine, served_model_name="tiny", model_path="-", message_eos_id=None,
                             tokens_per_message=1 if n == 1 else 0, stream_interval=n)
            got[n] = [chunk async for chunk in handler.generate(dict(request))]
    finally:
        await engine.stop()
    assert [len(c["token_ids"]) for c in got[interval]] == sizes
    for key in ("token_ids", "log_probs"):
        assert [x for c in got[interval] for x in c[key]] == [x for c in got[1] for x in c[key]]
    assert got[interval][-1]["finish_reason"] == "length"
    assert {c["engine_data"]["weights_version"] for c in got[interval]} == {0}


def test_stream_interval_below_one_is_refused():
    from dynamo_rl.serving.worker import Worker

    with pytest.raises(ValueError, match="stream_interval=0"):
        Worker(object(), served_model_name="tiny", model_path="-", message_eos_id=None, stream_interval=0)
