"""The trained policy is kept: checkpoints, serving one, and `--resume` (issue 16), through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from dynamo_rl.models import load_model
from dynamo_rl.rl.checkpoint import optimizer_sha256, weights_sha256
from greedy import greedy_decode

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
ONE_WORKER = ["policy.warm_start.steps=5", "grpo.prompts_per_step=4", "grpo.samples_per_prompt=4", "grpo.eval_every=0",
              "cluster.workers=1", "checkpoint.every=2"]


def _train(*args, timeout=420):
    p = subprocess.run([sys.executable, "-m", "dynamo_rl.cli", "train", "examples/grpo_tiny.yaml", *args], cwd=REPO,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout + p.stderr


def _metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_checkpoints_serve_and_resume(tmp_path):
    run = tmp_path / "run"
    out = _train(f"--run-dir={run}", "grpo.num_steps=4", *ONE_WORKER)
    ckpt = run / "checkpoints" / "step-000004"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["checkpoint"] == str(ckpt.resolve())
    assert sorted(d.name for d in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert f"the trained policy: {ckpt.resolve()}" in out
    state = json.loads((run / "trainer_state" / "step-000004" / "state.json").read_text())
    assert (state["step"], state["weights_version"]) == (4, 5)
    # the checkpoint holds the trainer's final weights, byte for byte (its hash, taken from
    # the trainer's own parameters when saving, equals the hash of what loads from disk)
    policy = load_model(ckpt)
    assert weights_sha256(policy.named_parameters()) == state["weights_sha256"]
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "chat_template.jinja").is_file()
    assert not list(ckpt.glob("*.pt"))   # the trainer state lives apart

    # `serve` on the checkpoint gives the trainer's greedy ids for it
    from dynamo_rl.serving.stack import LocalStack

    with LocalStack(ckpt, workers=1, run_dir=tmp_path / "serve", quiet=True) as stack:
        # the worker declares the version the checkpoint holds (dynamo_rl_checkpoint.json)
        v = httpx.post(f"{stack.workers[0].system_url}/engine/get_weight_version", json={}, timeout=30).json()
        assert v["version"] == 5
        for prompt in ([1, 31, 18, 35, 40, 8, 11, 6, 2, 41], [1, 14, 32, 32, 22, 33, 14, 27, 33, 41]):
            r = httpx.post(f"{stack.frontend_url}/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True,
                "nvext": {"extra_fields": ["completion_token_ids"]}})
            assert r.status_code == 200, r.text
            assert r.json()["nvext"]["completion_token_ids"] == greedy_decode(policy, prompt, 6)[0]

    # a resume with another task is refused before anything starts
    p = subprocess.run([sys.executable, "-m", "dynamo_rl.cli", "train", "examples/grpo_arith.yaml", "--resume",
                        str(run), "grpo.num_steps=6"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "the recipe differs from the one" in p.stdout + p.stderr, p.stdout + p.stderr
    assert "on name, task" in p.stdout + p.stderr
    # resume from step 2: steps 3 and 4 again, versions go on, the optimizer is the saved one
    uninterrupted = _metrics(run)
    saved2 = json.loads((run / "trainer_state" / "step-000002" / "state.json").read_text())
    first_logs = {f.name: f.read_bytes() for f in (run / "stack" / "logs").iterdir()}
    first_metrics, first_summary = (run / "metrics.jsonl").read_bytes(), (run / "summary.json").read_bytes()
    out = _train("--resume", str(run / "checkpoints" / "step-000002"), "grpo.num_steps=4", *ONE_WORKER)
    lines = _metrics(run)
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    versions = [l["weights_version"] for l in lines]
    assert versions == sorted(set(versions)) == [2, 3, 4, 5]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_optimizer_sha256"] == saved2["optimizer_sha256"]
    assert summary["steps"] == 4 and summary["checkpoint"] == str(ckpt.resolve())
    # the step-4 checkpoint of the first run was set aside, not overwritten
    aside = list((run / "checkpoints").glob("superseded-*/step-000004"))
    assert len(aside) == 1 and "kept" in out
    assert weights_sha256(load_model(aside[0]).named_parameters()) == state["weights_sha256"]
    # so were the first run's stack logs: byte for byte in stack/logs-<time>/, the resumed run's in logs/
    kept = list((run / "stack").glob("logs-*"))
    assert len(kept) == 1 and {f.name: f.read_bytes() for f in kept[0].iterdir()} == first_logs
    assert b"route request completed" in first_logs["frontend.log"]
    assert (run / "stack" / "logs" / "frontend.log").read_bytes() != first_logs["frontend.log"]
    # and the first run's metrics (steps 3, 4 are run again) and summary, as they were
    aside = list(run.glob("metrics-superseded-*.jsonl"))
    assert len(aside) == 1 and aside[0].read_bytes() == first_metrics
    earlier = list(run.glob("summary-*.json"))
    assert len(earlier) == 1 and earlier[0].read_bytes() == first_summary
    # same seeds, one worker: steps 3 and 4 repeat the uninterrupted run's figures. Token
    # sampling uses a per-request seed, and the one worker batches the same requests in the
    # same order, so the rollouts and hence the update are the same.
    for a, b in zip(uninterrupted[2:], lines[2:]):
        for key in ("reward_mean", "exact_match", "gen_tokens"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    blob = torch.load(run / "trainer_state" / "step-000002" / "trainer.pt", weights_only=True)
    assert optimizer_sha256(blob["optimizer"]) == saved2["optimizer_sha256"]


def test_resume_refuses_bad_input(tmp_path):
    for args, message in (
        (["--resume", str(tmp_path / "nowhere")], "no such directory"),
        (["--resume", str(tmp_path)], "is neither a run directory"),
    ):
        p = subprocess.run([sys.executable, "-m", "dynamo_rl.cli", "train", "examples/grpo_tiny.yaml", *args],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and message in p.stdout + p.stderr, p.stdout + p.stderr
