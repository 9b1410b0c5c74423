#!/bin/sh
# Runs ratd-bench-index on every (layer, query head) of a trace and writes one JSON
# file per head into OUTDIR, then prints the per-head table (summarize.py --per-file).
# usage: bench/index/run_trace_heads.sh TRACE OUTDIR [extra ratd-bench-index args]
# Default indexes: ivf,graph (HNSW builds are slow on small machines: add
# --index ivf,hnsw,graph for them).
set -e
trace=$1
out=$2
shift 2 || { echo "usage: $0 TRACE OUTDIR [args]" >&2; exit 2; }
bin=${RA_BENCH_INDEX:-build/bench/ratd-bench-index}
mkdir -p "$out"
layers=$(od -A n -t u4 -j 16 -N 4 "$trace" | tr -d ' ')
heads=$(od -A n -t u4 -j 20 -N 4 "$trace" | tr -d ' ')
l=0
while [ "$l" -lt "$layers" ]; do
  h=0
  while [ "$h" -lt "$heads" ]; do
    "$bin" --trace "$trace" --layer "$l" --head "$h" --json --index ivf,graph "$@" \
      > "$out/l${l}h${h}.json" 2> "$out/l${l}h${h}.err"
    h=$((h + 1))
  done
  l=$((l + 1))
done
python3 "$(dirname "$0")/summarize.py" --per-file "$out"/l*h*.json
