#!/usr/bin/env bash
# bench/device-run-session.sh OUT_DIR [RUN...]: a session's closing checks on the GPU host
# in one go: a Release build for sm_90, test_gpu_graph cuda and test_gpu_cuda, one head of
# 131K keys built by ratd's CPU build on every core and by the GPU (ratd-bench-graph
# --heads 1: the "CPU build of one head" line is issue 12's CPU figure; ratd-bench-index
# --verbose: the CPU build's phases), then decode runs
# of this tree at 128K (2 layers, 200 steps, as bench/decode/device-run-ab.sh), each RUN
# `new` with variants after a colon (ra_run_variants in bench/device-env.sh), e.g.
# new:g new:g-a128. RA_RUN_TIMEOUT: seconds per decode run (default 150).
set -uo pipefail
out=${1:?usage: device-run-session.sh OUT_DIR [RUN...]}
shift
mkdir -p "$out"
. bench/device-env.sh
b=/tmp/build-session
ra_cuda_build "$out" $b test_gpu_graph test_gpu_cuda ratd-bench-graph ratd-bench-index ratd ratd-bench-decode || exit 1
el built
timeout 120 $b/tests/gpu/test_gpu_graph cuda >"$out/test_gpu_graph_cuda.log" 2>&1
echo "test_gpu_graph cuda rc=$?: $(grep -E 'PASSED|FAILED' "$out/test_gpu_graph_cuda.log")"
timeout 60 $b/tests/gpu/test_gpu_cuda >"$out/test_gpu_cuda.log" 2>&1
echo "test_gpu_cuda rc=$?: $(grep -E 'PASSED|FAILED' "$out/test_gpu_cuda.log")"
timeout 150 $b/bench/ratd-bench-graph --heads 1 --json "$out/graph1.json" >"$out/graph1.log" 2>&1
echo "graph1 rc=$?"; grep -E "recall@100|cuda build:" "$out/graph1.log" | head -8
# the CPU build's phases on every core (ratd-bench-index --verbose)
timeout 150 $b/bench/ratd-bench-index --synthetic --n 131072 --dim 128 --topk 100 --queries 100 \
  --index graph --efforts 200,250,300 --verbose >"$out/index1.log" 2>&1
echo "index1 rc=$?"; grep -E "graph: built|effort=" "$out/index1.log" | head -8
el graph
for rv in "$@"; do
  ra_run_variants "$rv" || continue
  env "${RA_RUN_ENV[@]}" timeout "${RA_RUN_TIMEOUT:-150}" $b/bench/ratd-bench-decode \
    --ratd $b/daemon/ratd --json --steps 200 --context 131072 --layers 2 "${RA_RUN_ARGS[@]}" \
    >"$out/$RA_RUN_NAME.json" 2>"$out/$RA_RUN_NAME.log"
  echo "$RA_RUN_NAME rc=$?"
  python3 bench/decode/summary.py "$out/$RA_RUN_NAME.json" || tail -3 "$out/$RA_RUN_NAME.log"
  el "$RA_RUN_NAME"
done
