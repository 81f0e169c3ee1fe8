"""The two worker kinds of a local stack, and how each is launched.

- ``"dynamo-rl"``: our worker, ``python -m dynamo_rl.serving.worker`` (:func:`dynamo_rl_worker_argv`);
- ``"vllm"``: Dynamo's stock vLLM worker, ``python -m dynamo.vllm --enable-rl`` with our refit
  receiver as vLLM's worker extension (:data:`VLLM_EXTENSION`), run by the Python of a vLLM
  environment (:func:`find_vllm_python`), with the CPU settings of ``../shared/notes/vllm.md``
  (:func:`vllm_worker_argv`, :func:`vllm_worker_env`).

And the checks a caller runs before anything starts: :func:`check_engines` (kinds, the vLLM
environment), :func:`check_parsers` (Dynamo's tool-call and reasoning parsers). Each raises
ValueError or FileNotFoundError naming the input and the fix.

Pure functions: argv lists and environment dicts, nothing started. Used by
:class:`dynamo_rl.serving.stack.LocalStack`, the ``serve`` command and the recipe preflight.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

#: worker kinds of the stack: ours, and Dynamo's stock vLLM worker
ENGINES = ("dynamo-rl", "vllm")
#: the options LocalStack gives each of our workers itself (``worker_args`` must not repeat them)
MANAGED_WORKER_FLAGS = frozenset({"--model-path", "--served-model-name", "--device", "--dtype", "--namespace",
                                  "--component", "--max-batch-size", "--threads", "--discovery-backend",
                                  "--record-file", "--engine-cpus"})
#: ``--worker-extension-cls`` of the vLLM workers (runs the refit receiver in vLLM)
VLLM_EXTENSION = "dynamo_rl.integrations.vllm.RefitWorkerExtension"


def find_vllm_python(explicit: str | None = None) -> str:
    """The Python that runs ``python -m dynamo.vllm`` (vLLM + Dynamo + dynamo-rl installed).

    Looked up in order: ``explicit``; ``$DYNAMO_RL_VLLM_PYTHON``; ``.venv-vllm/bin/python`` in
    the current directory and in the dynamo-rl checkout (what ``make vllm`` builds).
    vLLM runs in an environment of its own, as in a production Dynamo vLLM image: it pins its
    own torch build and ~80 packages that the trainer must not inherit.

    Raises:
        FileNotFoundError: none of them exists (the message says how to build it).
    """
    if explicit:
        if Path(explicit).is_file() and os.access(explicit, os.X_OK):
            return explicit
        raise FileNotFoundError(f"vllm_python {explicit!r} is not an executable file; point it at the Python of "
                                "a vLLM environment (e.g. .venv-vllm/bin/python, built by `make vllm`)")
    tried = []
    for cand in (os.environ.get("DYNAMO_RL_VLLM_PYTHON"), str(Path.cwd() / ".venv-vllm/bin/python"),
                 str(Path(__file__).resolve().parents[3] / ".venv-vllm/bin/python")):
        if not cand or cand in tried:
            continue
        tried.append(cand)
        if os.access(cand, os.X_OK) and Path(cand).is_file():
            return cand
    raise FileNotFoundError(
        f"vLLM workers need the Python of a vLLM environment; none found (tried {tried}). Build it with "
        "`make vllm` (creates .venv-vllm, about 2 minutes and 6.5 GB), or point serve's --vllm-python, a "
        "recipe's cluster.vllm_python or $DYNAMO_RL_VLLM_PYTHON at a python where `import vllm, dynamo.vllm, "
        "dynamo_rl` works")


def check_engines(engine: str | list[str], workers: int, vllm_python: str | None = None
                  ) -> tuple[list[str], str, str | None]:
    """Check the worker kinds of a stack before anything is built.

    Args:
        engine: one kind for every worker, or a list of one kind per worker (:data:`ENGINES`).
        workers: how many workers (>= 0).
        vllm_python: the vLLM environment's Python, when given.
    Returns:
        ``(kinds, default kind, vllm_python)``: one kind per worker; the kind of workers
        added later; the Python of the vLLM environment (:func:`find_vllm_python`) where a
        kind is ``vllm``, else ``vllm_python`` as given.
    Raises:
        ValueError: an unknown kind, or a list whose length is not ``workers``.
        FileNotFoundError: a ``vllm`` kind and no vLLM environment (the message says how to build one).
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    kinds = [engine] * workers if isinstance(engine, str) else list(engine)
    if len(kinds) != workers:
        raise ValueError(f"engine lists {len(kinds)} worker kinds for {workers} workers; give one kind per worker")
    bad = sorted({k for k in kinds if k not in ENGINES})
    if bad or (isinstance(engine, str) and engine not in ENGINES):
        raise ValueError(f"engine {bad or engine!r} unknown; worker kinds are {list(ENGINES)}")
    default = engine if isinstance(engine, str) else (kinds[0] if kinds else "dynamo-rl")
    if "vllm" in kinds + [default]:
        vllm_python = find_vllm_python(vllm_python)
    return kinds, default, vllm_python


def max_position_embeddings(model_dir: Path) -> int | None:
    """``max_position_embeddings`` of the checkpoint's ``config.json``; None where unreadable."""
    try:
        return int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_parsers(tool_call_parser: str | None, reasoning_parser: str | None,
                  keys: tuple[str, str] = ("tool_call_parser", "reasoning_parser")) -> None:
    """Both names must be parsers Dynamo knows (``dynamo._core.get_tool_parser_names`` /
    ``get_reasoning_parser_names``). Raises ValueError naming ``keys`` and the known names."""
    from dynamo import _core

    for key, name, known in ((keys[0], tool_call_parser, _core.get_tool_parser_names),
                             (keys[1], reasoning_parser, _core.get_reasoning_parser_names)):
        if name is not None and name not in known():
            raise ValueError(f"{key} {name!r} is not a Dynamo parser; Dynamo 1.6.1 knows: {', '.join(sorted(known()))}")


#: the environment of a ``dynamo.vllm`` worker on a CPU machine, where the caller's environment
#: sets none (``../shared/notes/vllm.md``)
VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",            # GiB; vLLM's default is large
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",    # the workers share the cores
    "VLLM_LOGGING_COLOR": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def vllm_worker_env(namespace: str, env: dict[str, str]) -> dict[str, str]:
    """The variables to add to ``env`` (the child's environment) for a ``dynamo.vllm`` worker:
    its system server on, its Dynamo namespace, and :data:`VLLM_CPU_ENV` where ``env`` sets none."""
    return {"DYN_SYSTEM_ENABLED": "true", "DYN_NAMESPACE": namespace,
            **{k: env.get(k, v) for k, v in VLLM_CPU_ENV.items()}}


def vllm_worker_argv(vllm_python: str, model_dir: Path, *, served_model_name: str, device: str, dtype: str,
                     max_batch_size: int, max_model_len: int | None = None, parser_args: list[str] = (),
                     extra: list[str] = ()) -> list[str]:
    """``python -m dynamo.vllm --enable-rl`` on loopback with file discovery, the TCP request
    plane and the ZMQ event plane; ``--max-num-seqs`` = ``max_batch_size``; ``--max-model-len``
    = ``max_model_len`` or the model's ``max_position_embeddings``; eager mode on CPU.
    ``parser_args`` (``--dyn-tool-call-parser X``, ``--dyn-reasoning-parser Y``), then ``extra``
    (``--stream-interval``), go last."""
    max_len = max_model_len or max_position_embeddings(model_dir)
    argv = [vllm_python, "-m", "dynamo.vllm", "--model", str(model_dir),
            "--served-model-name", served_model_name, "--enable-rl",
            "--worker-extension-cls", VLLM_EXTENSION,
            "--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq",
            "--dtype", dtype, "--max-num-seqs", str(max_batch_size)]
    if max_len:
        argv += ["--max-model-len", str(max_len)]
    if device == "cpu":
        argv += ["--enforce-eager"]
    if parser_args:
        # Dynamo 1.6.1 turns on structural-tag guided decoding for tool calls by default:
        # vLLM then samples from a grammar-masked distribution while the logprobs (and the
        # trainer) see the raw one, and a model trained on another tool-call layout is
        # forced into the parser's. RL wants what the policy samples: off.
        argv += ["--dyn-structural-tag", "false"]
    return argv + list(parser_args) + list(extra)


def dynamo_rl_worker_argv(model_dir: Path, *, served_model_name: str, device: str, dtype: str, namespace: str,
                          component: str, max_batch_size: int, threads: int, record_file: Path | None = None,
                          extra: list[str] = ()) -> list[str]:
    """``python -m dynamo_rl.serving.worker`` with the options of :data:`MANAGED_WORKER_FLAGS`
    (file discovery); ``extra`` (parser flags, ``--stream-interval``, the user's worker
    arguments) goes last."""
    argv = [sys.executable, "-m", "dynamo_rl.serving.worker", "--model-path", str(model_dir),
            "--served-model-name", served_model_name, "--device", device, "--dtype", dtype,
            "--namespace", namespace, "--component", component, "--max-batch-size", str(max_batch_size),
            "--threads", str(threads), "--discovery-backend", "file"]
    if record_file is not None:
        argv += ["--record-file", str(record_file)]
    return argv + list(extra)
