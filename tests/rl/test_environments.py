"""Environments: the built-in tool_lookup (outcomes of every kind of answer), custom
environment classes named by a recipe (bad ones refused before anything starts, exit 2),
the warm start's demonstrations, and `dynamo-rl train` on an environment through the real
stack, tool calls parsed by Dynamo's hermes parser."""

from __future__ import annotations

import json
import random
import re
import textwrap
from pathlib import Path

import pytest

from dynamo_rl.config import Recipe, TaskConfig
from dynamo_rl.exitcodes import ExitCode
from dynamo_rl.models.tiny import build_tokenizer
from dynamo_rl.rl.environments import Step, ToolLookup
from dynamo_rl.rl.loop import run_training
from dynamo_rl.rl.tasks import EnvironmentTask, TaskError, load_task, supervised_example

REC = {"verb": "rev", "key": "c", "value": "472"}


def call(name: str, arguments: str, cid: str = "call_1") -> dict:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}]}


def test_tool_lookup_answers_every_kind_of_assistant_message():
    env = ToolLookup()
    first = env.reset(REC)
    assert first.messages == [{"role": "user", "content": "rev c"}]
    assert [t["function"]["name"] for t in first.tools] == ["get", "rev"]
    # an unknown tool, arguments that are not JSON, a wrong key: the tool says so, the episode goes on
    for name, args, said in [("put", '{"k":"c"}', "error: unknown tool put"),
                             ("rev", '{"k":', "error: arguments are not json"),
                             ("rev", '{"k":"d"}', "error: no such key")]:
        step = env.step(call(name, args))
        assert step == Step(messages=[{"role": "tool", "tool_call_id": "call_1", "content": said}])
    # the right call: the value reversed
    assert env.step(call("rev", '{"k": "c"}')).messages[0]["content"] == "274"
    done = env.step({"role": "assistant", "content": " 274 "})
    assert (done.done, done.reward, done.scores["success"], done.scores["tool_errors"]) == (True, 1.0, 1.0, 3.0)


def test_tool_lookup_rewards_partial_answers_and_counts_malformed_calls():
    env = ToolLookup()
    env.reset(REC)
    env.step(call("rev", '{"k":"c"}'))
    assert env.step({"role": "assistant", "content": "279"}).reward == pytest.approx(0.5 * 2 / 3)
    # no tool used: no reward even for the right digits (it cannot know them)
    env = ToolLookup()
    env.reset(REC)
    assert env.step({"role": "assistant", "content": "274"}).reward == 0.0
    # a call the parser could not read comes back as text: zero reward, counted
    env = ToolLookup()
    env.reset(REC)
    out = env.step({"role": "assistant", "content": '<tool_call>{"name":"rev":}</tool_call>'})
    assert (out.done, out.reward, out.scores["malformed_tool_call"]) == (True, 0.0, 1.0)
    # the wrong tool's answer is not a success
    env = ToolLookup()
    env.reset(REC)
    env.step(call("get", '{"k":"c"}'))
    assert env.step({"role": "assistant", "content": "274"}).scores["success"] == 0.0


def test_the_warm_start_trains_on_the_demonstration_rendered_by_the_template():
    tok = build_tokenizer("tools")
    task = load_task(TaskConfig(name="tool_lookup"))
    problem = task.sample(random.Random(0), 1)[0]
    problem = type(problem)((), record=REC)
    ids, mask = supervised_example(tok, problem, task)
    assert tok.decode(ids) == (
        "<|im_start|>system\ntools: get rev<|im_end|>\n<|im_start|>user\nrev c<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>{"name":"rev","arguments":{"k":"c"}}</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>274</tool_response><|im_end|>\n<|im_start|>assistant\n274<|im_end|>")
    trained = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(trained) == '<tool_call>{"name":"rev","arguments":{"k":"c"}}</tool_call><|im_end|>274<|im_end|>'
    # the call is 12 tokens: tags, the JSON merges, the name and key characters
    assert trained.index(tok.eos_token_id) == 11


ENV_FILE = '''
from dynamo_rl.rl.environments import Environment, Reset, Step

class Echo(Environment):
    """Says a word; the reward is 1 when the policy says it back."""
    max_turns = 2

    def reset(self, record):
        self.word = record["word"]
        return Reset(messages=[{"role": "user", "content": "say " + self.word}])

    def step(self, message):
        return Step(reward=float((message.get("content") or "").strip() == self.word), done=True,
                    scores={"said": float(bool(message.get("content")))})

    def demonstration(self, record):
        return [{"role": "assistant", "content": record["word"]}]

class NotAnEnv:
    pass

class BadReset(Environment):
    def reset(self, record):
        return [{"role": "user", "content": "hi"}]
'''


@pytest.fixture()
def env_dir(tmp_path) -> Path:
    (tmp_path / "echo_env.py").write_text(ENV_FILE)
    (tmp_path / "words.jsonl").write_text("\n".join(json.dumps({"word": w}) for w in ["ab", "cd", "ef"]) + "\n")
    return tmp_path


def recipe(tmp_path: Path, **task) -> Recipe:
    return Recipe.model_validate({
        "name": "env-test", "task": {"name": "custom", **task},
        "policy": {"warm_start": {"steps": 2, "batch_size": 4}},
        "generation": {"sampling": {"max_tokens": 4}},
        "grpo": {"num_steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2, "eval_every": 0},
        "logging": {"run_dir": str(tmp_path / "run"), "tensorboard": False},
        "cluster": {"workers": 1}})


@pytest.mark.parametrize("spec, data, expect", [
    ("echo_env.py:NotAnEnv", "words.jsonl", "is not a subclass of dynamo_rl.rl.environments.Environment"),
    ("echo_env.py:Missing", "words.jsonl", "has no class 'Missing'"),
    ("echo_env.py:BadReset", "words.jsonl", "returned a list, not a Reset"),
    ("echo_env.py:Echo", "nowhere.jsonl", "no such file"),
])
def test_a_bad_environment_exits_2_before_anything_starts(env_dir, monkeypatch, spec, data, expect, capsys):
    monkeypatch.chdir(env_dir)
    cfg = recipe(env_dir, environment=spec, data=data)
    assert run_training(cfg) == ExitCode.BAD_INPUT
    assert expect in capsys.readouterr().err.replace("\n", "")
    assert not (env_dir / "run").exists()


def test_the_recipe_needs_one_of_reward_and_environment():
    with pytest.raises(ValueError, match="either task.reward"):
        TaskConfig(name="custom", data="x.jsonl", reward="m:f", environment="m:C")
    with pytest.raises(ValueError, match="belong to task.name=custom"):
        TaskConfig(name="tool_lookup", environment="m:C")


def test_tools_need_a_tool_call_parser_and_the_tools_vocabulary(tmp_path, capsys):
    cfg = Recipe.model_validate({"task": {"name": "tool_lookup"}, "policy": {"tiny": {"vocab": "tools"}},
                                 "logging": {"run_dir": str(tmp_path / "r")}})
    assert run_training(cfg) == ExitCode.BAD_INPUT
    assert "cluster.tool_call_parser=hermes" in capsys.readouterr().err.replace("\n", "")
    cfg = Recipe.model_validate({"task": {"name": "tool_lookup"}, "cluster": {"tool_call_parser": "hermes"},
                                 "logging": {"run_dir": str(tmp_path / "r")}})
    assert run_training(cfg) == ExitCode.BAD_INPUT
    assert "policy.tiny.vocab=tools" in capsys.readouterr().err.replace("\n", "")


@pytest.mark.stack
def test_train_runs_a_custom_environment_from_a_file(env_dir, monkeypatch):
    monkeypatch.chdir(env_dir)
    cfg = recipe(env_dir, environment="echo_env.py:Echo", data="words.jsonl")
    assert isinstance(load_task(cfg.task), EnvironmentTask)
    assert run_training(cfg) == ExitCode.OK
    rows = [json.loads(line) for line in (env_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all("said" in r and r["version_mismatches"] == 0 for r in rows)


@pytest.mark.stack
def test_train_on_tool_lookup_through_the_stack_with_dynamos_parser(tmp_path):
    cfg = Recipe.model_validate({
        "name": "tools-test", "task": {"name": "tool_lookup"},
        "policy": {"tiny": {"vocab": "tools"}, "warm_start": {"steps": 120, "batch_size": 32}},
        "generation": {"sampling": {"max_tokens": 48}},
        "grpo": {"num_steps": 2, "prompts_per_step": 4, "samples_per_prompt": 4, "eval_every": 0},
        "logging": {"run_dir": str(tmp_path / "run"), "tensorboard": False},
        "cluster": {"workers": 1, "tool_call_parser": "hermes"}})
    assert run_training(cfg) == ExitCode.OK
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # after 120 supervised steps the format is learned: the parser reads calls (a 2nd turn)
    assert all(r["turns"] > 1.0 and r["version_mismatches"] == 0 and r["logprob_mae"] < 1e-5 for r in rows)



@pytest.mark.parametrize("step, said", [
    ("Step(reward=float('nan'), done=True)", "Step.reward=nan"),
    ("Step(reward=True, done=True)", "Step.reward=True"),
    ("Step(reward='1', done=True)", "Step.reward='1'"),
    ("Step(reward=1.0, done=True, scores={'x': 'abc'})", "Step.scores="),
    ("Step(reward=1.0, done=True, scores={'reward': 2.0})", "may not set 'reward'"),
    ("Step(messages=['hello'])", "Step.messages="),
    ("Step()", "not done and has no messages"),
    ("(1.0, True)", "returned a tuple"),
])
def test_what_an_environment_step_returns_is_checked(tmp_path, step, said):
    (tmp_path / "bad_env.py").write_text(textwrap.dedent(f"""
        from dynamo_rl.rl.environments import Environment, Reset, Step

        class Bad(Environment):
            def reset(self, record):
                return Reset(messages=[{{"role": "user", "content": "hi"}}])

            def step(self, message):
                return {step}
        """))
    (tmp_path / "d.jsonl").write_text('{"x": 1}\n')
    task = load_task(TaskConfig(name="custom", environment=f"{tmp_path / 'bad_env.py'}:Bad",
                                data=str(tmp_path / "d.jsonl")))
    env = task.make()
    task.reset(env, task.sample(random.Random(0), 1)[0])
    with pytest.raises(TaskError, match=re.escape(said)):
        task.step(env, {"role": "assistant", "content": "x"})
