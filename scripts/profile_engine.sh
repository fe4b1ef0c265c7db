#!/usr/bin/env bash
# Profile the GPU process of `serve --frontends N` under the batching benchmark's load (py-spy, GIL holders only).
# Usage: OUT=dir scripts/profile_engine.sh "extra serve flags" tag
set -u
extra=$1; tag=$2
python3 -m pip install --quiet --no-deps --no-index .device_wheels/py_spy*.whl 2>/dev/null
flashserve serve --port 0 --frontends 8 --allow-shm --backend auto --device cuda --log-level WARNING $extra > $OUT/serve_$tag.log 2>&1 &
spid=$!
for i in $(seq 1 120); do grep -q 'front ends on' $OUT/serve_$tag.log && break; sleep 0.5; done
sleep 3
port=$(grep -o 'front ends on 127.0.0.1:[0-9]*' $OUT/serve_$tag.log | cut -d: -f2)
timeout 60 flashserve bench 127.0.0.1:$port --tokens 512 --heads 16 --head-dim 64 --dtype bfloat16 --transport shm \
  --concurrency 64 --processes 8 --duration 20 --no-progress > $OUT/bench_$tag.out 2>&1 &
bpid=$!
sleep 8
py-spy record --pid $spid --duration 10 --rate 250 --format raw --threads --gil -o $OUT/gil_$tag.raw > /dev/null 2>&1
py-spy record --pid $spid --duration 5 --rate 250 --format raw --threads -o $OUT/all_$tag.raw > /dev/null 2>&1
wait $bpid
kill -TERM $spid; wait $spid
grep -E "^\| 64 " $OUT/bench_$tag.out | head -1  # the load's table row (req/s while profiled)
