"""Process plumbing shared by the stack and its entry points (no torch import here).

- :func:`die_with_parent`: the ``preexec_fn`` of every child the stack or a worker starts;
  :func:`child_setup` adds a CPU affinity to it (:func:`parse_cpus`, :func:`format_cpus`;
  :func:`check_engine_cpus` checks the ``engine_cpus`` a user gave, before anything starts).
- :class:`ChildProcess` and :func:`terminate`: a started child, and how it is stopped
  (SIGTERM, SIGKILL after a grace period, then the processes it started itself).
- :func:`tail`: the end of a child's log.
- :func:`entry_point`: the logging and event loop set-up of ``python -m`` entry points.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("dynamo_rl.serving.stack")


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


_CPU_RANGE = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", re.ASCII)


def parse_cpus(text: str, what: str = "cpus", allowed=None) -> frozenset[int]:
    """A Linux CPU list as a set of CPU ids: ``"1"``, ``"0,2-3"`` (the format of ``taskset -c``
    and of cgroup ``cpuset.cpus``; ASCII digits, spaces only around items and dashes).

    Raises:
        ValueError: ``text`` is not such a list, or names a CPU outside ``allowed`` (default:
            those this process may run on, ``os.sched_getaffinity(0)``); the message names
            ``what`` and the allowed CPUs. Ranges are checked before they are expanded, so a
            huge one fails at once.
    """
    allowed = frozenset(os.sched_getaffinity(0) if allowed is None else allowed)
    ranges = []
    for part in str(text).split(","):
        m = _CPU_RANGE.fullmatch(part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"{what} {text!r} is not a CPU list; write CPU ids and ranges as taskset -c does, "
                             f"e.g. '1' or '0,2-3' (allowed here: {format_cpus(allowed)})")
        first = int(m.group(1))
        ranges.append((first, int(m.group(2) or first)))
    top = max(allowed, default=-1)
    outside = [(a, b) for a, b in ranges if b > top or not set(range(a, b + 1)) <= allowed]
    if outside:
        named = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in outside)
        raise ValueError(f"{what} {text!r} names CPU(s) outside the allowed ones ({named}); choose among "
                         f"{format_cpus(allowed)}")
    return frozenset(c for a, b in ranges for c in range(a, b + 1))


def format_cpus(cpus) -> str:
    """The CPU list of a set of CPU ids, with ranges: ``{0, 2, 3}`` → ``"0,2-3"``."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def check_engine_cpus(text: str | int | None, kinds: list[str], worker_args: list[str] = (),
                      what: str = "engine_cpus") -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """``(engine CPUs, the CPUs of the stack's other children)`` for ``engine_cpus`` = ``text``
    (a CPU list, as ``taskset -c``; an int is one CPU), or ``(None, None)`` for None.

    Raises:
        ValueError: naming ``what`` (the option or key the user wrote): not a CPU list, CPUs
            this process may not use, every one of them (none left for the frontend), this
            process may use one CPU only, ``vllm`` among ``kinds``, or ``--no-engine-process``
            among ``worker_args`` (no engine process to pin).
    """
    if text is None:
        return None, None
    allowed = frozenset(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise ValueError(f"{what} {str(text)!r}: this process may use one CPU only ({format_cpus(allowed)}); "
                         "pinning the engine apart needs two")
    cpus = parse_cpus(str(text), what)
    if "vllm" in kinds:
        raise ValueError(f"{what} pins the engine processes of dynamo-rl workers; vllm workers bind their own "
                         "threads (set VLLM_CPU_OMP_THREADS_BIND in the environment instead)")
    if "--no-engine-process" in worker_args:
        raise ValueError(f"{what} pins the workers' engine processes, but the worker arguments hold "
                         "--no-engine-process; drop one of the two")
    if not allowed - cpus:
        raise ValueError(f"{what} {str(text)!r} takes every CPU this process may use ({format_cpus(allowed)}); "
                         f"leave at least one for the frontend and the workers, e.g. {format_cpus(sorted(allowed)[1:])!r}")
    return cpus, allowed - cpus


def child_setup(cpus: frozenset[int] | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: :func:`die_with_parent`, then, with ``cpus``, this CPU affinity
    (``sched_setaffinity``: every thread the child starts inherits it)."""
    def setup() -> None:
        die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


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


@dataclass
class ChildProcess:
    """One process of the stack."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    expected_exit: bool = False
    descendants: dict = field(default_factory=dict)   # pid -> psutil.Process (children of the child)

    @property
    def pid(self) -> int:
        return self.popen.pid


def record_descendants(c: ChildProcess) -> None:
    """Remember the processes ``c`` started (an engine process, vLLM's engine core), so that
    they can be ended after ``c`` even once it is gone."""
    try:
        import psutil

        for p in psutil.Process(c.pid).children(recursive=True):
            c.descendants.setdefault(p.pid, p)
    except Exception:  # noqa: BLE001 - gone already, or psutil missing
        pass


def kill_descendants(c: ChildProcess) -> None:
    """SIGKILL the remembered descendants of ``c`` that still run."""
    for p in c.descendants.values():
        try:
            if p.is_running():  # same process (psutil compares the start time): no PID reuse
                p.kill()
        except Exception:  # noqa: BLE001 - gone meanwhile
            pass


def send_signal(pid: int, sig: int) -> None:
    """``os.kill`` that ignores a process already gone."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(children: list[ChildProcess], grace_s: float) -> None:
    """SIGTERM every child in order, SIGKILL those still running ``grace_s`` seconds later,
    then SIGKILL their remembered descendants. Marks each exit as expected."""
    for c in children:
        record_descendants(c)
        c.expected_exit = True
    for c in children:
        if c.popen.poll() is None:
            send_signal(c.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for c in children:
        try:
            c.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %s) ignored SIGTERM for %.0f s; SIGKILL", c.name, c.pid, grace_s)
            send_signal(c.pid, signal.SIGKILL)
            try:
                c.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                log.error("%s (pid %s) survived SIGKILL", c.name, c.pid)
    for c in children:
        kill_descendants(c)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def tail(path: str | os.PathLike, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file, terminal colour codes removed ('' if absent)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = _ANSI.sub("", f.read().decode("utf-8", "replace"))
            return "\n".join(text.splitlines()[-lines:])
    except OSError:
        return ""
