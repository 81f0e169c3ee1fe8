"""What goes into the engine and what comes out: sampling parameters, generated tokens,
the prompt check and the engine's errors. No torch here: the worker process (which talks to
an engine in another process, :mod:`dynamo_rl.serving.engine_process`) uses them too.

:mod:`dynamo_rl.serving.engine` re-exports every name, the usual place to import them from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["EngineStoppedError", "PartialWeightsError", "SamplingParams", "TokenOutput", "WeightsError",
           "check_stream_interval", "validate_prompt"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stop settings.

    ``temperature`` 0 → greedy; ``top_k`` 0 (or -1, vLLM's spelling) → off; ``top_p`` 1 →
    off; ``seed`` None → a random seed; ``stop_token_ids`` end the stream with
    ``finish_reason="stop"`` (the stop token is returned), as do the engine's EOS ids
    unless ``ignore_eos``; ``max_tokens`` generated tokens end it with ``"length"``.

    Raises:
        ValueError: naming the field, for values out of range.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 0 (0 or -1 is off), got {self.top_k}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass(frozen=True)
class TokenOutput:
    """One generated token, in order.

    ``logprob``: ``log_softmax`` of the raw logits (temperature 1, before top-k/top-p), fp32.
    ``finish_reason``: ``"stop" | "length" | "abort"`` on the last token, else ``None``.
    ``weights_version``: the version of the weights that produced the token.
    """

    token_id: int
    logprob: float
    finish_reason: str | None
    weights_version: int


class WeightsError(ValueError):
    """A weight set was refused; nothing was changed.

    Attributes ``missing``, ``unexpected``, ``mismatched`` (lists of names) say which
    tensors are wrong; the message lists every one of them with the expected value.
    """

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class EngineStoppedError(RuntimeError):
    """The engine was stopped (or its forward failed) before the request finished."""


class PartialWeightsError(EngineStoppedError):
    """The parameters hold a partial weight set: an in-place load
    (:meth:`~dynamo_rl.serving.engine.Engine.load_weights_in_place`) failed part-way. Requests are refused until a
    later load (in place or not) completes."""


def validate_prompt(prompt_ids: Sequence[int], *, max_seq_len: int, vocab_size: int) -> list[int]:
    """``prompt_ids`` as a list of ints, checked as :meth:`~dynamo_rl.serving.engine.Engine.generate` checks them.

    Raises:
        ValueError: the prompt is empty, holds ``max_seq_len`` or more ids, or an id is
            outside ``[0, vocab_size)``.
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("prompt_ids is empty; give at least one token id")
    if len(prompt) >= max_seq_len:
        raise ValueError(f"prompt has {len(prompt)} tokens; this engine holds at most "
                         f"max_seq_len={max_seq_len} per sequence (prompt + generation)")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt ids {bad[:8]} are outside the vocabulary [0, {vocab_size})")
    return prompt


def check_stream_interval(stream_interval) -> int:
    """``stream_interval`` as an int (tokens per streamed message after the first).

    Raises:
        ValueError: it is below 1.
    """
    n = int(stream_interval)
    if n < 1:
        raise ValueError(f"stream_interval={stream_interval}: give a number of tokens >= 1")
    return n
