"""``dynamo-rl serve``: run the embedded Dynamo stack until Ctrl-C.

A thin shell over :class:`dynamo_rl.serving.stack.LocalStack`; the lead mounts
:func:`serve` as a command of the ``dynamo-rl`` typer app.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer


def serve(
    workers: Annotated[int, typer.Option("--workers", "-n", metavar="N", min=1, help="number of workers")] = 1,
    model_path: Annotated[Optional[str], typer.Option(metavar="DIR",
        help="HF checkpoint directory; default: the tiny model, built once in <run-dir>/model-tiny "
             "(with --run-dir) or ~/.cache/dynamo-rl/model-tiny (model-tiny-tools, with JSON characters and "
             "Qwen3's tool tags, when a parser is given)")] = None,
    port: Annotated[int, typer.Option(metavar="PORT", min=0, max=65535, help="frontend HTTP port on 127.0.0.1 (0: a free port)")] = 0,
    served_model_name: Annotated[str, typer.Option(metavar="NAME", help="model name in /v1/models")] = "tiny",
    threads: Annotated[int, typer.Option(metavar="N", min=1, help="torch threads per worker")] = 1,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="engine device: cpu, cuda, cuda:1 ...")] = "cpu",
    dtype: Annotated[str, typer.Option(metavar="DTYPE", help="engine dtype: float32, bfloat16, float16")] = "float32",
    run_dir: Annotated[Optional[str], typer.Option(metavar="DIR", help="logs/, kv/, home/, records/ (default: a temp dir)")] = None,
    record: Annotated[bool, typer.Option(help="workers append every finished request to records/*.jsonl")] = False,
    startup_timeout: Annotated[float, typer.Option(metavar="SECONDS", help="seconds to wait for readiness")] = 180.0,
    engine: Annotated[Optional[list[str]], typer.Option(
        "--engine", metavar="KIND", help="worker kind: dynamo-rl (ours) or vllm (Dynamo's stock `python -m dynamo.vllm "
                         "--enable-rl` with the refit extension; needs `make vllm`). Once: every worker; "
                         "repeated: one kind per worker, e.g. --engine vllm --engine dynamo-rl")] = None,
    vllm_python: Annotated[Optional[str], typer.Option(metavar="PATH",
        help="Python of the vLLM environment (default: $DYNAMO_RL_VLLM_PYTHON, else .venv-vllm/bin/python)")] = None,
    tool_call_parser: Annotated[Optional[str], typer.Option(metavar="NAME",
        help="Dynamo's tool-call parser for chat answers (the workers' --dyn-tool-call-parser), e.g. hermes: "
             "<tool_call>{...}</tool_call> becomes OpenAI tool_calls")] = None,
    reasoning_parser: Annotated[Optional[str], typer.Option(metavar="NAME",
        help="Dynamo's reasoning parser (--dyn-reasoning-parser), e.g. qwen3: <think> text becomes "
             "reasoning_content")] = None,
    max_batch_size: Annotated[int, typer.Option(metavar="N",
        min=1, help="KV slots per worker: the most requests each decodes at once (vLLM workers: --max-num-seqs)")] = 64,
    worker_args: Annotated[Optional[str], typer.Option(metavar="ARGS",
        help="more arguments for our workers, one string, e.g. '--no-engine-process' or '--mix-prefill-decode' "
             "(see python -m dynamo_rl.serving.worker --help); checked before anything starts")] = None,
    stream_interval: Annotated[Optional[int], typer.Option(metavar="N",
        min=1, help="tokens per streamed message after the first (sent at once), for both worker kinds (vLLM's "
                    "--stream-interval); larger: fewer messages through the frontend, burstier streams. Default: the "
                    "workers' own (1); `dynamo-rl train` gives 16 (cluster.stream_interval)")] = None,
    engine_cpus: Annotated[Optional[str], typer.Option(
        metavar="CPULIST", help="CPUs for our workers' engine processes, as taskset -c writes them (e.g. 1, 2-7); "
                                "the frontend and the workers' own processes then run on the other CPUs, so the "
                                "forwards never wait for a core. Default: no affinity")] = None,
) -> None:
    """Serve a model with the Dynamo frontend and N workers on 127.0.0.1 until Ctrl-C.

    Workers are ours (dynamo-rl) or Dynamo's stock vLLM worker (--engine vllm); both serve Dynamo's RL admin routes on their system server (pause_generation, update_weights_from_distributed, get_weight_version, ...). Once ready, a table gives the frontend's URL and each worker's control URL.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from dynamo_rl.serving.stack import LocalStack, StackError

    # not a terminal (a log, a pipe): wide enough that the URLs are never folded
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    from dynamo_rl.models import check_device, parse_dtype

    # checked here, not seconds later in each worker
    try:
        check_device(device, "--device")  # names the option itself
    except ValueError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    try:
        parse_dtype(dtype)
    except ValueError as e:
        console.print(f"[red]error:[/red] --dtype: {escape(str(e))}")
        raise typer.Exit(2) from None
    from dynamo_rl.serving.worker_kinds import check_parsers

    try:
        check_parsers(tool_call_parser, reasoning_parser, ("--tool-call-parser", "--reasoning-parser"))
    except ValueError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    extra_worker_args = shlex.split(worker_args or "")
    if extra_worker_args:
        if engine and all(e == "vllm" for e in engine):
            console.print("[red]error:[/red] --worker-args: only our workers (--engine dynamo-rl) take them; "
                          "every worker here is a vLLM worker")
            raise typer.Exit(2)
        from dynamo_rl.serving.worker_kinds import MANAGED_WORKER_FLAGS
        from dynamo_rl.serving.worker import parse_args as worker_parse_args

        clash = sorted({a.split("=", 1)[0] for a in extra_worker_args} & MANAGED_WORKER_FLAGS)
        if clash:
            console.print(f"[red]error:[/red] --worker-args: {', '.join(clash)} is set by serve itself; use serve's "
                          "own option")
            raise typer.Exit(2)
        try:
            import contextlib
            import io

            with contextlib.redirect_stderr(io.StringIO()) as err:
                worker_parse_args(["--model-path", "-", *extra_worker_args])
        except SystemExit:
            why = err.getvalue().strip().splitlines()[-1:] or ["not accepted"]
            console.print(f"[red]error:[/red] --worker-args {worker_args!r}: {escape(why[0])}")
            raise typer.Exit(2) from None
    if model_path is not None and not (Path(model_path) / "config.json").is_file():
        what = "does not exist" if not Path(model_path).exists() else "is not a Hugging Face checkpoint directory (no config.json)"
        console.print(f"[red]error:[/red] --model-path {model_path!r} {what}; omit it to serve the tiny model")
        raise typer.Exit(2)
    if port:
        import socket

        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as e:
                console.print(f"[red]error:[/red] --port {port}: 127.0.0.1:{port} is not free ({e.strerror}); "
                              "choose another port, or --port 0 for a free one")
                raise typer.Exit(2) from None
    kinds: str | list[str] = "dynamo-rl"
    if engine and len(engine) == 1:
        kinds = engine[0]
    elif engine:
        kinds = list(engine)
        workers = len(kinds)
    from dynamo_rl.serving.worker_kinds import check_engines

    try:  # before the tiny model is built
        _, _, vllm_python = check_engines(kinds, workers, vllm_python)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] --engine: {escape(str(e))}")
        raise typer.Exit(2) from None
    from dynamo_rl.serving.stack import check_engine_cpus

    try:
        check_engine_cpus(engine_cpus, [kinds] if isinstance(kinds, str) else kinds, extra_worker_args,
                          "--engine-cpus")
    except ValueError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    if model_path is None:
        from dynamo_rl.models import TinyModelSpec, ensure_tiny_model

        base = Path(run_dir) if run_dir else Path.home() / ".cache" / "dynamo-rl"
        if tool_call_parser or reasoning_parser:  # the vocabulary that can spell <tool_call>{...}
            model_path = str(ensure_tiny_model(base / "model-tiny-tools", TinyModelSpec(vocab="tools")))
            console.print(f"model: the tiny Qwen3 with the tools vocabulary at {model_path}")
        else:
            model_path = str(ensure_tiny_model(base / "model-tiny"))
            console.print(f"model: the tiny Qwen3 at {model_path}")
    try:
        stack = LocalStack(model_path, served_model_name=served_model_name, workers=workers, run_dir=run_dir,
                           worker_threads=threads, device=device, dtype=dtype, record=record,
                           startup_timeout_s=startup_timeout, frontend_port=port, engine=kinds,
                           vllm_python=vllm_python, tool_call_parser=tool_call_parser,
                           reasoning_parser=reasoning_parser, stream_interval=stream_interval,
                           max_batch_size=max_batch_size, worker_args=extra_worker_args, engine_cpus=engine_cpus)
    except (FileNotFoundError, ValueError) as e:  # what LocalStack checks itself
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None

    def _sigterm(*_):  # `kill <pid>` tears the stack down like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background (SIG_IGN)
    try:
        stack.start()
    except KeyboardInterrupt:  # perhaps a stalled start: keep its logs
        console.print("stopped during startup" + (f"; logs kept in {stack.run_dir / 'logs'}" if stack.run_dir else ""))
        raise typer.Exit(130) from None
    except (StackError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        if stack.run_dir is not None:
            console.print(f"logs kept in {stack.run_dir / 'logs'}")
        raise typer.Exit(1) from None
    clean = False
    try:
        table = Table(title=f"dynamo-rl stack — model {served_model_name!r}", show_lines=False)
        table.add_column("process", overflow="fold")
        table.add_column("pid", justify="right")
        table.add_column("URL", overflow="fold")   # never cut: the URLs are what to copy
        table.add_row("frontend (OpenAI API)", str(stack.frontend.pid), stack.frontend_url)
        for w in stack.workers:  # the control URL as refit.control_urls takes it (routes under /engine/)
            table.add_row(f"worker-{w.index} ({w.engine}) control", str(w.pid), w.system_url)
        console.print(table)
        console.print(
            f"try: curl -s {stack.frontend_url}/v1/chat/completions -H 'content-type: application/json' -d "
            f"'{{\"model\": \"{served_model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": "
            f"\"rev 472\"}}], \"max_tokens\": 8, \"nvext\": {{\"extra_fields\": [\"engine_data\", "
            f"\"completion_token_ids\"]}}}}'",
            soft_wrap=True, highlight=False, markup=False)
        urls = ", ".join(w.system_url for w in stack.workers)
        console.print(f"train against it: dynamo-rl train RECIPE generation.dynamo.frontend_url={stack.frontend_url} "
                      f"'refit.control_urls=[{urls}]'", soft_wrap=True, highlight=False, markup=False)
        console.print(f"run dir: {stack.run_dir} (logs in logs/)   Ctrl-C to stop")
        while stack.failure is None:
            time.sleep(0.5)
        console.print(f"[red]a process of the stack crashed; everything was stopped:[/red]\n{escape(stack.failure)}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping ...")
        clean = True
    finally:
        stack.stop()
        if clean:
            _drop_temp_run_dir(stack, run_dir, console)
        elif stack.run_dir is not None:
            console.print(f"logs kept in {stack.run_dir / 'logs'}")


def _drop_temp_run_dir(stack, run_dir: str | None, console) -> None:
    """A clean stop removes the temp directory the stack made (no --run-dir given)."""
    import shutil

    if run_dir is None and stack.run_dir is not None:
        shutil.rmtree(stack.run_dir, ignore_errors=True)
        console.print(f"removed {stack.run_dir} (pass --run-dir to keep the logs)")
