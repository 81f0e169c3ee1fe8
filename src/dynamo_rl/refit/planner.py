"""The slice planner: for one target TP rank, which bytes of which source rank go where.

Input: the publisher's descriptors (source naming, roles, global shapes, placements), the
model config, and the target's ``param_specs`` (HF names, local shapes, dtypes) with its
``tp_rank``/``tp_size``. Output: a :class:`TargetPlan` — a list of :class:`Copy` boxes
(source rank, source tensor, box in the source's *local* shard → destination tensor, box
in the destination) plus zero fills (vocabulary padding). Composition is interval
arithmetic: target region (megatron.target_region) → HF pieces (megatron.hf_view) →
source placements.

Bytes: ``needed_bytes`` is what the target tensors hold (minus padding). Transports that
move whole rows of a source shard (``dist``, ``nixl``: contiguous byte ranges) pull
``row_bytes``; for axis-0 roles that equals the need, for dim-1 roles (row-parallel) the
target narrower than the source forces whole rows: ``overpull_factor = row_bytes /
needed_bytes`` (per role in ``overpull_by_role``). Strided transports (``shm``/CUDA IPC)
read exactly the needed bytes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from dynamo_rl.refit.errors import MismatchError
from dynamo_rl.refit.megatron import ModelDims, hf_view, target_region
from dynamo_rl.refit.roles import TensorDescriptor, dtype_name

Box = tuple[tuple[int, int], ...]


@dataclass
class Copy:
    """``dst[dst_box] = source_rank_local(src)[src_box]``; boxes are per-dim ``(lo, hi)``."""

    dst: str
    src_rank: int
    src: str
    src_box: Box
    dst_box: Box

    @property
    def numel(self) -> int:
        return math.prod(hi - lo for lo, hi in self.src_box)


@dataclass
class TargetPlan:
    tp_rank: int
    tp_size: int
    copies: list[Copy] = field(default_factory=list)
    fills: list[tuple[str, Box]] = field(default_factory=list)
    needed_bytes: int = 0
    row_bytes: int = 0
    overpull_by_role: dict[str, float] = field(default_factory=dict)

    @property
    def overpull_factor(self) -> float:
        return self.row_bytes / self.needed_bytes if self.needed_bytes else 1.0

    @property
    def source_ranks(self) -> tuple[int, ...]:
        """The source ranks this plan reads from, sorted (computed once; plans are not
        modified after :func:`plan_target` returns)."""
        ranks = self.__dict__.get("_source_ranks")
        if ranks is None:
            ranks = self.__dict__["_source_ranks"] = tuple(sorted({c.src_rank for c in self.copies}))
        return ranks

    def by_rank(self) -> dict[int, list[Copy]]:
        out: dict[int, list[Copy]] = defaultdict(list)
        for c in self.copies:
            out[c.src_rank].append(c)
        return dict(out)

    def row_ranges(self) -> dict[tuple[int, str], list[tuple[int, int]]]:
        """``{(src_rank, src): merged [(row_lo, row_hi)]}`` of dim-0 rows a row-granular
        transport must move (dim 0 of a 1-D tensor = elements)."""
        raw: dict[tuple[int, str], list[tuple[int, int]]] = defaultdict(list)
        for c in self.copies:
            raw[(c.src_rank, c.src)].append(c.src_box[0])
        out = {}
        for k, ivs in raw.items():
            ivs.sort()
            merged = [list(ivs[0])]
            for lo, hi in ivs[1:]:
                if lo <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            out[k] = [tuple(m) for m in merged]
        return out


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def plan_target(
    tensors: Mapping[str, TensorDescriptor],
    naming: str,
    config: Mapping,
    param_specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    tp_rank: int,
    tp_size: int,
) -> TargetPlan:
    """Plan every copy a target rank needs.

    Raises:
        MismatchError: listing *all* missing / unexpected names and shape / dtype /
            layout mismatches at once.
    """
    dims = ModelDims.from_config(config)
    view = hf_view(tensors, naming, config)
    plan = TargetPlan(tp_rank, tp_size)
    missing = [n for n in param_specs if n not in view and not (n == "lm_head.weight" and dims.tied and "model.embed_tokens.weight" in view)]
    unexpected = [n for n in view if n not in param_specs and not (n == "lm_head.weight" and dims.tied)]
    mismatched: dict[str, str] = {}
    need_by_role: dict[str, int] = defaultdict(int)
    rows_by_role: dict[str, int] = defaultdict(int)
    for name, (shape, dtype) in param_specs.items():
        if name in missing:
            continue
        hft = view.get(name) or view["model.embed_tokens.weight"]  # tied lm_head
        if hft.dtype != dtype_name(dtype):
            mismatched[name] = f"dtype: engine {dtype_name(dtype)}, publisher {hft.dtype}"
            continue
        try:
            box, fills = target_region(name, hft.shape, tuple(shape), tp_rank, tp_size, dims)
        except MismatchError as e:
            mismatched.update(e.mismatched or {name: str(e)})
            continue
        plan.fills.extend((name, tuple(f)) for f in fills)
        covered = 0
        for piece in hft.pieces:
            desc = tensors[piece.src]
            if hft.dim is None:
                pdim, hf_lo, hf_hi, shift = 0, 0, hft.shape[0], 0
            else:
                pdim, hf_lo, hf_hi = hft.dim, piece.hf_start, piece.hf_start + piece.length
                shift = piece.src_start - piece.hf_start
            lo, hi = max(box[pdim][0], hf_lo), min(box[pdim][1], hf_hi)
            if lo >= hi:
                continue
            sbox = list(box)
            sbox[pdim] = (lo + shift, hi + shift)  # source global coords
            split = [p for p in desc.placement if p.dim is not None]
            if not split:  # replicated: read from one holder, spread over target ranks
                holders = sorted(desc.placement, key=lambda p: p.rank)
                pl = holders[tp_rank % len(holders)]
                cands = [(pl, sbox)]
            else:
                cands = []
                for pl in split:
                    d = pl.dim
                    a, b = max(sbox[d][0], pl.start), min(sbox[d][1], pl.start + pl.length)
                    if a < b:
                        sub = list(sbox)
                        sub[d] = (a, b)
                        cands.append((pl, sub))
            for pl, sub in cands:
                local = list(sub)
                if pl.dim is not None:
                    local[pl.dim] = (sub[pl.dim][0] - pl.start, sub[pl.dim][1] - pl.start)
                dst = []
                for d, (a, b) in enumerate(sub):
                    hf_a = a - (shift if d == pdim else 0)
                    dst.append((hf_a - box[d][0], hf_a - box[d][0] + (b - a)))
                c = Copy(name, pl.rank, desc.name, tuple(local), tuple(dst))
                plan.copies.append(c)
                covered += c.numel
                isz = _itemsize(desc.dtype)
                need_by_role[desc.role] += c.numel * isz
        want = math.prod(hi - lo for lo, hi in box)
        if covered != want:
            mismatched[name] = f"the publisher's shards cover {covered} of {want} elements (a source rank missing?)"
    if missing or unexpected or mismatched:
        raise MismatchError(
            f"publisher tensors do not fit the engine layout (TP rank {tp_rank}/{tp_size})",
            missing=missing, unexpected=unexpected, mismatched=mismatched,
        )
    # row-granular byte accounting
    for (rank, src), ivs in plan.row_ranges().items():
        desc = tensors[src]
        pl = next(p for p in desc.placement if p.rank == rank)
        shape = desc.local_shape(pl)
        row = math.prod(shape[1:]) * _itemsize(desc.dtype)
        rows_by_role[desc.role] += sum(hi - lo for lo, hi in ivs) * row
    plan.needed_bytes = sum(need_by_role.values())
    plan.row_bytes = sum(rows_by_role.values())
    plan.overpull_by_role = {r: rows_by_role[r] / need_by_role[r] for r in need_by_role if need_by_role[r]}
    return plan


def apply_local(plan: TargetPlan, sources: Mapping[int, Mapping[str, torch.Tensor]],
                param_specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Execute a plan in-process from ``{rank: {src_name: local_shard}}`` (test oracle path
    and the in-process ceiling in benchmarks). One copy per byte, fills zeroed."""
    out = {n: torch.empty(s, dtype=dt, device=device) for n, (s, dt) in param_specs.items()}
    for name, box in plan.fills:
        out[name][tuple(slice(a, b) for a, b in box)].zero_()
    for c in plan.copies:
        src = sources[c.src_rank][c.src][tuple(slice(a, b) for a, b in c.src_box)]
        out[c.dst][tuple(slice(a, b) for a, b in c.dst_box)].copy_(src)
    return out
