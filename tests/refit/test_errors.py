"""Bad input → one clear RefitError subclass naming every offending tensor / version, raised
before anything is returned (so the engine never sees a partial set)."""

from __future__ import annotations

import pytest
import torch

from dynamo_rl.refit import (
    MismatchError,
    Publisher,
    PublisherGoneError,
    Receiver,
    StaleVersionError,
    VersionNotFoundError,
)
from dynamo_rl.refit.megatron import engine_specs, hf_to_engine, hf_to_megatron

from refit_models import model


@pytest.fixture()
def gqa():
    return model("gqa16_8", seed=1)


def specs_of(hf, cfg, t=0, T=1):
    return engine_specs(hf_to_engine(hf, cfg, t, T))


def test_missing_shape_dtype_unexpected_all_listed(gqa):
    hf, cfg = gqa
    specs = specs_of(hf, cfg)
    sent = dict(hf)
    del sent["model.norm.weight"]
    sent["model.layers.0.mlp.down_proj.weight"] = sent["model.layers.0.mlp.down_proj.weight"].bfloat16()
    bad_specs = dict(specs)
    bad_specs["model.layers.0.self_attn.q_proj.weight"] = ((3, 3), torch.float32)
    del bad_specs["model.layers.0.input_layernorm.weight"]
    with Publisher() as pub:
        pub.publish(1, sent, model_config=cfg)
        recv = Receiver(tp_rank=0, tp_size=1, param_specs=bad_specs)
        with pytest.raises(MismatchError) as e:
            recv.pull(pub.url, 1)
        msg = str(e.value)
        assert "missing 1 tensor(s): model.norm.weight" in msg
        assert "unexpected 1 tensor(s): model.layers.0.input_layernorm.weight" in msg
        assert "model.layers.0.self_attn.q_proj.weight (engine expects [3, 3]" in msg
        assert "model.layers.0.mlp.down_proj.weight (dtype: engine float32, publisher bfloat16)" in msg
        assert e.value.missing == ["model.norm.weight"]
        assert recv.last_version is None  # nothing adopted


def test_target_layout_impossible_is_named(gqa):
    hf, cfg = gqa
    specs = specs_of(hf, cfg, 0, 1)  # full shapes, but the receiver claims TP=3
    with Publisher() as pub:
        pub.publish(1, hf, model_config=cfg)
        with pytest.raises(MismatchError, match="not divisible by TP 3"):
            Receiver(tp_rank=0, tp_size=3, param_specs=specs).pull(pub.url, 1)


def test_publisher_gone_before_pull(gqa):
    hf, cfg = gqa
    pub = Publisher()
    pub.publish(1, hf, model_config=cfg)
    url = pub.url
    pub.close()
    with pytest.raises(PublisherGoneError, match="unreachable"):
        Receiver(tp_rank=0, tp_size=1, param_specs=specs_of(hf, cfg)).pull(url, 1, timeout_s=5)


def test_overwritten_during_pull_is_stale_not_torn(gqa):
    hf, cfg = gqa
    with Publisher() as pub:
        pub.publish(1, hf, model_config=cfg)
        recv = Receiver(tp_rank=0, tp_size=1, param_specs=specs_of(hf, cfg))
        hit = []

        def progress(done, total):  # the trainer publishes version 2 in the middle of the pull
            if not hit:
                hit.append(1)
                pub.publish(2, {k: v + 1 for k, v in hf.items()}, model_config=cfg)

        with pytest.raises(StaleVersionError, match="overwritten during the pull"):
            recv.pull(pub.url, 1, progress=progress)
        out, rep = recv.pull(pub.url, 2)
        assert torch.equal(out["model.norm.weight"], hf["model.norm.weight"] + 1)


def test_multi_rank_manifest_waits_for_every_rank(gqa):
    hf, cfg = gqa
    shards = hf_to_megatron(hf, cfg, 2)
    with Publisher(tp_rank=0, tp_size=2) as p0, Publisher(tp_rank=1, tp_size=2, coordinator_url=p0.url) as p1:
        p0.publish(1, shards[0], naming="megatron", model_config=cfg)
        recv = Receiver(tp_rank=0, tp_size=1, param_specs=specs_of(hf, cfg))
        with pytest.raises(VersionNotFoundError, match="did not publish version 1"):
            recv.pull(p0.url, 1, timeout_s=0.5)  # rank 1 has not registered yet
        p1.publish(1, shards[1], naming="megatron", model_config=cfg)
        out, rep = recv.pull(p0.url, 1)
        ref = hf_to_engine(hf, cfg, 0, 1)
        assert all(torch.equal(out[n], ref[n]) for n in ref)
