#!/usr/bin/env bash
# bench/decode/device-run-trace.sh OUT_DIR: the GPU-built graph against ratd's CPU build
# on real heads (issue 12), on the GPU host. Builds ratd, ratd-lm-eval and
# ratd-bench-decode with CUDA, dumps the traces of both models with a GPU prefill
#   kjv16k   bench/models/kjv-byte-llama over 16,383 bytes of bench/data/heldout-kjv.txt
#   sql128k  bench/models/kjv-byte-llama-128k over 131,071 bytes of heldout-sqlite.txt
# and replays each through ratd-bench-decode twice: graphs built by the daemon on the
# CPU, then built here on the GPU and sent in the Offload (--gpu-build). One JSON per
# run in OUT_DIR: TRACE-cpu.json, TRACE-gpu.json. RA_RUN_TIMEOUT: seconds per run (200).
# RA_TRACE_KINDS: which replays (default "cpu gpu"; pscan: the projected-code scan,
# TRACE-pscan.json).
set -uo pipefail
out=${1:?usage: device-run-trace.sh OUT_DIR}
mkdir -p "$out"
. bench/device-env.sh
b=/tmp/build-trace
ra_cuda_build "$out" $b ratd ratd-bench-decode ratd-lm-eval || exit 1
el built
run() { local name=$1 tr=$2; shift 2
  timeout "${RA_RUN_TIMEOUT:-200}" $b/bench/ratd-bench-decode --ratd $b/daemon/ratd --json --steps 200 \
    --trace /tmp/$tr.trace "$@" >"$out/$name.json" 2>"$out/$name.log"
  echo "$name rc=$?"
  python3 bench/decode/summary.py "$out/$name.json" || tail -3 "$out/$name.log"
  el "$name"; }
ra_dump_traces "$out" $b
for t in kjv16k sql128k; do
  [ -s /tmp/$t.trace ] || continue
  for kind in ${RA_TRACE_KINDS:-cpu gpu}; do
    case $kind in
    cpu) run $t-cpu $t ;;
    gpu) run $t-gpu $t --gpu-build ;;
    pscan) run $t-pscan $t --index pscan ;;
    esac
  done
done
