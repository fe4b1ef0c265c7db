#!/usr/bin/env bash
# Install flashserve (building the CUDA kernels where a CUDA torch and nvcc are present) and run
# `flashserve demo` on this machine's best backend.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}" setuptools wheel
python -m pip install --quiet --no-build-isolation -e .
flashserve demo "$@"
