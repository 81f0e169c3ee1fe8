"""Token fidelity in the cases the field keeps hitting, through the real stack with tools,
Dynamo's ``hermes`` tool-call parser and ``qwen3`` reasoning parser on, against both worker
kinds (ours and ``python -m dynamo.vllm``). One regression test each:

* the newline after ``<|im_end|>`` at the assistant → tool boundary is kept;
* a template that strips earlier ``<think>`` blocks neither changes nor duplicates the
  history ids;
* every turn has as many logprobs as generated ids;
* a turn cut by ``max_tokens``: the next prompt is its ids verbatim, the ``<|im_end|>`` the
  template closes the message with, then the new messages;
* tool calls the agent re-sends reformatted do not change the ids already generated.
"""

from __future__ import annotations

import json

import pytest

from dynamo_rl.config import DynamoConfig, GenerationConfig, SamplingConfig
from dynamo_rl.generation import Conversation, DynamoGeneration, render_ids
from dynamo_rl.models import load_tokenizer

from .think_model import TOOLS, TURN1, TURN2, USER, answer_ids, build, tool_message

pytestmark = pytest.mark.stack

GREEDY = SamplingConfig(temperature=0.0, max_tokens=48)


@pytest.fixture(scope="module")
def think_model_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("models") / "think")


@pytest.fixture(scope="module", params=["dynamo-rl", pytest.param("vllm", marks=pytest.mark.vllm)])
def parser_stack(request, think_model_dir, tmp_path_factory):
    from dynamo_rl.serving.stack import LocalStack

    kind = request.param
    vllm_python = request.getfixturevalue("vllm_python") if kind == "vllm" else None
    with LocalStack(think_model_dir, workers=1, engine=kind, vllm_python=vllm_python, quiet=True,
                    tool_call_parser="hermes", reasoning_parser="qwen3",
                    run_dir=tmp_path_factory.mktemp(f"parsers-{kind}")) as st:
        yield st


def generation(stack) -> DynamoGeneration:
    return DynamoGeneration(GenerationConfig(dynamo=DynamoConfig(frontend_url=stack.frontend_url),
                                             retry_deadline_s=10.0, request_timeout_s=120.0))


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def tool_conversation(gen, tok) -> Conversation:
    """A chat-route conversation with the two tools, each prompt sent as ``nvext.token_data``."""
    return Conversation(gen, endpoint="chat", tokenizer=tok, tools=TOOLS, prefix="token_ids")


def history_of(turn) -> list[int]:
    """The ids a turn leaves in the history: its prompt, then its generation."""
    return turn.prompt_token_ids.tolist() + turn.generation_token_ids.tolist()


@pytest.mark.asyncio
async def test_think_and_tool_call_turns_keep_the_engines_ids_and_the_boundary_newline(parser_stack, think_model_dir):
    tok = load_tokenizer(think_model_dir)
    async with generation(parser_stack) as gen:
        conv = tool_conversation(gen, tok)
        t1 = await conv.step(USER, sampling=GREEDY)
        # the parsers split the answer: reasoning, then the call; the ids are all the engine's
        assert t1.generation_token_ids.tolist() == answer_ids(tok, TURN1)
        assert t1.message["reasoning_content"] == "hm" and not t1.message.get("content")
        (call,) = t1.message["tool_calls"]
        assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == ("get", {"k": "a"})
        assert t1.finish_reason == "tool_calls"
        t2 = await conv.step([tool_message(call["id"])], sampling=GREEDY)
    assert t2.generation_token_ids.tolist() == answer_ids(tok, TURN2) and t2.text == TURN2
    for t in (t1, t2):   # as many logprobs as generated ids, parsers on
        assert len(t.generation_logprobs) == len(t.generation_token_ids) > 0
    history = history_of(t1)
    prompt2 = t2.prompt_token_ids.tolist()
    assert prompt2[:len(history)] == history
    # after the generated <|im_end|>: the template's "\n", then only the tool message
    assert prompt2[len(history):] == ids_of(tok, "\n<|im_start|>user\n<tool_response>472</tool_response><|im_end|>\n"
                                                 "<|im_start|>assistant\n")
    think, end_think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert prompt2.count(think) == 1 and prompt2.count(end_think) == 1   # kept once, not duplicated
    # what re-rendering the history would have sent: the think block gone (the drift avoided)
    rerendered = render_ids(tok, conv.messages[:-1], tools=TOOLS)
    assert think not in rerendered and rerendered != prompt2


@pytest.mark.asyncio
async def test_a_turn_cut_by_max_tokens_is_closed_by_the_templates_im_end(parser_stack, think_model_dir):
    tok = load_tokenizer(think_model_dir)
    async with generation(parser_stack) as gen:
        conv = tool_conversation(gen, tok)
        t1 = await conv.step(USER, sampling=SamplingConfig(temperature=0.0, max_tokens=5))
        assert t1.finish_reason == "length"
        assert t1.generation_token_ids.tolist() == answer_ids(tok, TURN1)[:5]
        t2 = await conv.step([{"role": "user", "content": "again"}], sampling=SamplingConfig(temperature=0.0,
                                                                                                max_tokens=2))
    history = history_of(t1)
    assert history[-1] != tok.eos_token_id
    prompt2 = t2.prompt_token_ids.tolist()
    assert prompt2[:len(history)] == history
    assert prompt2[len(history):] == [tok.eos_token_id] + ids_of(
        tok, "\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.asyncio
async def test_tool_calls_resent_reformatted_do_not_change_the_generated_ids(parser_stack, think_model_dir):
    tok = load_tokenizer(think_model_dir)
    async with generation(parser_stack) as gen:
        conv = tool_conversation(gen, tok)
        t1 = await conv.step(USER, sampling=GREEDY)
        # the agent turns the SDK's message back into a dict: other key order, other whitespace
        (call,) = conv.messages[-1]["tool_calls"]
        conv.messages[-1] = {"tool_calls": [{"function": {"arguments": json.dumps(json.loads(
            call["function"]["arguments"]), indent=1), "name": "get"}, "type": "function", "id": call["id"]}],
            "content": None, "role": "assistant"}
        t2 = await conv.step([tool_message(call["id"])], sampling=GREEDY)
    history = history_of(t1)
    assert t2.prompt_token_ids.tolist()[:len(history)] == history
    assert t2.generation_token_ids.tolist() == answer_ids(tok, TURN2)
    # re-rendering the agent's rendition would have changed the call's ids
    rerendered = render_ids(tok, conv.messages[:3], tools=TOOLS)
    assert '{\n "k": "a"\n}' in tok.decode(rerendered) and rerendered[:len(history)] != history
    assert history[len(t1.prompt_token_ids):] == answer_ids(tok, TURN1)
