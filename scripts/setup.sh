#!/usr/bin/env bash
# Installs what building tfc needs on Debian 12, if it is missing. Idempotent and quick
# when everything is there already. Sourced by the other scripts.
set -euo pipefail

# The last line is for the GPU targets without a GPU: lavapipe (a Vulkan 1.3 driver on the
# CPU) and its loader, spirv-val, and a venv for the nvidia-cuda-nvcc-cu12 wheel's ptxas.
TFC_APT_PACKAGES=(build-essential llvm-22-dev libmlir-22-dev libpolly-22-dev clang-22
                  zlib1g-dev libzstd-dev graphviz
                  mesa-vulkan-drivers libvulkan1 spirv-tools python3-venv)

tfc_setup() {
    local missing=()
    for p in "${TFC_APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]}" >&2
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    # `TFC_NO_PTXAS=1`: a caller that compiles nothing for CUDA (the demo) skips it.
    local venv="$PWD/target/ptxas-venv"
    if [ -z "${TFC_NO_PTXAS:-}" ] && ! find "$venv" -path '*cuda_nvcc/bin/ptxas' 2>/dev/null | grep -q .; then
        echo "setup: installing ptxas (nvidia-cuda-nvcc-cu12) into $venv" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q nvidia-cuda-nvcc-cu12
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "setup: cargo is not installed; install Rust with rustup (https://rustup.rs)" >&2
        exit 1
    fi
}
