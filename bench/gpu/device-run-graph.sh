#!/usr/bin/env bash
# bench/gpu/device-run-graph.sh OUT_DIR: the GPU graph build on a CUDA machine in one go
# (bench/README.md "GPU graph build"): Release build for sm_90 of gpu/, index/, the graph
# tests and bench (and ratd + ratd-bench-decode, for a --gpu-build decode run after it in
# /tmp/build-graph), test_gpu_graph (CUDA against the CPU reference, build_heads, ties)
# and test_gpu_cuda, compute-sanitizer memchecks of two small builds (3,000 keys: every
# score a top-k candidate; 9,000: the sampled threshold) and a racecheck, then ratd-bench-graph at the
# Llama-3-8B shape at 128K (8 KV heads x 131072 keys, dim 128, 4 x 4096 training queries
# per KV head, one head after the other and then in one ra_gpu_graph_build_heads call)
# with the CPU index build of one head on every core; then two heads with the GEMM tiles
# instead of the MMA top-k (RA_GPU_MMA_TOPK=0), for the comparison, and the MMA top-k's
# phases; RA_GRAPH_AB runs of 4 heads with one setting each; with RA_GRAPH_1M=1 one layer
# at 1M keys.
set -uo pipefail
out=${1:?usage: device-run-graph.sh OUT_DIR}
mkdir -p "$out"
. bench/device-env.sh
b=/tmp/build-graph
ra_cuda_build "$out" $b test_gpu_graph test_gpu_cuda ratd-bench-graph ratd ratd-bench-decode || exit 1
echo built
timeout 120 $b/tests/gpu/test_gpu_graph cuda >"$out/test_gpu_graph_cuda.log" 2>&1
echo "test_gpu_graph cuda rc=$?"; grep -vE "^\[ (RUN|  ) " "$out/test_gpu_graph_cuda.log" | head -30
# the symmetric key->key filter (the default from 512K keys) on the tests' smaller heads
RA_GPU_MMA_SYM=1 timeout 120 $b/tests/gpu/test_gpu_graph cuda >"$out/test_gpu_graph_cuda_sym.log" 2>&1
echo "test_gpu_graph cuda RA_GPU_MMA_SYM=1 rc=$?"; grep -E "PASSED|FAILED|edges of" "$out/test_gpu_graph_cuda_sym.log"
timeout 60 $b/tests/gpu/test_gpu_cuda >"$out/test_gpu_cuda.log" 2>&1
echo "test_gpu_cuda rc=$?"; tail -3 "$out/test_gpu_cuda.log"
if command -v compute-sanitizer >/dev/null; then
  # 3000 keys: every score of a row is a top-k candidate; 9000: the sampled threshold
  timeout 60 compute-sanitizer --tool memcheck $b/bench/ratd-bench-graph --keys 3000 --heads 1 \
    --group 2 --train 300 --queries 5 --no-cpu-build >"$out/memcheck.log" 2>&1
  echo "memcheck rc=$?: $(grep -E 'ERROR SUMMARY' "$out/memcheck.log" | tail -1)"
  timeout 150 compute-sanitizer --tool memcheck $b/bench/ratd-bench-graph --keys 9000 --heads 2 \
    --group 1 --train 200 --queries 5 --no-cpu-build >"$out/memcheck9k.log" 2>&1
  echo "memcheck 9000 keys rc=$?: $(grep -E 'ERROR SUMMARY' "$out/memcheck9k.log" | tail -1)"
  # shared-memory races (it found rev_kernel's missing barrier; cuBLAS's own kernels report
  # hazards of their own, which are not ours)
  # (4,500 keys: the MMA top-k path of cuda_mma_topk.h, which needs 4,096)
  timeout 240 compute-sanitizer --tool racecheck $b/bench/ratd-bench-graph --keys 4500 --heads 1 \
    --group 1 --train 150 --queries 5 --no-cpu-build >"$out/racecheck.log" 2>&1
  echo "racecheck rc=$?: $(grep -E 'RACECHECK SUMMARY' "$out/racecheck.log" | tail -1)"
  grep -E "Race reported" "$out/racecheck.log" | grep -v nvjet | head -3
fi
timeout 200 $b/bench/ratd-bench-graph --json "$out/graph128k.json" 2>&1 | tee "$out/graph128k.log"
# the same without the MMA top-k (RA_GPU_MMA_TOPK=0: GEMM tiles + topk_kernel), two heads
RA_GPU_MMA_TOPK=0 timeout 120 $b/bench/ratd-bench-graph --heads 2 --no-cpu-build \
  --json "$out/graph128k-tiles.json" 2>&1 | tee "$out/graph128k-tiles.log"
# the phases of the MMA top-k (RA_GPU_MMA_PROFILE=1 synchronises: not for the timings above)
RA_GPU_MMA_PROFILE=1 timeout 60 $b/bench/ratd-bench-graph --heads 1 --no-cpu-build 2>&1 |
  grep -E "mma top-k|cuda build" | tee "$out/graph128k-profile.log"
# RA_GRAPH_AB="VAR=value ...": each a run of 4 heads with that one setting, for A/B against
# the default (e.g. RA_GPU_MMA_PRUNE=0, RA_GPU_MMA_RANK=65, RA_GPU_MMA_SYM=0)
for v in ${RA_GRAPH_AB:-}; do
  env "$v" timeout 120 $b/bench/ratd-bench-graph --heads 4 --no-cpu-build \
    --json "$out/graph128k-ab-${v//=/-}.json" 2>&1 | tee "$out/graph128k-ab-${v//=/-}.log"
done
[ -n "${RA_GRAPH_AB:-}" ] && timeout 120 $b/bench/ratd-bench-graph --heads 4 --no-cpu-build \
  --json "$out/graph128k-ab-default.json" 2>&1 | tee "$out/graph128k-ab-default.log"
# RA_GRAPH_1M=1: one layer of 8 heads at 1,048,576 keys (issue 12's 1M target), no CPU build
if [ "${RA_GRAPH_1M:-0}" = 1 ]; then
  timeout 400 $b/bench/ratd-bench-graph --keys 1048576 --no-cpu-build --json "$out/graph1m.json" \
    2>&1 | tee "$out/graph1m.log"
fi
