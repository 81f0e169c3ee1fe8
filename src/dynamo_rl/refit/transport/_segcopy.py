"""Many byte runs in one kernel launch: the copy program of a CUDA refit as a single gather.

A refit into a live engine is a list of byte runs ``(src address, dst address, nbytes)``:
a few bucket-sized ones, and hundreds of short ones where Megatron's fused QKV is split
per KV group into the engine's separate q / k / v (about 800 for Qwen3-4B, 1 GB of 8).
:class:`SegmentCopy` cuts every run into tiles of ``BLOCK`` 8-byte words and copies all
tiles of all runs in ONE Triton launch (one program per tile; the tile table is built
once per copy program and lives on the device). Bit-exact: words are moved, never
interpreted. Needs Triton (it ships with PyTorch's CUDA wheels) and 8-byte aligned runs;
:func:`available` says whether it can run here.
"""

from __future__ import annotations

import torch

#: 8-byte words per tile (16 KiB): ~2 waves of tiles per GB on an H100
BLOCK = 2048


def available() -> bool:
    """True when Triton and a CUDA device are present."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def copy_tiles(src_addr, dst_addr, seg_words, tile_seg, tile_start, BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            seg = tl.load(tile_seg + pid)
            start = tl.load(tile_start + pid)
            n = tl.load(seg_words + seg)
            src = tl.load(src_addr + seg).to(tl.pointer_type(tl.int64))
            dst = tl.load(dst_addr + seg).to(tl.pointer_type(tl.int64))
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)

        _KERNEL = copy_tiles
    return _KERNEL


class SegmentCopy:
    """Copy ``srcs[i]`` into ``dsts[i]`` (1-D uint8 CUDA views of equal length) in one launch.

    Args:
        dsts, srcs: the runs; every address and length a multiple of 8 bytes (ValueError).
        device: the CUDA device the kernel runs on (every view must be reachable from it:
            local memory or a CUDA IPC mapping).
    The views must stay alive (and unmoved) as long as this object is used.
    """

    def __init__(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor], device):
        if len(dsts) != len(srcs):
            raise ValueError(f"{len(dsts)} destinations for {len(srcs)} sources")
        src_addr, dst_addr, words, tile_seg, tile_start = [], [], [], [], []
        self.nbytes = 0
        for i, (d, s) in enumerate(zip(dsts, srcs)):
            n = s.numel() * s.element_size()
            if d.numel() * d.element_size() != n:
                raise ValueError(f"run {i}: {n} source bytes for {d.numel() * d.element_size()} destination bytes")
            if n % 8 or s.data_ptr() % 8 or d.data_ptr() % 8:
                raise ValueError(f"run {i} is not 8-byte aligned (address or length): copy it another way")
            src_addr.append(s.data_ptr())
            dst_addr.append(d.data_ptr())
            words.append(n // 8)
            for start in range(0, n // 8, BLOCK):
                tile_seg.append(i)
                tile_start.append(start)
            self.nbytes += n
        self.device = torch.device(device)
        t = lambda xs, dt: torch.tensor(xs, dtype=dt, device=self.device)  # noqa: E731
        self.tables = (t(src_addr, torch.int64), t(dst_addr, torch.int64), t(words, torch.int64),
                       t(tile_seg, torch.int32), t(tile_start, torch.int64))
        self.tiles = len(tile_seg)
        self.runs = len(srcs)

    def __call__(self) -> None:
        """Launch on the current CUDA stream (asynchronous)."""
        if self.tiles:
            _kernel()[(self.tiles,)](*self.tables, BLOCK=BLOCK, num_warps=4)
