"""Functional forward of a Qwen3 / Llama-family decoder over a slot-based KV cache.

The forward reads the Hugging Face module's own parameters at every call (never copies
of them), so a weight swap on the module (``param.data = t`` or ``param.data.copy_(t)``)
is seen by the next forward. Supported: the ``<Family>ForCausalLM`` layout of Qwen3,
Qwen2 and Llama (``model.embed_tokens``, ``model.layers[i].{input_layernorm, self_attn,
post_attention_layernorm, mlp}``, ``model.norm``, ``lm_head``), optional q/k/v/o biases,
optional per-head ``q_norm``/``k_norm`` (Qwen3), grouped-query attention, any RoPE type the
model's own ``rotary_emb`` implements (its cos/sin are tabulated once per position), a
gated MLP (``down(act(gate(x)) * up(x))``), tied or untied ``lm_head``. Not supported
(refused at construction): sliding-window layers, mixture-of-experts MLPs. RoPE types
whose frequencies depend on the sequence length seen (``dynamic``) are tabulated once for
``max_seq_len`` and so differ from HF below that length.

KV cache layout: per layer one key and one value tensor
``[num_slots, n_kv_heads, max_seq_len, head_dim]`` in the model dtype. A request owns a
slot; the caller tracks how many positions of its slot are valid. Numerics follow
``transformers`` (RMSNorm in fp32 then cast back, RoPE tables computed in fp32 and cast
to the model dtype, softmax of attention in fp32 inside SDPA) so that the logits match a
plain HF forward of the same sequence to float round-off.

Must not import any other ``dynamo_rl`` module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class UnsupportedModelError(ValueError):
    """The HF model does not have the decoder layout this forward implements."""


@dataclass
class DecoderShape:
    """Static shape facts of the decoder, read from the HF config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int


def describe_decoder(model) -> DecoderShape:
    """Check that ``model`` has the supported layout and return its shape facts.

    Raises:
        UnsupportedModelError: naming the missing module or the unsupported feature.
    """
    cfg = model.config
    base = getattr(model, "model", None)
    for owner, attr in ((model, "model"), (base, "embed_tokens"), (base, "layers"), (base, "norm"),
                        (base, "rotary_emb"), (model, "lm_head")):
        if owner is None or not hasattr(owner, attr):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no '{attr}' module; the engine serves the "
                "Qwen3/Qwen2/Llama <Family>ForCausalLM layout only"
            )
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(
            f"layer types {sorted(set(layer_types))} are not supported (sliding-window attention); "
            "serve a model whose config has use_sliding_window=false"
        )
    for i, layer in enumerate(base.layers):
        mlp = layer.mlp
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            raise UnsupportedModelError(
                f"layer {i} mlp ({type(mlp).__name__}) is not a gated MLP (mixture-of-experts?); "
                "the engine serves dense Qwen3/Qwen2/Llama models only"
            )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return DecoderShape(
        num_layers=len(base.layers),
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
    )


# --------------------------------------------------------------------------- building blocks


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as in ``transformers`` (normalize in fp32, cast back, then scale).

    Args:
        x: ``[..., D]`` in the model dtype.
        weight: ``[D]``.
    Returns:
        ``[..., D]`` in ``x.dtype`` (``weight.dtype`` when they differ, as in HF).
    """
    dtype = x.dtype
    fp32 = dtype == torch.float32   # (no .to() calls then: ~2 us each, 9 norms a forward)
    x32 = x if fp32 else x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 if fp32 else x32.to(dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` → ``[..., D]``: ``cat(-x[D/2:], x[:D/2])`` (the HF/GPT-NeoX RoPE convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` by ``cos``/``sin`` ``[B, T, D]`` (broadcast over heads)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def rope_tables(model, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[max_seq_len, head_dim]`` (model dtype, model device) for positions 0..L-1.

    Uses the model's own ``model.rotary_emb`` (so every RoPE type ``transformers`` implements,
    read from ``config.rope_parameters``, is honoured); the values are bitwise those HF
    computes for the same positions.
    """
    ref = model.model.embed_tokens.weight
    positions = torch.arange(max_seq_len, device=ref.device)[None]
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(ref[:1, :1].expand(1, max_seq_len, 1), positions)
    return cos[0].contiguous(), sin[0].contiguous()


def linear(x: torch.Tensor, proj) -> torch.Tensor:
    """``x @ proj.weight.T (+ proj.bias)``, reading the HF ``nn.Linear``'s current parameters."""
    return F.linear(x, proj.weight, proj.bias)


# --------------------------------------------------------------------------- KV cache


class KVCache:
    """Key/value tensors per layer, ``[num_slots, n_kv_heads, max_seq_len, head_dim]`` each.

    Zero-initialised, so a masked-out position never holds NaN/inf. ``nbytes`` is the
    total size in bytes.
    """

    def __init__(self, shape: DecoderShape, num_slots: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        dims = (num_slots, shape.num_kv_heads, max_seq_len, shape.head_dim)
        self.k = [torch.zeros(dims, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.v = [torch.zeros(dims, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.nbytes = sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy positions ``0 .. length - 1`` of slot ``src`` into slot ``dst`` (every layer)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


@dataclass
class Batch:
    """Index tensors of one forward (tensors on the model device; built on the host so
    that the forward needs no device-to-host synchronisation).

    ``tokens`` int64 ``[B, T]``: the rows' new tokens, right-padded. ``slots`` int64 ``[B]``:
    KV slot of each row. ``starts`` int64 ``[B]``: positions already cached in the slot;
    the row's tokens take positions ``starts .. starts + n_new - 1``. ``n_new`` int64
    ``[B]``: valid tokens per row (>= 1); a decode step is ``T == 1``. ``width``: cache
    positions read, ``max(starts + n_new)``. ``write_rows`` / ``write_slots`` /
    ``write_pos`` int64 ``[N]``: for each valid token, its index in the flattened ``[B*T]``
    batch, its slot and its position. ``slot_range``: ``(lo, hi)`` when ``slots`` is
    exactly ``lo, lo+1, .., hi-1`` (the cache is then read as a view, without a gather).
    ``fresh``: every row starts at position 0 (a prefill without cached prefix): attention
    then needs only the batch's own keys/values, causally (:func:`attend`).
    """

    tokens: torch.Tensor
    slots: torch.Tensor
    starts: torch.Tensor
    n_new: torch.Tensor
    width: int
    write_rows: torch.Tensor
    write_slots: torch.Tensor
    write_pos: torch.Tensor
    slot_range: tuple[int, int] | None
    fresh: bool = False


def make_batch(rows: list[list[int]], slots: list[int], starts: list[int], device) -> Batch:
    """Right-pad ``rows`` (token ids) into one ``[B, T]`` tensor and build the index tensors."""
    width_t = max(len(r) for r in rows)
    # one tensor from the padded lists (a tensor per row costs ~6 us each: 0.2 ms at 32 rows)
    tokens = torch.tensor([r + [0] * (width_t - len(r)) for r in rows], dtype=torch.long)
    write_rows, write_slots, write_pos = [], [], []
    for i, (r, slot, start) in enumerate(zip(rows, slots, starts)):
        write_rows.extend(range(i * width_t, i * width_t + len(r)))
        write_slots.extend([slot] * len(r))
        write_pos.extend(range(start, start + len(r)))
    contiguous = slots == list(range(slots[0], slots[0] + len(slots)))

    def put(xs):
        return torch.tensor(xs, dtype=torch.long).to(device, non_blocking=True)

    return Batch(
        tokens=tokens.to(device, non_blocking=True),
        slots=put(slots),
        starts=put(starts),
        n_new=put([len(r) for r in rows]),
        width=max(s + len(r) for s, r in zip(starts, rows)),
        write_rows=put(write_rows),
        write_slots=put(write_slots),
        write_pos=put(write_pos),
        slot_range=(slots[0], slots[0] + len(slots)) if contiguous else None,
        fresh=not any(starts),
    )


# --------------------------------------------------------------------------- forward


def project_qkv(layer, x: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of ``x`` ``[..., hidden]`` as ``[..., heads, head_dim]`` (Qwen3's per-head
    ``q_norm``/``k_norm`` applied, before RoPE)."""
    attn = layer.self_attn
    lead = x.shape[:-1]
    q = linear(x, attn.q_proj).view(*lead, -1, head_dim)
    k = linear(x, attn.k_proj).view(*lead, -1, head_dim)
    v = linear(x, attn.v_proj).view(*lead, -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over head_dim, before RoPE
        q = rms_norm(q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
        k = rms_norm(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
    return q, k, v


def attend(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, index: int, batch: Batch,
           cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """RoPE, the cache write of the rows' keys/values, and attention over their slots.

    Args:
        q, k, v: ``[B, T, heads, head_dim]`` from :func:`project_qkv`.
        cos, sin: ``[B, T, head_dim]`` RoPE at the rows' absolute positions.
        mask: bool ``[B, 1, T, batch.width]``; True where query t may attend to cache position j
            (None for a fresh batch: causal over its own keys/values).
    Returns:
        ``[B, T, heads * head_dim]``, before ``o_proj``.
    """
    attn = layer.self_attn
    B, T = q.shape[:2]
    head_dim = cos.shape[-1]
    q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
    k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, Hkv, T, D]
    v = v.transpose(1, 2)
    # write the valid tokens' keys/values into their slots: [N, Hkv, D] each
    k_cache, v_cache = cache.k[index], cache.v[index]
    n_kv = k.shape[1]
    k_new = k.transpose(1, 2).reshape(B * T, n_kv, head_dim).index_select(0, batch.write_rows)
    v_new = v.transpose(1, 2).reshape(B * T, n_kv, head_dim).index_select(0, batch.write_rows)
    k_cache[batch.write_slots, :, batch.write_pos] = k_new
    v_cache[batch.write_slots, :, batch.write_pos] = v_new
    scale = getattr(attn, "scaling", head_dim ** -0.5)
    if batch.fresh:
        # no cached prefix: each row attends to its own new keys/values, causally (a right-padded
        # row's valid tokens see only valid ones); one fused kernel, no mask, no cache read
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).reshape(B, T, -1)
    width = batch.width
    if batch.slot_range is not None:  # the rows' slots are consecutive: read a view
        lo, hi = batch.slot_range
        keys, values = k_cache[lo:hi, :, :width], v_cache[lo:hi, :, :width]
    else:  # gather the rows' slots: [B, Hkv, width, D]
        keys = k_cache[:, :, :width].index_select(0, batch.slots)
        values = v_cache[:, :, :width].index_select(0, batch.slots)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    )  # [B, H, T, D]
    return out.transpose(1, 2).reshape(B, T, -1)


def attention(layer, x: torch.Tensor, cache: KVCache, index: int, batch: Batch,
              cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Self-attention of one layer; writes the rows' keys/values into their slots.

    Args:
        x: ``[B, T, hidden]`` normalized hidden states.
        cos, sin: ``[B, T, head_dim]`` RoPE at the rows' absolute positions.
        mask: bool ``[B, 1, T, batch.width]``; True where query t may attend to cache position j
            (None for a fresh batch).

    Returns:
        ``[B, T, hidden]`` after ``o_proj``.
    """
    q, k, v = project_qkv(layer, x, cos.shape[-1])
    return linear(attend(layer, q, k, v, cache, index, batch, cos, sin, mask), layer.self_attn.o_proj)


def mlp(layer, x: torch.Tensor) -> torch.Tensor:
    """Gated MLP ``down(act(gate(x)) * up(x))``, ``[B, T, hidden]`` → ``[B, T, hidden]``."""
    m = layer.mlp
    return linear(m.act_fn(linear(x, m.gate_proj)) * linear(x, m.up_proj), m.down_proj)


def _rope_and_mask(batch: Batch, cos_table: torch.Tensor, sin_table: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """cos, sin ``[B, T, head_dim]`` at the rows' positions and the causal mask
    ``[B, 1, T, width]`` of ``batch`` (None for a fresh batch: :func:`attend` needs none)."""
    B, T = batch.tokens.shape
    device = batch.tokens.device
    t = torch.arange(T, device=device)
    positions = batch.starts[:, None] + t[None]  # [B, T]
    lookup = positions.clamp(max=cos_table.shape[0] - 1)
    if batch.fresh:
        return cos_table[lookup], sin_table[lookup], None
    j = torch.arange(batch.width, device=device)
    ends = (batch.starts + batch.n_new)[:, None, None]  # [B, 1, 1]
    mask = (j[None, None, :] <= positions[:, :, None]) & (j[None, None, :] < ends)
    return cos_table[lookup], sin_table[lookup], mask[:, None]


def forward(model, cache: KVCache, batch: Batch, cos_table: torch.Tensor,
            sin_table: torch.Tensor) -> torch.Tensor:
    """Run the decoder on ``batch`` and return the logits of each row's last valid token.

    Keys/values of every valid token are written into the row's slot at positions
    ``starts .. starts + n_new - 1``; attention sees the slot's positions ``0 .. p`` for the
    token at position ``p`` (causal). Padded tokens are computed but never read.

    Args:
        model: the HF ``<Family>ForCausalLM`` (checked by :func:`describe_decoder`).
        cos_table, sin_table: ``[max_seq_len, head_dim]`` from :func:`rope_tables`.

    Returns:
        logits ``[B, vocab]`` in the model dtype.
    """
    base = model.model
    tokens = batch.tokens
    B = tokens.shape[0]
    cos, sin, mask = _rope_and_mask(batch, cos_table, sin_table)
    h = F.embedding(tokens, base.embed_tokens.weight)
    for i, layer in enumerate(base.layers):
        ln1 = layer.input_layernorm
        h = h + attention(layer, rms_norm(h, ln1.weight, ln1.variance_epsilon), cache, i, batch,
                          cos, sin, mask)
        ln2 = layer.post_attention_layernorm
        h = h + mlp(layer, rms_norm(h, ln2.weight, ln2.variance_epsilon))
    last = h[torch.arange(B, device=tokens.device), batch.n_new - 1]  # [B, hidden]
    last = rms_norm(last, base.norm.weight, base.norm.variance_epsilon)
    return linear(last, model.lm_head)


def forward_groups(model, cache: KVCache, batches: list[Batch], cos_table: torch.Tensor,
                   sin_table: torch.Tensor) -> torch.Tensor:
    """:func:`forward` of several batches in one pass: the norms, projections and MLPs run
    once over all their tokens (packed, no padding between batches), attention per batch.

    A prefill of a few prompts (``[Bp, T]``) and a decode step of the running requests
    (``[Bd, 1]``) then cost one forward without padding the decode rows to ``T``
    (``Engine(mix_prefill_decode=True)``). Same numerics as :func:`forward` of each batch
    up to float round-off (the matmuls see other shapes).

    Returns:
        logits ``[sum of B, vocab]`` in the model dtype, in the order of ``batches``.
    """
    base = model.model
    device = batches[0].tokens.device
    rope = [_rope_and_mask(b, cos_table, sin_table) for b in batches]
    shapes = [tuple(b.tokens.shape) for b in batches]
    sizes = [rows * width for rows, width in shapes]
    head_dim = cos_table.shape[-1]
    h = F.embedding(torch.cat([b.tokens.reshape(-1) for b in batches]), base.embed_tokens.weight)  # [N, hidden]
    for i, layer in enumerate(base.layers):
        ln1 = layer.input_layernorm
        q, k, v = project_qkv(layer, rms_norm(h, ln1.weight, ln1.variance_epsilon), head_dim)  # [N, heads, D]
        outs = [attend(layer, qg.view(*shape, *qg.shape[1:]), kg.view(*shape, *kg.shape[1:]),
                       vg.view(*shape, *vg.shape[1:]), cache, i, b, cos, sin, mask).reshape(shape[0] * shape[1], -1)
                for b, shape, (cos, sin, mask), qg, kg, vg
                in zip(batches, shapes, rope, q.split(sizes), k.split(sizes), v.split(sizes))]
        h = h + linear(torch.cat(outs), layer.self_attn.o_proj)
        ln2 = layer.post_attention_layernorm
        h = h + mlp(layer, rms_norm(h, ln2.weight, ln2.variance_epsilon))
    offsets = [sum(sizes[:g]) for g in range(len(sizes))]
    last_rows = torch.cat([off + torch.arange(rows, device=device) * width + b.n_new - 1
                           for b, (rows, width), off in zip(batches, shapes, offsets)])
    last = rms_norm(h[last_rows], base.norm.weight, base.norm.variance_epsilon)
    return linear(last, model.lm_head)
