"""Training on an external agent: ``task.name: agent``.

The trainer serves the rollout endpoint (:mod:`dynamo_rl.rl.rollout_server`) on 127.0.0.1,
starts ``task.agent_command`` once the policy is served (weights version 1), and every GRPO
step takes ``grpo.prompts_per_step`` groups of ``grpo.samples_per_prompt`` ended sessions.
``{python}`` in the command is the trainer's own interpreter (:func:`agent_argv`). The
command gets, in its environment:

- ``DYNAMO_RL_ROLLOUT_URL``: the endpoint (``POST $DYNAMO_RL_ROLLOUT_URL/v1/sessions``);
- ``DYNAMO_RL_GROUP_SIZE``: how many sessions to play per task (one GRPO group), each
  created with the same ``group``;
- ``DYNAMO_RL_MODEL``: the served model name.

It plays until it is stopped (SIGTERM, then SIGKILL after 5 s, by its PID only) when the run
ends. Its output goes to ``<run_dir>/agent.log``. An agent that exits while the trainer waits
is a failure that names its exit status and shows its log's tail; a step that gets too few
sessions within ``task.agent_timeout_s`` fails the same way.

The agent plays while the trainer trains and refits, so an episode's turns may come from
two weights versions (a refit pauses, swaps and resumes the workers between two turns):
such samples count as stale (``stale_samples``; older than ``grpo.max_staleness`` versions:
dropped, ``dropped_samples``), as in the async loop.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from dynamo_rl.rl.rollout_server import RolloutServer


class AgentError(RuntimeError):
    """The external agent exited, or sent too few episodes in time (a runtime failure: exit 1)."""


def agent_argv(command: str) -> list[str]:
    """``task.agent_command`` as an argv; ``{python}`` is replaced by the trainer's interpreter.
    Raises ValueError when it does not parse (unbalanced quotes)."""
    return [sys.executable if a == "{python}" else a for a in shlex.split(command)]


class ExternalAgent:
    """The agent command as a child process of the trainer."""

    def __init__(self, command: str, *, url: str, group_size: int, model: str, log_path: Path):
        self.argv = agent_argv(command)
        self.env = dict(os.environ, DYNAMO_RL_ROLLOUT_URL=url, DYNAMO_RL_GROUP_SIZE=str(group_size),
                        DYNAMO_RL_MODEL=model, PYTHONUNBUFFERED="1")
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the command. Raises :class:`FileNotFoundError` when its program is missing."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        with open(self.log_path, "a") as f:
            f.write(f"# dynamo-rl: agent pid {self.proc.pid}: {shlex.join(self.argv)}\n")

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; only this PID (idempotent)."""
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p is not None:
            with open(self.log_path, "a") as f:
                f.write(f"# dynamo-rl: agent pid {p.pid} stopped (status {p.returncode})\n")
            self._log.close()
        self.proc = None


async def agent_rollouts(server: RolloutServer, agent: ExternalAgent, num_groups: int, group_size: int,
                         timeout_s: float):
    """The next ``num_groups`` groups of ``group_size`` episodes the agent ended.

    Raises:
        AgentError: the agent exited first, or too few episodes came within ``timeout_s``.
    """
    collect = asyncio.ensure_future(server.collect_groups(num_groups, group_size, timeout_s=timeout_s))
    try:
        while not collect.done():
            code = agent.exited()
            if code is not None:
                raise AgentError(f"the agent ({shlex.join(agent.argv)}) exited with status {code} while the trainer "
                                 f"waited for its episodes; the end of {agent.log_path}:\n{agent.tail()}")
            await asyncio.wait({collect}, timeout=0.5)
        return collect.result()
    except TimeoutError as e:
        raise AgentError(f"{e}\nthe end of {agent.log_path}:\n{agent.tail()}") from None
    finally:
        if not collect.done():
            collect.cancel()
