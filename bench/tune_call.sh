#!/usr/bin/env bash
# One device call: tuning build (FS_TUNE), tile sweep, fwd tests per candidate tile.
set -u
O=${OUT:-/tmp/tune}; mkdir -p $O
export FLASHSERVE_ARCHS=90a FLASHSERVE_HEADDIMS=64,128,256 FLASHSERVE_DTYPES=bf16 FLASHSERVE_NVCC_FLAGS=-DFS_TUNE MAX_JOBS=16 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
t0=$(date +%s)
timeout 200 env FLASHSERVE_BUILD_EXT=1 python3 -m pip install --no-build-isolation --no-deps -e . > $O/build.log 2>&1 || { grep -E "error" $O/build.log | head; tail -20 $O/build.log; exit 1; }
echo "build $(( $(date +%s)-t0 ))s"
timeout 150 python3 bench/tune_fwd_tiles.py --rows 256:1024:n,256:1024:y,256:4096:n,256:4096:y,256:16384:n,256:16384:y,128:4096:y,128:8192:y,128:4096:n,64:4096:y,64:8192:y,64:4096:n \
  --tiles "256=64x64x4,128x32x8,64x32x4;128=64x64x4,128x32x4;64=128x64x4,64x64x4" 2>$O/tune.err | tee $O/tune.md
tail -5 $O/tune.err
echo "after tune $(( $(date +%s)-t0 ))s"
for t in 64x64x4 128x32x8 128x32x4 128x64x4 64x32x4; do
  FLASHSERVE_FWD_TILE=$t timeout 50 python3 -m pytest -q -x -p no:cacheprovider --confcutdir=tests/gpu tests/gpu/test_fwd_kernels.py -k "not sanitizer" > $O/test_$t.log 2>&1
  echo "tests $t rc=$?: $(tail -1 $O/test_$t.log)  ($(( $(date +%s)-t0 ))s)"
done
cat $O/tune.md
