#!/usr/bin/env bash
# bench/decode/device-run.sh OUT_DIR [RUN...]: ratd-bench-decode on the GPU host's CPU (16
# Xeon cores), the figures of bench/README.md "Decode". Release build of ratd and the
# bench (no CUDA), then each RUN (default: c128k l128k c1m) as one JSON file in OUT_DIR:
#   c32k   calibrated generator, Llama-3-8B shape, 32K keys per KV head, 2 layers
#   c128k  the same at 128K          l128k  the hidden-state generator (lin) at 128K
#   c1m    calibrated, 1M keys, 8 query / 2 KV heads, 2 layers
#   b128k  batch 8 at 128K, 1 layer (8 sessions per Attend)
#   c128k0, c1m0  c128k and c1m at the default effort only (no sweep)
# A run may carry variants after a colon, each one letter and a value, joined by '-':
# b8 / b4 the daemon's search-code bits (RA_GRAPH_CODE_BITS), wN the daemon's workers;
# e.g. c128k:b8 and c128k:b4 (files c128k-b8.json, c128k-b4.json) compare the codes.
# RA_RUN_TIMEOUT: seconds per run (default 420). RA_BUILD_HEAD=1: first one 131K head's
# CPU graph build with --verbose (ratd-bench-index, both generators).
set -uo pipefail
out=${1:?usage: device-run.sh OUT_DIR [RUN...]}
shift
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(c128k l128k c1m)
mkdir -p "$out"
T0=$(date +%s)
el() { echo "[$(($(date +%s) - T0)) s] $*"; }
{ nproc; lscpu | grep -E "Model name|L3"; free -g | head -2; git log -1 --format=%H 2>/dev/null
  echo "thp: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"; } >"$out/machine.txt" 2>&1
. bench/device-env.sh
b=build-dev
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=OFF -DBUILD_TESTING=OFF "${RA_DEPS_CMAKE[@]}" \
  >"$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
timeout 300 cmake --build $b -j"$(nproc)" --target ratd ratd-bench-decode ratd-bench-index >"$out/build.log" 2>&1 ||
  { grep -E "error|Error" "$out/build.log" | head -30; exit 1; }
el built
if [ -n "${RA_BUILD_HEAD:-}" ]; then # one 131K head's CPU graph build, phase by phase
  for g in calibrated lin; do
    timeout 120 $b/bench/ratd-bench-index --synthetic --gen $g --n 131072 --dim 128 --topk 100 --dtype bf16 \
      --queries 50 --index graph --insert 0 --efforts 200,300 --verbose --json >"$out/build-$g.json" 2>"$out/build-$g.log"
    echo "build-$g rc=$?"; grep -E "graph: built|projection" "$out/build-$g.log" | head -3
  done
  el "head builds"
fi
D="$b/bench/ratd-bench-decode --ratd $b/daemon/ratd --json --steps 200"
for rv in "${runs[@]}"; do
  r=${rv%%:*} name=$r envs=() extra=()
  if [ "$rv" != "$r" ]; then
    IFS=- read -ra vs <<<"${rv#*:}"
    for v in "${vs[@]}"; do
      case $v in
      b8 | b4) envs+=("RA_GRAPH_CODE_BITS=${v#b}") ;;
      w[0-9]*) extra+=(--workers "${v#w}") ;;
      *) echo "unknown variant $v"; continue 2 ;;
      esac
    done
    name="$r-${rv#*:}"
  fi
  case $r in
  c32k) a=(--context 32768 --layers 2) ;;
  c128k) a=(--context 131072 --layers 2 --sweep 150,200,250,300,400) ;;
  c128ks) a=(--context 131072 --layers 2 --sweep 200,250,300,350,400,500) ;;
  l128ks) a=(--context 131072 --layers 2 --gen lin --steps 120 --sweep 200,250,300,400,500) ;;
  l128k) a=(--context 131072 --layers 2 --gen lin) ;;
  c1m) a=(--context 1048576 --layers 2 --q-heads 8 --kv-heads 2 --sweep 400,600,1000) ;;
  b128k) a=(--context 131072 --layers 1 --batch 8 --steps 100) ;;
  c128k0) a=(--context 131072 --layers 2) ;;
  c1m0) a=(--context 1048576 --layers 2 --q-heads 8 --kv-heads 2) ;;
  *) echo "unknown run $r"; continue ;;
  esac
  env "${envs[@]}" timeout "${RA_RUN_TIMEOUT:-420}" $D "${a[@]}" "${extra[@]}" >"$out/$name.json" 2>"$out/$name.log"
  echo "$name rc=$?"
  tail -2 "$out/$name.log"
  python3 - "$out/$name.json" <<'PY' || head -c 600 "$out/$name.json"
import json, sys
d = json.load(open(sys.argv[1]))
keys = ["context", "workers", "build_s", "attend_us_p50", "attend_us_p90", "attend_us_p99", "attend_us_max",
        "token_ms_model_est", "rtt_us_p50", "server_us_p50", "work_us_p50", "append_us_p50",
        "recall_mean", "recall_p10", "mass_mean", "retrieved_frac", "session_bytes", "lse_mismatch"]
print(" ".join("%s=%s" % (k, d.get(k)) for k in keys))
for i in range(d.get("sweep_n", 0)):
    print("  sweep", " ".join("%s=%s" % (k, d.get("sweep%d_%s" % (i, k))) for k in
          ["effort", "attend_us_p50", "attend_us_p99", "work_us_p50", "recall_mean", "recall_p10"]))
PY
  el "$name"
done
