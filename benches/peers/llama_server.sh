#!/usr/bin/env bash
# Builds llama.cpp's llama-server from the same llama.cpp source the peer benchmarks use
# (the llama-cpp-python sdist that benches/peers/setup.sh downloads), for this CPU, once:
# prints its path. Needs the peers' venv (benches/peers/setup.sh), and takes cmake from
# PyPI into it.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=target/peers
venv=target/peers-venv
lcp=0.3.36
out=$work/llama-server-$lcp
if [ ! -x "$out/bin/llama-server" ]; then
    [ -x $venv/bin/python ] || { echo "run: source benches/peers/setup.sh first" >&2; exit 1; }
    $venv/bin/pip install -q cmake >&2
    sdist=$work/llama_cpp_python-$lcp.tar.gz
    [ -f "$sdist" ] || $venv/bin/pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$lcp" -d $work >&2
    src=$work/src-$lcp
    rm -rf "$src" && mkdir -p "$src"
    tar xzf "$sdist" -C "$src" --strip-components=1
    $venv/bin/cmake -S "$src/vendor/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
    $venv/bin/cmake --build "$src/build" --target llama-server -j "$(nproc)" >&2
    mkdir -p "$out/bin"
    cp "$src/build/bin/llama-server" "$out/bin/"
    cp "$src"/build/bin/*.so* "$out/bin/" 2>/dev/null || true
fi
echo "$out/bin/llama-server"
