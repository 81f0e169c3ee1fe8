"""A tiny model that thinks before it calls a tool, built in the test (~10 s of CPU training).

The ``tools`` vocabulary and template of :mod:`dynamo_rl.models.tiny` (Qwen3's conventions:
``<think>`` blocks of past turns are stripped when a conversation is rendered), trained for
a few hundred steps so that greedy decoding answers

* ``get a`` (tools ``get``, ``rev``) with ``<think>hm</think><tool_call>{"name":"get",
  "arguments":{"k":"a"}}</tool_call><|im_end|>`` (:data:`TURN1`), and
* the tool's result ``472`` with ``472<|im_end|>`` (:data:`TURN2`).

Re-rendering turn 1 for turn 2's prompt loses its ``<think>hm</think>`` (and a client
that re-serializes the tool call's arguments changes its characters): the ids a trainer
must keep are the engine's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dynamo_rl.rl.environments import ToolLookup

TOOLS = ToolLookup.TOOLS
USER = [{"role": "user", "content": "get a"}]
CALL = '<tool_call>{"name":"get","arguments":{"k":"a"}}</tool_call>'
TURN1 = "<think>hm</think>" + CALL
TURN2 = "472"


def tool_message(call_id: str = "call_0") -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": TURN2}


def answer_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


def build(path: Path, steps: int = 300) -> Path:
    from dynamo_rl.config.schema import TinyModel
    from dynamo_rl.generation import render_ids
    from dynamo_rl.models import ensure_tiny_model, load_model, load_tokenizer, save_checkpoint, splice_required_prefix

    base = ensure_tiny_model(path.with_name(path.name + "-base"), TinyModel(vocab="tools"))
    tok, model = load_tokenizer(base), load_model(base)
    p1 = render_ids(tok, USER, tools=TOOLS)
    g1 = answer_ids(tok, TURN1)
    msgs = USER + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get", "arguments": '{"k":"a"}'}}]}, tool_message()]
    p2 = splice_required_prefix(render_ids(tok, msgs, tools=TOOLS), p1 + g1, tok.eos_token_id)
    examples = [(p1, g1), (p2, answer_ids(tok, TURN2))]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = sum(torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([p + g])).logits[0, len(p) - 1:-1],
                                                     torch.tensor(g)) for p, g in examples)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return save_checkpoint(model.eval(), path, tokenizer=tok)
