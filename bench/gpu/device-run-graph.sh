#!/usr/bin/env bash
# bench/gpu/device-run-graph.sh OUT_DIR: the GPU graph build on a CUDA machine in one go
# (bench/README.md "GPU graph build"): Release build for sm_90 of gpu/, index/ and the
# graph tests and bench, test_gpu_graph (CUDA against the CPU reference) and
# test_gpu_cuda, a compute-sanitizer memcheck of a small build, then ratd-bench-graph at
# the Llama-3-8B shape at 128K (8 KV heads x 131072 keys, dim 128, 4 x 4096 training
# queries per KV head) with the CPU index build of one head on every core.
set -uo pipefail
out=${1:?usage: device-run-graph.sh OUT_DIR}
mkdir -p "$out"
. bench/device-env.sh
b=/tmp/build-graph
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; } >"$out/machine.txt" 2>&1
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=ON -DRA_CUDA_ARCHS=90 "${RA_DEPS_CMAKE[@]}" \
  >"$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build $b -j"$(nproc)" --target test_gpu_graph test_gpu_cuda ratd-bench-graph \
  >"$out/build.log" 2>&1 || { grep -E "error|Error" "$out/build.log" | head -30; exit 1; }
echo built
timeout 120 $b/tests/gpu/test_gpu_graph cuda >"$out/test_gpu_graph_cuda.log" 2>&1
echo "test_gpu_graph cuda rc=$?"; grep -vE "^\[ (RUN|  ) " "$out/test_gpu_graph_cuda.log" | head -30
timeout 60 $b/tests/gpu/test_gpu_cuda >"$out/test_gpu_cuda.log" 2>&1
echo "test_gpu_cuda rc=$?"; tail -3 "$out/test_gpu_cuda.log"
if command -v compute-sanitizer >/dev/null; then
  timeout 60 compute-sanitizer --tool memcheck $b/bench/ratd-bench-graph --keys 3000 --heads 1 \
    --group 2 --train 300 --queries 5 --no-cpu-build >"$out/memcheck.log" 2>&1
  echo "memcheck rc=$?: $(grep -E 'ERROR SUMMARY' "$out/memcheck.log" | tail -1)"
fi
timeout 200 $b/bench/ratd-bench-graph --json "$out/graph128k.json" 2>&1 | tee "$out/graph128k.log"
