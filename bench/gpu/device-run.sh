#!/usr/bin/env bash
# bench/gpu/device-run.sh OUT_DIR [CMAKE_ARGS...]: what gpu/ runs on a GPU machine in one
# go — Release build for sm_90 (the whole project; if that fails, gpu/ alone through a
# private harness in .dev/harness when present), the gpu and unit tests of gpu/, a
# compute-sanitizer memcheck pass over the small device tests, and ratd-bench-gpu
# (--json and the table). Logs and results land in OUT_DIR.
set -uo pipefail
out=${1:?usage: device-run.sh OUT_DIR [cmake args]}
shift
j=$(nproc)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
  >"$out/nvidia-smi.txt" 2>&1
nvcc --version | tail -2 >>"$out/nvidia-smi.txt"
b=build-dev
t0=$(date +%s)
if cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=ON -DRA_CUDA_ARCHS=90 "$@" \
    >"$out/configure.log" 2>&1 && cmake --build $b -j"$j" >"$out/build.log" 2>&1; then
  echo "full project build: ok ($(($(date +%s) - t0)) s)"
else
  echo "full project build: FAILED (see build.log / configure.log); errors:"
  grep -E "error|Error" "$out/configure.log" "$out/build.log" | head -20
fi
if [ ! -x $b/tests/gpu/test_gpu_cuda ] || [ ! -x $b/bench/ratd-bench-gpu ]; then
  if [ -f .dev/harness/CMakeLists.txt ]; then
    b=build-harness
    cmake -S .dev/harness -B $b -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=ON -DRA_CUDA_ARCHS=90 "$@" \
      >"$out/harness.log" 2>&1 &&
      cmake --build $b -j"$j" --target test_gpu_cpu test_gpu_cuda ratd-bench-gpu >>"$out/harness.log" 2>&1 ||
      { tail -30 "$out/harness.log"; exit 1; }
    echo "built gpu/ through the harness"
  else
    exit 1
  fi
fi
# trace data for test_gpu_cuda (real q, k, v of the in-repo model), when the decoder exists
if [ -x $b/bench/ratd-lm-eval ] && [ -d bench/models/kjv-byte-llama ]; then
  $b/bench/ratd-lm-eval --model bench/models/kjv-byte-llama --text bench/data/heldout-kjv.txt \
    --context 1024 --eval 8 --mode full --dump-trace /tmp/ra-gpu.trace --trace-dtype bf16 \
    --quiet >"$out/trace.log" 2>&1 && export RA_GPU_TRACE=/tmp/ra-gpu.trace
fi
(cd $b && ctest -R '^test_gpu' -V) >"$out/ctest.log" 2>&1
grep -E "max rel err|ids differ|trace|PASSED|FAILED|SKIPPED|tests passed|Failed|\*\*\*" "$out/ctest.log"
if command -v compute-sanitizer >/dev/null; then
  RA_TEST_SMALL=1 timeout 240 compute-sanitizer --tool memcheck --report-api-errors no \
    $b/tests/gpu/test_gpu_cuda >"$out/memcheck.log" 2>&1
  echo "memcheck rc=$?: $(grep -E 'ERROR SUMMARY' "$out/memcheck.log" | tail -1)"
fi
$b/bench/ratd-bench-gpu --json | tee "$out/bench.json"
if command -v ncu >/dev/null && [ "${RA_NCU:-1}" = 1 ]; then # device time of each kernel
  timeout 180 ncu --clock-control none -k regex:'step_kernel|merge_kernel' -s 2000 -c 12 \
    --metrics gpu__time_duration.sum $b/bench/ratd-bench-gpu --quick --no-knn --no-staging \
    >"$out/ncu.log" 2>&1
  echo "ncu rc=$?"; grep -E "step_kernel|merge_kernel|gpu__time_duration" "$out/ncu.log" | head -8
fi
