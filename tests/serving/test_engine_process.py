"""The engine in a process of its own (:mod:`dynamo_rl.serving.engine_process`).

Against an in-process :class:`Engine` of the same checkpoint: the same ids and logprobs,
bit for bit; closing a stream aborts the request there; bad prompts are refused at call
time; control routes run beside the engine; a dead engine process ends the streams, answers
503 and makes the worker exit with status 1; the engine process goes with its worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import psutil
import pytest
import pytest_asyncio

from dynamo_rl.serving.engine import Engine, EngineStoppedError, SamplingParams
from dynamo_rl.serving.engine_process import EngineProcess

pytestmark = pytest.mark.timeout(240)

PROMPTS = [[1, 10, 11, 12, 13], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37]]


def config(model_dir) -> dict:
    return {"model_path": str(model_dir), "served_model_name": "tiny", "device": "cpu", "dtype": "float32",
            "max_batch_size": 8, "weights_version": 3, "mix_prefill_decode": False, "threads": 1, "cpus": None}


@pytest_asyncio.fixture
async def remote(tiny_model_dir):
    engine = await EngineProcess.launch(config(tiny_model_dir))
    try:
        yield engine
    finally:
        await engine.stop()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _collect(stream) -> list:
    return [out async for chunk in stream for out in chunk]


@pytest.mark.asyncio
async def test_same_ids_and_logprobs_as_the_engine_in_this_process(remote, tiny_model_dir):
    import torch

    torch.set_num_threads(1)   # as the engine process (config threads=1): the same reduction order
    local = Engine.from_pretrained(tiny_model_dir, max_batch_size=8, weights_version=3)
    await local.start()
    try:
        for i, prompt in enumerate(PROMPTS):  # one at a time: the same batches on both sides
            params = SamplingParams(max_tokens=12, temperature=1.0, seed=100 + i, ignore_eos=True)
            there = await _collect(remote.generate_chunks(prompt, params))
            here = await local.complete(prompt, params)
            assert [o.token_id for o in there] == [o.token_id for o in here]
            assert [o.logprob for o in there] == [o.logprob for o in here]   # bit for bit
            assert [o.finish_reason for o in there] == [None] * 11 + ["length"]
            assert {o.weights_version for o in there} == {3}
    finally:
        await local.stop()
    assert remote.pid != os.getpid() and remote.max_seq_len == local.max_seq_len


@pytest.mark.asyncio
async def test_closing_a_stream_aborts_it_and_bad_prompts_are_refused_at_call_time(remote):
    stream = remote.generate_chunks([1, 5, 6], SamplingParams(max_tokens=500, ignore_eos=True), request_id="r1")
    first = await anext(stream)
    assert first and first[0].finish_reason is None
    with pytest.raises(ValueError, match="already in flight"):
        await anext(remote.generate_chunks([1, 5], request_id="r1"))
    await stream.aclose()
    for _ in range(100):
        info = await remote.call_route("info", {})
        if info["stats"]["requests_running"] == 0:
            break
        await asyncio.sleep(0.05)
    assert info["status"] == "ok" and info["stats"]["requests_running"] == 0
    assert info["stats"]["tokens_generated"] < 500   # ended early, not run to max_tokens
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 53\)"):
        remote.generate_chunks([1, remote.vocab_size])
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        remote.generate_chunks([])
    out = await _collect(remote.generate_chunks([1, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True)))
    assert len(out) == 3   # the engine serves on


@pytest.mark.asyncio
async def test_stream_interval_is_held_in_the_engine_process(remote):
    """One request alone: the engine hands over its tokens 1 (prefill), then 4 per decode
    burst (``decode_steps=4``): [1, 4, 4, 2] for 11 tokens. ``stream_interval=6``: the first
    token crosses at once, then the engine process holds lists until they have 6 tokens, the
    last one what is left: [1, 8, 2], three messages. Same ids and logprobs."""
    params = SamplingParams(max_tokens=11, temperature=1.0, seed=5, ignore_eos=True)
    got = {}
    for n in (1, 6):
        assert (await remote.call_route("flush_cache", {}))["status"] == "ok"  # the same forwards both times
        got[n] = [chunk async for chunk in remote.generate_chunks([1, 9, 8], params, stream_interval=n)]
    assert [len(c) for c in got[1]] == [1, 4, 4, 2]
    assert [len(c) for c in got[6]] == [1, 8, 2]
    assert [(o.token_id, o.logprob) for c in got[6] for o in c] == [(o.token_id, o.logprob) for c in got[1] for o in c]
    assert got[6][-1][-1].finish_reason == "length"
    with pytest.raises(ValueError, match="stream_interval=0"):
        remote.generate_chunks([1, 9], params, stream_interval=0)


@pytest.mark.asyncio
async def test_control_routes_run_beside_the_engine(remote):
    assert (await remote.call_route("get_weight_version", {}))["version"] == 3
    refused = await remote.call_route("update_weights_from_disk", {"model_path": "/nonexistent", "weight_version": 4})
    assert refused["status"] == "error" and refused["code"] == 409 and "paused" in refused["message"]
    assert (await remote.call_route("pause_generation", {"mode": "wait"}))["status"] == "ok"
    assert (await remote.call_route("set_weight_version", {"weight_version": 7}))["status"] == "ok"
    assert (await remote.call_route("resume_generation", {}))["status"] == "ok"
    out = await _collect(remote.generate_chunks([1, 7], SamplingParams(max_tokens=2, ignore_eos=True)))
    assert [o.weights_version for o in out] == [7, 7]
    assert (await remote.call_route("no_such_route", {}))["code"] == 404


@pytest.mark.asyncio
async def test_a_dead_engine_process_ends_streams_and_answers_503(tiny_model_dir):
    remote = await EngineProcess.launch(config(tiny_model_dir))
    try:
        stream = remote.generate_chunks([1, 5], SamplingParams(max_tokens=10_000, ignore_eos=True))
        await anext(stream)
        assert remote.loop_died is None and remote.stats["loop_deaths"] == 0
        os.kill(remote.pid, signal.SIGKILL)
        with pytest.raises(EngineStoppedError, match=rf"engine process \(pid {remote.pid}\) exited with code -9"):
            async for _ in stream:
                pass
        answer = await remote.call_route("get_weight_version", {})
        assert answer["status"] == "error" and answer["code"] == 503
        assert remote.stats["loop_deaths"] == 1 and "exited with code -9" in remote.unhealthy
        with pytest.raises(EngineStoppedError):
            await anext(remote.generate_chunks([1, 5]))
    finally:
        await remote.stop()


@pytest.mark.asyncio
async def test_an_engine_process_that_cannot_start_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited with code 1 before its engine was ready"):
        await EngineProcess.launch(config(tmp_path / "no-model"))
    with pytest.raises(ValueError, match=r"missing \['threads'\]"):
        await EngineProcess.launch({k: v for k, v in config(tmp_path).items() if k != "threads"})


def test_sigterm_while_the_model_loads_leaves_no_socket_directory(tiny_model_dir, tmp_path):
    """A stack torn down during start-up SIGTERMs the engine process while it still loads:
    it exits 143 (128 + SIGTERM) and removes the directory of its IPC sockets."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    ipc = tmp_path / "ipc"
    ipc.mkdir()
    (ipc / "in").touch()
    p = subprocess.Popen([sys.executable, "-m", "dynamo_rl.serving.engine_process", "--to-engine", f"ipc://{ipc}/in",
                          "--from-engine", f"ipc://{ipc}/out", "--parent-pid", str(os.getpid()),
                          "--config", json.dumps(config(tiny_model_dir))], stderr=subprocess.PIPE)
    # inside serve(): torch is being imported (after main's handler, before the loop's own)
    deadline = time.monotonic() + 60
    while b"libtorch" not in Path(f"/proc/{p.pid}/maps").read_bytes():
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err.decode()[-2000:]
    assert not ipc.exists()
    assert b"Traceback" not in err


def test_the_engine_process_goes_with_its_worker(tiny_model_dir):
    """The worker is SIGKILLed (no cleanup): PR_SET_PDEATHSIG takes its engine process along."""
    import json
    import subprocess
    import sys

    script = f"""
import asyncio, json
from dynamo_rl.serving.engine_process import EngineProcess
async def main():
    engine = await EngineProcess.launch({config(tiny_model_dir)!r})
    print(json.dumps(engine.pid), flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        assert line, "the engine process did not start"
        engine_pid = json.loads(line)
        assert psutil.Process(engine_pid).ppid() == parent.pid
    finally:
        parent.kill()
        parent.wait(30)
    deadline = time.monotonic() + 30
    while not _gone(engine_pid):
        assert time.monotonic() < deadline, "the engine process outlived its worker"
        time.sleep(0.1)


@pytest.mark.stack
def test_the_worker_exits_1_when_its_engine_process_dies(tiny_model_dir, tmp_path):
    """Through a real stack: ``/engine/info`` names the engine process; after a SIGKILL of
    the engine process the worker exits with status 1 (so that it is restarted), and the
    stack reports it with the reason."""
    from dynamo_rl.serving.stack import LocalStack

    stack = LocalStack(tiny_model_dir, workers=1, run_dir=tmp_path / "run", quiet=True, startup_timeout_s=240)
    stack.start()
    try:
        w = stack.workers[0]
        info = httpx.post(f"{w.system_url}/engine/info", json={}, timeout=30).json()
        assert info["status"] == "ok" and info["pid"] == w.pid and info["engine_pid"] != w.pid
        assert psutil.Process(info["engine_pid"]).ppid() == w.pid
        assert info["weights_version"] == 0 and info["ready"] is True
        os.kill(info["engine_pid"], signal.SIGKILL)
        assert w.popen.wait(timeout=60) == 1
        deadline = time.monotonic() + 30
        while stack.failure is None:
            assert time.monotonic() < deadline, "the stack did not report the worker's exit"
            time.sleep(0.1)
        assert "exited with code 1" in stack.failure
        assert f"engine process (pid {info['engine_pid']}) exited with code -9" in stack.failure
    finally:
        stack.stop()
