"""`dynamo-rl train` on CUDA: trainer and workers on the GPU, the embedded stack, a few GRPO steps.

Skipped without a CUDA device (CI has none); run on a GPU machine:
``python -m pytest tests/rl/test_train_gpu.py -q``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("in_place", [False, True], ids=["staged", "in-place"])
def test_grpo_steps_on_cuda(tmp_path, in_place):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "dynamo_rl.cli", "train", "examples/grpo_tiny.yaml",
                        f"logging.run_dir={run}", "policy.device=cuda", "cluster.worker_device=cuda",
                        "cluster.workers=1", "grpo.num_steps=3", "policy.warm_start.steps=5",
                        "grpo.prompts_per_step=8", "grpo.samples_per_prompt=4", "grpo.eval_every=3",
                        "grpo.eval_prompts=8", f"refit.in_place={str(in_place).lower()}", "checkpoint.every=0",
                        "logging.tensorboard=false"],
                       cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                       timeout=600)
    out = p.stdout + p.stderr
    print(out[-3000:])
    assert p.returncode == 0, out[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["completed"] and summary["refits"] == 3
    assert summary["version_mismatches"] == 0
    assert summary["logprob_mae"] is not None and summary["logprob_mae"] < 1e-3   # fp32 on the GPU
    assert (run / "checkpoints" / "step-000003" / "model.safetensors").is_file()
