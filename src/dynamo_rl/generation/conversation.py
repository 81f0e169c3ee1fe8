"""Token-exact multi-turn rollouts: turn N+1's prompt extends turn N's ids verbatim.

A :class:`Conversation` keeps the ids the engine actually saw and produced
(``prompt_token_ids + generation_token_ids`` of the last turn) and builds the next
prompt from them plus the tokens of only the new messages. Re-rendering and
re-tokenizing the history instead can change ids (a BPE merge across ``"he"`` +
``"llo"``, a chat template that drops a past ``<think>...</think>`` block, special
tokens the detokenized text no longer shows), and then the trainer would score tokens
the engine never sampled.

Three ways give identical ids:

* ``endpoint="completions"``: the client renders the whole conversation with the chat
  template (``tokenizer.apply_chat_template``), finds where the new messages start with
  :func:`dynamo_rl.models.chat.new_message_start` (the rule of the worker's splice) and
  sends ``history ids + rendered[start:]`` as a token-id prompt.
* ``endpoint="chat"``: the client sends the messages and
  ``required_prefix_token_ids = history ids``; the frontend renders and tokenizes, and the
  worker calls :func:`dynamo_rl.models.chat.splice_required_prefix` with the same rule
  (our worker only).
* ``endpoint="chat", prefix="token_ids"``: the client computes the prompt as on the
  completion route and sends it as ``nvext.token_data`` with the messages; any worker kind
  (Dynamo's vLLM worker included) runs exactly those ids, and the frontend still parses
  tool calls and reasoning out of the answer. The first turn is rendered by the frontend.

With ``tools`` (chat route only), every request carries them and each assistant turn is
kept as the frontend's parsers returned it (``content``, ``tool_calls``,
``reasoning_content``): the next turn's messages are ``tool`` results or user messages.

Either way the result is checked: the prompt the engine saw must start with the history
ids (:class:`ContiguityError` shows the first differing position and both windows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from dynamo_rl.config import SamplingConfig
from dynamo_rl.generation import _wire
from dynamo_rl.generation.client import ChatPrompt, DynamoGeneration, Sample
from dynamo_rl.generation.errors import ContiguityError
from dynamo_rl.models.chat import PrefixSpliceError, splice_required_prefix

_WINDOW = 8


def check_contiguity(history: Sequence[int], prompt: Sequence[int], *, what: str = "prompt") -> None:
    """Assert that ``prompt`` starts with ``history`` (both ``list[int]``-like).

    Raises:
        ContiguityError: with the first differing position and the two windows
            (``history[p-8:p+8]`` vs ``prompt[p-8:p+8]``).
    """
    history = [int(t) for t in history]
    prompt = [int(t) for t in prompt]
    pos = _wire.first_difference(history, prompt)
    if pos is None:
        return
    lo, hi = max(0, pos - _WINDOW), pos + _WINDOW
    exp, got = history[lo:hi], prompt[lo:hi]
    reason = (f"the {what} ({len(prompt)} ids) is shorter than the history ({len(history)} ids)"
              if pos >= len(prompt) else f"{what} id {prompt[pos]} != history id {history[pos]}")
    raise ContiguityError(
        f"{what} does not extend the previous turn's prompt + generation ids: first difference at "
        f"position {pos}: {reason}.\n  history[{lo}:{hi}] = {exp}\n  {what}[{lo}:{hi}]  = {got}\n"
        "The history was re-tokenized somewhere; build the next turn from the verbatim ids "
        "(Conversation does this) and, on the chat route, send required_prefix_token_ids.",
        position=pos, expected=exp, actual=got)


def render_ids(tokenizer: Any, messages: list[dict], **template_kwargs: Any) -> list[int]:
    """``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``
    as a plain ``list[int]`` (transformers 5 returns a ``BatchEncoding``)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **template_kwargs)
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def text_messages(messages: list[dict]) -> list[dict]:
    """``messages`` with OpenAI content parts (``[{"type": "text", "text": ...}, ...]``) joined
    into plain text, as the frontend renders them; chat templates of text models take a string.

    Raises:
        ValueError: a part that is not text (images, audio: not for a text model's trajectory),
            or content that is neither a string, a list of parts nor null.
    """
    out = []
    for i, m in enumerate(messages):
        c = m.get("content")
        if isinstance(c, list):
            texts = []
            for j, part in enumerate(c):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"messages[{i}].content[{j}] is not a text part ({{'type': 'text', 'text': str}})")
                texts.append(part["text"])
            m = dict(m, content="".join(texts))
        elif c is not None and not isinstance(c, str):
            raise ValueError(f"messages[{i}].content must be a string, a list of text parts or null, "
                             f"not {type(c).__name__}")
        out.append(m)
    return out


def assistant_message(sample: Sample) -> dict:
    """The assistant message of a turn, for the next turn's history: the chat route's message
    as the frontend's parsers returned it (``content``, and ``tool_calls`` /
    ``reasoning_content`` when present), else ``{"role": "assistant", "content": text}``."""
    m = sample.message or {}
    out: dict = {"role": "assistant", "content": m.get("content") if m else sample.text}
    if out["content"] is None:
        out["content"] = ""
    for key in ("tool_calls", "reasoning_content"):
        if m.get(key):
            out[key] = m[key]
    return out


class Conversation:
    """One multi-turn rollout whose history ids are always the engine's own.

    Args:
        generation: the backend.
        endpoint: ``"completions"`` (token ids; needs ``tokenizer``) or ``"chat"``.
        prefix: on the chat route, ``"splice"`` (``required_prefix_token_ids``; our worker
            splices) or ``"token_ids"`` (the whole prompt as ``nvext.token_data``; needs
            ``tokenizer``; any worker kind).
        tools: OpenAI tool definitions sent with every turn (chat route).
        tokenizer: HF tokenizer with the served model's chat template (completion route).
        eos_token_id: the id that ends every chat message (``<|im_end|>``); default
            ``tokenizer.eos_token_id``. Needed on the completion route.
        template_kwargs: extra ``apply_chat_template`` arguments (completion route).

    Attributes:
        messages: the conversation so far (assistant turns as the frontend returned them).
        token_ids: int64 ``[T]``, the last turn's prompt ids + generation ids (empty before
            the first turn).
        samples: one :class:`Sample` per turn.
    """

    def __init__(self, generation: DynamoGeneration, *, endpoint: Literal["completions", "chat"] = "completions",
                 tokenizer: Any = None, eos_token_id: int | None = None, template_kwargs: dict | None = None,
                 tools: list[dict] | None = None, prefix: Literal["splice", "token_ids"] = "splice"):
        if endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {endpoint!r}")
        if prefix not in ("splice", "token_ids"):
            raise ValueError(f"prefix must be 'splice' or 'token_ids', got {prefix!r}")
        if tools and endpoint != "chat":
            raise ValueError("tools need endpoint='chat': the frontend's tool-call parser reads the answer there")
        if (endpoint == "completions" or prefix == "token_ids") and tokenizer is None:
            raise ValueError(f"Conversation(endpoint={endpoint!r}, prefix={prefix!r}) needs the served model's "
                             "tokenizer to render new messages; pass tokenizer=load_tokenizer(model_dir)")
        self.generation = generation
        self.endpoint = endpoint
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        if endpoint == "completions" and self.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; pass eos_token_id (the id ending each chat message)")
        self.template_kwargs = dict(template_kwargs or {})
        self.tools = [dict(t) for t in tools] if tools else None
        self.prefix = prefix
        self.messages: list[dict] = []
        self.token_ids = torch.empty(0, dtype=torch.int64)
        self.samples: list[Sample] = []

    def next_prompt_ids(self, new_messages: list[dict]) -> list[int]:
        """The next prompt = history ids + tokens of only ``new_messages`` (completion route,
        and the chat route with ``prefix="token_ids"``).

        The cut is checked: the history messages alone must render to as many message ends
        (EOS) as the verbatim history holds, else the new messages would start elsewhere
        (a message whose text holds ``<|im_end|>``, tools that appear or vanish between turns
        and so change the system preamble).
        Raises:
            PrefixSpliceError: the rendered history does not match the verbatim one in message
                ends (the message says which counts differ and why that happens).
        """
        kwargs = dict(self.template_kwargs, **({"tools": self.tools} if self.tools else {}))
        rendered = render_ids(self.tokenizer, self.messages + list(new_messages), **kwargs)
        if not self.samples:
            return rendered
        history = self.token_ids.tolist()
        eos = self.eos_token_id
        out = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=False, tokenize=True, **kwargs)
        past = [int(t) for t in (out["input_ids"] if isinstance(out, Mapping) else out)]
        held = history.count(eos) + (1 if history and history[-1] != eos else 0)
        if past.count(eos) != held:
            raise PrefixSpliceError(
                f"the conversation's {len(self.messages)} earlier messages render to {past.count(eos)} message ends "
                f"(<|im_end|>, id {eos}) but the verbatim history holds {held}: the new messages cannot be told "
                "apart. Keep the tools of a conversation the same on every turn, and no message text may contain "
                "the end-of-message token")
        return splice_required_prefix(rendered, history, eos)

    async def step(self, new_messages: list[dict], *, sampling: SamplingConfig | None = None,
                   seed: int | None = None) -> Sample:
        """Add ``new_messages`` (e.g. one user message), generate the assistant turn, return it.

        Raises:
            ContiguityError: the engine's prompt does not start with the history ids.
            GenerationError: see :meth:`DynamoGeneration.generate`.
        """
        new_messages = text_messages([dict(m) for m in new_messages])
        history = self.token_ids.tolist()
        if self.endpoint == "completions":
            prompt: Any = self.next_prompt_ids(new_messages)
            check_contiguity(history, prompt, what="next prompt")
        elif self.prefix == "token_ids" and self.samples:
            ids = self.next_prompt_ids(new_messages)
            check_contiguity(history, ids, what="next prompt")
            prompt = ChatPrompt(self.messages + new_messages, tools=self.tools, token_ids=ids)
        else:
            prompt = ChatPrompt(self.messages + new_messages, history if self.samples else None, tools=self.tools)
        sample = (await self.generation.generate([prompt], n=1, sampling=sampling, seed=seed))[0][0]
        check_contiguity(history, sample.prompt_token_ids.tolist(), what="engine's prompt")
        self.messages += new_messages + [assistant_message(sample)]
        self.token_ids = torch.cat([sample.prompt_token_ids, sample.generation_token_ids])
        self.samples.append(sample)
        return sample
