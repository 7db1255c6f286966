# Every target that needs the environment depends on .venv/.installed, so a fresh clone only
# needs `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned and installed first: the CPU wheel is on local disk here, an unpinned torch
# pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
export MUJOCO_GL ?= egl
export WANDB_SILENT ?= true

.PHONY: setup demo test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/distillery demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	mkdir -p benchmarks/results
	$(BIN)/python benchmarks/env_throughput.py --json benchmarks/results/env_throughput.json
	$(BIN)/python benchmarks/policy_latency.py --json benchmarks/results/latency_random_weights.json

clean:
	rm -rf $(VENV) build *.egg-info
