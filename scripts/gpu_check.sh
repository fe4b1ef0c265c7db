#!/usr/bin/env bash
# One call on a lent GPU machine: build flashserve._C, run tests/gpu, run bench/kernels.py, print a table last.
#
#   scripts/gpu_check.sh                 # full build (all head dims, fp16+bf16, sm_80+sm_90a), all tests, full bench
#   FLASHSERVE_HEADDIMS=64,128 FLASHSERVE_DTYPES=bf16 FLASHSERVE_ARCHS=90a scripts/gpu_check.sh   # dev build
#   GPU_CHECK_BENCH=quick|full|none  GPU_CHECK_BENCH_ARGS="--ops fwd" (extra bench/kernels.py args)
#   GPU_CHECK_TESTS="tests/gpu" (pytest args, shell-quoted: GPU_CHECK_TESTS="tests/gpu -k 'a or b'")  GPU_CHECK_SKIP_BUILD=1
#   GPU_CHECK_DEMO=1|0 (flashserve demo on the flash backend)
#   GPU_CHECK_SERVICE=none|quick|full|wire|batching (bench/service.py; batching: the on/off pair with
#   GPU_CHECK_SERVER_ARGS, default "--frontends 4", then bench/engine_pipeline.py --real)
#
# The machine lacks grpcio's health/reflection packages: run scripts/fetch_device_wheels.sh here first
# and carry .device_wheels with the call; they are installed below.
#
# Logs and JSON go to $OUT when set (the device tool returns that folder), else to /tmp/flashserve_gpu_check.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-/tmp/flashserve_gpu_check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
# compute-sanitizer (tests/gpu sanitizer cases) lives beside nvcc; not every image puts it on PATH.
for d in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do [ -d "$d" ] && export PATH="$PATH:$d"; done
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0

echo "== gpu_check $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
echo "   HEADDIMS=${FLASHSERVE_HEADDIMS:-all} DTYPES=${FLASHSERVE_DTYPES:-all} ARCHS=${FLASHSERVE_ARCHS:-80,90a}"

if ls .device_wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install --quiet --no-deps --no-index .device_wheels/*.whl || echo "carried wheels did not install"
fi

if [ "${GPU_CHECK_SKIP_BUILD:-0}" != "1" ]; then
  t0=$(date +%s)
  if ! FLASHSERVE_BUILD_EXT=1 python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT_DIR/build.log" 2>&1; then
    echo "BUILD FAILED (last lines of $OUT_DIR/build.log):"
    grep -E "error|Error" "$OUT_DIR/build.log" | head -30
    tail -30 "$OUT_DIR/build.log"
    exit 1
  fi
  echo "build: $(( $(date +%s) - t0 )) s"
fi
python3 -c "from flashserve import _C; print('compiled:', _C.compiled_configs())" || exit 1

if [ "${GPU_CHECK_DEMO:-1}" = "1" ]; then
  flashserve demo 2>&1 | tee "$OUT_DIR/demo.log" | tail -12
  [ "${PIPESTATUS[0]}" = "0" ] || status=1
fi

# GPU_CHECK_TESTS is split as a shell command line would be, so a quoted -k expression stays one argument.
eval "test_args=(${GPU_CHECK_TESTS:-tests/gpu})"
# shellcheck disable=SC2046
python3 -m pytest -q -rs -p no:cacheprovider --confcutdir=tests/gpu --continue-on-collection-errors $(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=1500) "${test_args[@]}" \
  2>&1 | tee "$OUT_DIR/tests.log" | grep -vE "^\s*$" | tail -40
[ "${PIPESTATUS[0]}" = "0" ] || status=1

# shellcheck disable=SC2086
case "${GPU_CHECK_BENCH:-full}" in
  none) ;;
  quick) python3 bench/kernels.py --quick ${GPU_CHECK_BENCH_ARGS:-} --json "$OUT_DIR/kernels.json" --md "$OUT_DIR/kernels.md" \
           >"$OUT_DIR/bench.out" 2>"$OUT_DIR/bench.log" || status=1 ;;
  *) python3 bench/kernels.py ${GPU_CHECK_BENCH_ARGS:-} --json "$OUT_DIR/kernels.json" --md "$OUT_DIR/kernels.md" \
       >"$OUT_DIR/bench.out" 2>"$OUT_DIR/bench.log" || status=1 ;;
esac
case "${GPU_CHECK_SERVICE:-none}" in
  none) ;;
  quick) python3 bench/service.py --quick --device cuda --out "$OUT_DIR" >"$OUT_DIR/service.out" 2>&1 || status=1 ;;
  wire) python3 bench/service.py --device cuda --skip-batching --sizes 16,32,64,128,256 --out "$OUT_DIR" \
          >"$OUT_DIR/service.out" 2>&1 || status=1 ;;
  batching)  # the full-service pair, then the GPU process alone (bench/engine_pipeline.py --real)
    python3 bench/service.py --device cuda --batching-only --server-args "${GPU_CHECK_SERVER_ARGS:---frontends 4}" \
      --out "$OUT_DIR" >"$OUT_DIR/service.out" 2>&1 || status=1
    python3 bench/engine_pipeline.py --real --seconds 4 --rounds 2 >>"$OUT_DIR/service.out" 2>&1 || status=1 ;;
  *) python3 bench/service.py --device cuda --out "$OUT_DIR" >"$OUT_DIR/service.out" 2>&1 || status=1 ;;
esac
[ -s "$OUT_DIR/service.out" ] && tail -45 "$OUT_DIR/service.out"
[ -s "$OUT_DIR/bench.log" ] && grep -iE "error|traceback" -A3 "$OUT_DIR/bench.log" | head -20
echo "== tests: $(grep -E '(passed|failed|error)' "$OUT_DIR/tests.log" | tail -1)"
[ -s "$OUT_DIR/kernels.md" ] && cat "$OUT_DIR/kernels.md"
# The device tool brings back only a few files per call: keep the tables (md, json), pack the logs into one.
if [ -n "${OUT:-}" ]; then
  (cd "$OUT_DIR" && ls ./*.log ./*.out >/dev/null 2>&1 && tar -czf logs.tgz --remove-files ./*.log ./*.out)
fi
exit $status
