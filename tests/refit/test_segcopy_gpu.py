"""The one-launch gather of the CUDA refit (refit/transport/_segcopy.py): byte-identical to
per-run copies, for runs of every size (one word, a partial tile, many tiles), at odd
8-byte offsets; misaligned runs are refused. Needs CUDA and Triton (skipped otherwise)."""

from __future__ import annotations

import pytest
import torch

from dynamo_rl.refit.transport import _segcopy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _segcopy.available(), reason="needs a CUDA device and Triton")]


def test_segment_copy_moves_every_run_byte_for_byte():
    g = torch.Generator(device="cuda").manual_seed(0)
    src = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, device="cuda", generator=g)
    dst = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda")
    sizes = [8, 16376, 16384, 16392, 3 << 20, 8 * _segcopy.BLOCK * 5 + 24, 40]
    runs, s_off, d_off = [], 8, 64
    for n in sizes:
        runs.append((dst[d_off:d_off + n], src[s_off:s_off + n]))
        s_off += n + 8 * 13
        d_off += n + 8 * 7
    op = _segcopy.SegmentCopy([d for d, _ in runs], [s for _, s in runs], "cuda")
    assert op.runs == len(sizes) and op.nbytes == sum(sizes)
    op()
    torch.cuda.synchronize()
    ref = torch.zeros_like(dst)
    for (d, s) in runs:
        ref[d.data_ptr() - dst.data_ptr():][:s.numel()].copy_(s)
    assert torch.equal(dst, ref)
    # gaps untouched
    assert int(dst[:64].sum()) == 0


def test_misaligned_runs_are_refused():
    buf = torch.zeros(1024, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="8-byte aligned"):
        _segcopy.SegmentCopy([buf[4:20]], [buf[100:116]], "cuda")
