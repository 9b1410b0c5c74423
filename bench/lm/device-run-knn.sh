#!/usr/bin/env bash
# bench/lm/device-run-knn.sh OUT_DIR: ratd mode of the decoder on the GPU with the index
# training lists computed on the GPU (--gpu-knn 100, the default) against ratd computing
# them itself (--gpu-knn 0), same context, same daemon binary. Logs land in OUT_DIR.
set -uo pipefail
out=${1:?usage: device-run-knn.sh OUT_DIR}
CTX=${CTX:-15360} EVAL=${EVAL:-1024}
mkdir -p "$out"
D=/tmp/ra-deps
mkdir -p $D && tar xJf .dev/deps/prefix.tar.xz -C $D
P=$D/prefix/usr
export LD_LIBRARY_PATH=$P/lib/x86_64-linux-gnu:$P/lib/x86_64-linux-gnu/openblas-pthread:${LD_LIBRARY_PATH:-}
export PATH=$P/bin:$PATH PKG_CONFIG_PATH=$P/lib/x86_64-linux-gnu/pkgconfig PKG_CONFIG_SYSROOT_DIR=$D/prefix
b=build-dev
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=ON -DRA_CUDA_ARCHS=90 -DCMAKE_PREFIX_PATH=$P \
  -DCMAKE_LIBRARY_PATH=$P/lib/x86_64-linux-gnu -DRA_FAISS_C_LIB=$P/lib/x86_64-linux-gnu/libfaiss_c.a \
  -DBUILD_TESTING=OFF >"$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
timeout 200 cmake --build $b -j"$(nproc)" --target ratd-lm-eval ratd >"$out/build.log" 2>&1 ||
  { grep -E "error|Error" "$out/build.log" | head -30; exit 1; }
E=$b/bench/ratd-lm-eval
M="--model bench/models/kjv-byte-llama --text bench/data/heldout-kjv.txt --context $CTX --eval $EVAL"
for k in 100 0; do
  timeout 150 $E $M --device cuda --mode ratd --topk 500 --gpu-knn $k --ratd $b/daemon/ratd \
    --wait-index 120000 >"$out/knn$k.txt" 2>"$out/knn$k.log"
  echo "== --gpu-knn $k: rc=$?"; cat "$out/knn$k.txt"; grep -E "offload|error" "$out/knn$k.log"
done
