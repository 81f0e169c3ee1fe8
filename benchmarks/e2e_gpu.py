"""The whole main job on one GPU: real Dynamo frontend, our workers, the trainer and the
in-place CUDA IPC refit, with the per-step breakdown.

Claim measured: where a GRPO step's time goes when everything shares one GPU — generation
through the frontend (tokens/s), the update (train seconds), the refit (seconds, and its
share of the step) — plus version mismatches and the trainer-vs-engine logprob mismatch in
bf16. Runs ``dynamo-rl train examples/grpo_gpu.yaml`` (override with ``--recipe`` and
trailing overrides) and summarizes its ``metrics.jsonl``; the first step (CUDA graph
capture, first refit) is reported apart.

Run on a GPU machine: ``python benchmarks/e2e_gpu.py`` → ``benchmarks/results/e2e_gpu.json``
(``--out`` for another file, e.g. one per card: H100 and H200 figures differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="examples/grpo_gpu.yaml")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("e2e_gpu.py needs a CUDA device")
    run = Path(tempfile.mkdtemp(prefix="e2e-gpu-")) / "run"
    cmd = [sys.executable, "-m", "dynamo_rl.cli", "train", args.recipe, f"logging.run_dir={run}", *args.overrides]
    p = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    print(p.stdout[-4000:], p.stderr[-4000:])
    if p.returncode != 0:
        sys.exit(f"train exited {p.returncode}")
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    steady = lines[1:] or lines

    def med(key):
        vals = [l[key] for l in steady if l.get(key) is not None]
        return statistics.median(vals) if vals else None

    step_s = [l["gen_seconds"] + l.get("train_seconds", 0.0) + l["refit_seconds"] for l in steady]
    breakdown = {
        "gen_tokens_per_s": med("gen_tokens_per_s"), "gen_seconds": med("gen_seconds"),
        "train_seconds": med("train_seconds"), "refit_seconds": med("refit_seconds"),
        "refit_gb_per_s": med("refit_gb_per_s"), "refit_bytes": med("refit_bytes"),
        "step_seconds": statistics.median(step_s),
        "refit_share_of_step": statistics.median(l["refit_seconds"] / s for l, s in zip(steady, step_s)),
    }
    print(json.dumps(breakdown, indent=1))
    write_result("e2e_gpu", {
        "recipe": args.recipe, "overrides": args.overrides, "train_command": " ".join(cmd[1:]),
        "steady_state_median": breakdown, "first_step": lines[0],
        "version_mismatches": summary["version_mismatches"], "logprob_mae_bf16": summary["logprob_mae"],
        "logprob_max_abs_bf16": summary["logprob_max_abs"], "mismatch_kl": summary.get("mismatch_kl"),
        "wall_seconds": summary["wall_seconds"], "steps": lines,
    }, args.out)


if __name__ == "__main__":
    main()
