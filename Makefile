# dynamo-rl — the two commands a new user needs:
#   make run    GRPO on the embedded Dynamo stack (examples/grpo_tiny.yaml)
#   make test   the test suite (real Dynamo frontend + workers on loopback, K8s API emulator)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RECIPE ?= examples/grpo_tiny.yaml
ARGS   ?=

.PHONY: install run test bench bench-gpu clean
install: $(STAMP)

# torch is pinned to the CPU build that lies on this machine's disk (a looser pin pulls a
# multi-GB CUDA build). ai-dynamo 1.6.1 installs with --no-deps: its declared dependency
# aisimulate==0.13.0 is a placeholder on PyPI; what it really imports is in pyproject.toml.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1
	touch $@

run: install
	$(BIN)/dynamo-rl train $(RECIPE) $(ARGS)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/refit.py

# On a machine with a CUDA GPU (results under benchmarks/results/*_gpu*.json)
bench-gpu: install
	$(BIN)/python benchmarks/step_gpu.py
	$(BIN)/python benchmarks/refit_gpu.py
	$(BIN)/python benchmarks/refit_multigpu.py   # skips without 2 GPUs

clean:
	rm -rf $(VENV) runs
