#!/usr/bin/env bash
# bench/index/device-run-search.sh OUT_DIR: the graph search on the GPU host's CPU (16
# Xeon cores with AVX-512 VNNI): Release build of the index benchmark and the index unit
# tests (the AVX-512 and VNNI kernels run only there), then recall / keys scanned / time
# per query of the graph at 131K and 1M keys on both synthetic generators (calibrated:
# one query stream; lin: GQA groups of 4, group walks against independent searches).
set -uo pipefail
out=${1:?usage: device-run-search.sh OUT_DIR}
mkdir -p "$out"
{ nproc; lscpu | grep -E "Model name|L3|NUMA"; grep -o -w 'avx512vnni\|amx_int8' /proc/cpuinfo | sort -u; git log -1 --format=%H; } >"$out/machine.txt" 2>&1
cat "$out/machine.txt"
. bench/device-env.sh
b=build-dev
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=OFF "${RA_DEPS_CMAKE[@]}" >"$out/configure.log" 2>&1 ||
  { tail -30 "$out/configure.log"; exit 1; }
timeout 300 cmake --build $b -j"$(nproc)" --target ratd-bench-index test_index_kernels test_index_head test_graph \
  >"$out/build.log" 2>&1 || { grep -E "error|Error" "$out/build.log" | head -30; exit 1; }
el built
(cd $b && timeout 120 ./tests/index/test_index_kernels >"$out/test_kernels.log" 2>&1; echo "kernels rc=$?";
 timeout 120 ./tests/index/test_index_head >"$out/test_head.log" 2>&1; echo "head rc=$?")
grep -E "PASSED|FAILED|SKIPPED|best ISA" "$out/test_kernels.log" | head; grep -E "PASSED|FAILED|group walk" "$out/test_head.log"
el tests
B="$b/bench/ratd-bench-index --dim 128 --topk 100 --index graph --insert 0 --dtype bf16 --json"
run() { local name=$1; shift; timeout 240 $B "$@" >"$out/$name.json" 2>"$out/$name.log"; echo "$name rc=$?";
        grep -v '"data"' "$out/$name.json" | sed 's/"build_s".*//'; el "$name"; }
run cal131k --synthetic --n 131072 --queries 200 --efforts 200,300,400,600
run lin131k --gen lin --group 4 --n 131072 --queries 100 --efforts 150,200,300,400
run lin1m --gen lin --group 4 --n 1048576 --queries 100 --efforts 200,300,400,600
run cal1m --synthetic --n 1048576 --queries 200 --efforts 300,400,600,800,1200
