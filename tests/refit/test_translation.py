"""Megatron↔HF translation + planner: byte-identical for every S, T ∈ {1, 2, 4} (in-process
execution of the plan: the same copies the transports run), interleave order, over-pull."""

from __future__ import annotations

import itertools

import pytest
import torch

from dynamo_rl.refit.megatron import engine_specs, hf_to_engine, hf_to_megatron, padded_vocab
from dynamo_rl.refit.planner import apply_local, plan_target
from dynamo_rl.refit.roles import local_descriptors, merge_descriptors

from refit_models import CONFIGS, hf_shard, model

SIZES = (1, 2, 4)


def publish_local(shards_per_rank):
    return merge_descriptors(
        local_descriptors(s, rank=r, tp_rank=r, tp_size=len(shards_per_rank))
        for r, s in enumerate(shards_per_rank)
    )


def check(hf, cfg, naming, S, T):
    if naming == "megatron":
        shards = hf_to_megatron(hf, cfg, S, pad_value=9.0)
        shards = [{"module." + k: v for k, v in s.items()} for s in shards]  # DDP wrapper
    else:
        shards = [hf_shard(hf, cfg, r, S) for r in range(S)]
    descs = publish_local(shards)
    sources = {r: {k.removeprefix("module."): v for k, v in s.items()} for r, s in enumerate(shards)}
    overpull = []
    for t in range(T):
        ref = hf_to_engine(hf, cfg, t, T)
        specs = engine_specs(ref)
        plan = plan_target(descs, naming, cfg, specs, t, T)
        out = apply_local(plan, sources, specs)
        assert set(out) == set(ref)
        bad = [n for n in ref if not torch.equal(out[n], ref[n])]
        assert not bad, f"{naming} S={S} T={T} rank {t}: {bad}"
        overpull.append(plan.overpull_by_role)
    return overpull


@pytest.mark.parametrize("key", ["tiny", "gqa16_8", "gqa32_4", "moe8"])
@pytest.mark.parametrize("naming", ["megatron", "hf"])
def test_byte_identical_all_pairs(key, naming):
    hf, cfg = model(key, seed=1)
    for S, T in itertools.product(SIZES, SIZES):
        if naming == "megatron" and cfg["num_key_value_heads"] % S:
            continue  # Megatron-Core requires num_query_groups % TP == 0 (tiny: 2 KV heads)
        over = check(hf, cfg, naming, S, T)
        for roles in over:
            for role, f in roles.items():
                if role in ("row", "expert_row"):  # dim-1 split: whole rows forced when T > S
                    assert f == pytest.approx(max(1.0, T / S)), (role, S, T)
                else:  # axis-0 roles and replicated: never more than needed
                    assert f == 1.0, (role, S, T)


def test_qkv_interleave_round_trip_head_index():
    cfg = dict(CONFIGS["gqa32_4"])
    nq, ng, hd, H = 32, 4, cfg["head_dim"], cfg["hidden_size"]
    hf, _ = model("gqa32_4")
    L = "model.layers.0.self_attn."
    hf[L + "q_proj.weight"] = torch.arange(nq).repeat_interleave(hd).float()[:, None].expand(-1, H).clone()
    hf[L + "k_proj.weight"] = (100 + torch.arange(ng)).repeat_interleave(hd).float()[:, None].expand(-1, H).clone()
    hf[L + "v_proj.weight"] = (200 + torch.arange(ng)).repeat_interleave(hd).float()[:, None].expand(-1, H).clone()
    for S in SIZES:
        shards = hf_to_megatron(hf, cfg, S)
        qpg = nq // ng
        for r, s in enumerate(shards):
            heads = s["decoder.layers.0.self_attention.linear_qkv.weight"][::hd, 0].tolist()
            expect = []
            for g in range(r * ng // S, (r + 1) * ng // S):
                expect += list(range(g * qpg, (g + 1) * qpg)) + [100 + g, 200 + g]
            assert heads == expect, (S, r)
        for T in SIZES:
            descs = publish_local(shards)
            for t in range(T):
                ref = hf_to_engine(hf, cfg, t, T)
                out = apply_local(plan_target(descs, "megatron", cfg, engine_specs(ref), t, T),
                                  dict(enumerate(shards)), engine_specs(ref))
                q = out[L + "q_proj.weight"][::hd, 0].tolist()
                assert q == list(range(t * nq // T, (t + 1) * nq // T))
                k = out[L + "k_proj.weight"][::hd, 0].tolist()
                assert k == [100 + g for g in range(t * ng // T, (t + 1) * ng // T)]


def test_kv_heads_replicated_when_target_tp_exceeds_kv_heads():
    hf, cfg = model("tiny")  # 2 KV heads
    ref = [hf_to_engine(hf, cfg, t, 4) for t in range(4)]
    k = "model.layers.0.self_attn.k_proj.weight"
    full = hf[k]
    assert torch.equal(ref[0][k], full[:32]) and torch.equal(ref[1][k], full[:32])
    assert torch.equal(ref[2][k], full[32:]) and torch.equal(ref[3][k], full[32:])


def test_gated_fc1_and_vocab_padding_layout():
    hf, cfg = model("gqa16_8", seed=2)
    shards = hf_to_megatron(hf, cfg, 2, pad_value=9.0)
    F = cfg["intermediate_size"]
    g, u = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    fc1 = shards[1]["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([g[F // 2:], u[F // 2:]]))
    vp = padded_vocab(cfg["vocab_size"], 2)
    assert vp == 256
    emb1 = shards[1]["embedding.word_embeddings.weight"]
    assert emb1.shape[0] == 128 and bool((emb1 == 9.0).all())  # rows 128.. are all padding


def test_tied_lm_head_served_from_embeddings_and_sequential_experts():
    hf, cfg = model("moe8", seed=4)  # tied embeddings
    shards = hf_to_megatron(hf, cfg, 2, experts="sequential", fused_norms=False)
    assert "decoder.layers.0.mlp.experts.local_experts.7.linear_fc1.weight" in shards[1]
    descs = publish_local(shards)
    for t in range(2):
        ref = hf_to_engine(hf, cfg, t, 2)
        specs = engine_specs(ref)
        specs["lm_head.weight"] = specs["model.embed_tokens.weight"]  # an engine that keeps lm_head
        out = apply_local(plan_target(descs, "megatron", cfg, specs, t, 2), dict(enumerate(shards)), specs)
        assert torch.equal(out["lm_head.weight"], ref["model.embed_tokens.weight"])
        assert all(torch.equal(out[n], ref[n]) for n in ref)
