#!/usr/bin/env bash
# bench/lm/device-run-fid.sh OUT_DIR: the fidelity table on the GPU host with the current
# index defaults: ratd mode of the decoder on the GPU (--device cuda, training lists from
# the GPU) over the top_k sweep, then --repeat 3 with full, window and ratd (k 500).
set -uo pipefail
out=${1:?usage: device-run-fid.sh OUT_DIR}
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
git log -1 --format=%H >"$out/commit.txt" 2>/dev/null
E=$b/bench/ratd-lm-eval
M="--model bench/models/kjv-byte-llama --text bench/data/heldout-kjv.txt --context 15360 --eval 1024 --device cuda"
timeout 280 $E $M --mode full,window,ratd --topk 100,250,500,1000,2000 --ratd $b/daemon/ratd \
  >"$out/sweep.txt" 2>"$out/sweep.log"; echo "sweep rc=$?"; cat "$out/sweep.txt"
timeout 90 $E $M --mode full,window,ratd --topk 500 --repeat 3 --ratd $b/daemon/ratd \
  >"$out/repeat.txt" 2>"$out/repeat.log"; echo "repeat rc=$?"; cat "$out/repeat.txt"
for eff in 750; do # candidate list L 1.5 k (the old default) against the default 2 k
  timeout 100 $E $M --mode ratd --topk 500 --effort $eff --ratd $b/daemon/ratd \
    >"$out/effort$eff.txt" 2>"$out/effort$eff.log"; echo "effort $eff rc=$?"; cat "$out/effort$eff.txt"
done
