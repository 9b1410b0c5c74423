#!/usr/bin/env bash
# bench/index/device-run-build.sh OUT_DIR: the CPU graph build of one head on the GPU
# host's 16 cores (issue 12 item 4), the key->key linking walks (RA_GRAPH_KK=0) against
# the key->key lists from the search codes on AMX (the default there), same binary, runs
# interleaved: build wall / CPU seconds per phase (--verbose) and recall@100 at fixed
# efforts. Then ratd-bench-graph (CUDA build): the GPU graph against ratd's CPU build of
# the same head (16K training queries, as the issue measures it), its cpu_build_s, and
# the index and graph unit tests (the AMX kernel runs only where the CPU has it).
# RA_BUILD_SCALE=1 adds 262K and 524K keys (where the all-pairs lists stop: G_KK_MAX_N).
set -uo pipefail
out=${1:?usage: device-run-build.sh OUT_DIR}
mkdir -p "$out"
. bench/device-env.sh
b=build-cu
ra_cuda_build "$out" $b ratd-bench-index ratd-bench-graph ratd ratd-bench-decode test_index_kernels \
  test_graph || exit 1
{ lscpu | grep -E "Model name|L2|L3|Thread|Core"; grep -o -w 'avx512_vnni\|amx_int8' /proc/cpuinfo | sort -u; git log -1 --format=%H; } >>"$out/machine.txt" 2>&1
cat "$out/machine.txt"
el built
(cd $b && timeout 120 ./tests/index/test_index_kernels >"$out/test_kernels.log" 2>&1; echo "kernels rc=$?";
 timeout 300 ./tests/graph/test_graph >"$out/test_graph.log" 2>&1; echo "graph rc=$?")
grep -E "amx|PASSED|FAILED" "$out/test_kernels.log" | head -4; grep -E "PASSED|FAILED|walks:|by code:|code lists" "$out/test_graph.log"
el tests
B="$b/bench/ratd-bench-index --synthetic --dim 128 --topk 100 --dtype bf16 --index graph --insert 0 --threads 16 --verbose"
run() { # name env... -- args...
  local name=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  env "${envs[@]}" RA_LOG_LEVEL=debug timeout 200 $B "$@" >"$out/$name.txt" 2>"$out/$name.log"
  echo "$name rc=$? $(grep -o 'built [0-9]* keys from [0-9]* queries on [0-9]* threads in [0-9.]* s (cpu [0-9.]* s)' "$out/$name.log")"
  grep -E "^graph +effort=[0-9]+ " "$out/$name.txt" | sed 's/  build.*//'
}
for rep in 1 2; do
  run cal-walks-$rep RA_GRAPH_KK=0 -- --n 131072 --queries 200 --efforts 100,200,300
  run cal-kk-$rep RA_GRAPH_KK=-1 -- --n 131072 --queries 200 --efforts 100,200,300
  run lin-walks-$rep RA_GRAPH_KK=0 -- --gen lin --group 4 --n 131072 --queries 100 --efforts 100,200,300
  run lin-kk-$rep RA_GRAPH_KK=-1 -- --gen lin --group 4 --n 131072 --queries 100 --efforts 100,200,300
  el "rep $rep"
done
if [ "${RA_BUILD_SCALE:-0}" = 1 ]; then
  for n in 262144 524288; do
    run cal$n-walks RA_GRAPH_KK=0 -- --n $n --queries 100 --efforts 300
    run cal$n-kk RA_GRAPH_KK=-1 -- --n $n --queries 100 --efforts 300
  done
  el scale
fi
timeout 200 $b/bench/ratd-bench-graph --heads 1 --json "$out/graph1.json" >"$out/graph1.log" 2>&1
echo "ratd-bench-graph rc=$?"; grep -v '^\[' "$out/graph1.json" | head -3
# the daemon's own (CPU) builds of a 2-layer 128K session, then decode through them:
# index ready after the last Offload (build_s), recall, Attend p50 (RA_BUILD_DECODE=0: skip)
if [ "${RA_BUILD_DECODE:-1}" = 1 ]; then
  D="$b/bench/ratd-bench-decode --ratd $b/daemon/ratd --json --steps 100 --context 131072 --layers 2"
  for mode in 0 -1; do
    RA_GRAPH_KK=$mode timeout 240 $D >"$out/decode-kk$mode.json" 2>"$out/decode-kk$mode.log"
    echo "decode RA_GRAPH_KK=$mode rc=$?"
    grep -oE '"(build_s|recall_mean|recall_p10|attend_us_p50|work_us_p50)": [0-9.e+-]+' "$out/decode-kk$mode.json" | tr '\n' ' '; echo
  done
  el decode
fi
el done
