"""Errors of the weight plane. Every error names the tensors / versions / addresses involved
and what to do about it. Nothing is half-applied: a receiver raises BEFORE it returns tensors.

Hierarchy::

    RefitError (ValueError)
    ├── MismatchError        missing / unexpected tensors, shape or dtype mismatch, bad layout
    ├── StaleVersionError    the version asked for is older than the publisher's (or the receiver's)
    ├── VersionNotFoundError the publisher never reached the version within the timeout
    ├── PublisherGoneError   the publisher (or one source rank) vanished / stopped answering mid-pull
    └── TransportError       a transport failed or is unavailable (e.g. NIXL not installed)
"""

from __future__ import annotations

from collections.abc import Iterable


def _names(names: Iterable[str], limit: int = 20) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", … ({len(names) - limit} more)"
    return shown


class RefitError(ValueError):
    """Base class of every weight-plane error.

    Attribute ``untouched``: True when the error was raised before any destination byte was
    written (matters for ``Receiver.pull(into=...)``, which writes into caller-owned tensors:
    they still hold what they held before). False when it is not known.
    """

    untouched: bool = False


class MismatchError(RefitError):
    """Tensors do not match what the receiver's engine expects.

    Attributes:
        missing: names the engine expects but the publisher does not provide.
        unexpected: names published that the engine does not know.
        mismatched: ``{name: "why"}`` for shape / dtype / layout mismatches.
    """

    def __init__(self, message: str = "", *, missing=(), unexpected=(), mismatched=None, fix: str | None = None):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = dict(mismatched or {})
        parts = [message] if message else []
        if self.missing:
            parts.append(f"missing {len(self.missing)} tensor(s): {_names(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} tensor(s): {_names(self.unexpected)}")
        if self.mismatched:
            items = [f"{k} ({v})" for k, v in sorted(self.mismatched.items())]
            parts.append(f"mismatched {len(items)} tensor(s): {_names(items)}")
        parts.append("fix: " + (fix or "publish the same model architecture/dtype the engine serves, or pass "
                                       "the engine's exact param_specs() to the Receiver"))
        super().__init__("; ".join(parts))


class StaleVersionError(RefitError):
    """The version asked for is older than one already seen (publisher or receiver)."""


class VersionNotFoundError(RefitError):
    """The publisher did not hold the requested version before the timeout."""


class PublisherGoneError(RefitError):
    """A publisher rank stopped answering (killed, closed, network) before the pull finished."""


class TransportError(RefitError):
    """A transport failed or is unavailable."""
