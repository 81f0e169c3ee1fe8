"""Role classifier: wrapper prefixes, grouped / sequential experts, overrides, errors."""

from __future__ import annotations

import pytest

from dynamo_rl.refit.errors import MismatchError
from dynamo_rl.refit.roles import classify, classify_all, role_counts, strip_wrappers


def megatron_moe_names(layers=2, experts=4):
    names = ["module.embedding.word_embeddings.weight", "module.output_layer.weight",
             "module.decoder.final_layernorm.weight"]
    for i in range(layers):
        p = f"module.decoder.layers.{i}."
        names += [
            p + "self_attention.linear_qkv.layer_norm_weight",
            p + "self_attention.linear_qkv.weight",
            p + "self_attention.linear_qkv.bias",
            p + "self_attention.q_layernorm.weight",
            p + "self_attention.k_layernorm.weight",
            p + "self_attention.linear_proj.weight",
            p + "pre_mlp_layernorm.weight",
            p + "mlp.router.weight",
        ]
        names += [p + f"mlp.experts.linear_fc1.weight{e}" for e in range(experts)]
        names += [p + f"mlp.experts.linear_fc2.weight{e}" for e in range(experts)]
    return names


def test_counts_megatron_grouped_experts_with_module_prefix():
    names = megatron_moe_names(layers=2, experts=4)
    assert dict(role_counts(names)) == {
        "vocab_parallel": 2,
        "replicated": 1 + 2 * 5,          # final norm + (qkv ln, q/k norm, pre-mlp ln, router) × 2
        "qkv_column": 2 * 2,              # weight + bias
        "row": 2,
        "expert_column": 2 * 4,
        "expert_row": 2 * 4,
    }
    out = classify_all(names)
    assert all(not n.startswith("module.") for n in out)
    assert out["decoder.layers.1.mlp.experts.linear_fc1.weight3"][1] == {"expert": 3}


def test_counts_dense_megatron_and_hf_with_wrappers():
    dense = []
    for i in range(3):
        p = f"_orig_mod.module.decoder.layers.{i}._fsdp_wrapped_module."
        dense += [p + "self_attention.linear_qkv.weight", p + "self_attention.linear_proj.weight",
                  p + "self_attention.linear_proj.bias", p + "mlp.linear_fc1.weight",
                  p + "mlp.linear_fc1.layer_norm_weight", p + "mlp.linear_fc2.weight"]
    assert dict(role_counts(dense)) == {"qkv_column": 3, "row": 6, "replicated": 6, "gated_mlp_column": 3}
    hf = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for i in range(2):
        p = f"model.layers.{i}."
        hf += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        hf += [p + "self_attn.q_norm.weight", p + "input_layernorm.weight", p + "mlp.gate.weight"]
        hf += [p + f"mlp.experts.{e}.{w}.weight" for e in range(8) for w in ("gate_proj", "up_proj", "down_proj")]
    assert dict(role_counts(hf)) == {"vocab_parallel": 2, "replicated": 1 + 2 * 3, "column": 2 * 3,
                                     "row": 2, "expert_column": 2 * 16, "expert_row": 2 * 8}


def test_sequential_experts_and_strip():
    n = "module.decoder.layers.0.mlp.experts.local_experts.5.linear_fc1.weight"
    assert classify(n)[1:] == ("expert_column", {"expert": 5})
    assert strip_wrappers("model.submodule.module.x") == "model.submodule.x"


def test_unknown_names_listed_and_overrides():
    with pytest.raises(MismatchError) as e:
        classify_all(["module.foo.weird_a", "model.norm.weight", "bar.weird_b"])
    assert "foo.weird_a" in str(e.value) and "bar.weird_b" in str(e.value)
    assert "overrides" in str(e.value)
    out = classify_all(["module.foo.weird_a"], overrides={r"weird_a$": "row"})
    assert out["foo.weird_a"][0] == "row"


def test_duplicate_after_strip_is_an_error():
    with pytest.raises(MismatchError, match="strip to the same name"):
        classify_all(["module.model.norm.weight", "model.norm.weight"])
