#!/usr/bin/env bash
# Builds the standalone Hopper forward harness (sm_90a) into build/hopper_fwd/ (git-ignored; carry it).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
export PATH=/opt/cudatk/nvidia/cu13/bin:$PATH
mkdir -p build/hopper_fwd
LIBDIR=/opt/cudatk/nvidia/cu13/lib
[ -d "$LIBDIR" ] || LIBDIR=$(dirname "$(command -v nvcc)")/../lib64
nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo \
  -Xptxas -v ${HARNESS_FLAGS:-} -Icsrc -L"$LIBDIR" \
  csrc/fwd/hopper/harness/fwd_hopper_harness.cu -o build/hopper_fwd/fwd_hopper_harness -lpthread \
  2> build/hopper_fwd/ptxas.log || { cat build/hopper_fwd/ptxas.log; exit 1; }
grep -A1 "fwd_hopper_kernel\|fwd_kernel" build/hopper_fwd/ptxas.log | grep -E "registers|spill" | head -40 || true
