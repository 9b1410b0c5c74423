#!/usr/bin/env bash
# bench/decode/device-run-ab.sh OUT_DIR OLD_SRC: the 128K decode figure of two versions in
# one run on the GPU host, so that a change is told from the host's variance: OLD_SRC is
# a source tree of the baseline (e.g. `git archive REV | tar x -C .dev/old-src`, without
# bench/models), built beside this one. Then this tree's `--gpu-build` (graphs built by
# the CUDA backend, sent in the Offload). One JSON per run in OUT_DIR: old, new, gpubuild.
set -uo pipefail
out=${1:?usage: device-run-ab.sh OUT_DIR OLD_SRC}
old=${2:?usage: device-run-ab.sh OUT_DIR OLD_SRC}
mkdir -p "$out"
T0=$(date +%s)
el() { echo "[$(($(date +%s) - T0)) s] $*"; }
. bench/device-env.sh
b=/tmp/build-new o=/tmp/build-old
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=ON -DRA_CUDA_ARCHS=90 -DBUILD_TESTING=OFF \
  "${RA_DEPS_CMAKE[@]}" >"$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake -S "$old" -B $o -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=OFF -DBUILD_TESTING=OFF \
  "${RA_DEPS_CMAKE[@]}" >"$out/configure-old.log" 2>&1 || { tail -30 "$out/configure-old.log"; exit 1; }
n=$(nproc)
timeout 300 cmake --build $o -j$((n / 2)) --target ratd ratd-bench-decode >"$out/build-old.log" 2>&1 &
timeout 300 cmake --build $b -j$((n / 2)) --target ratd ratd-bench-decode >"$out/build.log" 2>&1 ||
  { grep -E "error|Error" "$out/build.log" | head -30; exit 1; }
wait || { grep -E "error|Error" "$out/build-old.log" | head -30; exit 1; }
el built
A=(--json --steps 200 --context 131072 --layers 2)
run() { local name=$1 dir=$2; shift 2
  timeout "${RA_RUN_TIMEOUT:-150}" $dir/bench/ratd-bench-decode --ratd $dir/daemon/ratd "${A[@]}" "$@" \
    >"$out/$name.json" 2>"$out/$name.log"
  echo "$name rc=$?"
  python3 - "$out/$name.json" <<'PY' || tail -3 "$out/$name.log"
import json, sys
d = json.load(open(sys.argv[1]))
keys = ["build_s", "gpu_build_s", "attend_us_p50", "attend_us_p99", "rtt_us_p50", "server_us_p50",
        "work_us_p50", "append_us_p50", "recall_mean", "recall_p10", "mass_mean", "lse_mismatch"]
print(" ".join("%s=%s" % (k, d.get(k)) for k in keys))
PY
  el "$name"; }
run old $o
run new $b
run gpubuild $b --gpu-build
