#!/usr/bin/env bash
# bench/index/device-run-build-trace.sh OUT_DIR: the CPU graph build's two key->key
# methods on real heads (issue 12 item 4: "same recall"), on the GPU host: dumps the traces
# of both models with a GPU prefill (as bench/decode/device-run-trace.sh), then per layer
# the head that ratd-bench-index's group walk serves (KV head 1: query heads 3-5) built with
# the linking walks (RA_GRAPH_KK=0) and with the lists by code (the default on AMX): build
# seconds and recall@100 at fixed efforts on 200 decode queries; then each trace replayed
# through ratd (CPU builds, default effort with the recall probes) both ways.
set -uo pipefail
out=${1:?usage: device-run-build-trace.sh OUT_DIR}
mkdir -p "$out"
. bench/device-env.sh
b=/tmp/build-bt
ra_cuda_build "$out" $b ratd ratd-bench-decode ratd-lm-eval ratd-bench-index || exit 1
el built
ra_dump_traces "$out" $b
for t in kjv16k sql128k; do
  [ -s /tmp/$t.trace ] || continue
  for L in 0 1 2 3 4 5; do
    for kk in 0 -1; do
      RA_GRAPH_KK=$kk RA_LOG_LEVEL=debug timeout 60 $b/bench/ratd-bench-index --trace /tmp/$t.trace \
        --layer $L --head 5 --group 3 --topk 100 --queries 200 --index graph --insert 0 \
        --efforts 100,200,300 --dtype bf16 --threads 16 --verbose >"$out/$t-L$L-kk$kk.txt" \
        2>"$out/$t-L$L-kk$kk.log"
      echo "$t layer $L RA_GRAPH_KK=$kk rc=$? $(grep -o 'in [0-9.]* s (cpu [0-9.]* s)' "$out/$t-L$L-kk$kk.log" | head -1)" \
        "$(grep -E '^graph +effort=[0-9]+ ' "$out/$t-L$L-kk$kk.txt" | awk '{print $4}' | tr '\n' ' ')"
    done
  done
  el "$t heads"
done
for t in kjv16k sql128k; do
  [ -s /tmp/$t.trace ] || continue
  for kk in 0 -1; do
    RA_GRAPH_KK=$kk timeout 150 $b/bench/ratd-bench-decode --ratd $b/daemon/ratd --json --steps 200 \
      --trace /tmp/$t.trace >"$out/$t-decode-kk$kk.json" 2>"$out/$t-decode-kk$kk.log"
    echo "$t decode RA_GRAPH_KK=$kk rc=$?"
    python3 -c "import json; d=json.load(open('$out/$t-decode-kk$kk.json')); print({k: d.get(k) for k in ['build_s','recall_mean','recall_p10','mass_mean','attend_us_p50']})" 2>&1
  done
  el "$t decode"
done
el done
