"""The one error family of :mod:`dynamo_rl.generation`.

Every error raised by the data plane is a :class:`GenerationError`. Errors that end a
batch carry ``missing`` (the ``(prompt_index, sample_index)`` pairs that did not come
back) and ``completed`` (the :class:`~dynamo_rl.generation.Sample` objects that did; filled
by ``generate``, empty from ``stream``, whose caller already received them), so a sample
is never silently dropped: it is either returned or named in the error.
"""

from __future__ import annotations

from typing import Any


class GenerationError(Exception):
    """Base class. ``missing``: ``list[(prompt_index, sample_index)]`` not returned;
    ``completed``: samples that were returned before the failure (``generate`` only)."""

    def __init__(self, message: str, *, missing: list[tuple[int, int]] | None = None,
                 completed: list[Any] | None = None):
        super().__init__(message)
        self.message = message
        self.missing: list[tuple[int, int]] = list(missing or [])
        self.completed: list[Any] = list(completed or [])

    def __str__(self) -> str:
        if not self.missing:
            return self.message
        shown = ", ".join(f"({p},{s})" for p, s in self.missing[:16])
        more = f", ... ({len(self.missing) - 16} more)" if len(self.missing) > 16 else ""
        return (f"{self.message}\n{len(self.missing)} sample(s) not returned "
                f"(prompt_index, sample_index): {shown}{more}")


class EndpointConfigError(GenerationError, ValueError):
    """The frontend URL cannot be derived from ``generation.dynamo`` (both/neither set,
    ``dgd_name`` used outside a Kubernetes pod, malformed URL or name)."""


class ModelNotServedError(GenerationError):
    """The requested model is not in the frontend's ``/v1/models`` (the message lists the
    served ones), or several are served and none was chosen."""

    def __init__(self, message: str, *, served: list[str]):
        super().__init__(message)
        self.served = served


class FrontendUnavailableError(GenerationError):
    """Connection refused / reset, timeouts, or HTTP 502/503/504 lasted past
    ``generation.retry_deadline_s``. ``url``, ``last_status`` (HTTP status or None for a
    transport error), ``last_error`` (text) and ``waited_s`` describe the last attempt."""

    def __init__(self, message: str, *, url: str, last_status: int | None, last_error: str,
                 waited_s: float, missing=None, completed=None):
        super().__init__(message, missing=missing, completed=completed)
        self.url = url
        self.last_status = last_status
        self.last_error = last_error
        self.waited_s = waited_s


class RequestRejectedError(GenerationError):
    """The frontend answered with a non-retryable status (4xx, or 500): not retried.
    ``status`` and ``server_message`` are the frontend's."""

    def __init__(self, message: str, *, url: str, status: int, server_message: str,
                 missing=None, completed=None):
        super().__init__(message, missing=missing, completed=completed)
        self.url = url
        self.status = status
        self.server_message = server_message


class ResponseFormatError(GenerationError, ValueError):
    """A response cannot be turned into exact tensors: non-integral or negative token
    ids, logprobs that do not align with the ids, a missing ``nvext`` field."""


class ContiguityError(GenerationError, ValueError):
    """Turn N+1's prompt ids do not extend turn N's prompt + generation ids.

    ``position`` is the first differing index; ``expected`` / ``actual`` are the token
    windows around it (lists of ints)."""

    def __init__(self, message: str, *, position: int, expected: list[int], actual: list[int]):
        super().__init__(message)
        self.position = position
        self.expected = expected
        self.actual = actual


def _with_batch_context(err: GenerationError, *, missing, completed=None) -> GenerationError:
    """Attach batch bookkeeping to ``err`` (in place) and return it."""
    err.missing = list(missing)
    if completed is not None:
        err.completed = list(completed)
    return err
