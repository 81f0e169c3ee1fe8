"""Publisher → Receiver through the real shm path (coalesced copies, flat destination) for
every S, T ∈ {1, 2, 4}, in one process (the cross-process runs are in test_processes.py)."""

from __future__ import annotations

import contextlib
import itertools

import torch

from dynamo_rl.refit import Publisher, Receiver
from dynamo_rl.refit.megatron import engine_specs, hf_to_engine, hf_to_megatron

from refit_models import model


@contextlib.contextmanager
def published(shards: list[dict], cfg: dict):
    """S Megatron-layout source ranks publishing version 1; yields rank 0's manifest URL."""
    S = len(shards)
    pubs = [Publisher(tp_rank=0, tp_size=S)]
    pubs += [Publisher(tp_rank=r, tp_size=S, coordinator_url=pubs[0].url) for r in range(1, S)]
    try:
        for r, p in enumerate(pubs):
            p.publish(1, shards[r], naming="megatron", model_config=cfg)
        yield pubs[0].url
    finally:
        for p in pubs:
            p.close()


def test_shm_pull_every_pair_megatron_gqa():
    hf, cfg = model("gqa16_8", seed=7)
    for S, T in itertools.product((1, 2, 4), (1, 2, 4)):
        shards = hf_to_megatron(hf, cfg, S, pad_value=9.0)
        with published(shards, cfg) as url:
            for t in range(T):
                ref = hf_to_engine(hf, cfg, t, T)
                with Receiver(tp_rank=t, tp_size=T, param_specs=engine_specs(ref)) as recv:
                    out, rep = recv.pull(url, 1)
                bad = [n for n in ref if not torch.equal(out[n], ref[n])]
                assert not bad, (S, T, t, bad)
                assert rep["overpull_factor"] == 1.0  # strided reads: exactly the needed bytes


def test_shm_copy_program_variants_byte_identical():
    """The GPU copy program on CPU: short runs through _foreach_copy_ (the default), or
    batched into strided 2-D copies (Megatron QKV split per KV group), or one copy each;
    row-parallel column ranges as strided 2-D copies of a wide element type. Every variant
    byte-identical, in place too."""
    hf, cfg = model("gqa16_8", seed=9)
    variants = {"grids": {"big_run_bytes": 1 << 30, "grid_runs": True}, "foreach": {"big_run_bytes": 1 << 30},
                "copies": {"big_run_bytes": 0}}
    for S, T in ((1, 1), (2, 1), (1, 2), (4, 2)):
        shards = hf_to_megatron(hf, cfg, S, pad_value=9.0)
        with published(shards, cfg) as url:
            for t in range(T):
                ref = hf_to_engine(hf, cfg, t, T)
                for name, opts in variants.items():
                    with Receiver(tp_rank=t, tp_size=T, param_specs=engine_specs(ref),
                                  transport_options={"shm": opts}) as recv:
                        out, rep = recv.pull(url, 1)
                        assert not [n for n in ref if not torch.equal(out[n], ref[n])], (S, T, t, name)
                        prog = next(iter(recv._readers["shm"]._programs.values()))[1]
                        if name == "grids":
                            # S=1: per layer one grid each for q, k, v (GQA 16/8: 8 groups)
                            assert len(prog["grids"]) >= 3 * cfg["num_hidden_layers"], (S, T)
                            assert rep["copy_ops"] < prog["runs"]
                        elif S == T:  # no column ranges: no strided copies at all
                            assert prog["grids"] == [] and prog["strided"] == []
                        # in place into the same layout again: the bound program is reused
                        into = {n: torch.zeros_like(v) for n, v in out.items()}
                        out2, _ = recv.pull(url, 1, into=into)
                        assert out2 is not out
                        assert not [n for n in ref if not torch.equal(into[n], ref[n])], (S, T, t, name)


def test_dist_pull_direct_and_staged_paths():
    """gloo in one process (publisher thread ↔ receiver): row-parallel tensors resharded to a
    wider target travel as whole rows (staged, over-pull T/S); everything else goes straight
    into the destination buffer."""
    hf, cfg = model("gqa16_8", seed=8)
    for (S, T), direct_min in itertools.product(((1, 2), (2, 4), (4, 1)), (0, 8 << 20)):
        shards = hf_to_megatron(hf, cfg, S)
        with published(shards, cfg) as url:
            for t in range(T):
                ref = hf_to_engine(hf, cfg, t, T)
                # direct_min 0: every run its own message; 8 MiB: all of this small model's runs staged
                opts = {"msg_bytes": 4096, "direct_min_bytes": direct_min}
                with Receiver(tp_rank=t, tp_size=T, param_specs=engine_specs(ref),
                              transport_options={"dist": opts}) as recv:
                    out, rep = recv.pull(url, 1, "dist", timeout_s=60)
                    direct, staged, _ = next(v[1] for k, v in recv._readers["dist"]._programs.items()
                                             if len(k) == 4)
                    assert (direct == []) is (direct_min > 0), (S, T, len(direct))
                    assert staged or direct_min == 0
                assert rep["transport"] == "dist"
                assert not [n for n in ref if not torch.equal(out[n], ref[n])], (S, T, t)
                if T > S:
                    assert rep["overpull_by_role"]["row"] == T / S
                    assert rep["overpull_factor"] > 1.0
