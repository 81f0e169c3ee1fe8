"""Our Dynamo worker: one :class:`~dynamo_rl.serving.engine.Engine` behind the Dynamo frontend.

Run: ``python -m dynamo_rl.serving.worker --model-path DIR --served-model-name NAME
[--device cpu] [--dtype float32] [--namespace dynamo] [--component backend]
[--max-batch-size 64] [--threads 1] [--record-file PATH]``; the system server listens on
``DYN_SYSTEM_HOST:DYN_SYSTEM_PORT``. The same module runs in the local stack
(:mod:`dynamo_rl.serving.stack`) and in a DynamoGraphDeployment pod. Must not import
``generation``, ``rl`` or ``k8s``. Everything below was verified against Dynamo 1.6.1.

Data plane
    ``register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, ...)``
    makes the frontend apply the chat template and tokenize; :meth:`Worker.generate` gets
    the *preprocessed* request (``tests/serving/test_worker_mapping.py`` holds a real one)::

        {"model", "token_ids": [int], "eos_token_ids": [int], "annotations": [str],
         "stop_conditions": {"max_tokens", "stop", "stop_token_ids", "stop_token_ids_visible",
                             "stop_token_ids_hidden", "min_tokens", "ignore_eos", ...},
         "sampling_options": {"temperature", "top_p", "top_k", "seed", "n", "best_of", ...},
         "output_options": {"logprobs", "prompt_logprobs", ...}, "routing": {...},
         "mdc_sum": str, "extra_args": {"nvext": {...}}}   # extra_args only when nvext was sent

    It yields one chunk per engine delivery — every token of the request ready at that
    moment, up to the engine's ``decode_steps`` (4) — ``{"token_ids": [ids], "index": 0,
    "log_probs": [lps], "engine_data": {"weights_version": v}}``; with ``--stream-interval
    N`` (vLLM's option, which Dynamo's vLLM worker passes through) the first token goes at
    once and later chunks hold at least N tokens: fewer messages through the frontend. The last chunk adds ``finish_reason``
    (``stop``/``length``/``cancelled``) and ``completion_usage``, and its ``engine_data``
    adds ``prompt_token_ids`` (the prompt actually run, after any prefix splice) and the
    engine's own ``finish_reason`` (``stop``/``length``/``abort``) — read that one: the
    frontend reports an aborted (``cancelled``) stream as ``"stop"``. Logprobs are the
    engine's: ``log_softmax`` of the raw logits (temperature 1, before top-k/top-p), fp32.
    The EOS/stop token that ends a sequence is emitted (the trainer scores it).
    ``n``/``best_of`` > 1 and beam search are refused; ``min_tokens`` and penalties are
    ignored; ``stop`` strings are matched by the frontend, which then cancels the stream
    (the worker sees ``context.is_stopped()`` and aborts the engine request).

weights_version → client (every response)
    The chunk's ``engine_data`` comes back as ``nvext.engine_data`` when the request asks
    ``"nvext": {"extra_fields": ["engine_data", "worker_id", "completion_token_ids"]}``, on
    ``/v1/completions`` and ``/v1/chat/completions``. Streaming: every chunk carries it.
    Non-streaming: the LAST chunk's ``engine_data`` (``weights_version``,
    ``prompt_token_ids``, ``finish_reason``). ``worker_id`` gives
    ``nvext.worker_id.decode_worker_id`` = this worker's ``instance_id``;
    ``completion_token_ids`` the generated ids. Extra top-level chunk keys and
    ``disaggregated_params`` do not reach the client.

required_prefix_token_ids → worker (multi-turn on the chat endpoint)
    1.6.1 rejects unknown top-level body fields (``extra_args`` too, although newer docs
    list it) and unknown ``nvext`` keys, but passes ``nvext.annotations`` (strings) through
    as the request's ``annotations``. Send ``"nvext": {"annotations":
    ["required_prefix_token_ids:1,5,6,2"]}`` (comma-separated ids; a JSON array after the
    colon works too); ``extra_args.required_prefix_token_ids`` is honoured for newer
    frontends. The worker runs ``splice_required_prefix(token_ids, prefix, eos)`` with the
    tokenizer's eos (``<|im_end|>`` for ChatML). Alternative without splicing:
    ``nvext.token_data: [ids]`` on the chat endpoint replaces the rendered prompt (the
    frontend does it; the worker sees plain ``token_ids``).

Refused requests
    A request the worker cannot run (malformed annotation, a prefix that does not fit the
    rendered history, ids out of vocabulary, prompt too long, n > 1) raises Dynamo's
    ``InvalidArgument``: the client gets HTTP 400 ``{"message": "<Type>: <reason>"}``.
    (Yielding ``finish_reason: {"error": msg}`` gives a bare HTTP 500 instead; other
    exceptions lose the message.)

Control plane
    Dynamo 1.6.1's RL admin routes, the pause / drain rules and the weight updates are
    :class:`dynamo_rl.serving.admin.AdminRoutes` (its docstring); :class:`Worker` serves
    them beside the data plane.

Engine process
    By default (``--engine-process``) the engine runs in a child process
    (:mod:`dynamo_rl.serving.engine_process`): its forwards then do not share this
    process's GIL with Dynamo's request handling. This process keeps Dynamo, the data-plane
    handler and the record file; the control routes run beside the engine (each call is
    forwarded; ``/engine/info`` adds ``engine_pid``). If the engine process dies, the worker
    exits with status 1, as on a dead scheduling loop. ``--no-engine-process`` runs the
    engine on a thread of this process.

Shutdown
    SIGTERM/SIGINT → ``rt.shutdown()`` (deregister, stop taking requests, let in-flight
    ones finish); after ``--shutdown-grace-s`` (5 s) the engine is stopped, which ends the
    requests still running or held by a pause (their clients get an error), so the
    process exits instead of waiting for a resume that will never come.

Health
    The system server's ``/health`` answers ``ready`` once the model is registered
    (``rt.set_health_status(True)``; 1.6.1 ignores the deprecated
    ``DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS`` and would answer 503 otherwise).
    :meth:`Worker.watch_health` then mirrors the engine into it every ``--health-interval-s``
    (0.5 s): 503 ``notready`` while the weights are partial (a failed in-place refit; a
    complete update makes it ready again), so a readiness probe takes the pod
    out of rotation; and if the engine's scheduling loop dies, the worker shuts the runtime
    down and exits with status 1 (as Dynamo's own vLLM worker does on a dead engine), so
    that Kubernetes or the local stack sees a failed process instead of a live one that
    fails every request. ``/engine/info`` reports ``ready`` and ``unhealthy`` (the reason).
    ``DYN_SYSTEM_PORT`` must be < 32768: 1.6.1 parses it as a signed 16-bit integer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from dynamo_rl.serving._process import entry_point
from dynamo_rl.serving.admin import AdminRoutes, RouteError  # noqa: F401  (RouteError: re-exported)

log = logging.getLogger("dynamo_rl.serving.worker")

ANNOTATION_PREFIX = "required_prefix_token_ids:"
ENDPOINT_NAME = "generate"


def parse_required_prefix(request: Mapping[str, Any]) -> list[int] | None:
    """The ``required_prefix_token_ids`` of a preprocessed request, or ``None``.

    Looks at ``annotations`` (``"required_prefix_token_ids:1,2,3"`` or ``...:[1,2,3]``) and
    at ``extra_args["required_prefix_token_ids"]``.

    Raises:
        ValueError: when the annotation does not hold integers.
    """
    extra = request.get("extra_args") or {}
    if isinstance(extra, Mapping) and extra.get("required_prefix_token_ids") is not None:
        return [int(t) for t in extra["required_prefix_token_ids"]]
    for ann in request.get("annotations") or ():
        if isinstance(ann, str) and ann.startswith(ANNOTATION_PREFIX):
            body = ann[len(ANNOTATION_PREFIX):].strip()
            try:
                if body.startswith("["):
                    return [int(t) for t in json.loads(body)]
                return [int(t) for t in body.split(",") if t.strip()]
            except (ValueError, TypeError):
                raise ValueError(
                    f"annotation {ann[:80]!r} must be 'required_prefix_token_ids:' followed by "
                    "comma-separated token ids, e.g. 'required_prefix_token_ids:1,5,6'"
                ) from None
    return None


def sampling_params_from_request(request: Mapping[str, Any], *, context_window: int | None = None):
    """Map a Dynamo preprocessed request onto :class:`~dynamo_rl.serving.engine.SamplingParams`.

    OpenAI defaults where the request leaves a field null: temperature 1.0, top_p 1.0,
    top_k off (``None``/``-1``/``0``). ``max_tokens`` null → what is left of the context
    window (or 16 without one). Stop ids = ``stop_token_ids_hidden`` ∪ ``stop_token_ids``
    ∪ ``stop_token_ids_visible``; with ``ignore_eos`` the EOS ids are removed from them.

    Raises:
        ValueError: ``n``/``best_of`` > 1, beam search, or values ``SamplingParams`` rejects.
    """
    from dynamo_rl.serving.engine_types import SamplingParams

    so = request.get("sampling_options") or {}
    sc = request.get("stop_conditions") or {}
    for key in ("n", "best_of"):
        if so.get(key) not in (None, 1):
            raise ValueError(f"sampling_options.{key}={so[key]} is not supported by this worker; send "
                             f"{so[key]} separate requests (with distinct seeds) instead")
    if so.get("use_beam_search"):
        raise ValueError("beam search is not supported by this worker; use sampling or temperature 0")
    prompt_len = len(request.get("token_ids") or ())
    max_tokens = sc.get("max_tokens")
    if max_tokens is None:
        max_tokens = max(1, context_window - prompt_len) if context_window else 16
    ignore_eos = bool(sc.get("ignore_eos"))
    stops: set[int] = set()
    for key in ("stop_token_ids_hidden", "stop_token_ids", "stop_token_ids_visible"):
        stops.update(int(t) for t in (sc.get(key) or ()))
    if ignore_eos:
        stops -= {int(t) for t in (request.get("eos_token_ids") or ())}
    temperature = so.get("temperature")
    top_p = so.get("top_p")
    top_k = so.get("top_k")
    seed = so.get("seed")
    return SamplingParams(
        max_tokens=int(max_tokens),
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        top_k=0 if top_k is None or int(top_k) < 0 else int(top_k),
        seed=None if seed is None else int(seed),
        stop_token_ids=tuple(sorted(stops)),
        ignore_eos=ignore_eos,
    )


_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


STREAM_INTERVAL = 1  # tokens per message after the first; see Worker(stream_interval=)


async def _messages(chunks, at_most: int = 0):
    """The engine's chunks (already held to the stream interval: ``generate_chunks(...,
    stream_interval=)``) as messages, each cut into pieces of at most ``at_most`` tokens
    (0: no cut)."""
    async for out in chunks:
        step = at_most if at_most > 0 else len(out)
        for i in range(0, len(out), step):
            yield out[i:i + step]


class Worker(AdminRoutes):
    """The request handler and control routes around one engine (no Dynamo objects inside).

    Args:
        engine: a started :class:`~dynamo_rl.serving.engine.Engine`.
        served_model_name: the model name the frontend lists.
        model_path: the checkpoint directory (reported by ``/engine/info``).
        message_eos_id: the token that ends a chat message (for prefix splicing); ``None``:
            the request's first ``eos_token_ids``.
        device: where updates put loaded tensors.
        record_file: if set, one JSON line per finished request is appended there.
        tokens_per_message: at most this many tokens per message (0: no limit).
        stream_interval: after the first token (sent at once, for the time to first token),
            a message waits until it holds this many tokens or the request ends: fewer
            messages through Dynamo's request plane at the cost of burstier streams
            (vLLM's ``--stream-interval``, which Dynamo's vLLM worker passes through).

    Attributes:
        instance_id: this worker's Dynamo instance id (set by :func:`amain` once the endpoint exists).
    """

    def __init__(self, engine, *, served_model_name: str, model_path: str, message_eos_id: int | None,
                 device: str = "cpu", record_file: str | None = None, tokens_per_message: int = 0,
                 stream_interval: int = 1):
        super().__init__(engine, served_model_name=served_model_name, model_path=model_path, device=device)
        self.message_eos_id = message_eos_id
        self.record_file = record_file
        self.tokens_per_message = int(tokens_per_message)   # 0: every token ready at once
        if int(stream_interval) < 1:
            raise ValueError(f"stream_interval={stream_interval}: give a number of tokens >= 1")
        self.stream_interval = int(stream_interval)
        cfg = getattr(engine, "model_config", {}) or {}
        self.context_window = getattr(engine, "max_seq_len", None) or cfg.get("max_position_embeddings")

    def routes(self) -> dict[str, Any]:
        """The control routes (:meth:`AdminRoutes.routes`); with the engine in a process of
        its own (:class:`~dynamo_rl.serving.engine_process.EngineProcess`) each call runs
        there, and ``info`` adds this process's ``instance_id``, ``ready``, ``pid`` and the
        ``engine_pid``."""
        names = super().routes()
        call = getattr(self.engine, "call_route", None)
        if call is None:
            return names

        def forward(name: str):
            async def route(body: dict | None) -> dict:
                if body is not None and not isinstance(body, dict):
                    return {"status": "error", "message": "request body must be a JSON object", "code": 400}
                out = await call(name, body or {})
                if name == "info" and out.get("status") == "ok":
                    out = {**out, "instance_id": self.instance_id, "ready": self.ready, "pid": os.getpid(),
                           "engine_pid": self.engine.pid}
                return out

            route.__name__ = name
            return route

        return {name: forward(name) for name in names}

    # ---------------------------------------------------------------- data plane
    async def generate(self, request: dict, context=None) -> AsyncIterator[dict]:
        """Dynamo handler: preprocessed request in, LLMEngineOutput-shaped chunks out."""
        try:
            prompt = self._prompt(request)
            params = sampling_params_from_request({**request, "token_ids": prompt},
                                                  context_window=self.context_window)
            request_id = self._request_id(context)
            stream = self.engine.generate_chunks(prompt, params, request_id=request_id,
                                                 stream_interval=self.stream_interval)
        except ValueError as e:  # bad prefix / ids / params: end the request with the reason
            log.warning("request refused: %s", e)
            from dynamo.llm.exceptions import InvalidArgument

            raise InvalidArgument(f"{type(e).__name__}: {e}") from None
        ids: list[int] = []
        lps: list[float] = []
        finish: str | None = None
        version: int | None = None
        try:
            async for outs in _messages(stream, self.tokens_per_message):
                out = outs[-1]
                ids.extend(o.token_id for o in outs)
                lps.extend(o.logprob for o in outs)
                version = out.weights_version   # one version per request: the engine drains before a swap
                chunk: dict[str, Any] = {
                    "token_ids": [o.token_id for o in outs],
                    "index": 0,
                    "log_probs": [o.logprob for o in outs],
                    "engine_data": {"weights_version": out.weights_version},
                }
                if out.finish_reason is not None:
                    finish = _FINISH.get(out.finish_reason, out.finish_reason)
                    chunk["finish_reason"] = finish
                    chunk["completion_usage"] = {
                        "prompt_tokens": len(prompt),
                        "completion_tokens": len(ids),
                        "total_tokens": len(prompt) + len(ids),
                    }
                    chunk["engine_data"]["prompt_token_ids"] = prompt
                    chunk["engine_data"]["finish_reason"] = out.finish_reason
                    yield chunk
                    break
                yield chunk
                if context is not None and context.is_stopped():
                    finish = "cancelled"
                    break
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()  # aborts the request in the engine if it is still running
            self._record(request_id, prompt, ids, lps, finish or "cancelled", version, params)

    def _prompt(self, request: Mapping[str, Any]) -> list[int]:
        prompt = [int(t) for t in request["token_ids"]]
        prefix = parse_required_prefix(request)
        if prefix is None:
            return prompt
        eos = self.message_eos_id
        if eos is None:
            eos = int((request.get("eos_token_ids") or [0])[0])
        from dynamo_rl.models import splice_required_prefix

        return splice_required_prefix(prompt, prefix, eos)

    @staticmethod
    def _request_id(context) -> str:
        rid = None
        if context is not None:
            try:
                rid = context.id()
            except Exception:  # noqa: BLE001 - older bindings
                rid = None
        return rid or uuid.uuid4().hex

    def _record(self, request_id, prompt, ids, lps, finish, version, params) -> None:
        if not self.record_file:
            return
        rec = {
            "request_id": request_id,
            "prompt_token_ids": prompt,
            "token_ids": ids,
            "logprobs": lps,
            "finish_reason": finish,
            "weights_version": version,
            "sampling": {
                "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed,
                "stop_token_ids": list(params.stop_token_ids), "ignore_eos": params.ignore_eos,
            },
        }
        with open(self.record_file, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _checkpoint_version(model_path: str) -> int:
    """The weights version a dynamo-rl checkpoint holds (its ``dynamo_rl_checkpoint.json``,
    written by ``dynamo_rl.rl.checkpoint``), else 0: the worker declares what it serves."""
    try:
        v = json.loads((Path(model_path) / "dynamo_rl_checkpoint.json").read_text())["weights_version"]
        return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _message_eos_id(model_path: str) -> int | None:
    try:
        from dynamo_rl.models import load_tokenizer

        return load_tokenizer(model_path).eos_token_id
    except Exception:  # noqa: BLE001 - fall back to the request's eos ids
        log.warning("no tokenizer eos in %s; splicing uses the request's first eos id", model_path)
        return None


async def amain(args: argparse.Namespace) -> int:
    """Run the worker until shutdown; returns the exit status (1: the engine failed)."""
    from dynamo.llm import ModelInput, ModelRuntimeConfig, ModelType, WorkerType, register_model
    from dynamo.runtime import DistributedRuntime

    served = args.served_model_name or Path(args.model_path).name
    config = {"model_path": args.model_path, "served_model_name": served, "device": args.device,
              "dtype": args.dtype, "max_batch_size": args.max_batch_size,
              "weights_version": _checkpoint_version(args.model_path),
              "mix_prefill_decode": args.mix_prefill_decode, "threads": args.threads,
              "cpus": sorted(args.engine_cpus) if args.engine_cpus else None}
    if args.engine_process:
        from dynamo_rl.serving.engine_process import EngineProcess

        engine = await EngineProcess.launch(config)
    else:
        import torch

        from dynamo_rl.serving.engine import Engine

        torch.set_num_threads(args.threads)
        engine = Engine.from_pretrained(args.model_path, device=args.device, dtype=args.dtype,
                                        max_batch_size=args.max_batch_size,
                                        weights_version=config["weights_version"],
                                        mix_prefill_decode=args.mix_prefill_decode)
        await engine.start()
    worker = Worker(engine, served_model_name=served, model_path=args.model_path,
                    message_eos_id=_message_eos_id(args.model_path), device=args.device,
                    record_file=args.record_file, tokens_per_message=args.tokens_per_message,
                    stream_interval=args.stream_interval)

    loop = asyncio.get_running_loop()
    rt = DistributedRuntime(loop, args.discovery_backend, "tcp")

    def on_signal() -> None:
        # Stop taking requests and let in-flight ones finish (Dynamo's graceful shutdown);
        # after args.shutdown_grace_s, end whatever still runs or waits (e.g. held by a
        # pause) so that the process exits instead of waiting for a resume.
        log.info("shutdown requested; in-flight requests get %.0f s", args.shutdown_grace_s)
        rt.shutdown()
        loop.call_later(args.shutdown_grace_s, lambda: loop.create_task(engine.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    ep = rt.endpoint(f"{args.namespace}.{args.component}.{ENDPOINT_NAME}")
    worker.instance_id = ep.connection_id()
    for name, fn in worker.routes().items():
        rt.register_engine_route(name, fn)
    runtime_config = ModelRuntimeConfig()
    runtime_config.tool_call_parser = args.dyn_tool_call_parser
    runtime_config.reasoning_parser = args.dyn_reasoning_parser
    await register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, ep, args.model_path,
                         served, worker_type=WorkerType.Aggregated, runtime_config=runtime_config)
    log.info("worker pid=%s instance_id=%s serving %r from %s", os.getpid(), worker.instance_id, served,
             args.model_path)
    # System /health: 1.6.1 ignores DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS (deprecated) and
    # would otherwise answer 503 "notready"; the model is registered and the engine runs.
    failed: list[str] = []

    def on_fatal(why: str) -> None:  # the engine is broken: exit 1, so that it is restarted
        failed.append(why)
        rt.shutdown()
        loop.call_later(args.shutdown_grace_s, lambda: loop.create_task(engine.stop()))

    watch = loop.create_task(worker.watch_health(rt.set_health_status, on_fatal,
                                                 interval_s=args.health_interval_s))
    try:
        await ep.serve_endpoint(worker.generate)
    finally:
        watch.cancel()
        worker.close()
        await engine.stop()
        log.info("worker pid=%s stopped%s", os.getpid(), f" (engine failed: {failed[0]})" if failed else "")
    return 1 if failed else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _cpu_list(text: str) -> frozenset[int]:
    from dynamo_rl.serving._process import parse_cpus

    try:
        # the machine's CPUs, not this process's: LocalStack pins this process away from them
        return parse_cpus(text, "--engine-cpus", allowed=range(os.cpu_count() or 1))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive, finite number of seconds")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dynamo_rl.serving.worker",
                                description="dynamo-rl Dynamo worker (engine + control routes). Started by "
                                            "`dynamo-rl serve` / `train` (LocalStack) or a DGD; the Dynamo "
                                            "runtime reads its system (control) port from DYN_SYSTEM_PORT "
                                            "(with DYN_SYSTEM_ENABLED=true) and its request plane and "
                                            "discovery from the DYN_* environment, as every Dynamo worker.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-path", required=True, help="HF checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--served-model-name", default=None, help="name listed by the frontend; None: the checkpoint directory's name")
    p.add_argument("--device", default="cpu", help="where the engine runs: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", help="the engine's weights dtype: float32, bfloat16, float16")
    p.add_argument("--namespace", default=os.environ.get("DYN_NAMESPACE", "dynamo"),
                   help="Dynamo namespace of the endpoint (env DYN_NAMESPACE)")
    p.add_argument("--component", default="backend", help="Dynamo component of the endpoint")
    p.add_argument("--max-batch-size", type=int, default=64, help="KV slots: the most requests decoded at once")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--record-file", default=None, help="append one JSON line per finished request")
    p.add_argument("--dyn-tool-call-parser", default=None,
                   help="Dynamo tool-call parser the frontend applies to chat responses (e.g. hermes); the "
                        "same flag as python -m dynamo.vllm")
    p.add_argument("--dyn-reasoning-parser", default=None,
                   help="Dynamo reasoning parser (e.g. qwen3: <think> text goes to reasoning_content)")
    p.add_argument("--tokens-per-message", type=int, default=0,
                   help="at most this many tokens per streamed message (0: no limit); cuts the messages "
                        "--stream-interval makes")
    p.add_argument("--mix-prefill-decode", action="store_true",
                   help="running requests decode one token in each prefill forward of new arrivals (packed "
                        "beside the prompts; see Engine(mix_prefill_decode=))")
    p.add_argument("--stream-interval", type=_positive_int, default=STREAM_INTERVAL,
                   help="tokens per streamed message after the first (sent at once); as vLLM's --stream-interval. "
                        "Larger: fewer messages through Dynamo, burstier streams")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine (forwards, scheduling, the refit receiver and what the /engine/* routes "
                        "do; this process serves the routes and forwards each call) in a process of its own, so "
                        "that Dynamo's request handling here does not slow its forwards (see "
                        "dynamo_rl.serving.engine_process)")
    p.add_argument("--engine-cpus", type=_cpu_list, default=None, metavar="CPULIST",
                   help="the CPUs of the engine process, as taskset -c writes them (e.g. 1 or 2-7): its forwards "
                        "then run on cores of their own, apart from this process and the frontend (pin those to "
                        "the other cores, as LocalStack(engine_cpus=) does); as vLLM's VLLM_CPU_OMP_THREADS_BIND. "
                        "Default: no affinity")
    p.add_argument("--shutdown-grace-s", type=float, default=5.0,
                   help="on SIGTERM, seconds in-flight requests get before they are ended")
    p.add_argument("--health-interval-s", type=_positive_seconds, default=0.5,
                   help="seconds between checks of the engine's health (system /health, exit on a dead engine)")
    p.add_argument("--discovery-backend", default=os.environ.get("DYN_DISCOVERY_BACKEND", "file"),
                   choices=["file", "etcd", "kubernetes", "mem"],
                   help="how the frontend finds this worker (Dynamo's discovery backend; env DYN_DISCOVERY_BACKEND)")
    args = p.parse_args(argv)
    if args.engine_cpus and not args.engine_process:
        p.error("--engine-cpus pins the engine process; it needs --engine-process (drop --no-engine-process, "
                "or pin this whole worker with taskset -c instead)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = entry_point("%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run(amain(args)))


if __name__ == "__main__":
    main()
