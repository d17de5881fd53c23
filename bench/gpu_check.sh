#!/usr/bin/env bash
# `make gpu-check`: the CUDA path in a few minutes, on a machine with an NVIDIA GPU.
#
#   1. convert the test model for CUDA (float16 weights; the numerics reference is
#      recorded from the unquantized weights on the CPU, as on any machine);
#   2. `llm-local doctor` over the CUDA candidates (float16, int8_float16, bfloat16,
#      int8_bfloat16, float32): the verdict table, and what auto serves;
#   3. the gRPC end-to-end tests and the numerics tests with the server on CUDA, auto;
#   4. one benchmark row: the gRPC server on CUDA, 1 and 16 streams.
#
# Elsewhere it says there is no GPU and exits 0. Never part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}

if ! "$BIN/python" -c 'import ctranslate2, sys; sys.exit(0 if ctranslate2.get_cuda_device_count() > 0 else 1)' 2>/dev/null; then
    echo "gpu-check: no NVIDIA GPU visible to CTranslate2 here: nothing to check"
    exit 0
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

export ENV=test
export LLM_LOCAL_SERVICE_RUNTIME__DEVICE=cuda
export LLM_LOCAL_SERVICE_RUNTIME__COMPUTE_TYPE=auto
export LLM_LOCAL_SERVICE_MODEL__QUANTIZATION=float16

echo "== 1. convert for CUDA (float16)"
"$BIN/llm-local" convert
echo "== 2. the verdict over the CUDA candidates"
"$BIN/llm-local" doctor
echo "== 3. end-to-end on CUDA"
LLM_LOCAL_SERVICE_NUMERICS__CHECK_AT_LOAD=true \
    "$BIN/pytest" -q -p no:cacheprovider tests/e2e/test_grpc.py tests/e2e/test_numerics.py
echo "== 4. one benchmark row: gRPC on CUDA"
"$BIN/python" -m bench --scenarios grpc --streams 1,16 --duration 15 \
    --model-dir "$("$BIN/python" -c 'from llm_local.convert.api import find_converted; from llm_local.settings.loader import load_settings; print(find_converted(load_settings("test")))')" \
    --results-dir bench/results/gpu --docs-dir bench/results/gpu
echo "gpu-check: done"
