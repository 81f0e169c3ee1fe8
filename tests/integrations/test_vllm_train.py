"""`dynamo-rl train examples/grpo_tiny_vllm.yaml`: the main job on real `dynamo.vllm` workers.

A short run of the real CLI (the README's figures come from the full 120-step run): every
step refits the stock vLLM worker through Dynamo's RL routes; rollouts carry the engine's
exact ids and logprobs (no weights version per response: the refit barrier gives it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]


def test_main_job_on_vllm_workers(tmp_path, vllm_python):
    run = tmp_path / "run"
    steps = 6
    p = subprocess.run([sys.executable, "-m", "dynamo_rl.cli", "train", "examples/grpo_tiny_vllm.yaml",
                        f"logging.run_dir={run}", f"grpo.num_steps={steps}", "grpo.eval_every=3",
                        "grpo.eval_prompts=16", f"cluster.vllm_python={vllm_python}"],
                       cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                       timeout=840)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "(1 vllm worker)" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps and summary["completed"] is True and summary["refits"] == steps
    assert summary["version_mismatches"] == 0 and summary["stale_samples"] == 0
    # every response came from the stock worker (no per-response version): all versioned by the barrier
    assert summary["unversioned_samples"] == steps * 16 * 8
    # the trainer's fp32 logprobs vs vLLM's fp32 logprobs of the same weights: summation order only
    assert summary["logprob_mae"] is not None and summary["logprob_mae"] < 1e-5
    assert summary["logprob_max_abs"] < 1e-3
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["weights_version"] for l in lines] == list(range(2, steps + 2))
    assert all(l["refit_bytes"] == 400_768 * 4 for l in lines)   # one worker, the whole fp32 model
    # the worker's log shows the extension loading each version through vLLM's reload
    log = (run / "stack" / "logs" / "worker-0.log").read_text()
    assert f"loaded weights version {steps + 1}" in log
