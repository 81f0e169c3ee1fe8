"""`dynamo-rl train` on an external agent (task.name: agent): the trainer serves the rollout
endpoint, starts the agent command, trains on the episodes it ends, and stops it; an agent
that dies is a named runtime failure (exit 1); a bad command is bad input (exit 2)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from dynamo_rl.config import Recipe
from dynamo_rl.exitcodes import ExitCode
from dynamo_rl.rl.loop import run_training

REPO = Path(__file__).resolve().parents[2]


def recipe(tmp_path: Path, command: str, **over) -> Recipe:
    cfg = {
        "name": "agent-test",
        "task": {"name": "agent", "agent_command": command, "agent_timeout_s": 120, "session_timeout_s": 30},
        "policy": {"tiny": {"vocab": "tools"},
                   "warm_start": {"steps": 120, "batch_size": 32, "task": {"name": "tool_lookup"}}},
        "generation": {"sampling": {"max_tokens": 48}},
        "grpo": {"num_steps": 2, "prompts_per_step": 2, "samples_per_prompt": 4, "eval_every": 0},
        "logging": {"run_dir": str(tmp_path / "run"), "tensorboard": False},
        "cluster": {"workers": 1, "tool_call_parser": "hermes"},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return Recipe.model_validate(cfg)


@pytest.mark.stack
def test_train_on_an_external_openai_sdk_agent(tmp_path):
    agent = REPO / "examples" / "agents" / "tool_agent.py"
    cfg = recipe(tmp_path, f"{{python}} {agent} --episodes 0 --concurrency 8 --out {tmp_path / 'played.jsonl'}")
    assert run_training(cfg) == ExitCode.OK
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["gen_tokens"] > 0 and "success" in r and "tool_calls" in r and r["version_mismatches"] == 0
    # the agent plays while the trainer trains: step 2 may train on version-1 episodes only
    # (stale, kept by max_staleness 1); where samples are on-policy, the logprobs match
    assert rows[0]["stale_samples"] == 0 and rows[0]["logprob_mae"] < 1e-5
    assert all(r.get("logprob_mae", 0.0) < 1e-5 for r in rows)
    log = (out / "agent.log").read_text()
    (pid,) = re.findall(r"# dynamo-rl: agent pid (\d+): ", log)
    assert f"# dynamo-rl: agent pid {pid} stopped" in log
    with pytest.raises(ProcessLookupError):   # stopped with the run
        os.kill(int(pid), 0)
    played = [json.loads(line) for line in (tmp_path / "played.jsonl").read_text().splitlines()] \
        if (tmp_path / "played.jsonl").exists() else []
    assert len(played) == 0   # --episodes 0 plays until stopped: it never gets to write its summary
    assert json.loads((out / "summary.json").read_text())["completed"] is True


@pytest.mark.stack
def test_an_agent_that_exits_is_named_and_the_run_fails_with_1(tmp_path, capsys):
    cfg = recipe(tmp_path, "{python} -c \"import sys; print('agent: no tasks today'); sys.exit(3)\"",
                 policy={"warm_start": {"steps": 0}})
    assert run_training(cfg) == ExitCode.FAILURE
    out = capsys.readouterr().err.replace("\n", " ")
    assert "exited with status 3" in out and "no tasks today" in out


@pytest.mark.parametrize("over, expect", [
    ({"task": {"agent_command": "no-such-agent-program --x"}}, "no program 'no-such-agent-program'"),
    ({"grpo": {"eval_every": 5}}, "grpo.eval_every=5"),
    ({"policy": {"warm_start": {"steps": 10, "task": None}}}, "policy.warm_start.task"),
    ({"cluster": {"tool_call_parser": "herms"}}, "cluster.tool_call_parser 'herms' is not a Dynamo parser"),
])
def test_bad_agent_recipes_exit_2_before_anything_starts(tmp_path, capsys, over, expect):
    cfg = recipe(tmp_path, "{python} examples/agents/tool_agent.py", **over)
    assert run_training(cfg) == ExitCode.BAD_INPUT
    assert expect in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "run").exists()
