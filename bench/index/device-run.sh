#!/usr/bin/env bash
# bench/index/device-run.sh OUT_DIR: the index benchmark on a machine with more cores
# than the 2-vCPU development box (the GPU host: 16 Xeon cores with AVX-512): Release
# build of ratd-bench-index, then (1) the synthetic 131K head with every index in one
# run, (2) graph build scaling over N = 32K, 128K, 512K. JSON lines land in OUT_DIR.
set -uo pipefail
out=${1:?usage: device-run.sh OUT_DIR [CMAKE_ARGS...]}
shift
mkdir -p "$out"
j=$(nproc)
{ nproc; lscpu | grep -E "Model name|Flags" | cut -c1-200; git log -1 --format=%H; } >"$out/machine.txt"
cmake -S . -B build-idx -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=OFF -DBUILD_TESTING=OFF "$@" \
  >"$out/configure.log" 2>&1 && cmake --build build-idx -j"$j" --target ratd-bench-index \
  >"$out/build.log" 2>&1 || { tail -30 "$out/configure.log" "$out/build.log"; exit 1; }
b=build-idx/bench/ratd-bench-index
echo "== synthetic 131072 x 128, top-100, every index, one run =="
timeout 330 $b --synthetic --n 131072 --dim 128 --topk 100 --queries 200 --json \
  >"$out/synth131k.json" 2>"$out/synth131k.log"; echo "rc $?"
echo "== graph build scaling =="
for n in 32768 131072 524288; do
  timeout 120 $b --synthetic --n $n --dim 128 --topk 100 --queries 100 --index graph --insert 0 \
    --efforts 200 --json >"$out/scale$n.json" 2>>"$out/scale.log"; echo "n=$n rc $?"
done
