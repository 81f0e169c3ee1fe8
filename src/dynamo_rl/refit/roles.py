"""Tensor roles, descriptors and the role classifier.

A *role* says how a tensor is split across tensor-parallel (TP) ranks, following the
Megatron-Core conventions (``megatron/core/tensor_parallel/layers.py``):

==================== ===== ==============================================================
role                 dim   meaning
==================== ===== ==============================================================
``column``           0     ColumnParallelLinear: output features split (bias split too)
``row``              1     RowParallelLinear: input features split (bias replicated)
``qkv_column``       0     fused ``linear_qkv``: whole KV groups per rank (see megatron.py)
``gated_mlp_column`` 0     fused ``linear_fc1``: each rank holds [its gate rows; its up rows]
``vocab_parallel``   0     embeddings / output layer: padded vocabulary split on rows
``replicated``       —     every rank holds the full tensor (norms, router, row biases)
``expert_column``    0     MoE expert fc1 (gated: [gate; up] per rank, like gated_mlp_column)
``expert_row``       1     MoE expert fc2
==================== ===== ==============================================================

Names may carry wrapper components (``module.``, ``_orig_mod.``, ``_fsdp_wrapped_module.``)
anywhere in the dotted path: :func:`classify` looks at the raw name, and
:func:`strip_wrappers` gives the name that is published. Per-expert TransformerEngine
grouped-GEMM parameters (``experts.linear_fc1.weight0..weightN``) are recognised even at
EP=1, as are SequentialMLP names (``experts.local_experts.N.linear_fc1.weight``) and HF
names (``mlp.experts.N.gate_proj.weight``). ``overrides`` (regex → role, checked first,
against both the raw and the stripped name) cover non-standard model code.

This module imports nothing from ``dynamo_rl`` except :mod:`dynamo_rl.refit.errors`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum

import torch

from dynamo_rl.refit.errors import MismatchError


class Role(str, Enum):
    COLUMN = "column"
    ROW = "row"
    QKV_COLUMN = "qkv_column"
    GATED_MLP_COLUMN = "gated_mlp_column"
    VOCAB_PARALLEL = "vocab_parallel"
    REPLICATED = "replicated"
    EXPERT_COLUMN = "expert_column"
    EXPERT_ROW = "expert_row"


#: The dimension a role splits across TP ranks (None: replicated).
SHARD_DIM: dict[Role, int | None] = {
    Role.COLUMN: 0,
    Role.QKV_COLUMN: 0,
    Role.GATED_MLP_COLUMN: 0,
    Role.VOCAB_PARALLEL: 0,
    Role.EXPERT_COLUMN: 0,
    Role.ROW: 1,
    Role.EXPERT_ROW: 1,
    Role.REPLICATED: None,
}

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")
_WRAPPER_RE = re.compile(r"(?:(?<=\.)|^)(?:module|_orig_mod|_fsdp_wrapped_module)\.")


def strip_wrappers(name: str) -> str:
    """Remove DDP/FSDP/torch.compile wrapper components anywhere in a dotted name.

    ``module._orig_mod.decoder.layers.0._fsdp_wrapped_module.mlp.linear_fc1.weight`` →
    ``decoder.layers.0.mlp.linear_fc1.weight``. A component merely *ending* in ``module``
    (e.g. ``submodule.``) is kept.
    """
    prev = None
    while prev != name:
        prev = name
        name = _WRAPPER_RE.sub("", name)
    return name


# (pattern on the stripped name, role, extras-from-match). First match wins.
_EXPERT_ID = lambda m: {"expert": int(m.group("e"))}  # noqa: E731
_RULES: list[tuple[re.Pattern, Role, object]] = [
    # --- Megatron-Core names ---
    (re.compile(r"(^|\.)embedding\.word_embeddings\.weight$"), Role.VOCAB_PARALLEL, None),
    (re.compile(r"(^|\.)output_layer\.weight$"), Role.VOCAB_PARALLEL, None),
    (re.compile(r"\.linear_qkv\.layer_norm_(weight|bias)$"), Role.REPLICATED, None),
    (re.compile(r"\.linear_fc1\.layer_norm_(weight|bias)$"), Role.REPLICATED, None),
    (re.compile(r"\.linear_qkv\.(weight|bias)$"), Role.QKV_COLUMN, None),
    (re.compile(r"\.experts\.linear_fc1\.weight(?P<e>\d+)$"), Role.EXPERT_COLUMN, _EXPERT_ID),
    (re.compile(r"\.experts\.linear_fc2\.weight(?P<e>\d+)$"), Role.EXPERT_ROW, _EXPERT_ID),
    (re.compile(r"\.experts\.linear_fc1\.bias(?P<e>\d+)$"), Role.EXPERT_COLUMN, _EXPERT_ID),
    (re.compile(r"\.experts\.linear_fc2\.bias(?P<e>\d+)$"), Role.REPLICATED, _EXPERT_ID),
    (re.compile(r"\.local_experts\.(?P<e>\d+)\.linear_fc1\.(weight|bias)$"), Role.EXPERT_COLUMN, _EXPERT_ID),
    (re.compile(r"\.local_experts\.(?P<e>\d+)\.linear_fc2\.weight$"), Role.EXPERT_ROW, _EXPERT_ID),
    (re.compile(r"\.local_experts\.(?P<e>\d+)\.linear_fc2\.bias$"), Role.REPLICATED, _EXPERT_ID),
    (re.compile(r"\.linear_fc1\.(weight|bias)$"), Role.GATED_MLP_COLUMN, None),
    (re.compile(r"\.(linear_proj|linear_fc2)\.weight$"), Role.ROW, None),
    (re.compile(r"\.(linear_proj|linear_fc2)\.bias$"), Role.REPLICATED, None),
    (re.compile(r"\.router\.(weight|bias|expert_bias)$"), Role.REPLICATED, None),
    # --- Hugging Face names (Qwen3 / Llama / Qwen3-MoE) ---
    (re.compile(r"(^|\.)embed_tokens\.weight$"), Role.VOCAB_PARALLEL, None),
    (re.compile(r"(^|\.)lm_head\.weight$"), Role.VOCAB_PARALLEL, None),
    (re.compile(r"\.experts\.(?P<e>\d+)\.(gate_proj|up_proj)\.(weight|bias)$"), Role.EXPERT_COLUMN, _EXPERT_ID),
    (re.compile(r"\.experts\.(?P<e>\d+)\.down_proj\.weight$"), Role.EXPERT_ROW, _EXPERT_ID),
    (re.compile(r"\.experts\.(?P<e>\d+)\.down_proj\.bias$"), Role.REPLICATED, _EXPERT_ID),
    (re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$"), Role.COLUMN, None),
    (re.compile(r"\.(o_proj|down_proj)\.weight$"), Role.ROW, None),
    (re.compile(r"\.(o_proj|down_proj)\.bias$"), Role.REPLICATED, None),
    (re.compile(r"\.mlp\.gate\.(weight|bias|e_score_correction_bias)$"), Role.REPLICATED, None),
    # --- norms (both namings) ---
    (re.compile(r"(norm|layernorm|layer_norm)[^.]*\.(weight|bias)$"), Role.REPLICATED, None),
]


def classify(
    raw_name: str, overrides: Mapping[str, Role | str] | None = None
) -> tuple[str, Role, dict]:
    """Classify one parameter.

    Args:
        raw_name: the name as the training code sees it (wrapper prefixes allowed).
        overrides: ``{regex: role}``; searched (``re.search``) against the raw and the
            stripped name before the built-in rules.
    Returns:
        ``(published_name, role, extras)``; ``extras`` holds ``{"expert": e}`` for experts.
    Raises:
        MismatchError: the name matches no rule (it lists the name and how to override).
    """
    name = strip_wrappers(raw_name)
    for pattern, role in (overrides or {}).items():
        if re.search(pattern, raw_name) or re.search(pattern, name):
            extras = {}
            m = re.search(r"experts\.(?:local_experts\.)?(\d+)\.|experts\..*weight(\d+)$", name)
            if m:
                extras["expert"] = int(m.group(1) or m.group(2))
            return name, Role(role), extras
    for pattern, role, extras_fn in _RULES:
        m = pattern.search(name)
        if m:
            return name, role, (extras_fn(m) if extras_fn else {})
    raise MismatchError(
        f"cannot classify parameter {raw_name!r} (stripped {name!r}) into a TP role; pass "
        f"overrides={{'<regex>': '<role>'}} with a role from {[r.value for r in Role]}",
        mismatched={name: "unknown role"},
    )


def classify_all(
    raw_names: Iterable[str], overrides: Mapping[str, Role | str] | None = None
) -> dict[str, tuple[Role, dict]]:
    """Classify many names; one :class:`MismatchError` lists every unknown or duplicate name.

    Returns:
        ``{published_name: (role, extras)}`` in input order.
    """
    out: dict[str, tuple[Role, dict]] = {}
    bad: dict[str, str] = {}
    for raw in raw_names:
        try:
            name, role, extras = classify(raw, overrides)
        except MismatchError as e:
            bad.update(e.mismatched)
            continue
        if name in out:
            bad[name] = f"two raw names strip to the same name (second: {raw!r})"
            continue
        out[name] = (role, extras)
    if bad:
        raise MismatchError(
            "cannot classify some parameters; pass overrides={'<regex>': '<role>'}", mismatched=bad
        )
    return out


def role_counts(raw_names: Iterable[str], overrides=None) -> Counter:
    """``Counter({role_value: n})`` of :func:`classify_all` — handy for audits and tests."""
    return Counter(role.value for role, _ in classify_all(raw_names, overrides).values())


# ----------------------------------------------------------------------------- descriptors


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (the manifest's dtype spelling)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise MismatchError(f"unknown dtype {name!r} in the manifest")
    return dt


@dataclass
class Placement:
    """Where one source rank's local shard sits in the global tensor and in its arena.

    ``dim`` is the split dimension (None: the rank holds the full tensor); the rank holds
    global indices ``[start, start + length)`` on ``dim``. ``bucket``/``offset`` (bytes)
    locate the contiguous row-major local shard in the rank's transport arena.
    """

    rank: int
    dim: int | None
    start: int
    length: int
    bucket: int = 0
    offset: int = 0


@dataclass
class TensorDescriptor:
    """One published tensor: name (stripped, in the publisher's naming), role, global shape
    (after gathering all ranks' shards on ``dim``; for ``gated_mlp_column`` that is
    Megatron's per-rank-stacked order), dtype (``"bfloat16"``...), placements, extras."""

    name: str
    role: str
    global_shape: list[int]
    dtype: str
    placement: list[Placement] = field(default_factory=list)
    extras: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> "TensorDescriptor":
        return cls(
            name=d["name"],
            role=d["role"],
            global_shape=list(d["global_shape"]),
            dtype=d["dtype"],
            placement=[Placement(**p) for p in d["placement"]],
            extras=dict(d.get("extras") or {}),
        )

    def local_shape(self, p: Placement) -> list[int]:
        shape = list(self.global_shape)
        if p.dim is not None:
            shape[p.dim] = p.length
        return shape


def local_descriptors(
    shards: Mapping[str, torch.Tensor],
    *,
    rank: int,
    tp_rank: int,
    tp_size: int,
    overrides: Mapping[str, Role | str] | None = None,
) -> list[TensorDescriptor]:
    """Descriptors of one source rank's LOCAL shards (one placement each, no arena offsets).

    Megatron TP shards are uniform, so rank ``tp_rank`` of ``tp_size`` holds global indices
    ``[tp_rank·n, (tp_rank+1)·n)`` on the role's dim, ``n`` the local size there.
    """
    roles = classify_all(shards.keys(), overrides)
    out = []
    for (raw, t), (name, (role, extras)) in zip(shards.items(), roles.items()):
        dim = SHARD_DIM[role]
        if dim is not None and dim >= t.dim():
            dim = 0
        shape = list(t.shape)
        if dim is None:
            pl = Placement(rank, None, 0, shape[0] if shape else 1)
        else:
            n = shape[dim]
            pl = Placement(rank, dim, tp_rank * n, n)
            shape[dim] = n * tp_size
        out.append(TensorDescriptor(name, role.value, shape, dtype_name(t.dtype), [pl], dict(extras)))
    return out


def merge_descriptors(per_rank: Iterable[Iterable[TensorDescriptor]]) -> dict[str, TensorDescriptor]:
    """Merge every rank's local descriptors into one descriptor per tensor (placements joined).

    Raises:
        MismatchError: ranks disagree on role / global shape / dtype (names listed).
    """
    out: dict[str, TensorDescriptor] = {}
    bad: dict[str, str] = {}
    for descs in per_rank:
        for d in descs:
            cur = out.get(d.name)
            if cur is None:
                out[d.name] = TensorDescriptor(d.name, d.role, list(d.global_shape), d.dtype,
                                               list(d.placement), dict(d.extras))
            elif (cur.role, cur.global_shape, cur.dtype) != (d.role, list(d.global_shape), d.dtype):
                bad[d.name] = (f"ranks disagree: {cur.role} {cur.global_shape} {cur.dtype} vs "
                               f"{d.role} {d.global_shape} {d.dtype}")
            else:
                cur.placement.extend(d.placement)
    if bad:
        raise MismatchError("source ranks published inconsistent descriptors", mismatched=bad)
    for d in out.values():
        d.placement.sort(key=lambda p: p.rank)
    return out
