"""Regressions (a) and (b) on the real stack, with a model that makes the drift happen:
a BPE tokenizer where ``"hello"`` is one token but the engine emits ``he`` + ``llo``, and
a chat template that drops a past ``<think>...</think>`` block (see drift_model.py).

Turn 1 (greedy) answers ``<think> h m </think> he llo <|im_end|>``. Re-rendering the
history would turn that into ``hello <|im_end|>``; a Conversation keeps the engine's ids
on both routes.
"""

from __future__ import annotations

import pytest
import torch

from dynamo_rl.config import SamplingConfig
from dynamo_rl.generation import ChatPrompt, ContiguityError, Conversation, DynamoGeneration, check_contiguity, render_ids
from dynamo_rl.models import load_tokenizer

from .conftest import gen_config, read_records, record_of
from .drift_model import answer_ids

pytestmark = pytest.mark.stack

GREEDY = SamplingConfig(temperature=0.0, max_tokens=12)
USERS = ["hi", "more"]


async def two_turns(drift_stack, tok):
    async with DynamoGeneration(gen_config(drift_stack.frontend_url)) as gen:
        comp = Conversation(gen, endpoint="completions", tokenizer=tok)
        chat = Conversation(gen, endpoint="chat")
        for u in USERS:
            for conv in (comp, chat):
                await conv.step([{"role": "user", "content": u}], sampling=GREEDY)
    records = read_records(drift_stack)
    for conv in (comp, chat):
        for s in conv.samples:
            rec = record_of(records, s)
            assert s.prompt_token_ids.tolist() == rec["prompt_token_ids"]
            assert s.generation_token_ids.tolist() == rec["token_ids"]
            assert torch.equal(s.generation_logprobs, torch.tensor(rec["logprobs"], dtype=torch.float32))
    for a, b in zip(comp.samples, chat.samples):  # both routes give identical ids
        assert torch.equal(a.prompt_token_ids, b.prompt_token_ids)
        assert torch.equal(a.generation_token_ids, b.generation_token_ids)
    return comp, chat


@pytest.mark.asyncio
async def test_a_bpe_split_keeps_the_engines_he_llo_not_the_reencoded_hello(drift_stack, drift_model_dir):
    tok = load_tokenizer(drift_model_dir)
    he, llo, hello = tok.convert_tokens_to_ids(["he", "llo", "hello"])
    assert tok.encode("hello", add_special_tokens=False) == [hello]
    comp, chat = await two_turns(drift_stack, tok)
    first = comp.samples[0]
    assert first.generation_token_ids.tolist() == answer_ids(tok)  # ... he, llo, <|im_end|>
    # re-encoding the frontend's text merges he+llo into hello: that is the drift
    assert tok.encode(first.text, add_special_tokens=False)[-1] == hello
    history = torch.cat([first.prompt_token_ids, first.generation_token_ids]).tolist()
    for conv in (comp, chat):
        second = conv.samples[1].prompt_token_ids.tolist()
        assert second[: len(history)] == history
        at = len(first.prompt_token_ids) + 4
        assert second[at: at + 2] == [he, llo] and hello not in second


@pytest.mark.asyncio
async def test_b_template_dropping_past_think_keeps_the_verbatim_think_ids(drift_stack, drift_model_dir):
    tok = load_tokenizer(drift_model_dir)
    think, end_think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    comp, chat = await two_turns(drift_stack, tok)
    first = comp.samples[0]
    assert first.text == "<think>hm</think>hello"
    history = torch.cat([first.prompt_token_ids, first.generation_token_ids]).tolist()
    # what re-rendering the messages gives: the template drops the think block
    msgs = comp.messages[:2] + [{"role": "user", "content": USERS[1]}]
    naive = render_ids(tok, msgs)
    assert think not in naive and end_think not in naive
    with pytest.raises(ContiguityError) as e:
        check_contiguity(history, naive)
    assert e.value.position == len(first.prompt_token_ids) and think in e.value.expected
    assert "first difference at position" in str(e.value)
    # the conversation keeps the engine's ids on both routes
    for conv in (comp, chat):
        second = conv.samples[1].prompt_token_ids.tolist()
        assert second[: len(history)] == history
        assert second.count(think) == 1 and second.count(end_think) == 1
    # an OpenAI agent that resends the messages without the prefix gets the dropped
    # history from the real frontend, and the contiguity check catches it
    async with DynamoGeneration(gen_config(drift_stack.frontend_url)) as gen:
        (plain,), (spliced,) = await gen.generate(
            [msgs, ChatPrompt(msgs, required_prefix_token_ids=history)], sampling=GREEDY)
    assert plain.prompt_token_ids.tolist() == naive  # the frontend renders like the HF template
    with pytest.raises(ContiguityError):
        check_contiguity(history, plain.prompt_token_ids.tolist())
    assert spliced.prompt_token_ids.tolist() == comp.samples[1].prompt_token_ids.tolist()
