"""Token-exact multi-turn histories on the chat endpoint.

An OpenAI-style chat request carries messages, which the Dynamo frontend renders with
the chat template and tokenizes. Re-rendering a past assistant turn can change its ids
(a template that drops ``<think>`` blocks, a BPE merge across a boundary), so the next
turn's prompt would no longer extend what the engine actually produced. The client sends
``required_prefix_token_ids`` (the previous turn's prompt + generation ids, verbatim); the
worker calls :func:`splice_required_prefix` to put those ids in place of the rendered
history. The same function gives the completion path its new-message tokens, so both
endpoints produce identical ids.

Rule (in the spirit of NeMo-RL's ``_replace_prefix_tokens``): every chat message of a
ChatML-style template ends with the EOS token (``<|im_end|>``). Let ``k`` be the number of
EOS tokens in the required prefix, plus one if the prefix does not end with EOS (a
generation cut by ``max_tokens`` still gets its message closed by the template). The
rendered ids after the ``k``-th EOS are the tokens of the new messages; the result is the
required prefix followed by them.

A turn cut by ``max_tokens`` (or a stop string): its ids stay verbatim and the message is
closed with the EOS the template writes there, so the next prompt is
``prefix + [eos] + new messages``. That EOS is a prompt token (never trained on as a
generation), and no assistant message in a prompt is left without its end.
"""

from __future__ import annotations

from collections.abc import Sequence


class PrefixSpliceError(ValueError):
    """The rendered prompt does not contain the history that the required prefix claims."""


def new_message_start(rendered_ids: Sequence[int], prefix_ids: Sequence[int], eos_token_id: int) -> int:
    """Index into ``rendered_ids`` where the messages after the required prefix begin.

    Raises:
        PrefixSpliceError: when ``rendered_ids`` holds fewer EOS tokens than the history needs.
    """
    k = sum(1 for t in prefix_ids if t == eos_token_id)
    if not prefix_ids or prefix_ids[-1] != eos_token_id:
        k += 1
    seen = 0
    for i, t in enumerate(rendered_ids):
        if t == eos_token_id:
            seen += 1
            if seen == k:
                return i + 1
    raise PrefixSpliceError(
        f"rendered prompt has {seen} end-of-message tokens (id {eos_token_id}) but the required "
        f"prefix covers {k} messages; send the full message history that produced the prefix"
    )


def splice_required_prefix(
    rendered_ids: Sequence[int], prefix_ids: Sequence[int], eos_token_id: int
) -> list[int]:
    """Return ``prefix_ids + rendered_ids[new_message_start(...):]`` as a list of ints.

    The EOS that closes a cut turn is added after ``prefix_ids`` (module docstring).

    Args:
        rendered_ids: the template-rendered, tokenized prompt of the whole conversation.
        prefix_ids: the previous turn's prompt ids followed by its generation ids, verbatim.
        eos_token_id: the id that ends a chat message (``<|im_end|>`` for ChatML).
    Raises:
        PrefixSpliceError: see :func:`new_message_start`.
    """
    start = new_message_start(rendered_ids, prefix_ids, eos_token_id)
    close = [int(eos_token_id)] if prefix_ids and prefix_ids[-1] != eos_token_id else []
    return [int(t) for t in prefix_ids] + close + [int(t) for t in rendered_ids[start:]]
