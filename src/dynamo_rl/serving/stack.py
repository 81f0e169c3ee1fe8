"""The embedded default: a loopback-only Dynamo stack of processes on this machine.

:class:`LocalStack` starts, in a run directory, a ZMQ broker
(:mod:`dynamo_rl.serving.broker`), ``python -m dynamo.frontend`` and N workers of two
kinds: ours (``"dynamo-rl"``: :mod:`dynamo_rl.serving.worker`) and Dynamo's stock vLLM
worker (``"vllm"``: ``python -m dynamo.vllm --enable-rl --worker-extension-cls
dynamo_rl.integrations.vllm.RefitWorkerExtension``, run by the Python of the vLLM
environment; :mod:`dynamo_rl.serving.worker_kinds` builds both kinds' command lines), in any
mix. It waits until the model is listed in ``/v1/models``, every worker's system server names its instance in ``/metrics`` and
answers ``get_weight_version``, and every instance is in the frontend's ``/health``; and it
tears down every process it started (SIGTERM, then SIGKILL after a grace period, by PID,
grandchildren included: a vLLM worker's ``EngineCore`` child too).

Run directory layout::

    <run_dir>/logs/{broker,frontend,worker-<i>}.log
    <run_dir>/kv/        file-discovery state (DYN_FILE_KV); isolates this stack from others
    <run_dir>/home/      HOME of every child (Dynamo copies model files to ~/.cache/dynamo)
    <run_dir>/records/worker-<i>.jsonl   with record=True (one JSON line per request)

The model directory is only read (the frontend refuses a model directory whose files keep
growing, so nothing is ever written there).

Logs: plain text (``NO_COLOR``), Dynamo at ``info`` with one line per request, not four
(:data:`QUIET_DYN_LOG`); a ``DYN_LOG`` in the environment wins.

Loopback: every child gets ``DYN_TCP_RPC_HOST``, ``DYN_TCP_RESPONSE_STREAM_HOST``,
``DYN_EVENT_PLANE_HOST``, ``DYN_SYSTEM_HOST`` = 127.0.0.1 and ``DYN_ZMQ_BROKER_URL`` (event
publishers connect to the broker instead of binding 0.0.0.0); the frontend binds
``--http-host 127.0.0.1``. Ports are chosen free at runtime.

Crashes: a watcher thread polls the children; when one exits that was not stopped on
purpose (``stop``/``kill_worker``), the stack logs which one with the tail of its log,
records it in :attr:`LocalStack.failure`, and tears everything down. Children get
``PR_SET_PDEATHSIG`` = SIGTERM, so they also go when this process dies without cleanup
(they are forked by one long-lived thread of the stack, since the signal follows the
forking thread).

Must not import ``generation``, ``rl`` or ``k8s``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dynamo_rl.refit.control import worker_id_from_metrics
from dynamo_rl.serving._process import (
    ChildProcess,
    check_engine_cpus,
    child_setup,
    format_cpus,
    kill_descendants,
    record_descendants,
    send_signal,
    tail,
    terminate,
)
from dynamo_rl.serving.broker import broker_url
from dynamo_rl.serving.worker_kinds import (
    ENGINES,
    check_engines,
    dynamo_rl_worker_argv,
    find_vllm_python,
    vllm_worker_argv,
    vllm_worker_env,
)

log = logging.getLogger("dynamo_rl.serving.stack")

LOOPBACK = "127.0.0.1"
#: ``DYN_LOG`` of the stack's children: info, except the lines Dynamo 1.6.1 writes per request
#: (its "route request completed" line, one per request, ignores the filter).
QUIET_DYN_LOG = ",".join([
    "info",
    "dynamo_llm::preprocessor=warn",                                  # "[SIDECAR-SKIP-TOKENIZE] Found nvext.token_data"
    "dynamo_llm::http::service::metrics=warn",                        # "request received"
    "dynamo_runtime::pipeline::network::egress=warn",                 # "Selected worker", "route request completed"
    "dynamo_runtime::pipeline::network::ingress::push_handler=warn",  # worker: "request received"
    "dynamo_llm::http::service::service_v2=warn",                     # "http response sent"
])


def _keep_earlier_logs(logs: Path) -> Path | None:
    """An earlier start's logs in this run directory (a resumed training run, a reused
    ``--run-dir``) move to ``logs-<time>/`` beside it, so that a new start never truncates
    them. Returns where they went (None: there were none)."""
    if not logs.is_dir() or not any(logs.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(logs.stat().st_mtime))
    dest, n = logs.with_name(f"logs-{stamp}"), 1
    while dest.exists():
        n += 1
        dest = logs.with_name(f"logs-{stamp}-{n}")
    logs.rename(dest)
    return dest


class StackError(RuntimeError):
    """The stack could not start, or one of its processes died (message holds its log tail)."""


def free_port(host: str = LOOPBACK, *, below: int | None = None) -> int:
    """A TCP port that was free on ``host`` a moment ago.

    Without ``below``: bind to port 0 and read the kernel's choice. With ``below``: try
    random ports in ``[10000, below)`` (Dynamo 1.6.1 parses ``DYN_SYSTEM_PORT`` as a signed
    16-bit integer, so system ports must be < 32768, below Linux's ephemeral range).
    """
    import random

    if below is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    for _ in range(200):
        port = random.randrange(10000, below)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise StackError(f"no free TCP port below {below} on {host} after 200 tries")


@dataclass
class WorkerProcess(ChildProcess):
    """A worker of the stack: ``system_url`` serves ``/engine/*``; ``instance_id`` is its Dynamo id."""

    index: int = 0
    system_port: int = 0
    system_url: str = ""
    instance_id: int | None = None
    record_file: Path | None = None
    engine: str = "dynamo-rl"


class LocalStack:
    """ZMQ broker + Dynamo frontend + N workers on 127.0.0.1 (a context manager).

    Args:
        model_dir: HF checkpoint directory served by every worker (read only).
        served_model_name: the model name of ``/v1/models`` and of requests.
        workers: number of workers started by :meth:`start`.
        run_dir: where logs/, kv/, home/, records/ go (default: a new temp directory).
        worker_threads: torch threads per worker.
        device, dtype: engine placement and precision.
        record: each worker appends its finished requests to ``records/worker-<i>.jsonl``.
        startup_timeout_s: seconds to wait for readiness (per :meth:`start`/:meth:`add_worker`).
        frontend_port: 0 → a free port.
        max_batch_size: engine batch limit per worker.
        stop_grace_s: seconds between SIGTERM and SIGKILL at teardown.
        quiet: no progress lines on stderr.
        namespace: the workers' Dynamo namespace.
        on_crash: called (from the watcher thread) with the crash report before teardown.
        engine: ``"dynamo-rl"`` (our worker), ``"vllm"`` (Dynamo's stock vLLM worker), or a
            list with one kind per worker (a mixed fleet; its length must equal ``workers``).
            :meth:`add_worker` takes a kind too (default: the first one).
        vllm_python: the vLLM environment's Python (default: :func:`~dynamo_rl.serving.worker_kinds.find_vllm_python`).
        max_model_len: vLLM's ``--max-model-len`` (default: the model's
            ``max_position_embeddings``).
        worker_args: extra command-line arguments for our workers (``python -m
            dynamo_rl.serving.worker --help``), e.g. ``["--tokens-per-message", "1"]``.
        tool_call_parser, reasoning_parser: Dynamo's parsers the frontend applies to this
            model's chat responses (``--dyn-tool-call-parser`` / ``--dyn-reasoning-parser``
            of both worker kinds, e.g. ``"hermes"`` / ``"qwen3"``); None: off.
        stream_interval: tokens per streamed message after the first (``--stream-interval``
            of both worker kinds, vLLM's option); None: the workers' default (1).
        engine_cpus: a CPU list (``"1"``, ``"2-7"``, as ``taskset -c``) for the engine processes
            of our workers (``--engine-cpus``); the broker, the frontend and the workers' own
            processes then run on the other CPUs, so forwards never wait for a core. None: no
            affinity. On a machine of few cores it keeps the engine's forwards as fast as
            in-process (benchmarks/serving.py ``--engine-cpus``). Not for ``vllm`` workers
            (vLLM binds its own threads: ``VLLM_CPU_OMP_THREADS_BIND``).

    Attributes:
        frontend_url: ``http://127.0.0.1:PORT``.
        frontend, broker: their :class:`ChildProcess` (``.pid``, ``.log_path``).
        workers: the live workers, in start order (a killed worker is removed).
        failure: ``None``, or the report of the child whose crash tore the stack down.
        run_dir: ``Path``.
    Raises (from :meth:`start`): StackError naming the child that failed, with its log tail.
    """

    def __init__(self, model_dir, *, served_model_name: str = "tiny", workers: int = 1, run_dir=None,
                 worker_threads: int = 1, device: str = "cpu", record: bool = False,
                 startup_timeout_s: float = 180.0, frontend_port: int = 0, dtype: str = "float32",
                 max_batch_size: int = 64, stop_grace_s: float = 10.0, quiet: bool = False,
                 namespace: str = "dynamo", on_crash: Callable[[str], None] | None = None,
                 engine: str | list[str] = "dynamo-rl", vllm_python: str | None = None,
                 max_model_len: int | None = None, worker_args: list[str] | None = None,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None,
                 stream_interval: int | None = None, engine_cpus: str | None = None):
        self.model_dir = Path(model_dir).resolve()
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"model_dir {str(self.model_dir)!r} holds no config.json; pass an HF "
                                    "checkpoint directory (e.g. dynamo_rl.models.ensure_tiny_model(dir))")
        self.engines, self.default_engine, self.vllm_python = check_engines(engine, workers, vllm_python)
        self.max_model_len = max_model_len
        self.worker_args = list(worker_args or [])
        self.parser_args: list[str] = []
        if tool_call_parser:
            self.parser_args += ["--dyn-tool-call-parser", tool_call_parser]
        if reasoning_parser:
            self.parser_args += ["--dyn-reasoning-parser", reasoning_parser]
        if stream_interval is not None and int(stream_interval) < 1:
            raise ValueError(f"stream_interval={stream_interval}: give a number of tokens >= 1 (or None)")
        # the same flag on both kinds (ours mirrors vLLM's)
        self.engine_args = [] if stream_interval is None else ["--stream-interval", str(int(stream_interval))]
        self.engine_cpus, self._other_cpus = check_engine_cpus(engine_cpus, self.engines + [self.default_engine],
                                                               list(worker_args or []))
        self.served_model_name = served_model_name
        self.num_workers = workers
        self._run_dir_arg = run_dir
        self.run_dir: Path | None = None
        self.worker_threads = worker_threads
        self.device = device
        self.dtype = dtype
        self.record = record
        self.startup_timeout_s = startup_timeout_s
        self.frontend_port = frontend_port
        self.max_batch_size = max_batch_size
        self.stop_grace_s = stop_grace_s
        self.quiet = quiet
        self.namespace = namespace
        self.on_crash = on_crash
        self.frontend_url = ""
        self.frontend: ChildProcess | None = None
        self.broker: ChildProcess | None = None
        self.workers: list[WorkerProcess] = []
        self.failure: str | None = None
        self._children: list[ChildProcess] = []
        self._history: list[ChildProcess] = []   # every child ever started (pids() after stop)
        self._spawner: concurrent.futures.ThreadPoolExecutor | None = None
        self._env: dict[str, str] = {}
        self._next_index = 0
        self._lock = threading.RLock()
        self._stopping = False
        self._watcher: threading.Thread | None = None
        self._watch_stop = threading.Event()

    # ------------------------------------------------------------------ public
    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalStack":
        """Start broker, frontend and workers; return when all serve. Stops everything on failure."""
        t0 = time.monotonic()
        try:
            self._prepare_run_dir()
            self._start_broker()
            self._start_frontend()
            new = [self._spawn_worker(kind) for kind in self.engines]
            self._wait_ready(new, t0)
        except BaseException:
            self.stop()
            raise
        self._say(f"stack ready in {time.monotonic() - t0:.1f}s: {self.frontend_url} "
                  f"(model {self.served_model_name!r}, {len(self.workers)} worker(s), run dir {self.run_dir})")
        self._start_watcher()
        return self

    def add_worker(self, engine: str | None = None) -> WorkerProcess:
        """Start one more worker (of kind ``engine``, default the stack's first kind) and wait
        until the frontend routes to it."""
        if not self.frontend_url:
            raise StackError("add_worker() needs a started stack; call start() first")
        engine = engine or self.default_engine
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} unknown; worker kinds are {list(ENGINES)}")
        if engine == "vllm" and self.vllm_python is None:
            self.vllm_python = find_vllm_python()
        t0 = time.monotonic()
        w = self._spawn_worker(engine)
        try:
            self._wait_ready([w], t0)
        except BaseException:
            self._terminate([w])
            with self._lock:
                if w in self.workers:
                    self.workers.remove(w)
            raise
        return w

    def kill_worker(self, index: int) -> None:
        """SIGKILL ``workers[index]`` (no grace) and drop it from :attr:`workers`.

        Frontend discovery forgets a killed worker after ~10-13 s (Dynamo 1.6.1, file backend).
        """
        with self._lock:
            w = self.workers.pop(index)
            w.expected_exit = True
        record_descendants(w)
        send_signal(w.pid, signal.SIGKILL)
        try:
            w.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            log.warning("worker %s (pid %s) did not die after SIGKILL", w.index, w.pid)
        kill_descendants(w)

    def control_urls(self) -> dict[int | str, str]:
        """``{instance_id: system_url}`` of the live workers."""
        return {w.instance_id: w.system_url for w in self.workers}

    def pids(self) -> list[int]:
        """Every PID this stack started (also after :meth:`stop`), plus their descendants seen so far."""
        out: list[int] = []
        for c in self._history:
            out.append(c.pid)
            if c.popen.poll() is None:
                record_descendants(c)
            out.extend(sorted(c.descendants))
        return out

    def check(self) -> None:
        """Raise :class:`StackError` if a child of the stack crashed."""
        if self.failure:
            raise StackError(self.failure)
        if crashed := self._crashed(list(self._children)):
            raise StackError(self._crash_report(*crashed))

    def stop(self) -> None:
        """Terminate every child (SIGTERM, SIGKILL after ``stop_grace_s``). Idempotent."""
        with self._lock:
            if self._stopping and not self._children:
                return
            self._stopping = True
            children = list(self._children)
        self._watch_stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
        # workers first (they deregister), then the frontend, then the broker
        order = [c for c in children if isinstance(c, WorkerProcess)] + \
                [c for c in children if not isinstance(c, WorkerProcess)]
        self._terminate(order)
        with self._lock:
            self._children.clear()
            self.workers.clear()
            spawner, self._spawner = self._spawner, None
        if spawner is not None:
            spawner.shutdown(wait=False)

    # ----------------------------------------------------------------- helpers
    def _say(self, msg: str) -> None:
        log.info(msg)
        if not self.quiet:
            print(f"[dynamo-rl stack] {msg}", file=sys.stderr, flush=True)

    def _prepare_run_dir(self) -> None:
        rd = Path(self._run_dir_arg) if self._run_dir_arg else Path(tempfile.mkdtemp(prefix="dynamo-rl-stack-"))
        rd = rd.resolve()
        if rd == self.model_dir or self.model_dir in rd.parents:
            raise StackError(f"run_dir {rd} lies inside the model directory {self.model_dir}; the frontend "
                             "refuses a model directory that changes. Choose a run_dir elsewhere")
        _keep_earlier_logs(rd / "logs")
        for sub in ("logs", "kv", "home", "records"):
            (rd / sub).mkdir(parents=True, exist_ok=True)
        self.run_dir = rd
        self._stopping = False
        self.failure = None
        env = dict(os.environ)
        env.update({
            "DYN_DISCOVERY_BACKEND": "file",
            "DYN_FILE_KV": str(rd / "kv"),
            "DYN_TCP_RPC_HOST": LOOPBACK,
            "DYN_TCP_RESPONSE_STREAM_HOST": LOOPBACK,
            "DYN_EVENT_PLANE_HOST": LOOPBACK,
            "DYN_SYSTEM_HOST": LOOPBACK,
            "DYN_HTTP_HOST": LOOPBACK,
            "HF_HUB_OFFLINE": "1",
            "HOME": str(rd / "home"),
            "PYTHONUNBUFFERED": "1",
        })
        for k in ("DYN_SYSTEM_PORT", "DYN_SYSTEM_ENABLED", "DYN_HTTP_PORT", "DYN_NAMESPACE"):
            env.pop(k, None)
        # plain-text logs without a line per request (set DYN_LOG yourself to see those)
        env.setdefault("DYN_LOG", QUIET_DYN_LOG)
        env.setdefault("NO_COLOR", "1")
        env.setdefault("DYN_SDK_DISABLE_ANSI_LOGGING", "1")
        self._env = env

    def _popen(self, name: str, argv: list[str], env: dict[str, str], cls=ChildProcess, **kw) -> ChildProcess:
        log_path = self.run_dir / "logs" / f"{name}.log"
        f = open(log_path, "wb")  # a fresh log per start (a stale line must not be read as current)
        try:
            # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so every
            # child is forked by the stack's own long-lived spawner thread, whatever thread
            # calls start()/add_worker() (e.g. asyncio.to_thread).
            if self._spawner is None:
                self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dynamo-rl-stack-spawn")
            p = self._spawner.submit(
                subprocess.Popen, argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=str(self.run_dir), start_new_session=True, preexec_fn=child_setup(self._other_cpus)).result()
        finally:
            f.close()
        child = cls(name=name, popen=p, log_path=log_path, **kw)
        with self._lock:
            self._children.append(child)
            self._history.append(child)
        return child

    def _start_broker(self) -> None:
        c = self._popen("broker", [sys.executable, "-m", "dynamo_rl.serving.broker", "--host", LOOPBACK],
                        self._env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for line in tail(c.log_path, 5).splitlines():
                if line.startswith("broker xsub="):
                    parts = dict(kv.split("=", 1) for kv in line.split()[1:])
                    a = int(parts["xsub"].rsplit(":", 1)[1])
                    b = int(parts["xpub"].rsplit(":", 1)[1])
                    self._env["DYN_ZMQ_BROKER_URL"] = broker_url(a, b)
                    self.broker = c
                    self._say(f"broker up (pid {c.pid}, xsub :{a}, xpub :{b})")
                    return
            if c.popen.poll() is not None:
                raise StackError(self._crash_report(c))
            time.sleep(0.05)
        raise StackError(f"broker did not report its ports within 30 s\n{self._crash_report(c)}")

    def _start_frontend(self) -> None:
        # below the kernel's ephemeral range: no outgoing connection can take it meanwhile
        port = self.frontend_port or free_port(below=32768)
        argv = [sys.executable, "-m", "dynamo.frontend", "--http-host", LOOPBACK, "--http-port", str(port),
                "--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
        c = self._popen("frontend", argv, self._env)
        self.frontend_url = f"http://{LOOPBACK}:{port}"
        self.frontend = c
        self._say(f"frontend starting (pid {c.pid}) on {self.frontend_url}")

    def _spawn_worker(self, engine: str = "dynamo-rl") -> WorkerProcess:
        with self._lock:
            i = self._next_index
            self._next_index += 1
        port = free_port(below=32768)
        env = dict(self._env)
        env.update({"DYN_SYSTEM_PORT": str(port),
                    "OMP_NUM_THREADS": str(self.worker_threads), "MKL_NUM_THREADS": str(self.worker_threads)})
        record = None
        if engine == "vllm":
            if self.device != "cpu" and not self.device.startswith("cuda"):
                raise StackError(f"vLLM workers run on 'cpu' or 'cuda', not {self.device!r}")
            env.update(vllm_worker_env(self.namespace, env))
            argv = vllm_worker_argv(
                self.vllm_python, self.model_dir, served_model_name=self.served_model_name, device=self.device,
                dtype=self.dtype, max_batch_size=self.max_batch_size, max_model_len=self.max_model_len,
                parser_args=self.parser_args, extra=self.engine_args)
        else:
            record = self.run_dir / "records" / f"worker-{i}.jsonl" if self.record else None
            argv = dynamo_rl_worker_argv(
                self.model_dir, served_model_name=self.served_model_name, device=self.device, dtype=self.dtype,
                namespace=self.namespace, component=self._component(engine), max_batch_size=self.max_batch_size,
                threads=self.worker_threads, record_file=record,
                extra=self.parser_args + self.engine_args + self.worker_args
                + (["--engine-cpus", format_cpus(self.engine_cpus)] if self.engine_cpus else []))
        w = self._popen(f"worker-{i}", argv, env, cls=WorkerProcess, index=i, system_port=port,
                        system_url=f"http://{LOOPBACK}:{port}", record_file=record, engine=engine)
        with self._lock:
            self.workers.append(w)
        self._say(f"worker-{i} ({engine}) starting (pid {w.pid}), control {w.system_url}")
        return w

    def _component(self, engine: str) -> str:
        """The Dynamo component of a worker. In a mixed fleet our workers get their own
        (``dynamo-rl``): the frontend keeps one worker set per namespace/component/endpoint
        and rejects a worker whose model card differs from the set's first one (1.6.1:
        "Rejected incompatible workers"), and the two engines' cards differ (KV block size,
        runtime config); a model may be served by several worker sets."""
        return "dynamo-rl" if engine == "dynamo-rl" and len(set(self.engines) | {self.default_engine}) > 1 \
            else "backend"

    def _wait_ready(self, new: list[WorkerProcess], t0: float) -> None:
        import httpx

        deadline = t0 + self.startup_timeout_s
        model_listed = False
        pending = list(new)
        with httpx.Client(timeout=5.0) as http:
            while True:
                self.check()
                for w in list(pending):
                    found = self._probe(http, w)
                    if found is not None:
                        w.instance_id, version = found
                        pending.remove(w)
                        self._say(f"worker-{w.index} ({w.engine}) is instance {w.instance_id}, weight version "
                                  f"{version!r}, {time.monotonic() - t0:.0f}s")
                if not model_listed:
                    try:
                        r = http.get(f"{self.frontend_url}/v1/models")
                        model_listed = r.status_code == 200 and any(
                            m.get("id") == self.served_model_name for m in r.json().get("data", []))
                        if model_listed:
                            self._say(f"frontend lists model {self.served_model_name!r}")
                    except (httpx.HTTPError, ValueError):
                        pass
                if not pending and (model_listed or not self.workers):
                    want = {w.instance_id for w in new}
                    try:
                        h = http.get(f"{self.frontend_url}/health").json()
                        seen = {i.get("instance_id") for i in h.get("instances", []) if i.get("endpoint") == "generate"}
                        if want <= seen:
                            return
                    except (httpx.HTTPError, ValueError):
                        pass
                if time.monotonic() > deadline:
                    waiting = ", ".join(w.name for w in pending) or "frontend /health listing"
                    logs = "\n".join(f"--- {c.name} ({c.log_path}):\n{tail(c.log_path, 15)}" for c in self._children)
                    raise StackError(f"stack not ready after {self.startup_timeout_s:.0f} s (waiting for {waiting}; "
                                     f"model listed: {model_listed})\n{logs}")
                time.sleep(0.25)

    @staticmethod
    def _probe(http, w: WorkerProcess):
        """``(instance_id, weight_version)`` once the worker's system server names its
        ``generate`` instance in ``/metrics`` and answers ``get_weight_version`` (the RL
        routes are up); ``None`` before."""
        import httpx

        try:
            r = http.get(f"{w.system_url}/metrics")
            iid = worker_id_from_metrics(r.text) if r.status_code == 200 else None
            if iid is None:
                return None
            v = http.post(f"{w.system_url}/engine/get_weight_version", json={})
            body = v.json() if v.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return None
        if body.get("status") != "ok":
            return None
        return iid, body.get("version")

    @staticmethod
    def _crashed(children: list[ChildProcess]) -> list[ChildProcess]:
        return [c for c in children if not c.expected_exit and c.popen.poll() is not None]

    @staticmethod
    def _exit_line(c: ChildProcess) -> str:
        return f"{c.name} (pid {c.pid}) exited with code {c.popen.poll()}"

    def _crash_report(self, *crashed: ChildProcess) -> str:
        """Each child that exited, with its exit code and its log's last lines. Several are
        named when they were seen dead together (e.g. a killed worker and the frontend that
        went down with it): which one was first cannot be told from the outside."""
        return "\n".join(f"{self._exit_line(c)}; last lines of {c.log_path}:\n{tail(c.log_path, 30)}"
                         for c in crashed)

    def _start_watcher(self) -> None:
        self._watch_stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="dynamo-rl-stack-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._watch_stop.wait(0.5):
            with self._lock:
                children = list(self._children)
            for c in children:
                record_descendants(c)
            if (crashed := self._crashed(children)) and not self._stopping:
                # those going down with it (a frontend whose worker was killed) are named too
                time.sleep(0.25)
                if self._stopping:   # stop() began meanwhile: its exits are not crashes
                    return
                crashed += [c for c in self._crashed(children) if c not in crashed]
                self.failure = self._crash_report(*crashed)
                # one line here; the log tails are in `failure` (StackError), printed once by its reader
                short = "; ".join(f"{self._exit_line(c)} (log: {c.log_path})" for c in crashed)
                if self.quiet:
                    log.error("stack child crashed: %s; stopping the stack", short)
                else:
                    print(f"[dynamo-rl stack] CRASH: {short}; stopping the stack", file=sys.stderr, flush=True)
                if self.on_crash is not None:
                    try:
                        self.on_crash(self.failure)
                    except Exception:  # noqa: BLE001
                        log.exception("on_crash callback failed")
                self.stop()
                return

    def _terminate(self, children: list[ChildProcess]) -> None:
        terminate(children, self.stop_grace_s)
        if children and not self.quiet and any(c.name == "frontend" for c in children):
            self._say("stack stopped")
