"""The embedded default's path: one trainer process, TP=1, HF names, CPU, shm transport."""

from __future__ import annotations

import pytest
import torch

from dynamo_rl.refit import Publisher, Receiver, StaleVersionError, VersionNotFoundError

from refit_models import tiny


@pytest.fixture()
def tiny_sd():
    return tiny()


def test_publish_pull_tp1_byte_identical_and_versions(tiny_sd):
    sd, cfg = tiny_sd
    specs = {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}
    # the trainer passes its raw state dict: DDP prefix + the tied lm_head included
    raw = {"module." + n: t for n, t in sd.items()}
    raw["module.lm_head.weight"] = sd["model.embed_tokens.weight"]
    with Publisher() as pub, Receiver(tp_rank=0, tp_size=1, param_specs=specs) as recv:
        pub.publish(1, raw, model_config=cfg)
        out, rep = recv.pull(pub.url, 1)
        assert set(out) == set(specs)
        for n in specs:
            assert torch.equal(out[n], sd[n]), n
        assert rep["tensors"] == len(specs) and rep["transport"] == "shm"
        assert rep["bytes"] == sum(t.numel() * 4 for t in sd.values())
        assert rep["overpull_factor"] == 1.0
        assert rep["copy_ops"] == 1  # same layout: the whole bucket moves in one copy
        flat = out["model.norm.weight"].untyped_storage()
        assert all(t.untyped_storage().data_ptr() == flat.data_ptr() for t in out.values())
        # the arena is reused; new values arrive; the old tensors are untouched
        old = out["model.norm.weight"].clone()
        sd2 = {k: v + 1 for k, v in raw.items()}
        pub.publish(2, sd2, model_config=cfg)
        out2, _ = recv.pull(pub.url, 2)
        assert torch.equal(out2["model.norm.weight"], sd["model.norm.weight"] + 1)
        assert torch.equal(out["model.norm.weight"], old)
        with pytest.raises(StaleVersionError, match="already loaded 2"):
            recv.pull(pub.url, 1)
        fresh = Receiver(tp_rank=0, tp_size=1, param_specs=specs)
        with pytest.raises(StaleVersionError, match="no longer holds version 1"):
            fresh.pull(pub.url, 1)
        with pytest.raises(VersionNotFoundError, match="did not publish version 3"):
            fresh.pull(pub.url, 3, timeout_s=0.3)
        with pytest.raises(StaleVersionError, match="versions must increase"):
            pub.publish(2, sd2, model_config=cfg)


def test_double_buffer_alternates_two_sets(tiny_sd):
    sd, cfg = tiny_sd
    specs = {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}
    with Publisher() as pub, Receiver(tp_rank=0, tp_size=1, param_specs=specs, double_buffer=True) as recv:
        ptrs = []
        for v in (1, 2, 3):
            pub.publish(v, {k: t + v for k, t in sd.items()}, model_config=cfg)
            out, _ = recv.pull(pub.url, v)
            assert torch.equal(out["model.norm.weight"], sd["model.norm.weight"] + v)
            ptrs.append(out["model.norm.weight"].data_ptr())
        assert ptrs[0] == ptrs[2] != ptrs[1]


def test_shared_memory_control_path(tiny_sd):
    """Once a receiver holds the layout it reads version, seqlock and liveness from the
    publisher's state block: no HTTP. A changed layout sends it back to the manifest; a
    version not yet published times out; a closed publisher is named."""
    import threading

    from dynamo_rl.refit import PublisherGoneError

    sd, cfg = tiny_sd
    specs = {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}
    pub = Publisher()
    recv = Receiver(tp_rank=0, tp_size=1, param_specs=specs)
    try:
        pub.publish(1, sd, model_config=cfg)
        assert recv.pull(pub.url, 1)[1]["control"] == "http"
        assert not recv.ready(pub.url, 2) and not recv.ready("http://127.0.0.1:9", 1)
        pub.publish(2, {k: v + 2 for k, v in sd.items()}, model_config=cfg)
        assert recv.ready(pub.url, 2) and not recv.ready(pub.url, 3)
        out, rep = recv.pull(pub.url, 2)
        assert rep["control"] == "shm_state" and torch.equal(out["model.norm.weight"], sd["model.norm.weight"] + 2)
        # the receiver waits (in shared memory) for a version the trainer publishes later
        later = threading.Timer(0.2, pub.publish, (3, {k: v + 3 for k, v in sd.items()}), {"model_config": cfg})
        later.start()
        out, rep = recv.pull(pub.url, 3, timeout_s=10)
        later.join()
        assert rep["control"] == "shm_state" and torch.equal(out["model.norm.weight"], sd["model.norm.weight"] + 3)
        with pytest.raises(VersionNotFoundError, match="rank 0 at version 3"):
            recv.pull(pub.url, 4, timeout_s=0.2)
        # a new model config (same shapes) bumps the layout generation: manifest again
        pub.publish(4, sd, model_config={**cfg, "rope_theta": 1234.0})
        out, rep = recv.pull(pub.url, 4)
        assert rep["control"] == "http" and torch.equal(out["model.norm.weight"], sd["model.norm.weight"])
        pub.publish(5, sd, model_config={**cfg, "rope_theta": 1234.0})
        assert recv.pull(pub.url, 5)[1]["control"] == "shm_state"
        pub.close()
        with pytest.raises(PublisherGoneError, match="unreachable"):
            recv.pull(pub.url, 6, timeout_s=2)
        # a publisher restarted at the same address is found again (over HTTP, then shm)
        port = int(pub.url.rsplit(":", 1)[1])
        pub = Publisher(port=port)
        pub.publish(6, {k: v + 6 for k, v in sd.items()}, model_config=cfg)
        out, rep = recv.pull(pub.url, 6)
        assert rep["control"] == "http" and torch.equal(out["model.norm.weight"], sd["model.norm.weight"] + 6)
        pub.publish(7, sd, model_config=cfg)
        assert recv.pull(pub.url, 7)[1]["control"] == "shm_state"
    finally:
        pub.close()
        recv.close()


def test_into_is_validated_and_foreign_layouts_touch_only_their_tensors(tiny_sd):
    from dynamo_rl.refit import MismatchError

    sd, cfg = tiny_sd
    specs = {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}
    names = list(specs)
    with Publisher() as pub, Receiver(tp_rank=0, tp_size=1, param_specs=specs) as recv:
        pub.publish(1, sd, model_config=cfg)
        own, _ = recv.pull(pub.url, 1)
        # the caller's own buffer: tensors 512 bytes apart, its data in between must survive
        sizes = [sd[n].numel() * 4 for n in names]
        buf = torch.full((sum(sizes) + 512 * len(names),), -7, dtype=torch.uint8)
        into, pos = {}, 0
        for n, size in zip(names, sizes):
            into[n] = buf[pos : pos + size].view(torch.float32).view(specs[n][0])
            pos += size + 512
        pub.publish(2, {k: v + 2 for k, v in sd.items()}, model_config=cfg)
        out, rep = recv.pull(pub.url, 2, into=into)
        assert out is into and rep["copy_ops"] >= len(names)  # no coalescing over the caller's bytes
        assert all(torch.equal(into[n], sd[n] + 2) for n in names)
        pos = 0
        for size in sizes:
            assert bool((buf[pos + size : pos + size + 512] == 0xF9).all())  # -7 as uint8: untouched
            pos += size + 512
        # a tensor swapped inside the same mapping is noticed
        into[names[3]] = torch.zeros_like(into[names[3]])
        recv.pull(pub.url, 2, into=into)
        assert torch.equal(into[names[3]], sd[names[3]] + 2)
        into[names[3]] = torch.zeros(7)
        with pytest.raises(MismatchError, match=f"{names[3]}.*the layout needs") as err:
            recv.pull(pub.url, 2, into=into)
        assert err.value.untouched and "pass into= exactly the receiver's param_specs" in str(err.value)
        # a FrozenTensors is checked once, then by identity; a new one is validated again
        from dynamo_rl.refit import FrozenTensors

        frozen = FrozenTensors({n: t for n, t in own.items()})
        out, _ = recv.pull(pub.url, 2, into=frozen)
        assert out is frozen and torch.equal(own[names[0]], sd[names[0]] + 2)
        with pytest.raises(TypeError):
            frozen[names[0]] = torch.zeros(1)  # read-only
        with pytest.raises(MismatchError, match="not a torch.Tensor"):
            recv.pull(pub.url, 2, into=FrozenTensors({**own, names[0]: None}))
        # aliasing and non-tensors are refused before anything is written
        alias = dict(own)
        alias[names[1]] = alias[names[0]] if specs[names[0]] == specs[names[1]] else alias[names[1]]
        alias["model.layers.0.input_layernorm.weight"] = alias["model.norm.weight"]
        with pytest.raises(MismatchError, match="shares memory with"):
            recv.pull(pub.url, 2, into=alias)
        with pytest.raises(MismatchError, match="not a torch.Tensor"):
            recv.pull(pub.url, 2, into={**own, names[0]: None})
