"""The external-agent path against Dynamo's stock vLLM worker: an ``openai`` SDK agent
process plays episodes of the two-tool task through the rollout endpoint; vLLM returns
``engine_data`` and takes ``nvext.token_data`` (no splice), and every turn keeps the
engine's ids and logprobs, contiguous, with the loss mask on the assistant tokens."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from dynamo_rl.config import DynamoConfig, GenerationConfig, Recipe, SamplingConfig
from dynamo_rl.generation import DynamoGeneration
from dynamo_rl.models import load_model, load_tokenizer
from dynamo_rl.rl.rollout_server import RolloutServer
from dynamo_rl.rl.trainer import Trainer

AGENT = Path(__file__).resolve().parents[2] / "examples" / "agents" / "tool_agent.py"

pytestmark = [pytest.mark.vllm, pytest.mark.stack]


@pytest.mark.asyncio
async def test_an_openai_sdk_agent_against_dynamo_vllm_workers(tool_model_dir, vllm_python, tmp_path):
    from dynamo_rl.serving.stack import LocalStack

    tok = load_tokenizer(tool_model_dir)
    out = tmp_path / "episodes.jsonl"
    with LocalStack(tool_model_dir, workers=1, engine="vllm", vllm_python=vllm_python, quiet=True,
                    tool_call_parser="hermes", run_dir=tmp_path / "stack") as st:
        cfg = GenerationConfig(dynamo=DynamoConfig(frontend_url=st.frontend_url), retry_deadline_s=10.0,
                               request_timeout_s=120.0)
        async with DynamoGeneration(cfg) as gen, RolloutServer(gen, tok, sampling=SamplingConfig(max_tokens=48)) as srv:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(AGENT), "--url", srv.url, "--out", str(out), "--episodes", "8",
                "--group-size", "4", "--seed", "1", stderr=asyncio.subprocess.PIPE)
            episodes = await srv.collect_groups(2, 4, timeout_s=240)
            _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            assert proc.returncode == 0, err.decode()[-3000:]
    played = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(episodes) == 8 and len(played) == 8
    assert sum(p["tool_calls"] for p in played) > 0
    eos = tok.eos_token_id
    for e in episodes:
        history: list[int] = []
        mask: list[int] = []
        for s in e.turns:
            prompt, gen_ids = s.prompt_token_ids.tolist(), s.generation_token_ids.tolist()
            assert len(s.generation_logprobs) == len(gen_ids) > 0
            assert prompt[:len(history)] == history
            if history and history[-1] == eos:   # the template's newline after <|im_end|> is kept
                assert prompt[len(history)] == tok.convert_tokens_to_ids("\n")
            mask += [0] * (len(prompt) - len(history)) + [1] * len(gen_ids)
            history = prompt + gen_ids
        assert e.ids == history and e.mask == mask
    assert any(len(e.turns) > 1 for e in episodes)
    # the trainer scores exactly those ids: its logprobs equal vLLM's (fp32, summation order apart)
    trainer = Trainer(load_model(tool_model_dir), Recipe.model_validate(
        {"grpo": {"samples_per_prompt": 4}, "task": {"name": "tool_lookup"}, "policy": {"tiny": {"vocab": "tools"}}}))
    for e in episodes:
        e.versions = {0}
    stats = trainer.step(episodes, tok.pad_token_id, current_version=0)
    assert stats["logprob_mae"] < 1e-4
