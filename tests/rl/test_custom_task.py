"""Your own task: a JSONL file and a `module:function` reward outside the package (issue 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHORT = ["grpo.num_steps=2", "policy.warm_start.steps=3", "grpo.prompts_per_step=4", "grpo.samples_per_prompt=4",
         "grpo.eval_every=0", "cluster.workers=1", "generation.sampling.max_tokens=4"]


def _write_task(d: Path, *, records=None, reward_body: str | None = None) -> None:
    """``d/data.jsonl`` and ``d/myrewards.py`` (a module named by ``myrewards:score``)."""
    recs = records if records is not None else [
        {"prompt": f"{a}+{b}=", "answer": str(a + b), "a": a, "b": b} for a in range(5) for b in range(5)]
    (d / "data.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    (d / "myrewards.py").write_text(textwrap.dedent(reward_body or '''
        def score(record, completion):
            exact = float(completion.text == record["answer"])
            return {"reward": exact, "exact_match": exact, "tokens": float(len(completion.token_ids)),
                    "ends": float(completion.finish_reason in ("stop", "length"))}
        '''))


def _train(cwd: Path, *args, timeout=420):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "dynamo_rl.cli", "train", str(REPO / "examples/grpo_tiny.yaml"),
                           "task.name=custom", "task.data=data.jsonl", "task.reward=myrewards:score", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.stack
@pytest.mark.slow
def test_a_task_from_a_jsonl_file_and_a_reward_function_trains(tmp_path):
    _write_task(tmp_path)
    p = _train(tmp_path, "logging.run_dir=run", *SHORT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2]
    for l in lines:
        # the reward function's own figures, per step, beside the reward
        assert {"exact_match", "tokens", "ends"} <= set(l)
        assert 1.0 <= l["tokens"] <= 4.0 and l["ends"] == 1.0
        assert l["reward_mean"] == pytest.approx(l["exact_match"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["exact_match_last"] is not None and summary["logprob_mae"] < 1e-4
    assert "exact" in out


BAD_CASES = [
    ("missing-field", dict(records=[{"prompt": "1+1=", "answer": "2"}, {"question": "2+2="}]),
     "data.jsonl:2: the record needs 'prompt' (a string) or 'messages'"),
    ("not-json", dict(records=['{"prompt": "1+1=", "answer": "2"}', "{oops"]), "data.jsonl:2: not JSON"),
    ("reward-raises", dict(reward_body="def score(record, completion):\n    return 1 / 0\n"),
     "reward myrewards:score on data.jsonl:1 raised ZeroDivisionError"),
    ("non-number", dict(reward_body="def score(record, completion):\n    return 'good'\n"),
     "reward myrewards:score on data.jsonl:1 returned 'good' (str)"),
    ("no-reward-key", dict(reward_body="def score(record, completion):\n    return {'exact': 1.0}\n"),
     "returned a dict without 'reward'"),
    ("import-fails", dict(reward_body="import no_such_module_here\n"),
     "module 'myrewards' does not import (ModuleNotFoundError"),
    ("no-function", dict(reward_body="score = 3\n"), "myrewards has no function 'score' (score is a int)"),
    ("no-answers-for-warm-start", dict(records=[{"prompt": "1+1="}],
                                       reward_body="def score(record, completion):\n    return 0.0\n"),
     "policy.warm_start.steps=3 needs an 'answer' in every record"),
]


@pytest.mark.parametrize("case, kw, message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_tasks_exit_2_before_anything_starts(tmp_path, case, kw, message):
    _write_task(tmp_path, **kw)
    p = _train(tmp_path, "logging.run_dir=run", *SHORT, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert message in out, out[-3000:]
    assert "Traceback" not in out
    assert not (tmp_path / "run").exists()
