"""JSON ↔ tensors for the frontend's OpenAI routes: exact ids, no detokenize/re-encode.

Token ids come from ``nvext.completion_token_ids`` (requested with
``nvext.extra_fields``); JSON has one number type, so an id may arrive as ``17`` or
``17.0``: both become int64 17; ``17.5``, ``-1``, ``true`` or ``"17"`` are rejected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from dynamo_rl.generation.errors import ResponseFormatError

_INT64_MAX = 2**63 - 1


def as_token_ids(values: Any, what: str) -> torch.Tensor:
    """``[17, 18.0, ...]`` → int64 tensor ``[G]`` (``[0]`` for an empty list).

    Raises:
        ResponseFormatError: not a list, or an element that is not a non-negative
            integral number (the message names ``what``, the position and the value).
    """
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.dtype.is_floating_point or values.dtype == torch.bool:
            raise ResponseFormatError(f"{what}: expected a 1-D integer tensor, got {values.dtype} {tuple(values.shape)}")
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ResponseFormatError(f"{what}: expected a list of token ids, got {type(values).__name__}: {values!r:.80}")
    if not values:
        return torch.empty(0, dtype=torch.int64)
    if all(type(v) is int for v in values) and min(values) >= 0 and max(values) <= _INT64_MAX:  # noqa: E721
        return torch.tensor(values, dtype=torch.int64)  # fast path: plain JSON integers
    out: list[int] = []
    for i, v in enumerate(values):
        if type(v) is int:  # noqa: E721  (bool is an int subclass and is rejected below)
            t = v
        elif isinstance(v, float) and math.isfinite(v) and v.is_integer():
            t = int(v)
        else:
            raise ResponseFormatError(
                f"{what}[{i}] = {v!r} is not an integral token id (ids may arrive as JSON numbers like "
                "17 or 17.0, nothing else)")
        if not 0 <= t <= _INT64_MAX:
            raise ResponseFormatError(f"{what}[{i}] = {v!r} is not a valid token id (must be 0 ≤ id < 2**63)")
        out.append(t)
    return torch.tensor(out, dtype=torch.int64) if out else torch.empty(0, dtype=torch.int64)


def as_logprobs(values: Any, n: int, what: str) -> torch.Tensor:
    """Per-token logprobs → float32 tensor ``[n]``.

    Raises:
        ResponseFormatError: not ``n`` finite-or--inf numbers.
    """
    if not isinstance(values, (list, tuple)):
        raise ResponseFormatError(f"{what}: expected a list of {n} logprobs, got {type(values).__name__}")
    if len(values) != n:
        raise ResponseFormatError(
            f"{what}: {len(values)} logprobs for {n} token ids; they must align one to one")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v > 1e-3:
            raise ResponseFormatError(f"{what}[{i}] = {v!r} is not a logprob (a number ≤ 0)")
    return torch.tensor(values, dtype=torch.float32) if n else torch.empty(0, dtype=torch.float32)


def ids_to_list(ids: Any, what: str) -> list[int]:
    """A prompt given as ids (list/tuple of ints or a 1-D integer tensor) → ``list[int]``.

    Raises:
        ValueError: non-integral or negative ids (named by position).
    """
    try:
        return as_token_ids(ids, what).tolist()
    except ResponseFormatError as e:
        raise ValueError(str(e)) from None


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def choice_of(body: Any, what: str) -> dict:
    """The single choice of a non-streamed response.

    Raises:
        ResponseFormatError: no ``choices[0]``.
    """
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise ResponseFormatError(f"{what}: expected exactly one choice, got {body!r:.300}")
    return choices[0]


def completion_logprobs(choice: dict, chat: bool) -> Any:
    """The sampled tokens' logprobs list of a choice (``None`` when absent).

    ``/v1/completions``: ``logprobs.token_logprobs``; ``/v1/chat/completions``:
    ``logprobs.content[i].logprob`` (OpenAI shapes).
    """
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    if chat:
        content = lp.get("content")
        if not isinstance(content, list):
            return None
        return [c.get("logprob") if isinstance(c, dict) else c for c in content]
    return lp.get("token_logprobs")


def worker_id_of(nvext: Any) -> str | None:
    """``nvext.worker_id`` as a string: an int, a string, or Dynamo's
    ``{"decode_worker_id", "prefill_worker_id", ...}`` object (decode wins)."""
    w = _get(nvext, "worker_id")
    if isinstance(w, dict):
        for key in ("decode_worker_id", "worker_id", "prefill_worker_id", "instance_id"):
            if w.get(key) is not None:
                return str(w[key])
        return None
    if w is None or isinstance(w, bool):
        return None
    return str(int(w)) if isinstance(w, float) and w.is_integer() else str(w)


def optional_int(v: Any, what: str) -> int | None:
    """``None`` / ``3`` / ``3.0`` / ``"3"`` → ``int | None``.

    Raises:
        ResponseFormatError: anything else.
    """
    if v is None:
        return None
    if type(v) is int:  # noqa: E721
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    raise ResponseFormatError(f"{what} = {v!r} is not an integer")


def first_difference(expected: Sequence[int], actual: Sequence[int]) -> int | None:
    """Index of the first position where ``actual`` does not extend ``expected``, or None."""
    for i, e in enumerate(expected):
        if i >= len(actual) or actual[i] != e:
            return i
    return None
