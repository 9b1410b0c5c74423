#!/usr/bin/env bash
# bench/decode/device-run-trace.sh OUT_DIR: the GPU-built graph against ratd's CPU build
# on real heads (issue 12), on the GPU host. Builds ratd, ratd-lm-eval and
# ratd-bench-decode with CUDA, dumps the traces of both models with a GPU prefill
#   kjv16k   bench/models/kjv-byte-llama over 16,383 bytes of bench/data/heldout-kjv.txt
#   sql128k  bench/models/kjv-byte-llama-128k over 131,071 bytes of heldout-sqlite.txt
# and replays each through ratd-bench-decode twice: graphs built by the daemon on the
# CPU, then built here on the GPU and sent in the Offload (--gpu-build). One JSON per
# run in OUT_DIR: TRACE-cpu.json, TRACE-gpu.json. RA_RUN_TIMEOUT: seconds per run (200).
set -uo pipefail
out=${1:?usage: device-run-trace.sh OUT_DIR}
mkdir -p "$out"
T0=$(date +%s)
el() { echo "[$(($(date +%s) - T0)) s] $*"; }
. bench/device-env.sh
b=/tmp/build-trace
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=ON -DRA_CUDA_ARCHS=90 -DBUILD_TESTING=OFF \
  "${RA_DEPS_CMAKE[@]}" >"$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
timeout 400 cmake --build $b -j"$(nproc)" --target ratd ratd-bench-decode ratd-lm-eval >"$out/build.log" 2>&1 ||
  { grep -E "error|Error" "$out/build.log" | head -30; exit 1; }
el built
trace() { local name=$1 model=$2 text=$3 ctx=$4
  timeout 300 $b/bench/ratd-lm-eval --device cuda --model "$model" --text "$text" --context "$ctx" \
    --eval 1 --mode full --dump-trace /tmp/$name.trace --trace-dtype f16 --quiet --json \
    >"$out/$name-trace.json" 2>"$out/$name-trace.log"
  echo "$name trace rc=$? $(ls -la /tmp/$name.trace 2>&1 | awk '{print $5}') bytes"
  el "$name trace"; }
run() { local name=$1 tr=$2; shift 2
  timeout "${RA_RUN_TIMEOUT:-200}" $b/bench/ratd-bench-decode --ratd $b/daemon/ratd --json --steps 200 \
    --trace /tmp/$tr.trace "$@" >"$out/$name.json" 2>"$out/$name.log"
  echo "$name rc=$?"
  python3 bench/decode/summary.py "$out/$name.json" || tail -3 "$out/$name.log"
  el "$name"; }
trace kjv16k bench/models/kjv-byte-llama bench/data/heldout-kjv.txt 16383
trace sql128k bench/models/kjv-byte-llama-128k bench/data/heldout-sqlite.txt 131071
for t in kjv16k sql128k; do
  [ -s /tmp/$t.trace ] || continue
  run $t-cpu $t
  run $t-gpu $t --gpu-build
done
