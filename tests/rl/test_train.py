"""`dynamo-rl train` end to end: the real CLI, the real embedded stack, short runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]
CLI = [sys.executable, "-m", "dynamo_rl.cli", "train"]
REPO = Path(__file__).resolve().parents[2]


def _run(args, tmp_path, timeout=420):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    p = subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


def _descendants_alive(before: set[int]) -> list[str]:
    me = psutil.Process()
    return [f"{c.pid} {c.name()}" for c in me.children(recursive=True) if c.pid not in before and c.is_running()]


SHORT = ["grpo.num_steps=4", "policy.warm_start.steps=5", "grpo.prompts_per_step=4", "grpo.samples_per_prompt=4",
         "grpo.eval_every=2", "grpo.eval_prompts=8", "cluster.workers=2"]


def test_sync_run_writes_outputs_with_exact_versions_and_logprobs(tmp_path):
    run = tmp_path / "run"
    p, _ = _run(["examples/grpo_tiny.yaml", f"logging.run_dir={run}", *SHORT], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["completed"] is True
    assert summary["refits"] == 4 and summary["weights_version"] == 5  # v1 is served before step 1
    assert summary["version_mismatches"] == 0
    assert summary["stale_samples"] == 0
    assert summary["logprob_mae"] < 1e-4
    assert summary["generation_gpus"] == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    assert [l["weights_version"] for l in lines] == [2, 3, 4, 5]   # v1 = after warm start
    for l in lines:
        assert l["refit_bytes"] == 2 * 400_768 * 4          # two workers, every fp32 parameter once
        assert l["gen_tokens"] > 0 and l["train_seconds"] > 0
    assert "eval_reward" in lines[1] and "eval_reward" in lines[3]
    assert (run / "reward.png").stat().st_size > 10_000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "run summary" in p.stdout


@pytest.mark.parametrize("max_staleness", [1, 0])
def test_async_run_respects_the_staleness_bound(tmp_path, max_staleness):
    run = tmp_path / "run"
    p, _ = _run(["examples/grpo_tiny.yaml", f"logging.run_dir={run}", "grpo.loop=async",
                 f"grpo.max_staleness={max_staleness}", *SHORT], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["stale_samples"] == sum(l["stale_samples"] for l in lines)
    # step N+1's rollouts are generated while step N trains: some come from the weights one
    # version behind, never more
    assert summary["stale_samples"] > 0
    assert all(l["max_staleness_seen"] <= 1 for l in lines)
    if max_staleness == 1:
        assert summary["dropped_samples"] == 0
    else:   # every group holding a stale sample is dropped, fresh groups are trained on
        assert summary["dropped_samples"] >= summary["stale_samples"]
        assert all(("loss" in l) == (l["dropped_samples"] < 16) for l in lines)


def test_multiturn_run_keeps_token_contiguity(tmp_path):
    run = tmp_path / "run"
    # refits in place here: logprobs match below only if every worker holds the trainer's weights
    p, _ = _run(["examples/grpo_multiturn.yaml", f"logging.run_dir={run}", "task.turns=3", "refit.in_place=true",
                 *SHORT], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["refits"] == 4
    # the trainer scores the concatenated 3-turn ids; engine logprobs match only if every
    # turn's prompt extended the previous prompt + generation verbatim (checked per turn)
    assert summary["logprob_mae"] < 1e-4 and summary["version_mismatches"] == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(l["gen_tokens"] >= 3 * 16 for l in lines)   # 16 episodes x 3 turns x >= 1 token


@pytest.mark.parametrize(
    "args, message",
    [
        (["grpo.num_stepz=3"], "grpo.num_stepz: unknown key; did you mean 'grpo.num_steps'?"),
        (["policy.model_path=/nonexistent/model"], "policy.model_path '/nonexistent/model' does not exist"),
        (["policy.model_path=examples"], "'examples' is not a Hugging Face checkpoint directory"),
        (["grpo.num_steps=0"], "grpo.num_steps: Input should be greater than or equal to 1"),
        (["generation.dynamo.frontend_url=http://127.0.0.1:9", "refit.control_urls=[http://127.0.0.1:9]"],
         "http://127.0.0.1:9"),
        (["policy.device=mps"], "policy.device: 'mps' is not supported; use cpu, cuda or cuda:<index>"),
        (["cluster.worker_device=cuda:64"], "cluster.worker_device: 'cuda:64' but "),
        # issue 18: found before anything starts, each naming the key and the fix
        (["refit.control_urls=[http://127.0.0.1:9]"],
         "refit.control_urls is set but the recipe starts the embedded stack"),
        (["generation.dynamo.frontend_url=http://127.0.0.1:9"],
         "refit.control_urls is empty: list the workers' system servers"),
        (["refit.transport=nixl"], "refit.transport=nixl but NIXL is not installed"),
        (["logging.wandb=true"], "logging.wandb is true but wandb is not installed"),
        (["generation.sampling.max_tokens=100000"],
         "max_tokens=100000 does not fit the model's context of 256 tokens"),
        (["cluster.engine=vllm", "cluster.vllm_python=/nonexistent/python"],
         "cluster.engine: vllm_python '/nonexistent/python' is not an executable file"),
        (["cluster.engine_cpus=0-4095"], "cluster.engine_cpus '0-4095' names CPU(s) outside the allowed ones"),
    ],
)
def test_bad_recipes_fail_fast_and_leave_nothing_behind(tmp_path, args, message):
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    p, seconds = _run(["examples/grpo_tiny.yaml", f"logging.run_dir={tmp_path / 'run'}", *args], tmp_path, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stdout + p.stderr
    assert seconds < 60
    assert _descendants_alive(before) == []
    assert not (tmp_path / "run" / "stack").exists()
    assert not (tmp_path / "run").exists()   # nothing is left for a recipe that cannot run


def test_a_run_dir_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    p, _ = _run(["examples/grpo_tiny.yaml", "--run-dir", str(tmp_path / "afile")], tmp_path, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"--run-dir '{tmp_path / 'afile'}': cannot write there" in p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr and (tmp_path / "afile").read_text() == "x"


def _start_long_run(run: Path, steps_done: int) -> subprocess.Popen:
    """A 200-step `train` in the background, returned once ``steps_done`` steps are logged."""
    p = subprocess.Popen([*CLI, "examples/grpo_tiny.yaml", f"logging.run_dir={run}", *SHORT, "grpo.num_steps=200"],
                         cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps_done):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise AssertionError(f"no {steps_done} training step(s) within 300 s:\n{p.stdout.read()[-3000:]}")
        time.sleep(0.5)
    return p


def test_sigterm_mid_run_stops_everything_and_keeps_a_summary(tmp_path):
    run = tmp_path / "run"
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    p = _start_long_run(run, steps_done=2)
    try:
        started = psutil.Process(p.pid).children(recursive=True)
        assert len(started) >= 4   # broker, frontend, 2 workers (+ multiprocessing's resource tracker)
        p.send_signal(15)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out[-2000:]
    assert "interrupted; everything this run started has been stopped" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] is False and summary["steps"] >= 2 and summary["stopped_by"] == "interrupted"
    # what was trained is kept: a checkpoint of the last update, named in the summary
    ckpt = Path(summary["checkpoint"])
    assert ckpt.parent == (run / "checkpoints").resolve() and (ckpt / "model.safetensors").is_file()
    assert int(ckpt.name.split("-")[1]) >= summary["steps"]
    # every process the run started is gone (helpers such as multiprocessing's resource
    # tracker leave a moment after their parent: allow them a few seconds)
    _, alive = psutil.wait_procs(started, timeout=15)
    assert [f"{q.pid} {q.cmdline()}" for q in alive if q.status() != psutil.STATUS_ZOMBIE] == []
    assert _descendants_alive(before) == []


def test_a_refit_failure_mid_run_exits_1_not_2(tmp_path, tiny_model_dir):
    """Issue 18, defect 1: RefitError is a ValueError, yet a refit that fails at run time is a
    runtime failure (exit 1), not bad input (2). Here the deployment serves another model
    shape than the trainer's, so the first refit is refused by the worker (422)."""
    from dynamo_rl.serving.stack import LocalStack

    run = tmp_path / "run"
    with LocalStack(tiny_model_dir, workers=1, run_dir=tmp_path / "stack", quiet=True) as stack:
        p, _ = _run(["examples/grpo_tiny.yaml", f"logging.run_dir={run}",
                     f"generation.dynamo.frontend_url={stack.frontend_url}",
                     f"refit.control_urls=[{stack.workers[0].system_url}]", "policy.tiny.intermediate_size=256",
                     "policy.warm_start.steps=0", "grpo.num_steps=2"], tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    assert "RefitCycleError" in out and "refit to version 1 failed" in out and "mlp" in out, out[-3000:]
    assert "Traceback" not in out
    assert (run / "recipe.json").exists()   # a run that began keeps its directory


def test_control_urls_that_leave_out_a_worker_are_bad_input_before_the_warm_start(tmp_path, tiny_model_dir):
    """A deployment of 2 workers and refit.control_urls naming 1: the worker left out would
    serve old weights, so the run stops at its preflight (exit 2), naming the instance."""
    from dynamo_rl.serving.stack import LocalStack

    run = tmp_path / "run"
    with LocalStack(tiny_model_dir, workers=2, run_dir=tmp_path / "stack", quiet=True) as stack:
        p, _ = _run(["examples/grpo_tiny.yaml", f"logging.run_dir={run}",
                     f"generation.dynamo.frontend_url={stack.frontend_url}",
                     f"refit.control_urls=[{stack.workers[0].system_url}]"], tmp_path)
        left_out = stack.workers[1].instance_id
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "refit.control_urls (1 given) does not cover the workers the frontend at" in out, out[-3000:]
    assert f"{left_out}: 'no control URL'" in out.replace("\n", ""), out[-3000:]
    assert "warm start" not in out.lower() and "Traceback" not in out


def test_a_killed_worker_ends_the_run_with_1_and_its_log_tail_once(tmp_path):
    """Issue 18, defects 1 and 9: a worker SIGKILLed mid-run is a runtime failure (exit 1),
    reported with the worker's log tail exactly once."""
    run = tmp_path / "run"
    p = _start_long_run(run, steps_done=1)
    try:
        # a worker the stack started itself (not a process a worker forked, which carries its
        # command line until it execs)
        worker = next(c for c in psutil.Process(p.pid).children()
                      if c.cmdline()[1:3] == ["-m", "dynamo_rl.serving.worker"])
        worker.kill()
        out, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1, out[-3000:]
    assert f"(pid {worker.pid}) exited with code -9" in out, out
    assert out.count(f"(pid {worker.pid}) exited with code -9; last lines of") == 1, out
    assert "Traceback" not in out, out


def test_the_next_steps_rollouts_are_discarded_without_an_unretrieved_error(caplog):
    """A run that fails while the next step's rollouts generate (in eval, say) reports its own
    error; the rollouts' error, a consequence, must not reach asyncio's "Task exception was
    never retrieved" (a traceback on stderr at exit, as a CI run once printed)."""
    import asyncio
    import gc

    from dynamo_rl.rl.loop import _discard

    async def fails():
        raise ConnectionError("the frontend went away")

    async def hangs():
        await asyncio.sleep(3600)

    async def main():
        done = asyncio.create_task(fails())
        await asyncio.sleep(0)
        running = asyncio.create_task(hangs())
        await asyncio.sleep(0)
        await _discard(done)
        await _discard(running)
        await _discard(None)
        return done, running

    with caplog.at_level("ERROR", logger="asyncio"):
        done, running = asyncio.run(main())
        assert "exception=ConnectionError('the frontend went away')" in repr(done) and running.cancelled()
        del done, running
        gc.collect()
    assert [r.getMessage() for r in caplog.records] == []
