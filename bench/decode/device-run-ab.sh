#!/usr/bin/env bash
# bench/decode/device-run-ab.sh OUT_DIR OLD_SRC [RUN...]: the 128K decode figure of two
# versions in one run on the GPU host, so that a change is told from the host's variance:
# OLD_SRC is a source tree of the baseline (e.g. `git archive REV | tar x -C .dev/old-src`,
# without bench/models), built beside this one (both with CUDA). Each RUN is `old` or
# `new`, optionally with variants after a colon joined by '-' (ra_run_variants in
# bench/device-env.sh): g (graphs built on the GPU and sent in the Offload), wN (the
# daemon's workers), pN (its --spin-us), s (a sweep of efforts 200,250,300,350), b8/b4. Default runs: old new new:g. One JSON per run in
# OUT_DIR, named after it (new:g-w8 -> new-g-w8.json). RA_RUN_TIMEOUT: seconds per run.
set -uo pipefail
out=${1:?usage: device-run-ab.sh OUT_DIR OLD_SRC [RUN...]}
old=${2:?usage: device-run-ab.sh OUT_DIR OLD_SRC [RUN...]}
shift 2
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(old new new:g)
mkdir -p "$out"
. bench/device-env.sh
b=/tmp/build-new o=/tmp/build-old
C=(-DCMAKE_BUILD_TYPE=Release -DRA_CUDA=ON -DRA_CUDA_ARCHS=90 -DBUILD_TESTING=OFF "${RA_DEPS_CMAKE[@]}")
cmake -S . -B $b "${C[@]}" >"$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake -S "$old" -B $o "${C[@]}" >"$out/configure-old.log" 2>&1 || { tail -30 "$out/configure-old.log"; exit 1; }
n=$(nproc)
timeout 300 cmake --build $o -j$((n / 2)) --target ratd ratd-bench-decode >"$out/build-old.log" 2>&1 &
timeout 300 cmake --build $b -j$((n / 2)) --target ratd ratd-bench-decode >"$out/build.log" 2>&1 ||
  { grep -E "error|Error" "$out/build.log" | head -30; exit 1; }
wait || { grep -E "error|Error" "$out/build-old.log" | head -30; exit 1; }
el built
A=(--json --steps 200 --context 131072 --layers 2)
for rv in "${runs[@]}"; do
  ra_run_variants "$rv" || continue
  r=$RA_RUN name=$RA_RUN_NAME
  case $r in old) dir=$o ;; new) dir=$b ;; *) echo "unknown run $r"; continue ;; esac
  env "${RA_RUN_ENV[@]}" timeout "${RA_RUN_TIMEOUT:-150}" $dir/bench/ratd-bench-decode \
    --ratd $dir/daemon/ratd "${A[@]}" "${RA_RUN_ARGS[@]}" >"$out/$name.json" 2>"$out/$name.log"
  echo "$name rc=$?"
  python3 bench/decode/summary.py "$out/$name.json" || tail -3 "$out/$name.log"
  el "$name"
done
