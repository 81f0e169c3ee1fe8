"""Our worker behind the real Dynamo 1.6.1 frontend (acceptance of issue 2, items 3-4).

One module-scoped stack (2 workers, round-robin routing, request records on); the tests run
in file order, the weight update last. References are computed with the ordinary HF model
on the same ids: logprobs |diff| < 1e-5 (fp32), greedy ids equal.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import psutil
import pytest
import torch

from dynamo_rl.models import TinyModelSpec, build_tiny_model, load_tokenizer, save_checkpoint, splice_required_prefix

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]

STACK_WORKERS = 2
STACK_RECORD = True
EOS = 2
PROMPT = [1, 30, 18, 35, 4, 11, 5, 2, 10, 41]   # ids of the 50-token character vocabulary
NVEXT = {"extra_fields": ["worker_id", "completion_token_ids", "engine_data"]}


# ----------------------------------------------------------------------------- helpers


def post(url: str, body: dict, timeout: float = 120.0) -> dict:
    r = httpx.post(url, json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def complete(stack, prompt, **kw) -> dict:
    return post(f"{stack.frontend_url}/v1/completions",
                {"model": "tiny", "prompt": list(prompt), "logprobs": 1, "nvext": NVEXT, **kw})


def chat(stack, messages, annotations=None, **kw) -> dict:
    nvext = dict(NVEXT, **({"annotations": annotations} if annotations else {}))
    return post(f"{stack.frontend_url}/v1/chat/completions",
                {"model": "tiny", "messages": messages, "logprobs": True, "nvext": nvext, **kw})


def info(worker) -> dict:
    r = httpx.get(f"{worker.system_url}/engine/info", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def control(worker, route: str, body: dict | None = None) -> dict:
    r = httpx.post(f"{worker.system_url}/engine/{route}", json=body or {}, timeout=120)
    assert r.status_code == 200, r.text   # 1.6.1 sends route dicts with 200, errors included
    return r.json()


def update(worker, version, *, path=None, publisher=None, **extra) -> dict:
    """One update through Dynamo's routes, inside pause → update → resume, as the orchestrator
    sends it: ``update_weights_from_disk`` for ``path``, else ``update_weights_from_distributed``."""
    if path is not None:
        route, body = "update_weights_from_disk", {"model_path": str(path), "weight_version": version}
    else:
        route, body = "update_weights_from_distributed", {
            "engine_rpc": "dynamo_rl_update_weights", "weight_version": version, "version": version,
            "publisher": publisher}
    control(worker, "pause_generation", {"mode": "wait"})
    try:
        return control(worker, route, {**body, **extra})
    finally:
        control(worker, "resume_generation")


def ref_logprobs(model, prompt, gen) -> torch.Tensor:
    """log_softmax of the raw logits at each generated token, one full-sequence forward (fp32)."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(gen)])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(gen))
    return lp[pos, torch.tensor(gen)]


def ref_greedy(model, prompt, n: int) -> list[int]:
    """The model's own greedy decoding (argmax, stop after EOS), full forward per step."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
            if t == EOS:
                break
    return out


def distinct_model(seed: int):
    """A tiny model whose greedy ids differ from the served one's.

    The random tiny model's residual stream is dominated by the input embedding, and with
    tied embeddings its greedy decoding just repeats the last token whatever the seed;
    scaling the layers' output projections makes the weights matter.
    """
    model = build_tiny_model(TinyModelSpec(seed=seed))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(30.0)
            layer.self_attn.o_proj.weight.mul_(30.0)
    return model


def assert_logprobs_match(model, prompt, gen, got):
    ref = ref_logprobs(model, prompt, gen)
    diff = (torch.tensor(got, dtype=torch.float32) - ref).abs().max().item()
    assert diff < 1e-5, f"logprobs differ from the HF forward by {diff}"


def completion_result(resp) -> tuple[list[int], list[float], dict]:
    ids = resp["nvext"]["completion_token_ids"]
    lps = resp["choices"][0]["logprobs"]["token_logprobs"]
    return ids, lps, resp["nvext"]["engine_data"]


# ----------------------------------------------------------------------------- data plane


def test_token_id_completion_returns_engine_ids_and_hf_logprobs(serving_stack, hf_tiny):
    resp = complete(serving_stack, PROMPT, max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    ids, lps, data = completion_result(resp)
    assert len(ids) == 8 and len(lps) == 8
    assert resp["choices"][0]["finish_reason"] == "length"
    assert data == {"weights_version": 0, "prompt_token_ids": PROMPT, "finish_reason": "length"}
    assert_logprobs_match(hf_tiny, PROMPT, ids, lps)
    assert resp["nvext"]["worker_id"]["decode_worker_id"] in serving_stack.control_urls()


def test_chat_completion_returns_engine_ids_and_hf_logprobs(serving_stack, hf_tiny, tiny_model_dir):
    messages = [{"role": "user", "content": "rev 472"}]
    resp = chat(serving_stack, messages, max_tokens=6, temperature=0.7, seed=5)
    ids = resp["nvext"]["completion_token_ids"]
    content = resp["choices"][0]["logprobs"]["content"]
    assert [c["token_id"] for c in content] == ids
    prompt = resp["nvext"]["engine_data"]["prompt_token_ids"]
    tok = load_tokenizer(tiny_model_dir)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == tok(text, add_special_tokens=False)["input_ids"]   # the frontend rendered ChatML
    assert resp["nvext"]["engine_data"]["weights_version"] == 0
    assert_logprobs_match(hf_tiny, prompt, ids, [c["logprob"] for c in content])


def test_same_seed_same_ids(serving_stack):
    # consecutive requests go round-robin to different workers: the seed alone fixes the ids
    runs = [complete(serving_stack, PROMPT, max_tokens=8, temperature=1.0, seed=1234, ignore_eos=True)
            for _ in range(3)]
    ids = [r["nvext"]["completion_token_ids"] for r in runs]
    assert ids[0] == ids[1] == ids[2]
    assert len({r["nvext"]["worker_id"]["decode_worker_id"] for r in runs}) == 2


def test_greedy_equals_model_greedy(serving_stack, hf_tiny):
    for prompt in (PROMPT, [1, 14, 15, 16]):
        resp = complete(serving_stack, prompt, max_tokens=8, temperature=0.0)
        ids, lps, _ = completion_result(resp)
        assert ids == ref_greedy(hf_tiny, prompt, 8)
        assert_logprobs_match(hf_tiny, prompt, ids, lps)


def _stream(url: str, body: dict, chunks: list | None = None) -> list[dict]:
    """POST a streaming request; parsed SSE data chunks are appended to ``chunks`` as they come."""
    chunks = [] if chunks is None else chunks
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def _stream_in_background(stack, max_tokens: int) -> tuple[threading.Thread, list[dict]]:
    """Start a streaming completion (ignore_eos) on a thread; chunks arrive in the list."""
    chunks: list[dict] = []
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "nvext": NVEXT}
    t = threading.Thread(target=_stream, args=(stack.frontend_url + "/v1/completions", body, chunks))
    t.start()
    return t, chunks


def test_streaming_chunks_carry_weights_version(serving_stack):
    u = serving_stack.frontend_url
    for path, body in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        chunks = [c for c in _stream(u + path, {"model": "tiny", "max_tokens": 5, "ignore_eos": True,
                                                "stream": True, "nvext": NVEXT, **body}) if c["choices"]]
        # one message per engine delivery: the prefill's token, then the 4 of one decode hand-off
        assert [len(c["nvext"]["completion_token_ids"]) for c in chunks] == [1, 4]
        assert all(c["nvext"]["engine_data"]["weights_version"] == 0 for c in chunks)
        assert "prompt_token_ids" in chunks[-1]["nvext"]["engine_data"]


def test_required_prefix_is_spliced(serving_stack, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    turn1 = [{"role": "user", "content": "rev 12"}]
    r1 = chat(serving_stack, turn1, max_tokens=4, temperature=1.0, seed=3)   # EOS can only end it
    prefix = r1["nvext"]["engine_data"]["prompt_token_ids"] + r1["nvext"]["completion_token_ids"]
    turn2 = turn1 + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "ok"}]
    ann = "required_prefix_token_ids:" + ",".join(map(str, prefix))
    r2 = chat(serving_stack, turn2, annotations=[ann], max_tokens=2, temperature=0.0)
    rendered = tok(tok.apply_chat_template(turn2, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"]
    got = r2["nvext"]["engine_data"]["prompt_token_ids"]
    assert got == splice_required_prefix(rendered, prefix, EOS)
    assert got[:len(prefix)] == prefix
    # a prefix the history cannot hold is refused with the reason (HTTP 400)
    r = httpx.post(f"{serving_stack.frontend_url}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": turn1, "max_tokens": 2,
        "nvext": {"annotations": ["required_prefix_token_ids:1,2,1,2,1,2"]}})
    assert r.status_code == 400 and "PrefixSpliceError" in r.text


def test_record_file_holds_every_finished_request(serving_stack):
    resp = complete(serving_stack, [1, 20, 21], max_tokens=3, temperature=0.0)
    ids, lps, _ = completion_result(resp)
    wid = resp["nvext"]["worker_id"]["decode_worker_id"]
    worker = next(w for w in serving_stack.workers if w.instance_id == wid)
    recs = [json.loads(line) for line in worker.record_file.read_text().splitlines()]
    mine = [r for r in recs if r["prompt_token_ids"] == [1, 20, 21]]
    assert len(mine) == 1
    rec = mine[0]
    assert resp["id"] == f"cmpl-{rec['request_id']}"   # the frontend's request id reaches the worker
    assert rec["token_ids"] == ids and rec["logprobs"] == pytest.approx(lps, abs=1e-6)
    assert rec["weights_version"] == 0 and rec["finish_reason"] == resp["choices"][0]["finish_reason"]
    assert rec["sampling"]["temperature"] == 0.0 and rec["sampling"]["max_tokens"] == 3
    assert set(rec) == {"request_id", "prompt_token_ids", "token_ids", "logprobs", "finish_reason",
                        "weights_version", "sampling"}


def test_32_concurrent_requests_are_batched(serving_stack):
    async def run():
        async with httpx.AsyncClient(timeout=240) as client:
            async def one(i):
                r = await client.post(f"{serving_stack.frontend_url}/v1/completions", json={
                    "model": "tiny", "prompt": [1, 4 + i % 10, 14 + i % 26], "max_tokens": 8,
                    "temperature": 1.0, "seed": i, "ignore_eos": True, "nvext": NVEXT})
                assert r.status_code == 200, r.text
                return r.json()
            return await asyncio.gather(*(one(i) for i in range(32)))

    before = {w.instance_id: info(w)["stats"]["requests_finished"] for w in serving_stack.workers}
    results = asyncio.run(run())
    assert all(len(r["nvext"]["completion_token_ids"]) == 8 for r in results)
    assert all(r["choices"][0]["finish_reason"] == "length" for r in results)
    stats = {w.instance_id: info(w)["stats"] for w in serving_stack.workers}
    assert sum(s["requests_finished"] - before[i] for i, s in stats.items()) == 32
    assert max(s["max_decode_batch"] for s in stats.values()) > 1


def test_info_and_system_health(serving_stack):
    for w in serving_stack.workers:
        i = info(w)
        assert i["instance_id"] == w.instance_id and i["pid"] == w.pid and i["model"] == "tiny"
        assert i["layout"] == {"tp_rank": 0, "tp_size": 1} and i["paused"] is False
        assert i["ready"] is True and i["unhealthy"] is None  # the health watch runs
        assert {"forward_passes", "decode_batches", "max_decode_batch", "tokens_generated",
                "requests_finished", "kv_cache_tokens"} <= set(i["stats"])
        h = httpx.get(f"{w.system_url}/health", timeout=30)
        assert h.status_code == 200 and h.json()["status"] == "ready"


def test_every_listening_socket_is_loopback(serving_stack):
    pids = serving_stack.pids()
    assert len(pids) >= 2 + STACK_WORKERS
    listening = []
    for pid in pids:
        for c in psutil.Process(pid).net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN or (c.type == 2 and c.laddr and c.laddr.port):  # TCP listen / bound UDP
                listening.append((pid, c.laddr.ip, c.laddr.port))
    assert listening, "no listening socket found"
    assert {ip for _, ip, _ in listening} <= {"127.0.0.1", "::1"}, listening
    ports = {p for _, _, p in listening}
    assert int(serving_stack.frontend_url.rsplit(":", 1)[1]) in ports
    assert all(w.system_port in ports for w in serving_stack.workers)


# ----------------------------------------------------------------------------- control plane


def test_pause_holds_new_tokens_and_resume_releases_them(serving_stack):
    workers = serving_stack.workers
    for w in workers:
        res = control(w, "pause_generation")
        assert (res["status"], res["paused"]) == ("ok", True) and info(w)["paused"] is True
    t, chunks = _stream_in_background(serving_stack, max_tokens=4)
    try:
        deadline = time.monotonic() + 60
        while sum(info(w)["stats"]["requests_waiting"] for w in workers) < 1:
            assert time.monotonic() < deadline, "the request never reached a worker"
            time.sleep(0.1)
        assert chunks == []                       # held: it waits at the worker, no token out
    finally:
        for w in workers:
            res = control(w, "resume_generation")
            assert res["paused"] is False
    t.join(60)
    assert sum(len(c["nvext"]["completion_token_ids"]) for c in chunks if c["choices"]) == 4


def test_pause_drains_in_flight_requests(serving_stack):
    t, chunks = _stream_in_background(serving_stack, max_tokens=200)
    deadline = time.monotonic() + 60
    while not chunks:   # the request is mid-stream
        assert time.monotonic() < deadline, "no token arrived"
        time.sleep(0.01)
    try:
        for w in serving_stack.workers:
            control(w, "pause_generation")
            assert info(w)["stats"]["requests_running"] == 0   # nothing mid-stream after pause returns
    finally:
        for w in serving_stack.workers:
            control(w, "resume_generation")
    t.join(60)
    toks = [c for c in chunks if c["choices"]]
    assert sum(len(c["nvext"]["completion_token_ids"]) for c in toks) == 200
    assert toks[-1]["choices"][0]["finish_reason"] == "length"
    assert {c["nvext"]["engine_data"]["weights_version"] for c in toks} == {0}


def test_pause_with_timeout_aborts_stragglers_visibly(serving_stack):
    t, chunks = _stream_in_background(serving_stack, max_tokens=240)
    deadline = time.monotonic() + 60
    while not chunks:
        assert time.monotonic() < deadline, "no token arrived"
        time.sleep(0.01)
    aborted = 0
    try:
        for w in serving_stack.workers:
            res = control(w, "pause_generation", {"mode": "abort"})
            assert res["mode"] == "abort"
            aborted += res["aborted"]
            assert info(w)["stats"]["requests_running"] == 0
    finally:
        for w in serving_stack.workers:
            control(w, "resume_generation")
    t.join(60)
    last = [c for c in chunks if c["choices"]][-1]
    n = sum(len(c["nvext"]["completion_token_ids"]) for c in chunks if c["choices"])
    if aborted:   # (the request could have finished before the pause on a fast machine)
        assert n < 240
        assert last["nvext"]["engine_data"]["finish_reason"] == "abort"   # the OpenAI field says "stop"
    else:
        assert n == 240 and last["nvext"]["engine_data"]["finish_reason"] == "length"


def test_flush_empties_the_kv_cache(serving_stack):
    for _ in range(2):
        complete(serving_stack, PROMPT, max_tokens=2, temperature=0.0)
    assert sum(info(w)["stats"]["kv_cache_tokens"] for w in serving_stack.workers) > 0
    freed = 0
    for w in serving_stack.workers:
        control(w, "pause_generation")
        try:
            res = control(w, "flush_cache")
            assert res["status"] == "ok", res
            freed += res["freed_tokens"]
            assert info(w)["stats"]["kv_cache_tokens"] == 0
        finally:
            control(w, "resume_generation")
    assert freed > 0


def test_update_weights_from_checkpoint(serving_stack, hf_tiny, tmp_path):
    new_model = distinct_model(seed=1)
    ckpt = save_checkpoint(new_model, tmp_path / "v1")
    prompts = (PROMPT, [1, 14, 15, 16])
    old = {tuple(p): complete(serving_stack, p, max_tokens=8, temperature=0.0)["nvext"]["completion_token_ids"]
           for p in prompts}
    assert all(ids == ref_greedy(hf_tiny, p, 8) for p, ids in zip(prompts, old.values()))
    w = serving_stack.workers[0]
    # Dynamo's rule: an update while not paused is refused, with Dynamo's message
    refused = control(w, "update_weights_from_disk", {"model_path": str(ckpt), "weight_version": 1})
    assert refused["status"] == "error" and refused["message"].startswith(
        "Worker must be paused via pause_generation() before updating weights"), refused
    assert control(w, "get_weight_version") == {"status": "ok", "version": 0, "version_declared": True,
                                                 "paused": False}
    for w in serving_stack.workers:
        res = update(w, 1, path=ckpt)
        assert res["status"] == "ok", res
        assert res["version"] == 1 and res["version_declared"] is True and res["tensors"] > 0 and res["bytes"] > 0
        assert info(w)["weights_version"] == 1
        assert control(w, "get_weight_version")["version"] == 1
    for p in prompts:
        for _ in serving_stack.workers:   # round-robin: every worker serves the new weights
            resp = complete(serving_stack, p, max_tokens=8, temperature=0.0)
            ids, lps, data = completion_result(resp)
            assert ids == ref_greedy(new_model, p, 8)
            assert data["weights_version"] == 1
            assert_logprobs_match(new_model, p, ids, lps)
    assert any(ref_greedy(new_model, p, 8) != list(ids) for p, ids in old.items())

    w = serving_stack.workers[0]
    assert update(w, 1, path=ckpt)["noop"] is True
    stale = update(w, 0, path=ckpt)
    assert stale["code"] == 409 and "older than the served version 1" in stale["message"]
    missing = update(w, 2, path=tmp_path / "nowhere")
    assert missing["code"] == 404 and "nowhere" in missing["message"]
    wrong = save_checkpoint(build_tiny_model(TinyModelSpec(seed=2, intermediate_size=256)), tmp_path / "wrong")
    mismatch = update(w, 2, path=wrong)
    assert mismatch["code"] == 422 and "mlp" in mismatch["message"], mismatch
    no_version = update(w, 2, path=ckpt, weight_version=None)
    assert no_version["code"] == 400 and "integers >= 0" in no_version["message"], no_version
    late = update(w, 2, path=ckpt, deadline_unix_s=time.time() - 1)
    assert late["code"] == 408 and "deadline" in late["message"]
    late = control(w, "pause_generation", {"deadline_unix_s": time.time() - 1})
    assert late["code"] == 408 and info(w)["paused"] is False
    # the failures left the served weights alone
    assert info(w)["weights_version"] == 1
    for _ in serving_stack.workers:
        resp = complete(serving_stack, PROMPT, max_tokens=8, temperature=0.0)
        assert resp["nvext"]["completion_token_ids"] == ref_greedy(new_model, PROMPT, 8)
        assert resp["nvext"]["engine_data"]["weights_version"] == 1


def test_update_weights_from_refit_publisher(serving_stack):
    """The other source of update_weights: pull version 2 from a refit Publisher (shm)."""
    from dynamo_rl.refit.publisher import Publisher

    model = distinct_model(seed=2)
    gone = update(serving_stack.workers[0], 2, publisher="http://127.0.0.1:9/gone", transport="shm", timeout_s=5)
    assert gone["code"] == 502 and "PublisherGoneError" in gone["message"], gone
    assert control(serving_stack.workers[0], "get_weight_version")["version"] == 1
    assert info(serving_stack.workers[0])["weights_version"] == 1
    pub = Publisher(transport="shm")
    try:
        pub.publish(2, dict(model.state_dict()), naming="hf", model_config=model.config.to_dict())
        for w in serving_stack.workers:
            res = update(w, 2, publisher=pub.url, transport="shm")
            assert res["status"] == "ok", res
            assert res["version"] == 2 and res["source"] == "publisher" and res["transport"] == "shm"
    finally:
        pub.close()
    for _ in serving_stack.workers:
        resp = complete(serving_stack, PROMPT, max_tokens=8, temperature=0.0)
        ids, lps, data = completion_result(resp)
        assert ids == ref_greedy(model, PROMPT, 8) and data["weights_version"] == 2
        assert_logprobs_match(model, PROMPT, ids, lps)


def test_update_weights_in_place_from_refit_publisher(serving_stack):
    """in_place: straight into the live parameters (these workers pulled before, in the
    previous test); from a new publisher the version is read over HTTP, then from shared
    memory. A refit refused before any byte was written leaves the worker serving."""
    from dynamo_rl.refit.publisher import Publisher

    base = info(serving_stack.workers[0])["weights_version"]
    models = {v: distinct_model(seed=10 + v) for v in (1, 2, 3)}
    pub = Publisher(transport="shm")
    try:
        for i in (1, 2):
            v = base + i
            pub.publish(v, dict(models[i].state_dict()), naming="hf", model_config=models[i].config.to_dict())
            for w in serving_stack.workers:
                res = update(w, v, publisher=pub.url, in_place=True)
                assert res["status"] == "ok", res
                assert res["version"] == v and res["in_place"] is True, res
                assert res["control"] == ("shm_state" if i == 2 else "http"), res
            for _ in serving_stack.workers:
                ids, lps, data = completion_result(complete(serving_stack, PROMPT, max_tokens=8, temperature=0.0))
                assert ids == ref_greedy(models[i], PROMPT, 8) and data["weights_version"] == v
                assert_logprobs_match(models[i], PROMPT, ids, lps)
        # the trainer moved on to v+2 before the worker asked for v+1: refused, nothing written
        v = base + 3
        pub.publish(v, dict(models[3].state_dict()), naming="hf", model_config=models[3].config.to_dict())
        pub.publish(v + 1, dict(models[3].state_dict()), naming="hf", model_config=models[3].config.to_dict())
        w = serving_stack.workers[0]
        res = update(w, v, publisher=pub.url, in_place=True, timeout_s=5)
        assert res["code"] == 409 and "before any weight was written" in res["message"], res
        state = info(w)
        assert state["weights_version"] == base + 2 and state["weights_partial"] is None
        ids, _, data = completion_result(complete(serving_stack, PROMPT, max_tokens=8, temperature=0.0))
        assert data["weights_version"] == base + 2
        bad = update(w, v + 5, publisher=pub.url, engine_rpc="update_weights_from_path")
        assert bad["code"] == 400 and "engine_rpc 'update_weights_from_path' is not served" in bad["message"]
        for w in serving_stack.workers:
            res = update(w, v + 1, publisher=pub.url, in_place=True)
            assert res["status"] == "ok" and res["version"] == v + 1, res
    finally:
        pub.close()

