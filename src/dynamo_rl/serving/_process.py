"""Process plumbing shared by the stack and its entry points (no torch import here).

- :func:`die_with_parent`: the ``preexec_fn`` of every child the stack or a worker starts.
- :func:`entry_point`: the logging and event loop set-up of ``python -m`` entry points.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent exits (``PR_SET_PDEATHSIG``).

    Runs in the child between fork and exec (``subprocess.Popen(preexec_fn=...)``). Not on
    Linux it does nothing: callers rely on explicit teardown (and the engine process also
    checks its parent's pid)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux
        pass


def entry_point(log_format: str) -> Callable:
    """Log to stderr at ``$DYNAMO_RL_LOG`` (default ``INFO``) with ``log_format``; return the
    function that runs the entry point's coroutine: ``uvloop.run`` (``asyncio.run`` where
    uvloop is missing)."""
    logging.basicConfig(level=os.environ.get("DYNAMO_RL_LOG", "INFO"), stream=sys.stderr, format=log_format)
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover
        return asyncio.run
