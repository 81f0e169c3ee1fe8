"""The engine in a process of its own, beside the Dynamo worker (vLLM's engine-core split).

Why
    In one process, the engine's forwards share the GIL with Dynamo's request handling (the
    pyo3 bridge, our handler, the messages of every stream). Measured on 2 CPU cores
    (tiny model, 32 requests in flight): a Python thread holding the GIL 30% of the time
    makes a decode step 70% slower (2.29 → 3.91 ms), and through the frontend the
    worker's decode steps took 3.07 ms against 2.36 ms in-process. So the engine, its
    scheduling loop, the control routes (:class:`~dynamo_rl.serving.admin.AdminRoutes`) and
    the refit receiver run in an *engine process*; the worker process keeps Dynamo and the
    data-plane handler (:meth:`Worker.generate <dynamo_rl.serving.worker.Worker.generate>`),
    and :class:`EngineProcess` stands in for the engine there.

Protocol
    Two ZMQ PUSH/PULL sockets on ``ipc://`` paths in a private temporary directory (nothing
    listens on the network); each message is a pickled tuple (both ends are this module).

    - worker → engine: ``("generate", request_id, prompt_ids, SamplingParams)``,
      ``("abort", request_id)``, ``("route", call_id, name, body)``, ``("stop",)``.
    - engine → worker: ``("ready", facts)``; ``("tokens", [(request_id, item), ...])`` where
      ``item`` is a list of ``(token_id, logprob, finish_reason, weights_version)``, ``None``
      (the request ended before its first token: aborted while it waited) or
      ``(error_type, message)``; ``("answer", call_id, dict)``; ``("health", snapshot)``
      every :data:`HEALTH_INTERVAL_S`.

    The tokens that one engine step delivers to all its requests travel in one message.

Lifetime
    :meth:`EngineProcess.launch` starts ``python -m dynamo_rl.serving.engine_process`` (with
    ``PR_SET_PDEATHSIG`` = SIGTERM: it goes when the worker dies) and waits for ``ready``;
    if the process exits first, the error names its exit code. :meth:`EngineProcess.stop`
    sends ``stop`` (the engine stops; unfinished requests end with
    :class:`~dynamo_rl.serving.engine.EngineStoppedError`) and SIGKILLs the process if it has
    not exited after ``grace_s``. The engine process ignores SIGINT (a Ctrl-C reaches the
    whole process group; the worker decides when the engine stops) and stops on SIGTERM.
    If it dies, every open stream ends with ``EngineStoppedError``, every route answers
    503, and :attr:`EngineProcess.loop_died` says why, so the worker's health watch exits
    with status 1 (:meth:`AdminRoutes.watch_health <dynamo_rl.serving.admin.AdminRoutes.watch_health>`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from dynamo_rl.serving._process import child_setup, entry_point
from dynamo_rl.serving.engine_types import (
    EngineStoppedError,
    PartialWeightsError,
    SamplingParams,
    TokenOutput,
    check_stream_interval,
    validate_prompt,
)

log = logging.getLogger("dynamo_rl.serving.engine_process")

HEALTH_INTERVAL_S = 0.25
_ERRORS = {"ValueError": ValueError, "PartialWeightsError": PartialWeightsError}
_ENGINE_KEYS = ("model_path", "served_model_name", "device", "dtype", "max_batch_size", "weights_version",
                "mix_prefill_decode", "threads", "cpus")


def _sockets(push_address: str, pull_address: str, *, bind: bool):
    """A blocking ZMQ PUSH socket (no high-water mark: a send never blocks) to
    ``push_address`` and a ``zmq.asyncio`` PULL socket from ``pull_address``; the worker binds
    (and drops unsent messages at close), the engine process connects (and flushes for up
    to 1 s at close, so that its last tokens and answers leave)."""
    import zmq
    import zmq.asyncio

    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.setsockopt(zmq.LINGER, 0 if bind else 1000)
    pull = zmq.asyncio.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.setsockopt(zmq.LINGER, 0)
    for sock, address in ((push, push_address), (pull, pull_address)):
        (sock.bind if bind else sock.connect)(address)
    return push, pull


class EngineProcess:
    """The worker's handle on an engine running in a process of its own.

    It offers what :class:`~dynamo_rl.serving.worker.Worker` uses of an
    :class:`~dynamo_rl.serving.engine.Engine`: :meth:`generate_chunks`, :meth:`abort`,
    ``max_seq_len``, ``model_config``; the control routes through :meth:`call_route`; and
    what the health watch reads (:attr:`unhealthy`, :attr:`loop_died`, ``stats["loop_deaths"]``),
    as of the engine process's last health message (at most :data:`HEALTH_INTERVAL_S` old).
    Make one with :meth:`launch`.

    Attributes:
        pid: the engine process's PID.
        max_seq_len, vocab_size: the engine's limits (ints), for checking prompts here.
        model_config: the model's ``config.json`` as a dict.
    """

    def __init__(self, popen: subprocess.Popen, ipc_dir: str, facts: dict, push, pull):
        self._popen = popen
        self._ipc_dir = ipc_dir
        self._push = push   # zmq PUSH (blocking sends never block: no high-water mark)
        self._pull = pull   # zmq.asyncio PULL
        self.pid = popen.pid
        self.max_seq_len = int(facts["max_seq_len"])
        self.vocab_size = int(facts["vocab_size"])
        self.model_config = facts["model_config"]
        self._health: dict = facts["health"]
        self._streams: dict[str, asyncio.Queue] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._died: str | None = None
        self._stopping = False
        self._tasks = [asyncio.get_running_loop().create_task(self._read(), name="engine-process-reader"),
                       asyncio.get_running_loop().create_task(self._monitor(), name="engine-process-monitor")]

    # ------------------------------------------------------------------ start / stop

    @classmethod
    async def launch(cls, config: dict[str, Any]) -> EngineProcess:
        """Start the engine process and wait until its engine runs.

        Args:
            config: ``model_path`` (str), ``served_model_name`` (str), ``device`` (str),
                ``dtype`` (str), ``max_batch_size`` (int), ``weights_version`` (int),
                ``mix_prefill_decode`` (bool), ``threads`` (torch
                intra-op threads): see :class:`~dynamo_rl.serving.engine.Engine`; ``cpus``
                (list of CPU ids, or None): the engine process's CPU affinity, set before
                it starts, so its forwards do not share these cores with the worker.
        Raises:
            ValueError: ``config`` misses a key or has one it does not know.
            RuntimeError: the engine process exited before it was ready (its exit code;
                its own error is in the worker's log, which it shares).
        """
        missing, unknown = set(_ENGINE_KEYS) - set(config), set(config) - set(_ENGINE_KEYS)
        if missing or unknown:
            raise ValueError(f"engine process config: missing {sorted(missing)}, unknown {sorted(unknown)}")
        ipc_dir = tempfile.mkdtemp(prefix="dynamo-rl-engine-")
        to_engine, from_engine = f"ipc://{ipc_dir}/in", f"ipc://{ipc_dir}/out"
        push, pull = _sockets(to_engine, from_engine, bind=True)
        argv = [sys.executable, "-m", "dynamo_rl.serving.engine_process", "--to-engine", to_engine,
                "--from-engine", from_engine, "--parent-pid", str(os.getpid()), "--config", json.dumps(config)]
        cpus = frozenset(config["cpus"]) if config["cpus"] else None
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=child_setup(cpus))  # noqa: PLW1509
        log.info("engine process pid=%s starting (%s on %s)", popen.pid, config["model_path"], config["device"])
        try:
            recv = asyncio.ensure_future(pull.recv())
            while True:
                done, _ = await asyncio.wait({recv}, timeout=0.2)
                if done:
                    msg = pickle.loads(recv.result())
                    if msg[0] == "ready":
                        break
                    recv = asyncio.ensure_future(pull.recv())
                    continue
                if popen.poll() is not None:
                    recv.cancel()
                    raise RuntimeError(f"the engine process (pid {popen.pid}) exited with code {popen.returncode} "
                                       "before its engine was ready; its error is in the lines above")
        except BaseException:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
            push.close()
            pull.close()
            shutil.rmtree(ipc_dir, ignore_errors=True)
            raise
        log.info("engine process pid=%s ready", popen.pid)
        return cls(popen, ipc_dir, msg[1], push, pull)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop the engine (unfinished requests end with ``EngineStoppedError``) and its
        process (SIGKILL after ``grace_s`` seconds). Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if self._popen.poll() is None:
            self._send(("stop",))
            for _ in range(int(grace_s / 0.05)):
                if self._popen.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                log.warning("engine process pid=%s did not stop in %.0f s; SIGKILL", self.pid, grace_s)
                self._popen.kill()
            await asyncio.to_thread(self._popen.wait)
        log.info("engine process pid=%s stopped (exit code %s)", self.pid, self._popen.returncode)
        await asyncio.sleep(0)  # let the reader hand out what arrived
        self._end_all(EngineStoppedError("the engine was stopped before this request finished"))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._push.close()
        self._pull.close()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)

    # ------------------------------------------------------------------ data plane

    def generate_chunks(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                        request_id: str | None = None, stream_interval: int = 1
                        ) -> AsyncIterator[list[TokenOutput]]:
        """As :meth:`Engine.generate_chunks <dynamo_rl.serving.engine.Engine.generate_chunks>`:
        lists of :class:`TokenOutput`, the last ending with the token whose ``finish_reason``
        is set; closing the iterator early aborts the request. ``stream_interval`` is applied
        in the engine process: a list crosses to this one only when it is due.

        Raises:
            ValueError: (at call time) empty or too long prompt, id out of vocabulary,
                ``request_id`` already in flight, ``stream_interval`` < 1.
            EngineStoppedError: (while iterating) the engine stopped, its forward failed, or
                its process died (:class:`PartialWeightsError` while the weights are partial).
        """
        prompt = validate_prompt(prompt_ids, max_seq_len=self.max_seq_len, vocab_size=self.vocab_size)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in flight; use a unique id")
        return self._stream(request_id, prompt, params or SamplingParams(), check_stream_interval(stream_interval))

    async def _stream(self, request_id: str, prompt: list[int], params: SamplingParams, interval: int
                      ) -> AsyncIterator[list[TokenOutput]]:
        # registered when iteration starts, so an unused iterator leaks nothing (as the engine's)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in flight; use a unique id")
        if self._died is not None or self._stopping:
            raise EngineStoppedError(self._died or "the engine is stopping")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._send(("generate", request_id, prompt, params, interval))
        finished = False
        try:
            while True:
                # one list per message: the engine process sent it when it was due
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:  # ended before its first token
                    finished = True
                    return
                chunk = [TokenOutput(*t) for t in item]
                finished = chunk[-1].finish_reason is not None
                yield chunk
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._died is None and not self._stopping:
                self._send(("abort", request_id))

    def abort(self, request_id: str) -> bool:
        """End a request (as ``Engine.abort``); False when none of that id is streaming here."""
        if request_id not in self._streams or self._died is not None:
            return False
        self._send(("abort", request_id))
        return True

    # ------------------------------------------------------------------ control plane

    async def call_route(self, name: str, body: dict) -> dict:
        """Run control route ``name`` (:meth:`AdminRoutes.routes
        <dynamo_rl.serving.admin.AdminRoutes.routes>`) in the engine process; its answer
        (``{"status": "ok"|"error", ...}``), or a 503 error if the process is gone."""
        if self._died is not None or self._stopping:
            return {"status": "error", "message": self._died or "the engine is stopping", "code": 503}
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self._send(("route", call_id, name, body))
        try:
            return await fut
        finally:
            self._calls.pop(call_id, None)

    @property
    def loop_died(self) -> str | None:
        """Why the engine's scheduling loop (or its whole process) died, else None."""
        return self._died or self._health.get("loop_died")

    @property
    def unhealthy(self) -> str | None:
        """Why the engine cannot serve now (partial weights, dead loop or process), else None."""
        return self._died or self._health.get("unhealthy")

    @property
    def stats(self) -> dict:
        """The engine's counters as of its last health message; ``loop_deaths`` counts a dead
        process too."""
        stats = dict(self._health.get("stats", {}))
        stats["loop_deaths"] = int(stats.get("loop_deaths", 0)) + int(self._died is not None)
        return stats

    # ------------------------------------------------------------------ internals

    def _send(self, msg: tuple) -> None:
        self._push.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    async def _read(self) -> None:
        while True:
            raw = await self._pull.recv()
            try:
                self._dispatch(pickle.loads(raw))
            except Exception:  # noqa: BLE001 - one bad message must not stop every stream
                log.exception("a message from the engine process could not be handled")

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "tokens":
            for request_id, item in msg[1]:
                queue = self._streams.get(request_id)
                if queue is None:
                    continue  # closed here meanwhile
                if isinstance(item, tuple):
                    kind_name, text = item
                    item = _ERRORS.get(kind_name, EngineStoppedError)(
                        text if kind_name in _ERRORS else f"{kind_name}: {text}")
                queue.put_nowait(item)
        elif kind == "answer":
            fut = self._calls.get(msg[1])
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
        elif kind == "health":
            self._health = msg[1]

    async def _monitor(self) -> None:
        while self._popen.poll() is None:
            await asyncio.sleep(0.1)
        if self._stopping:
            return
        await asyncio.sleep(0.05)  # let the reader hand out the last messages
        self._died = f"the engine process (pid {self.pid}) exited with code {self._popen.returncode}"
        log.error("%s", self._died)
        self._end_all(EngineStoppedError(self._died))

    def _end_all(self, error: BaseException) -> None:
        for queue in list(self._streams.values()):
            queue.put_nowait(error)
        for fut in list(self._calls.values()):
            if not fut.done():
                fut.set_result({"status": "error", "message": str(error), "code": 503})


# ---------------------------------------------------------------------- the engine process


async def serve(config: dict, to_engine: str, from_engine: str, parent_pid: int) -> None:
    """The engine process: build and start the engine, then serve the worker's messages
    (module docstring) until ``stop``, SIGTERM, or the parent's exit."""
    import torch

    from dynamo_rl.serving.admin import AdminRoutes
    from dynamo_rl.serving.engine import Engine

    torch.set_num_threads(int(config["threads"]))
    engine = Engine.from_pretrained(config["model_path"], device=config["device"], dtype=config["dtype"],
                                    max_batch_size=int(config["max_batch_size"]),
                                    weights_version=int(config["weights_version"]),
                                    mix_prefill_decode=bool(config["mix_prefill_decode"]))
    await engine.start()
    control = AdminRoutes(engine, served_model_name=config["served_model_name"], model_path=config["model_path"],
                          device=config["device"])
    routes = control.routes()
    loop = asyncio.get_running_loop()
    push, pull = _sockets(from_engine, to_engine, bind=False)

    def send(msg: tuple) -> None:
        push.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def health() -> dict:
        return {"unhealthy": engine.unhealthy, "loop_died": engine.loop_died, "stats": engine.stats}

    pending: list = []

    def flush() -> None:
        send(("tokens", pending.copy()))
        pending.clear()

    def emit(request_id: str, item) -> None:
        # every request woken by one engine step runs in one turn of the loop; the flush
        # scheduled now runs after all of them: one message per step
        if not pending:
            loop.call_soon(flush)
        pending.append((request_id, item))

    tasks: dict[str, asyncio.Task] = {}

    async def run(request_id: str, prompt: list[int], params: SamplingParams, interval: int) -> None:
        ended = False
        try:
            async for chunk in engine.generate_chunks(prompt, params, request_id=request_id,
                                                      stream_interval=interval):
                emit(request_id, [(o.token_id, o.logprob, o.finish_reason, o.weights_version) for o in chunk])
                ended = chunk[-1].finish_reason is not None
            if not ended:
                emit(request_id, None)
        except asyncio.CancelledError:  # aborted by the worker: the engine ended it
            pass
        except Exception as e:  # noqa: BLE001 - every error goes back to the request's stream
            emit(request_id, (type(e).__name__, str(e)))
        finally:
            tasks.pop(request_id, None)

    async def answer(call_id: int, name: str, body: dict) -> None:
        fn = routes.get(name)
        out = (await fn(body) if fn is not None else
               {"status": "error", "message": f"no control route {name!r}", "code": 404})
        send(("answer", call_id, out))

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            if os.getppid() != parent_pid:  # the worker is gone (PR_SET_PDEATHSIG missed)
                log.error("the worker (pid %s) is gone; stopping", parent_pid)
                stopped.set()
                return
            send(("health", health()))

    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    send(("ready", {"max_seq_len": engine.max_seq_len, "vocab_size": engine.shape.vocab_size,
                    "model_config": engine.model_config, "health": health()}))
    beat = loop.create_task(heartbeat())
    stop_wait = loop.create_task(stopped.wait())
    calls: set[asyncio.Task] = set()
    try:
        while not stopped.is_set():
            recv = asyncio.ensure_future(pull.recv())
            await asyncio.wait({recv, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not recv.done():
                recv.cancel()
                break
            msg = pickle.loads(recv.result())
            kind = msg[0]
            if kind == "generate":
                _, request_id, prompt, params, interval = msg
                tasks[request_id] = loop.create_task(run(request_id, prompt, params, interval))
            elif kind == "abort":
                task = tasks.get(msg[1])
                if task is not None:
                    task.cancel()
            elif kind == "route":
                t = loop.create_task(answer(*msg[1:]))
                calls.add(t)
                t.add_done_callback(calls.discard)
            elif kind == "stop":
                break
    finally:
        beat.cancel()
        stop_wait.cancel()
        await engine.stop()  # unfinished requests end with EngineStoppedError: sent back
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for t in calls:
            t.cancel()
        if pending:
            flush()
        control.close()
        push.close()
        pull.close()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dynamo_rl.serving.engine_process",
                                description="the engine process of a dynamo-rl worker (started by the worker)")
    p.add_argument("--to-engine", required=True)
    p.add_argument("--from-engine", required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--config", required=True, help="JSON: see EngineProcess.launch")
    args = p.parse_args(argv)
    run = entry_point("%(asctime)s %(levelname)s %(name)s[engine pid %(process)d]: %(message)s")
    # until serve() takes SIGTERM over (it stops the engine then): unwind, so that a stack torn
    # down while the model still loads leaves no socket directory behind
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    code = 0
    try:
        run(serve(json.loads(args.config), args.to_engine, args.from_engine, args.parent_pid))
    except SystemExit as e:  # SIGTERM before serving began
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report, then exit without waiting on ZMQ's teardown
        log.exception("the engine process failed")
        code = 1
    finally:
        # the worker removes the socket directory too; this covers a worker that was killed
        shutil.rmtree(os.path.dirname(args.to_engine.removeprefix("ipc://")), ignore_errors=True)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
