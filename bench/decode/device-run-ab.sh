#!/usr/bin/env bash
# bench/decode/device-run-ab.sh OUT_DIR OLD_SRC [RUN...]: the 128K decode figure of two
# versions in one run on the GPU host, so that a change is told from the host's variance:
# OLD_SRC is a source tree of the baseline (e.g. `git archive REV | tar x -C .dev/old-src`,
# without bench/models), built beside this one (both with CUDA). Each RUN is `old` or
# `new`, optionally with variants after a colon joined by '-': g (graphs built on the GPU
# and sent in the Offload, --gpu-build), wN (the daemon's workers), pN (the daemon's
# --spin-us, via RATD_SPIN_US), s (a sweep of efforts 200,250,300,350 after the default). Default runs: old new new:g. One JSON per run in
# OUT_DIR, named after it (new:g-w8 -> new-g-w8.json). RA_RUN_TIMEOUT: seconds per run.
set -uo pipefail
out=${1:?usage: device-run-ab.sh OUT_DIR OLD_SRC [RUN...]}
old=${2:?usage: device-run-ab.sh OUT_DIR OLD_SRC [RUN...]}
shift 2
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(old new new:g)
mkdir -p "$out"
T0=$(date +%s)
el() { echo "[$(($(date +%s) - T0)) s] $*"; }
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
  r=${rv%%:*} name=$r extra=() envs=()
  case $r in old) dir=$o ;; new) dir=$b ;; *) echo "unknown run $r"; continue ;; esac
  if [ "$rv" != "$r" ]; then
    IFS=- read -ra vs <<<"${rv#*:}"
    for v in "${vs[@]}"; do
      case $v in
      g) extra+=(--gpu-build) ;;
      w[0-9]*) extra+=(--workers "${v#w}") ;;
      p[0-9]*) envs+=("RATD_SPIN_US=${v#p}") ;;
      s) extra+=(--sweep 200,250,300,350) ;;
      *) echo "unknown variant $v"; continue 2 ;;
      esac
    done
    name="$r-${rv#*:}"
  fi
  env "${envs[@]}" timeout "${RA_RUN_TIMEOUT:-150}" $dir/bench/ratd-bench-decode --ratd $dir/daemon/ratd "${A[@]}" "${extra[@]}" \
    >"$out/$name.json" 2>"$out/$name.log"
  echo "$name rc=$?"
  python3 - "$out/$name.json" <<'PY' || tail -3 "$out/$name.log"
import json, sys
d = json.load(open(sys.argv[1]))
keys = ["workers", "build_s", "gpu_build_s", "attend_us_p50", "attend_us_p99", "rtt_us_p50", "server_us_p50",
        "work_us_p50", "append_us_p50", "recall_mean", "recall_p10", "mass_mean", "lse_mismatch"]
print(" ".join("%s=%s" % (k, d.get(k)) for k in keys))
for i in range(d.get("sweep_n", 0)):
    print("  sweep", " ".join("%s=%s" % (k, d.get("sweep%d_%s" % (i, k))) for k in
          ["effort", "attend_us_p50", "attend_us_p99", "server_us_p50", "work_us_p50", "recall_mean"]))
PY
  el "$name"
done
