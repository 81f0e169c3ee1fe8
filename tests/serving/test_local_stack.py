"""LocalStack lifecycle: scale-up, deliberate kill, crash detection and complete teardown.

One stack with one worker: add a worker, SIGKILL it through ``kill_worker`` (expected, not
a crash), then SIGKILL the first worker from outside: the watcher must report that child
with its log tail and tear everything down, leaving no process of the stack.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from dynamo_rl.serving.stack import LocalStack, StackError

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]


def _alive(pids):
    """The pids that still run (zombies count as gone)."""
    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_scale_up_kill_crash_and_teardown(tiny_model_dir, tmp_path):
    model_files = sorted(os.listdir(tiny_model_dir))
    stack = LocalStack(tiny_model_dir, workers=1, run_dir=tmp_path / "run", quiet=True)
    stack.start()
    try:
        assert (tmp_path / "run" / "logs" / "frontend.log").is_file()
        first = stack.workers[0]
        w = stack.add_worker()
        urls = stack.control_urls()
        assert len(urls) == 2 and urls[w.instance_id] == w.system_url
        ids = {i["instance_id"] for i in httpx.get(f"{stack.frontend_url}/health").json()["instances"]}
        assert set(urls) <= ids
        pids = stack.pids()

        stack.kill_worker(1)                       # deliberate: no crash report
        assert _alive([w.pid]) == []
        assert [x.instance_id for x in stack.workers] == [first.instance_id]
        time.sleep(1.0)
        assert stack.failure is None
        stack.check()

        frontend = stack.frontend
        os.kill(first.pid, signal.SIGKILL)         # a crash, and the frontend down with it
        os.kill(frontend.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while stack.failure is None:
            assert time.monotonic() < deadline, "the crash was not detected"
            time.sleep(0.2)
        # both are named, each with its exit code and (once) its log's last lines
        for name, pid in (("worker-0", first.pid), ("frontend", frontend.pid)):
            assert stack.failure.count(f"{name} (pid {pid}) exited with code -9; last lines of ") == 1, stack.failure
            assert stack.failure.count(f"{name}.log:\n") == 1
        with pytest.raises(StackError, match="worker-0"):
            stack.check()
        deadline = time.monotonic() + 60
        while _alive(pids):
            assert time.monotonic() < deadline, f"left alive: {_alive(pids)}"
            time.sleep(0.2)
    finally:
        stack.stop()
    assert _alive(pids) == []
    assert sorted(os.listdir(tiny_model_dir)) == model_files   # nothing written into the model dir


def test_stop_leaves_no_process(tiny_model_dir, tmp_path):
    with LocalStack(tiny_model_dir, workers=1, run_dir=tmp_path / "run", quiet=True) as stack:
        r = httpx.post(f"{stack.frontend_url}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": [1, 5, 6], "max_tokens": 2})
        assert r.status_code == 200
        pids = stack.pids()
        assert len(pids) >= 3
    assert _alive(pids) == [] and _alive(stack.pids()) == []
    assert stack.failure is None


def test_stream_interval_reaches_the_worker(tiny_model_dir, tmp_path):
    """``stream_interval=5``: a streamed completion of 12 tokens arrives through the real
    frontend as messages of 1, 8 and 3 tokens: the first at once, then engine deliveries (4
    tokens per decode hand-off) held by the engine process until at least 5, the last what
    is left; the worker sends each as one message."""
    import json

    with LocalStack(tiny_model_dir, workers=1, run_dir=tmp_path / "run", quiet=True, stream_interval=5) as stack:
        body = {"model": "tiny", "prompt": [1, 30, 18, 35], "max_tokens": 12, "ignore_eos": True, "stream": True,
                "temperature": 0, "nvext": {"extra_fields": ["completion_token_ids"]}}
        sizes = []
        with httpx.stream("POST", f"{stack.frontend_url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and line.strip() != "data: [DONE]":
                    chunk = json.loads(line[5:])
                    ids = (chunk.get("nvext") or {}).get("completion_token_ids")
                    if ids:
                        sizes.append(len(ids))
    assert sizes == [1, 8, 3], sizes
    with pytest.raises(ValueError, match="stream_interval=0"):
        LocalStack(tiny_model_dir, workers=1, stream_interval=0)


def test_engine_cpus_pin_the_engine_process_and_the_rest_elsewhere(tiny_model_dir, tmp_path):
    """``engine_cpus``: every thread of the worker's engine process runs on those CPUs; every
    thread of the broker, the frontend and the worker runs on the others; requests are served."""
    from dynamo_rl.serving._process import format_cpus

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"pinning needs two CPUs; this process may use {cpus}")
    engine_cpu, rest = cpus[-1], frozenset(cpus[:-1])

    def thread_cpus(proc: psutil.Process) -> set[frozenset[int]]:
        return {frozenset(os.sched_getaffinity(t.id)) for t in proc.threads()}

    with LocalStack(tiny_model_dir, workers=1, run_dir=tmp_path / "run", quiet=True,
                    engine_cpus=str(engine_cpu)) as stack:
        r = httpx.post(f"{stack.frontend_url}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": [1, 5, 6], "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        worker = psutil.Process(stack.workers[0].pid)
        engines = [c for c in worker.children() if "dynamo_rl.serving.engine_process" in c.cmdline()]
        assert len(engines) == 1
        assert thread_cpus(engines[0]) == {frozenset({engine_cpu})}
        for proc in (worker, psutil.Process(stack.frontend.pid), psutil.Process(stack.broker.pid)):
            assert thread_cpus(proc) == {rest}, proc.cmdline()[:3]
    with pytest.raises(ValueError, match=f"engine_cpus '{format_cpus(cpus)}' takes every CPU this process may use"):
        LocalStack(tiny_model_dir, workers=1, engine_cpus=format_cpus(cpus))
    with pytest.raises(ValueError, match="engine_cpus '0-99999999999' names CPU"):  # at once, not expanded
        LocalStack(tiny_model_dir, workers=1, engine_cpus="0-99999999999")
    with pytest.raises(ValueError, match="but the worker arguments hold --no-engine-process"):
        LocalStack(tiny_model_dir, workers=1, engine_cpus=str(engine_cpu), worker_args=["--no-engine-process"])


def test_bad_model_dir_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LocalStack(tmp_path, workers=1)


def test_a_worker_that_cannot_start_is_reported(tmp_path):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-architecture"}')
    stack = LocalStack(bad, workers=1, run_dir=tmp_path / "run", quiet=True, startup_timeout_s=120)
    with pytest.raises(StackError, match=r"worker-0 \(pid \d+\) exited") as e:
        stack.start()
    assert "worker-0.log" in str(e.value)
    assert stack.workers == [] and stack.frontend.popen.poll() is not None


def test_children_die_with_a_killed_parent(tiny_model_dir, tmp_path):
    """The parent is SIGKILLed (no cleanup at all): PR_SET_PDEATHSIG takes the stack down.

    The parent starts the stack from a short-lived thread, as ``asyncio.to_thread`` would;
    the stack must survive that thread and still die with the process.
    """
    import json
    import subprocess
    import sys

    script = f"""
import json, sys, threading, time
from dynamo_rl.serving.stack import LocalStack
stack = LocalStack({str(tiny_model_dir)!r}, workers=1, run_dir={str(tmp_path / "run")!r}, quiet=True)
t = threading.Thread(target=stack.start); t.start(); t.join()
time.sleep(1.0)   # the starting thread is gone; the stack must still be up
stack.check()
print(json.dumps(stack.pids()), flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        assert line, "the parent did not start the stack"
        pids = json.loads(line)
        assert len(pids) >= 3 and len(_alive(pids)) == len(pids)
    finally:
        parent.kill()
        parent.wait(30)
    deadline = time.monotonic() + 60
    while _alive(pids):
        assert time.monotonic() < deadline, f"orphans left: {_alive(pids)}"
        time.sleep(0.2)


def test_serve_command_runs_until_ctrl_c(tiny_model_dir, tmp_path):
    """``dynamo-rl serve``: prints the frontend URL, serves, and Ctrl-C (SIGINT) stops everything.
    ``--max-batch-size`` and ``--worker-args`` reach the worker (its KV capacity; the engine on
    a thread of the worker: no ``engine_pid``)."""
    import json
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "dynamo_rl.cli", "serve", "--workers", "1", "--model-path",
                             str(tiny_model_dir), "--run-dir", str(tmp_path / "run"), "--max-batch-size", "4",
                             "--worker-args", "--no-engine-process"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        out = "".join(lines)
        assert "Ctrl-C to stop" in out, out[-3000:]
        url = re.search(r"http://127\.0\.0\.1:\d+(?=\s)", out.split("frontend (OpenAI API)")[1]).group(0)
        # each worker's control URL as refit.control_urls takes it, in a train command to paste
        train = re.search(r"train against it: dynamo-rl train RECIPE generation\.dynamo\.frontend_url=(\S+) "
                          r"'refit\.control_urls=\[(http://127\.0\.0\.1:\d+)\]'", out.replace("\n", ""))
        assert train is not None, out[-3000:]
        control = train.group(2)
        assert control in out.split("worker-0 (dynamo-rl) control")[1].splitlines()[0]
        info = httpx.get(f"{control}/engine/info", timeout=30).json()
        max_seq_len = min(json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"], 4096)
        assert info["stats"]["kv_cache_capacity_tokens"] == 4 * max_seq_len
        assert "engine_pid" not in info and info["pid"] > 0
        assert train.group(1) == url
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": [1, 5, 6], "max_tokens": 2})
        assert r.status_code == 200, r.text
        pids = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(pids) >= 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    while _alive(pids):
        assert time.monotonic() < deadline, f"left alive: {_alive(pids)}"
        time.sleep(0.2)
    # plain-text logs, without Dynamo's per-request "request received" / "Selected worker" lines
    logs = {p.name: p.read_bytes() for p in (tmp_path / "run" / "logs").glob("*.log")}
    assert {"frontend.log", "worker-0.log"} <= set(logs)
    assert all(b"\x1b[" not in text for text in logs.values())
    assert b"Selected worker" not in logs["frontend.log"] and b"request received" not in logs["worker-0.log"]
    assert b"route request completed" in logs["frontend.log"]  # the one per-request line 1.6.1 keeps


@pytest.mark.parametrize("args, message", [
    (["--dtype", "foo"], "--dtype: unknown dtype 'foo'"),
    (["--device", "cuda:64"], "--device: 'cuda:64' but"),
    (["--threads", "0"], "Invalid value for '--threads'"),
    (["--port", "70000"], "Invalid value for '--port'"),
    (["--stream-interval", "0"], "Invalid value for '--stream-interval'"),
    (["--max-batch-size", "0"], "Invalid value for '--max-batch-size'"),
    (["--engine-cpus", "0-4095"], "--engine-cpus '0-4095' names CPU(s) outside the allowed ones"),
    (["--engine-cpus", "one"], "--engine-cpus 'one' is not a CPU list"),
    (["--engine-cpus", "1-"], "--engine-cpus '1-' is not a CPU list"),
    (["--engine-cpus", "1 2"], "--engine-cpus '1 2' is not a CPU list"),
    (["--engine-cpus", ""], "--engine-cpus '' is not a CPU list"),
    (["--engine", "vllm", "--engine-cpus", "0"], "--engine-cpus pins the engine processes of dynamo-rl"),
    (["--engine-cpus", "1", "--worker-args", "--no-engine-process"], "but the worker arguments hold --no-engine-process"),
    (["--worker-args", "--engine-cpus 1"], "--worker-args: --engine-cpus is set by serve itself"),
    (["--worker-args", "--no-such-flag"], "--worker-args '--no-such-flag': python -m dynamo_rl.serving.worker: "
                                          "error: unrecognized arguments: --no-such-flag"),
    (["--worker-args", "--threads 2"], "--worker-args: --threads is set by serve itself"),
    (["--engine", "vllm", "--worker-args", "--mix-prefill-decode"], "--worker-args: only our workers"),
    # the worker kinds are checked before the tiny model is built (it would land in the run dir)
    (["--engine", "bogus"], "--engine: engine ['bogus'] unknown; worker kinds are ['dynamo-rl', 'vllm']"),
    (["--engine", "vllm", "--vllm-python", "/nonexistent/python"],
     "--engine: vllm_python '/nonexistent/python' is not an executable file"),
])
def test_serve_refuses_bad_options_before_starting_anything(tmp_path, args, message):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "dynamo_rl.cli", "serve", "--run-dir", str(tmp_path / "run"), *args],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stdout + p.stderr and "Traceback" not in p.stdout + p.stderr
    assert not (tmp_path / "run").exists()
