"""The rollout endpoint for external agents, on the real stack: an agent process using the
``openai`` SDK plays 16 episodes of the two-tool task (examples/agents/tool_agent.py); the
trainer trains on them, and for every turn the ids trained on are the ids the workers
recorded, the loss mask covers exactly the assistant tokens, and contiguity holds."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest
import torch

from dynamo_rl.config import DynamoConfig, GenerationConfig, Recipe, SamplingConfig
from dynamo_rl.generation import DynamoGeneration
from dynamo_rl.models import load_model, load_tokenizer
from dynamo_rl.rl.rollout_server import RolloutServer
from dynamo_rl.rl.rollouts import to_batch
from dynamo_rl.rl.trainer import Trainer

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "examples" / "agents" / "tool_agent.py"


def read_records(stack) -> dict[str, dict]:
    out = {}
    for w in stack.workers:
        for line in Path(w.record_file).read_text().splitlines():
            rec = json.loads(line)
            out[rec["request_id"]] = rec
    return out


@pytest.fixture(scope="module")
def tool_stack(tool_model_dir, tmp_path_factory):
    from dynamo_rl.serving.stack import LocalStack

    with LocalStack(tool_model_dir, workers=2, record=True, quiet=True, tool_call_parser="hermes",
                    run_dir=tmp_path_factory.mktemp("tool-stack")) as st:
        yield st


def gen_config(url: str) -> GenerationConfig:
    return GenerationConfig(dynamo=DynamoConfig(frontend_url=url), retry_deadline_s=10.0, request_timeout_s=60.0)


async def run_agent(url: str, out: Path, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, str(AGENT), "--url", url, "--out", str(out), *args,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=240)
    assert proc.returncode == 0, err.decode()[-3000:]


def check_episode(ep, records: dict[str, dict], eos: int) -> None:
    """Every turn: the worker's record = the ids and logprobs kept; contiguity; the mask."""
    expected_mask: list[int] = []
    history: list[int] = []
    for s in ep.turns:
        rec = records[s.request_id.split("-", 1)[1]]
        prompt, gen = s.prompt_token_ids.tolist(), s.generation_token_ids.tolist()
        assert prompt == rec["prompt_token_ids"] and gen == rec["token_ids"]
        assert torch.equal(s.generation_logprobs, torch.tensor(rec["logprobs"], dtype=torch.float32))
        assert len(s.generation_logprobs) == len(gen)
        assert prompt[:len(history)] == history, "turn does not extend the previous prompt + generation"
        if history:   # the template's newline after <|im_end|> at the assistant -> tool boundary
            assert history[-1] == eos and prompt[len(history)] != eos
        expected_mask += [0] * (len(prompt) - len(history)) + [1] * len(gen)
        history = prompt + gen
    assert ep.ids == history
    assert ep.mask == expected_mask
    assert [lp for lp, m in zip(ep.engine_logp, ep.mask) if m] == [
        float(x) for s in ep.turns for x in s.generation_logprobs.tolist()]


@pytest.mark.asyncio
async def test_an_openai_sdk_agent_process_plays_16_episodes_and_the_trainer_trains_on_exact_ids(
        tool_stack, tool_model_dir, tmp_path):
    tok = load_tokenizer(tool_model_dir)
    out = tmp_path / "episodes.jsonl"
    async with DynamoGeneration(gen_config(tool_stack.frontend_url)) as gen, \
            RolloutServer(gen, tok, sampling=SamplingConfig(max_tokens=48)) as server:
        agent = asyncio.create_task(run_agent(server.url, out, "--episodes", "16", "--group-size", "4"))
        episodes = await server.collect_groups(4, 4, timeout_s=240)
        await agent
    assert len(episodes) == 16
    played = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(played) == 16 and {p["stream"] for p in played} == {True, False}
    # the groups are the agent's tasks, in GRPO's group-major layout
    assert [e.problem_index for e in episodes] == [i // 4 for i in range(16)]
    by_session = {p["session"]: p for p in played}
    assert sum(p["tool_calls"] for p in played) > 0, "the model made no tool call the parser could read"
    records = read_records(tool_stack)
    assert sum(len(e.turns) for e in episodes) == len(records)   # every request the workers ran
    for e in episodes:
        check_episode(e, records, tok.eos_token_id)
    multi = [e for e in episodes if len(e.turns) > 1]
    assert multi, "no episode got past its first tool call"
    # the agent re-sent every tool call re-serialized ({"k": "a"}); the ids kept are the
    # engine's ({"k":"a"} as generated), never the agent's rendition
    for e in multi:
        first_gen = e.turns[0].generation_token_ids.tolist()
        assert e.turns[1].prompt_token_ids.tolist()[:len(e.turns[0].prompt_token_ids) + len(first_gen)][-len(first_gen):] \
            == first_gen
    assert sorted(e.reward for e in episodes) == sorted(p["reward"] for p in by_session.values())

    # the trainer trains on them: the batch rows are the episodes' ids, the loss mask theirs
    cfg = Recipe.model_validate({"grpo": {"samples_per_prompt": 4}, "task": {"name": "tool_lookup"},
                                 "policy": {"tiny": {"vocab": "tools"}}})
    trainer = Trainer(load_model(tool_model_dir), cfg)
    ids, attn, mask, _ = to_batch(episodes, tok.pad_token_id)
    for i, e in enumerate(episodes):
        n = len(e.ids)
        assert ids[i, :n].tolist() == e.ids and mask[i, :n].tolist() == [float(m) for m in e.mask]
        assert int(mask[i].sum()) == sum(len(s.generation_token_ids) for s in e.turns)
    for e in episodes:
        e.versions = {0}
    stats = trainer.step(episodes, tok.pad_token_id, current_version=0)
    assert stats["logprob_mae"] < 1e-4   # the trainer's logprobs of those ids = the engine's
    assert torch.isfinite(torch.tensor(stats["loss"]))


@pytest.mark.asyncio
async def test_bad_requests_and_an_agent_that_never_ends_its_session(tool_stack, tool_model_dir):
    tok = load_tokenizer(tool_model_dir)
    async with DynamoGeneration(gen_config(tool_stack.frontend_url)) as gen, \
            RolloutServer(gen, tok, sampling=SamplingConfig(max_tokens=48), session_timeout_s=2.0) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            # a reward for a session that does not exist
            r = await http.post("/v1/sessions/nope/end", json={"reward": 1.0})
            assert r.status_code == 404 and "no session 'nope'" in r.json()["error"]["message"]
            r = await http.post("/sessions/nope/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 404
            s = (await http.post("/v1/sessions", json={"group": "g"})).json()
            base = f"/sessions/{s['id']}/v1"
            server.session_timeout_s = 3600.0   # no reaping while the bad requests run (set back below)
            r = await http.post(f"{base}/chat/completions", json={"messages": []})
            assert r.status_code == 400 and "'messages'" in r.json()["error"]["message"]
            r = await http.post(f"/v1/sessions/{s['id']}/end", json={"reward": "high"})
            assert r.status_code == 400 and "finite number" in r.json()["error"]["message"]
            first = [{"role": "user", "content": "get a"}]
            r = await http.post(f"{base}/chat/completions", json={"messages": first, "max_tokens": 48})
            assert r.status_code == 200, r.text
            r1 = r.json()
            answer = r1["choices"][0]["message"]
            # a history that does not extend the session's
            r = await http.post(f"{base}/chat/completions", json={"messages": [{"role": "user", "content": "x"}] * 3})
            assert r.status_code == 409 and "do not extend" in r.json()["error"]["message"]
            # a prompt past the model's context: 400 with the worker's reason; the session goes on
            long = first + [dict(answer, content=answer.get("content") or ""),
                            {"role": "user", "content": "z" * 300}]
            r = await http.post(f"{base}/chat/completions", json={"messages": long})
            assert r.status_code == 400 and "refused" in r.json()["error"]["message"]
            # the same request again (a client that lost the answer retries): the same answer, no new turn
            again = await http.post(f"{base}/chat/completions", json={"messages": first, "max_tokens": 48})
            assert again.status_code == 200 and again.json() == r1 and server.counts["replayed_turns"] == 1
            hist = first + [dict(answer, content=answer.get("content") or "")]
            for body, status, said in [
                # fields that would change what the policy samples are refused, by name
                ({"messages": hist + [{"role": "user", "content": "x"}], "stop": ["<"]}, 400, "['stop']"),
                ({"messages": hist + [{"role": "user", "content": "x"}], "tool_choice": "none"}, 400, "tool_choice"),
                ({"messages": hist + [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "positive integer"),
                ({"messages": hist + [{"role": "system", "content": "x"}]}, 400, "user or tool messages"),
                ({"messages": hist + [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "not a text part"),
                ({"messages": hist + [{"role": "user", "content": "x"}], "tools": [1]}, 400, "'tools'"),
                # tools that change mid-session would change the ids already generated
                ({"messages": hist + [{"role": "user", "content": "x"}],
                  "tools": [{"type": "function", "function": {"name": "get"}}]}, 409, "tools differ"),
                # a message whose text holds the end-of-message token would move the cut
                ({"messages": [dict(first[0], content="get a<|im_end|>")] + hist[1:]
                  + [{"role": "user", "content": "x"}]}, 409, "message ends"),
            ]:
                r = await http.post(f"{base}/chat/completions", json=body)
                assert r.status_code == status and said in r.json()["error"]["message"], (body, r.text)
            # rewards and scores are checked before the session ends: it stays open
            for end, said in [({"reward": 10 ** 400}, "finite number"), ({"reward": 1, "scores": [1]}, "'scores'"),
                              ({"reward": 1, "scores": {"reward": 2}}, "reserved"),
                              ({"reward": 1, "scores": {"x": float("nan")}}, "finite number")]:
                r = await http.post(f"/v1/sessions/{s['id']}/end", content=json.dumps(end))
                assert r.status_code == 400 and said in r.json()["error"]["message"], (end, r.text)
            assert (await http.get(f"/v1/sessions/{s['id']}")).json()["ended"] is False
            server.session_timeout_s = 2.0
            # the agent goes away without ending it: ended after 2 s idle with reward 0, counted;
            # until collected its GET says how it ended and a late reward gets 409
            for _ in range(40):
                st = (await http.get(f"/v1/sessions/{s['id']}")).json()
                if st["ended"]:
                    break
                await asyncio.sleep(0.25)
            assert st["outcome"] == "timeout"
            r = await http.post(f"/v1/sessions/{s['id']}/end", json={"reward": 1.0})
            assert r.status_code == 409 and "has ended (timeout)" in r.json()["error"]["message"]
            episodes = await server.collect_groups(1, 1, timeout_s=20)
            assert len(episodes) == 1 and episodes[0].reward == 0.0 and episodes[0].scores[0]["timeout"] == 1.0
            assert len(episodes[0].turns) == 1 and server.counts["timeouts"] == 1
            r = await http.post(f"/v1/sessions/{s['id']}/end", json={"reward": 1.0})
            assert r.status_code == 404   # collected: gone
        with pytest.raises(TimeoutError, match="1 groups of 1|0 of 1 groups"):
            await server.collect_groups(1, 1, timeout_s=0.5)
        with pytest.raises(ValueError, match="group_size >= 1"):
            await server.collect_groups(1, 0)
