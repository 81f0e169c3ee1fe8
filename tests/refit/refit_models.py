"""Model configs and deterministic HF-shaped tensors for the refit tests and benchmark.

``random_hf(cfg, seed)`` builds Qwen3-named tensors directly (dense, or Qwen3-MoE with
per-expert names), so tests need no transformers model except the real tiny Qwen3.
``hf_shard(hf, cfg, rank, size)`` is a generic role-based sharder for HF-named sources
(FSDP/DTensor-like: column on dim 0, row on dim 1, vocabulary padded to a multiple of the
size then split, norms replicated).
"""

from __future__ import annotations

import torch

from dynamo_rl.refit.roles import SHARD_DIM, Role, classify

CONFIGS = {
    # 16 query / 8 KV heads
    "gqa16_8": dict(num_attention_heads=16, num_key_value_heads=8, head_dim=8, hidden_size=64,
                    intermediate_size=96, vocab_size=100, num_hidden_layers=1, tie_word_embeddings=False),
    # 32 query / 4 KV heads
    "gqa32_4": dict(num_attention_heads=32, num_key_value_heads=4, head_dim=4, hidden_size=64,
                    intermediate_size=64, vocab_size=77, num_hidden_layers=1, tie_word_embeddings=False),
    # Qwen3-MoE-like, 8 experts
    "moe8": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, hidden_size=32,
                 intermediate_size=64, moe_intermediate_size=16, num_experts=8, vocab_size=61,
                 num_hidden_layers=2, tie_word_embeddings=True),
}


def tiny():
    """(hf state dict without the tied lm_head, config dict) of the real tiny Qwen3."""
    from dynamo_rl.models import build_tiny_model

    m = build_tiny_model()
    sd = {k: v.detach().clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    return sd, m.config.to_dict()


def random_hf(cfg: dict, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nq, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    sd = {"model.embed_tokens.weight": r(V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = r(H)
        sd[p + "self_attn.q_proj.weight"] = r(nq * hd, H)
        sd[p + "self_attn.k_proj.weight"] = r(nkv * hd, H)
        sd[p + "self_attn.v_proj.weight"] = r(nkv * hd, H)
        sd[p + "self_attn.o_proj.weight"] = r(H, nq * hd)
        sd[p + "self_attn.q_norm.weight"] = r(hd)
        sd[p + "self_attn.k_norm.weight"] = r(hd)
        sd[p + "post_attention_layernorm.weight"] = r(H)
        if cfg.get("num_experts"):
            E, F = cfg["num_experts"], cfg["moe_intermediate_size"]
            sd[p + "mlp.gate.weight"] = r(E, H)
            for e in range(E):
                sd[p + f"mlp.experts.{e}.gate_proj.weight"] = r(F, H)
                sd[p + f"mlp.experts.{e}.up_proj.weight"] = r(F, H)
                sd[p + f"mlp.experts.{e}.down_proj.weight"] = r(H, F)
        else:
            F = cfg["intermediate_size"]
            sd[p + "mlp.gate_proj.weight"] = r(F, H)
            sd[p + "mlp.up_proj.weight"] = r(F, H)
            sd[p + "mlp.down_proj.weight"] = r(H, F)
    sd["model.norm.weight"] = r(H)
    if not cfg.get("tie_word_embeddings"):
        sd["lm_head.weight"] = r(V, H)
    return sd


def hf_shard(hf: dict, cfg: dict, rank: int, size: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in hf.items():
        _, role, _ = classify(name)
        dim = SHARD_DIM[role]
        if dim is None or dim >= t.dim():
            out[name] = t.clone()
            continue
        if role == Role.VOCAB_PARALLEL:
            vp = -(-t.shape[0] // size) * size
            full = torch.full((vp, *t.shape[1:]), 3.0, dtype=t.dtype)  # non-zero padding
            full[: t.shape[0]] = t
            t = full
        out[name] = torch.chunk(t, size, dim)[rank].contiguous().clone()
    return out


def model(key: str, seed: int = 0):
    """(hf tensors, config) for "tiny" or a CONFIGS key."""
    if key == "tiny":
        sd, cfg = tiny()
        if seed:
            g = torch.Generator().manual_seed(seed)
            sd = {k: v + torch.randn(v.shape, generator=g) for k, v in sd.items()}
        return sd, cfg
    cfg = dict(CONFIGS[key])
    return random_hf(cfg, seed), cfg
