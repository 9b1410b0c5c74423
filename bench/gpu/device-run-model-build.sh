#!/usr/bin/env bash
# bench/gpu/device-run-model-build.sh OUT_DIR: issue 12's whole-model figure on a CUDA
# machine in one go (bench/README.md "GPU graph build"): Release build for sm_90, one layer
# of 8 heads at 128K by ratd-bench-graph with each RA_GRAPH_AB setting and the default
# (--heads 8, no CPU build), then ratd-bench-decode --gpu-build on the Llama-3-8B shape
# at 128K with RA_MODEL_LAYERS layers (default 32; its "gpu build" line is the figure:
# every head's graph, transfers included) and, for each RA_MODEL_AB setting, the same
# with RA_MODEL_AB_LAYERS layers (default 8) and that setting, beside a default run of
# as many layers.
set -uo pipefail
out=${1:?usage: device-run-model-build.sh OUT_DIR}
mkdir -p "$out"
. bench/device-env.sh
b=/tmp/build-graph
ra_cuda_build "$out" $b ratd-bench-graph ratd ratd-bench-decode || exit 1
echo built
for v in ${RA_GRAPH_AB:-} default; do
  env ${v/#default/RA_NONE=1} timeout 120 $b/bench/ratd-bench-graph --heads 8 --no-cpu-build \
    --json "$out/graph8-${v//=/-}.json" >"$out/graph8-${v//=/-}.log" 2>&1
  echo "graph8 $v: $(grep -E 'heads in one' "$out/graph8-${v//=/-}.log")"
done
dec() { # NAME LAYERS [VAR=value]
  env ${3:-RA_NONE=1} timeout 300 $b/bench/ratd-bench-decode --json --steps 16 --context 131072 \
    --layers "$2" --gpu-build >"$out/$1.json" 2>"$out/$1.log"
  echo "$1 rc=$?: $(grep -E 'gpu build:|ready' "$out/$1.log" | sed 's/ratd-bench-decode: //' | tr '\n' ' ')"
}
for v in ${RA_MODEL_AB:-}; do
  dec "model${RA_MODEL_AB_LAYERS:-8}-${v//=/-}" "${RA_MODEL_AB_LAYERS:-8}" "$v"
  dec "model${RA_MODEL_AB_LAYERS:-8}-default" "${RA_MODEL_AB_LAYERS:-8}"
done
dec "model${RA_MODEL_LAYERS:-32}" "${RA_MODEL_LAYERS:-32}"
