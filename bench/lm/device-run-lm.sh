#!/usr/bin/env bash
# bench/lm/device-run-lm.sh OUT_DIR: the decoder-on-the-GPU session in one command on a
# CUDA machine without package access (the project's deps come as .dev/deps/prefix.tar.xz,
# made by /work/shared/tools/pack-deps.sh): Release build for sm_90 of ratd-lm-eval, ratd
# and the gpu tests; test_gpu_lm (GPU decoder vs CPU decoder on the real model); then
# ratd-lm-eval --device cuda at context $CTX (15360), eval $EVAL (1024): full and window,
# then ratd (top_k 500, graph index, a private ratd on the machine's CPUs). Logs and
# JSON results land in OUT_DIR.
set -uo pipefail
out=${1:?usage: device-run-lm.sh OUT_DIR}
CTX=${CTX:-15360} EVAL=${EVAL:-1024}
mkdir -p "$out"
. bench/device-env.sh
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2; nproc;
  lscpu | grep "Model name"; } >"$out/machine.txt" 2>&1
b=build-dev
if ! cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=ON -DRA_CUDA_ARCHS=90 -DCMAKE_PREFIX_PATH=$P \
    -DCMAKE_LIBRARY_PATH=$P/lib/x86_64-linux-gnu -DRA_FAISS_C_LIB=$P/lib/x86_64-linux-gnu/libfaiss_c.a \
    >"$out/configure.log" 2>&1; then
  tail -30 "$out/configure.log"; exit 1
fi
if ! timeout 200 cmake --build $b -j"$(nproc)" --target ratd-lm-eval ratd test_gpu_lm >"$out/build.log" 2>&1; then
  grep -E "error|Error" "$out/build.log" | head -30; exit 1
fi
el "built"
(cd $b && timeout 60 ctest -R '^test_gpu_lm$' -V) >"$out/ctest.log" 2>&1
grep -E "# (prefill|full|window)|PASSED|FAILED|SKIPPED|tests passed|Failed" "$out/ctest.log"
el "tests done"
E=$b/bench/ratd-lm-eval
M="--model bench/models/kjv-byte-llama --text bench/data/heldout-kjv.txt --context $CTX --eval $EVAL"
timeout 90 $E $M --device cuda --mode full,window >"$out/eval-fw.txt" 2>"$out/eval-fw.log"
echo "rc=$?"; cat "$out/eval-fw.txt"; tail -3 "$out/eval-fw.log"
el "full/window done"
# what is left of BUDGET (s, default 400) goes to ratd mode; the index builds may take
# all but a minute of it
left=$((${BUDGET:-400} - $(date +%s) + T0))
el "ratd mode gets $left s"
timeout $left $E $M --device cuda --mode ratd --topk 500 --ratd $b/daemon/ratd \
  --wait-index $(((left > 90 ? left - 60 : 30) * 1000)) >"$out/eval-ratd.txt" 2>"$out/eval-ratd.log"
echo "rc=$?"; cat "$out/eval-ratd.txt"; grep -v "tokens, bpb so far" "$out/eval-ratd.log" | tail -6
el "ratd done"
