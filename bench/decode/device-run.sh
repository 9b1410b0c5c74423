#!/usr/bin/env bash
# bench/decode/device-run.sh OUT_DIR [RUN...]: ratd-bench-decode on the GPU host's CPU (16
# Xeon cores), the figures of bench/README.md "Decode". Release build of ratd and the
# bench (no CUDA), then each RUN (default: c128k l128k c1m) as one JSON file in OUT_DIR:
#   c32k   calibrated generator, Llama-3-8B shape, 32K keys per KV head, 2 layers
#   c128k  the same at 128K          l128k  the hidden-state generator (lin) at 128K
#   c1m    calibrated, 1M keys, 8 query / 2 KV heads, 2 layers
#   b128k  batch 8 at 128K, 1 layer (8 sessions per Attend)
#   c128k0, c1m0  c128k and c1m at the default effort only (no sweep)
#   c128k32, l128k32  all 32 layers at 128K, 16 steps (a model's indexes and codes, far
#          more than the L3 holds); c1m4  c1m with 4 layers, 100 steps; c1m4s the
#          same with a sweep (a sweep's efforts are pscan's candidates rescored, or the
#          graph's candidate lists with the variant gr)
# A run may carry variants after a colon, joined by '-' (ra_run_variants in
# bench/device-env.sh: b8 / b4 search-code bits, wN workers, pN --spin-us, g --gpu-build,
# s a sweep); e.g. c128k:b8 and c128k:b4 (files c128k-b8.json, c128k-b4.json) compare
# the codes (g needs a CUDA build: use device-run-ab.sh).
# RA_RUN_TIMEOUT: seconds per run (default 420). RA_BUILD_HEAD=1: first one 131K head's
# CPU graph build with --verbose (ratd-bench-index, both generators).
set -uo pipefail
out=${1:?usage: device-run.sh OUT_DIR [RUN...]}
shift
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(c128k l128k c1m)
mkdir -p "$out"
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
# sw GRAPH PSCAN: a sweep's efforts, the graph's candidate lists when the run has --index
# graph (variant gr: is_graph=1), else pscan's candidates rescored (the default index since the
# thirteenth session)
sw() { if [ "$is_graph" = 1 ]; then echo "$1"; else echo "$2"; fi; }
for rv in "${runs[@]}"; do
  ra_run_variants "$rv" || continue
  r=$RA_RUN name=$RA_RUN_NAME
  is_graph=0; [[ " ${RA_RUN_ARGS[*]} " == *" --index graph "* ]] && is_graph=1
  case $r in
  c32k) a=(--context 32768 --layers 2) ;;
  c128k) a=(--context 131072 --layers 2 --sweep "$(sw 150,200,250,300,400 300,500,700,1000,1500)") ;;
  c128ks) a=(--context 131072 --layers 2 --sweep "$(sw 200,250,300,350,400,500 300,400,500,700,1000,1500)") ;;
  l128ks) a=(--context 131072 --layers 2 --gen lin --steps 120 --sweep "$(sw 200,250,300,400,500 300,500,700,1000,1500)") ;;
  l128k) a=(--context 131072 --layers 2 --gen lin) ;;
  c1m) a=(--context 1048576 --layers 2 --q-heads 8 --kv-heads 2 --sweep "$(sw 400,600,1000 700,1000,1500)") ;;
  b128k) a=(--context 131072 --layers 1 --batch 8 --steps 100) ;;
  c128k0) a=(--context 131072 --layers 2) ;;
  c128k32) a=(--context 131072 --layers 32 --steps 16) ;;
  l128k32) a=(--context 131072 --layers 32 --steps 16 --gen lin) ;;
  c1m4) a=(--context 1048576 --layers 4 --q-heads 8 --kv-heads 2 --steps 100) ;;
  c1m4s) a=(--context 1048576 --layers 4 --q-heads 8 --kv-heads 2 --steps 100 --sweep "$(sw 400,600,1200 700,1000,1500)") ;;
  c1m0) a=(--context 1048576 --layers 2 --q-heads 8 --kv-heads 2) ;;
  *) echo "unknown run $r"; continue ;;
  esac
  env "${RA_RUN_ENV[@]}" timeout "${RA_RUN_TIMEOUT:-420}" $D "${a[@]}" "${RA_RUN_ARGS[@]}" \
    >"$out/$name.json" 2>"$out/$name.log"
  echo "$name rc=$?"
  tail -2 "$out/$name.log"
  python3 bench/decode/summary.py "$out/$name.json" || head -c 600 "$out/$name.json"
  el "$name"
done
