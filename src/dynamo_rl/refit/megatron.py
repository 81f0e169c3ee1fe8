"""Megatron-Core ↔ Hugging Face names and layouts (Qwen3 / Llama family, dense and MoE).

Conventions (Megatron-LM ``megatron/core/transformer/attention.py`` ``get_query_key_value_tensors``,
Megatron-Bridge ``models/conversion/param_mapping.py`` ``QKVMapping`` / ``GatedMLPMapping``):

* Fused QKV ``linear_qkv`` (weight ``[ng·(nq/ng+2)·hd, H]``, bias likewise): rows grouped by
  KV group g = 0..ng-1; group g holds its nq/ng query heads (hd rows each), then k-head g,
  then v-head g. TP rank r holds whole groups ``[r·ng/TP, (r+1)·ng/TP)``, so the
  concatenation of all ranks' shards is the same group-ordered tensor for every TP size.
* Gated ``linear_fc1``: rank r holds ``[gate_r; up_r]`` (each ``F/TP`` rows). The
  concatenation over ranks is ``[G0;U0;G1;U1;...]``: it depends on the TP size.
* Vocabulary padding: ``V_p = ceil(V / (m·TP))·(m·TP)`` (``make_vocab_size_divisible_by`` m,
  default 128); rank r owns rows ``[r·V_p/TP, (r+1)·V_p/TP)``; HF export trims rows ≥ V.
* Row-parallel (``linear_proj`` = ``o_proj``, ``linear_fc2`` = ``down_proj``) and everything
  else map 1:1 with a rename; tied embeddings have no ``output_layer``/``lm_head``.

Engine (target) layout, vLLM style, for TP size T: column tensors split on dim 0
(q/k/v by heads; when T > num KV heads each KV head is replicated T/nkv times and rank t
holds head ``t // (T/nkv)``), gate/up each split on dim 0, row tensors on dim 1,
embeddings / lm_head split on rows with the rows per rank taken from the engine's
``param_specs()`` (rows ≥ V are zero padding), norms / router replicated; MoE experts are
split like dense MLPs.

This module provides the *source view* used by the planner (:func:`hf_view`) and two
reference sharders used as test oracles and by publishers: :func:`hf_to_megatron`
(HF state dict → per-rank Megatron shards) and :func:`hf_to_engine` (HF state dict →
the engine's TP-rank tensors).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from dynamo_rl.refit.errors import MismatchError
from dynamo_rl.refit.roles import Role, TensorDescriptor, classify


@dataclass(frozen=True)
class ModelDims:
    """The few config fields layout translation needs (from an HF config dict)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    tied: bool
    num_layers: int = 0
    num_experts: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping) -> "ModelDims":
        try:
            nq = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            vocab = int(cfg["vocab_size"])
        except KeyError as e:
            raise MismatchError(
                f"model_config lacks {e.args[0]!r}; pass the HF config dict (config.to_dict())"
            ) from None
        return cls(
            num_heads=nq,
            num_kv_heads=int(cfg.get("num_key_value_heads") or nq),
            head_dim=int(cfg.get("head_dim") or hidden // nq),
            hidden_size=hidden,
            vocab_size=vocab,
            tied=bool(cfg.get("tie_word_embeddings", False)),
            num_layers=int(cfg.get("num_hidden_layers") or 0),
            num_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0),
        )


# ----------------------------------------------------------------------------- names

L = r"decoder\.layers\.(?P<i>\d+)\."
_M2H: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^embedding\.word_embeddings\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^output_layer\.weight$"), "lm_head.weight"),
    (re.compile(r"^decoder\.final_layernorm\.weight$"), "model.norm.weight"),
    (re.compile(L + r"self_attention\.linear_qkv\.layer_norm_weight$"), "model.layers.{i}.input_layernorm.weight"),
    (re.compile(L + r"input_layernorm\.weight$"), "model.layers.{i}.input_layernorm.weight"),
    (re.compile(L + r"self_attention\.q_layernorm\.weight$"), "model.layers.{i}.self_attn.q_norm.weight"),
    (re.compile(L + r"self_attention\.k_layernorm\.weight$"), "model.layers.{i}.self_attn.k_norm.weight"),
    (re.compile(L + r"self_attention\.linear_proj\.weight$"), "model.layers.{i}.self_attn.o_proj.weight"),
    (re.compile(L + r"self_attention\.linear_proj\.bias$"), "model.layers.{i}.self_attn.o_proj.bias"),
    (re.compile(L + r"mlp\.linear_fc1\.layer_norm_weight$"), "model.layers.{i}.post_attention_layernorm.weight"),
    (re.compile(L + r"pre_mlp_layernorm\.weight$"), "model.layers.{i}.post_attention_layernorm.weight"),
    (re.compile(L + r"mlp\.linear_fc2\.weight$"), "model.layers.{i}.mlp.down_proj.weight"),
    (re.compile(L + r"mlp\.router\.weight$"), "model.layers.{i}.mlp.gate.weight"),
    (re.compile(L + r"mlp\.experts\.linear_fc2\.weight(?P<e>\d+)$"), "model.layers.{i}.mlp.experts.{e}.down_proj.weight"),
    (re.compile(L + r"mlp\.experts\.local_experts\.(?P<e>\d+)\.linear_fc2\.weight$"), "model.layers.{i}.mlp.experts.{e}.down_proj.weight"),
]
_QKV = re.compile(L + r"self_attention\.linear_qkv\.(?P<p>weight|bias)$")
_FC1 = re.compile(L + r"mlp\.linear_fc1\.(?P<p>weight|bias)$")
_EFC1 = re.compile(L + r"mlp\.experts\.(?:linear_fc1\.weight(?P<e>\d+)|local_experts\.(?P<e2>\d+)\.linear_fc1\.weight)$")


# ----------------------------------------------------------------------------- source view


@dataclass
class Piece:
    """HF global indices ``[hf_start, hf_start+length)`` on the view's ``dim`` come from
    source tensor ``src`` at global indices ``[src_start, src_start+length)`` (same dim)."""

    hf_start: int
    length: int
    src: str
    src_start: int


@dataclass
class HFTensor:
    """One HF tensor as the source provides it. ``dim`` None: identity (the whole source
    tensor ``pieces[0].src``, same shape); else ``pieces`` tile dim ``dim`` of ``shape``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    dim: int | None
    pieces: list[Piece] = field(default_factory=list)


def _fused_pieces(desc: TensorDescriptor) -> tuple[int, int]:
    """(number of source shards on dim 0, rows per shard) for a gated fc1 descriptor."""
    lengths = {p.length for p in desc.placement if p.dim == 0}
    if not lengths:  # TP=1 / replicated placement
        return 1, desc.global_shape[0]
    if len(lengths) != 1:
        raise MismatchError(f"{desc.name}: uneven TP shards {sorted(lengths)}")
    n = lengths.pop()
    return desc.global_shape[0] // n, n


def hf_view(
    tensors: Mapping[str, TensorDescriptor], naming: str, config: Mapping
) -> dict[str, HFTensor]:
    """Describe every HF tensor the source provides as pieces of source tensors.

    Args:
        tensors: published descriptors by (stripped) name.
        naming: ``"hf"`` or ``"megatron"``.
        config: the HF config dict (head counts, head_dim, vocab_size, tie_word_embeddings).
    Raises:
        MismatchError: unknown naming, a Megatron name without HF counterpart, or a fused
            tensor whose size disagrees with the config (all names listed).
    """
    dims = ModelDims.from_config(config)
    out: dict[str, HFTensor] = {}
    bad: dict[str, str] = {}

    def vocab_trim(hf_name: str, d: TensorDescriptor) -> HFTensor:
        v = dims.vocab_size
        if d.global_shape[0] < v:
            bad[d.name] = f"{d.global_shape[0]} rows < vocab_size {v}"
        shape = (v, *d.global_shape[1:])
        return HFTensor(hf_name, shape, d.dtype, 0, [Piece(0, v, d.name, 0)])

    if naming not in ("hf", "megatron"):
        raise MismatchError(f"unknown naming {naming!r}; use 'hf' or 'megatron'")
    for name, d in tensors.items():
        if naming == "hf":
            if d.role == Role.VOCAB_PARALLEL.value:
                out[name] = vocab_trim(name, d)
            else:
                out[name] = HFTensor(name, tuple(d.global_shape), d.dtype, None, [Piece(0, 0, name, 0)])
            continue
        m = _QKV.match(name)
        if m:
            i, p = m.group("i"), m.group("p")
            nq, ng, hd = dims.num_heads, dims.num_kv_heads, dims.head_dim
            qpg = nq // ng
            per = (qpg + 2) * hd
            if d.global_shape[0] != ng * per:
                bad[name] = f"{d.global_shape[0]} rows != num_kv_heads·(nq/ng+2)·head_dim = {ng * per}"
                continue
            rest = tuple(d.global_shape[1:])
            pre = f"model.layers.{i}.self_attn."
            q = HFTensor(pre + f"q_proj.{p}", (nq * hd, *rest), d.dtype, 0)
            k = HFTensor(pre + f"k_proj.{p}", (ng * hd, *rest), d.dtype, 0)
            v = HFTensor(pre + f"v_proj.{p}", (ng * hd, *rest), d.dtype, 0)
            for g in range(ng):
                base = g * per
                q.pieces.append(Piece(g * qpg * hd, qpg * hd, name, base))
                k.pieces.append(Piece(g * hd, hd, name, base + qpg * hd))
                v.pieces.append(Piece(g * hd, hd, name, base + (qpg + 1) * hd))
            for t in (q, k, v):
                out[t.name] = t
            continue
        m = _FC1.match(name) or _EFC1.match(name)
        if m:
            i, gd = m.group("i"), m.groupdict()
            if gd.get("p") is not None:
                pre, suf = f"model.layers.{i}.mlp.", gd["p"]
            else:
                e = gd.get("e") if gd.get("e") is not None else gd.get("e2")
                pre, suf = f"model.layers.{i}.mlp.experts.{e}.", "weight"
            if d.global_shape[0] % 2:
                bad[name] = f"gated fc1 with odd row count {d.global_shape[0]}"
                continue
            s, n = _fused_pieces(d)
            h = n // 2
            rest = tuple(d.global_shape[1:])
            gate = HFTensor(pre + f"gate_proj.{suf}", (d.global_shape[0] // 2, *rest), d.dtype, 0)
            up = HFTensor(pre + f"up_proj.{suf}", (d.global_shape[0] // 2, *rest), d.dtype, 0)
            for r in range(s):
                gate.pieces.append(Piece(r * h, h, name, r * n))
                up.pieces.append(Piece(r * h, h, name, r * n + h))
            out[gate.name], out[up.name] = gate, up
            continue
        for pat, tmpl in _M2H:
            m = pat.match(name)
            if m:
                hf = tmpl.format(**m.groupdict())
                if d.role == Role.VOCAB_PARALLEL.value:
                    out[hf] = vocab_trim(hf, d)
                else:
                    out[hf] = HFTensor(hf, tuple(d.global_shape), d.dtype, None, [Piece(0, 0, name, 0)])
                break
        else:
            bad[name] = "no Hugging Face counterpart known (Qwen3/Llama family)"
    if bad:
        raise MismatchError("cannot translate the publisher's Megatron tensors", mismatched=bad)
    return out


# ----------------------------------------------------------------------------- target layout


def target_region(
    hf_name: str,
    hf_shape: tuple[int, ...],
    spec_shape: tuple[int, ...],
    tp_rank: int,
    tp_size: int,
    dims: ModelDims,
) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]]]:
    """The part of HF tensor ``hf_name`` a target TP rank holds.

    Returns:
        ``(box, fills)``: ``box`` = per-dim ``(lo, hi)`` in HF global indices, placed at
        the origin of the destination tensor; ``fills`` = destination boxes to zero
        (vocabulary padding).
    Raises:
        MismatchError: the shape cannot be split that way or disagrees with ``spec_shape``.
    """
    _, role, _ = classify(hf_name)
    box = [(0, s) for s in hf_shape]
    fills: list[list[tuple[int, int]]] = []
    ndim = len(hf_shape)
    if tp_size > 1 and role != Role.REPLICATED:
        if role == Role.VOCAB_PARALLEL:
            rows = spec_shape[0]
            lo = tp_rank * rows
            hi = min(lo + rows, hf_shape[0])
            if lo >= hf_shape[0] and rows * tp_size < hf_shape[0]:
                raise MismatchError(mismatched={hf_name: "vocab rows per rank too small"})
            if rows * tp_size < hf_shape[0]:
                raise MismatchError(
                    mismatched={hf_name: f"{rows} rows × TP {tp_size} < vocab {hf_shape[0]}"}
                )
            box[0] = (lo, max(lo, hi))
            if hi - lo < rows:
                f = [(0, s) for s in spec_shape]
                f[0] = (max(0, hi - lo), rows)
                fills.append(f)
        else:
            dim = 1 if role in (Role.ROW, Role.EXPERT_ROW) else 0
            if dim >= ndim:  # a bias of a row-parallel layer (classified replicated anyway)
                dim = 0
            size = hf_shape[dim]
            is_kv = re.search(r"\.(k_proj|v_proj)\.(weight|bias)$", hf_name) is not None
            if is_kv and tp_size > dims.num_kv_heads:
                if tp_size % dims.num_kv_heads:
                    raise MismatchError(
                        mismatched={hf_name: f"TP {tp_size} is not a multiple of {dims.num_kv_heads} KV heads"}
                    )
                head = tp_rank // (tp_size // dims.num_kv_heads)
                hd = size // dims.num_kv_heads
                box[dim] = (head * hd, (head + 1) * hd)
            else:
                if size % tp_size:
                    raise MismatchError(
                        mismatched={hf_name: f"dim {dim} size {size} not divisible by TP {tp_size}"}
                    )
                n = size // tp_size
                box[dim] = (tp_rank * n, (tp_rank + 1) * n)
    local = tuple(hi - lo for lo, hi in box)
    if fills:
        local = (spec_shape[0], *local[1:])
    if tuple(local) != tuple(spec_shape):
        raise MismatchError(
            mismatched={hf_name: f"engine expects {list(spec_shape)}, TP {tp_size} rank {tp_rank} layout gives {list(local)}"}
        )
    return box, fills


# ----------------------------------------------------------------------------- reference sharders


def padded_vocab(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """Megatron's ``_vocab_size_with_padding``: ``ceil(V / (m·TP))·(m·TP)``."""
    m = multiple * tp_size
    return int(math.ceil(vocab_size / m) * m)


def hf_to_megatron(
    hf: Mapping[str, torch.Tensor],
    config: Mapping,
    tp_size: int,
    *,
    vocab_multiple: int = 128,
    pad_value: float = 0.0,
    experts: str = "grouped",
    fused_norms: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Reference sharder: a full HF state dict → per-TP-rank Megatron-Core shards.

    Args:
        hf: HF-named tensors (Qwen3/Llama dense or Qwen3-MoE with per-expert names).
        config: HF config dict.
        tp_size: Megatron TP size (also used as expert TP size).
        vocab_multiple: ``make_vocab_size_divisible_by``.
        pad_value: fill of the vocabulary padding rows (non-zero lets tests prove trimming).
        experts: ``"grouped"`` (TE ``experts.linear_fc1.weight{e}``) or ``"sequential"``
            (``experts.local_experts.{e}.linear_fc1.weight``).
        fused_norms: TE spec (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``);
            MoE layers always use ``pre_mlp_layernorm``.
    Returns:
        ``[rank0_dict, rank1_dict, ...]`` of contiguous tensors.
    """
    dims = ModelDims.from_config(config)
    nq, ng, hd = dims.num_heads, dims.num_kv_heads, dims.head_dim
    if ng % tp_size:
        raise MismatchError(f"Megatron needs num_kv_heads ({ng}) divisible by TP ({tp_size})")
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]

    def put_split(name, t, dim):
        for r, c in enumerate(torch.chunk(t, tp_size, dim=dim)):
            ranks[r][name] = c.contiguous().clone()

    def put_rep(name, t):
        for r in range(tp_size):
            ranks[r][name] = t.contiguous().clone()

    def vocab(name, t):
        vp = padded_vocab(dims.vocab_size, tp_size, vocab_multiple)
        full = torch.full((vp, *t.shape[1:]), pad_value, dtype=t.dtype)
        full[: t.shape[0]] = t
        put_split(name, full, 0)

    moe_layers = {m.group(1) for n in hf for m in [re.match(r"model\.layers\.(\d+)\.mlp\.experts\.", n)] if m}
    for name, t in hf.items():
        if name == "model.embed_tokens.weight":
            vocab("embedding.word_embeddings.weight", t)
        elif name == "lm_head.weight":
            if not dims.tied:
                vocab("output_layer.weight", t)
        elif name == "model.norm.weight":
            put_rep("decoder.final_layernorm.weight", t)
        else:
            m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
            if not m:
                raise MismatchError(f"no Megatron counterpart for {name!r}")
            i, rest = m.groups()
            pre = f"decoder.layers.{i}."
            moe = i in moe_layers
            if rest == "input_layernorm.weight":
                put_rep(pre + ("self_attention.linear_qkv.layer_norm_weight" if fused_norms else "input_layernorm.weight"), t)
            elif rest == "post_attention_layernorm.weight":
                put_rep(pre + ("mlp.linear_fc1.layer_norm_weight" if fused_norms and not moe else "pre_mlp_layernorm.weight"), t)
            elif rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
                put_rep(pre + "self_attention." + rest.split(".")[1][0] + "_layernorm.weight", t)
            elif rest in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
                p = rest.rsplit(".", 1)[1]
                q = t.reshape(ng, (nq // ng) * hd, *t.shape[1:])
                k = hf[f"model.layers.{i}.self_attn.k_proj.{p}"].reshape(ng, hd, *t.shape[1:])
                v = hf[f"model.layers.{i}.self_attn.v_proj.{p}"].reshape(ng, hd, *t.shape[1:])
                qkv = torch.cat([q, k, v], dim=1).reshape(-1, *t.shape[1:])
                put_split(pre + f"self_attention.linear_qkv.{p}", qkv, 0)
            elif re.match(r"self_attn\.[kv]_proj\.", rest):
                continue  # fused with q_proj above
            elif rest.startswith("self_attn.o_proj."):
                if rest.endswith("weight"):
                    put_split(pre + "self_attention.linear_proj.weight", t, 1)
                else:
                    put_rep(pre + "self_attention.linear_proj.bias", t)
            elif rest == "mlp.gate_proj.weight":
                up = hf[f"model.layers.{i}.mlp.up_proj.weight"]
                g, u = torch.chunk(t, tp_size, 0), torch.chunk(up, tp_size, 0)
                for r in range(tp_size):
                    ranks[r][pre + "mlp.linear_fc1.weight"] = torch.cat([g[r], u[r]]).contiguous()
            elif rest == "mlp.up_proj.weight":
                continue
            elif rest == "mlp.down_proj.weight":
                put_split(pre + "mlp.linear_fc2.weight", t, 1)
            elif rest == "mlp.gate.weight":
                put_rep(pre + "mlp.router.weight", t)
            else:
                m2 = re.match(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", rest)
                if not m2:
                    raise MismatchError(f"no Megatron counterpart for {name!r}")
                e, which = m2.groups()
                fc1 = (f"mlp.experts.linear_fc1.weight{e}" if experts == "grouped"
                       else f"mlp.experts.local_experts.{e}.linear_fc1.weight")
                fc2 = (f"mlp.experts.linear_fc2.weight{e}" if experts == "grouped"
                       else f"mlp.experts.local_experts.{e}.linear_fc2.weight")
                if which == "gate_proj":
                    up = hf[f"model.layers.{i}.mlp.experts.{e}.up_proj.weight"]
                    g, u = torch.chunk(t, tp_size, 0), torch.chunk(up, tp_size, 0)
                    for r in range(tp_size):
                        ranks[r][pre + fc1] = torch.cat([g[r], u[r]]).contiguous()
                elif which == "down_proj":
                    put_split(pre + fc2, t, 1)
    return ranks


def engine_param_specs(
    hf_specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], config: Mapping, tp_size: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The engine layout's ``param_specs`` for TP size ``tp_size`` from full HF shapes.

    Column tensors: dim 0 / T (k/v: one head when T > num KV heads); row: dim 1 / T;
    vocabulary: ``ceil(V/T)`` rows per rank; replicated: unchanged. A tied ``lm_head`` is
    omitted. Same for every rank (uniform shards).
    """
    dims = ModelDims.from_config(config)
    out = {}
    for name, (shape, dtype) in hf_specs.items():
        if name == "lm_head.weight" and dims.tied:
            continue
        _, role, _ = classify(name)
        spec = list(shape)
        if tp_size > 1 and role != Role.REPLICATED:
            if role == Role.VOCAB_PARALLEL:
                spec[0] = -(-shape[0] // tp_size)
            else:
                dim = 1 if role in (Role.ROW, Role.EXPERT_ROW) else 0
                kv = re.search(r"\.(k_proj|v_proj)\.", name) and tp_size > dims.num_kv_heads
                spec[dim] = dims.head_dim if kv else shape[dim] // tp_size
        out[name] = (tuple(spec), dtype)
    return out


def hf_to_engine(
    hf: Mapping[str, torch.Tensor], config: Mapping, tp_rank: int, tp_size: int
) -> dict[str, torch.Tensor]:
    """Reference sharder for the engine layout (the byte-identity oracle).

    Vocabulary tensors: ``V_p = ceil(V/T)·T`` rows, ``V_p/T`` per rank, padding rows zero.
    A tied ``lm_head.weight`` is omitted (as in ``Engine.param_specs()``).
    """
    dims = ModelDims.from_config(config)
    specs = engine_param_specs({n: (tuple(t.shape), t.dtype) for n, t in hf.items()}, config, tp_size)
    out: dict[str, torch.Tensor] = {}
    for name, (spec, _) in specs.items():
        t = hf[name]
        box, fills = target_region(name, tuple(t.shape), spec, tp_rank, tp_size, dims)
        dst = torch.zeros(spec, dtype=t.dtype)
        src = t[tuple(slice(lo, hi) for lo, hi in box)]
        dst[tuple(slice(0, hi - lo) for lo, hi in box)] = src
        out[name] = dst
    return out


def engine_specs(shards: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``param_specs()``-shaped dict of a set of engine tensors."""
    return {n: (tuple(t.shape), t.dtype) for n, t in shards.items()}
