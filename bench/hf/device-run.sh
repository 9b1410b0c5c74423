#!/usr/bin/env bash
# bench/hf/device-run.sh OUT_DIR: the Python package and its transformers integration on
# the GPU host (torch + transformers there, no package access; the project's C deps come
# as .dev/deps/prefix.tar.xz, as for bench/lm/device-run-lm.sh). Release build of ratd and
# libratd-client (no CUDA needed: the Python side does the device work in torch); the
# Python tests that need a GPU or transformers (test_hf: the model through
# attn_implementation 'ratd' against 'sdpa'; test_torch: CUDA tensors; test_hf_core and
# test_binding as a check of the host); then bench_hf.py: held-out KJV, context 15,360,
# eval 1,024, bf16, sdpa vs ratd (k 500, graph index, builds waited for), teacher-forced
# and generate() of 256 bytes; then --repeat 3. Logs, JSON and tables land in OUT_DIR.
# PYTHON (default python3) must have torch, transformers >= 4.56, numpy and pytest.
# RA_HF_TESTS_ONLY=1: the tests, not the benchmarks.
set -uo pipefail
out=${1:?usage: device-run.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; lscpu | grep "Model name"
  $PY -c "import sys, torch, transformers, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
  $PY -c "import pytest; print('pytest', pytest.__version__)"; git log -1 --format=%H; } >"$out/machine.txt" 2>&1
cat "$out/machine.txt"
. bench/device-env.sh
b=build-hf
if ! cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=OFF -DBUILD_TESTING=OFF -DRA_PYTHON="$(command -v $PY)" \
    "${RA_DEPS_CMAKE[@]}" >"$out/configure.log" 2>&1; then
  tail -30 "$out/configure.log"; exit 1
fi
if ! timeout 300 cmake --build $b -j"$(nproc)" --target ratd ratd-client >"$out/build.log" 2>&1; then
  grep -E "error|Error" "$out/build.log" | head -30; exit 1
fi
el "built"
export RA_SOURCE_DIR=$PWD RA_BINARY_DIR=$PWD/$b RATD_BIN=$PWD/$b/daemon/ratd RATD_LIB_DIR=$PWD/$b/client
export PYTHONPATH=$PWD/client/python PYTHONDONTWRITEBYTECODE=1
if $PY -c "import pytest" 2>/dev/null; then
  timeout 420 $PY -m pytest -q -rs -p no:cacheprovider tests/client/python/test_hf.py tests/client/python/test_torch.py \
    tests/client/python/test_hf_core.py tests/client/python/test_binding.py tests/client/python/test_merge.py \
    >"$out/tests.log" 2>&1
  echo "tests rc=$?"; tail -25 "$out/tests.log"
else
  echo "pytest is missing for $PY: tests not run (bench only)" | tee "$out/tests.log"
fi
el "tests done"
[ -n "${RA_HF_TESTS_ONLY:-}" ] && exit 0 # the tests alone (a check after a change)
B="$PY bench/hf/bench_hf.py --model bench/models/kjv-byte-llama --text bench/data/heldout-kjv.txt --context 15360 --eval 1024 --ratd $RATD_BIN"
timeout 600 $B --json "$out/bench.json" >"$out/bench.txt" 2>"$out/bench.log"
echo "bench rc=$?"; cat "$out/bench.txt"; tail -3 "$out/bench.log"
el "bench done"
timeout 420 $B --repeat 3 --gen 0 --json "$out/repeat.json" >"$out/repeat.txt" 2>"$out/repeat.log"
echo "repeat rc=$?"; cat "$out/repeat.txt"; tail -3 "$out/repeat.log"
el "repeat done"
