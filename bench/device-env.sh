# bench/device-env.sh: sourced by the device scripts (bench/*/device-run*.sh) on a CUDA
# machine without package access. Unpacks the project's C dependencies (.dev/deps/
# prefix.tar.xz, made by bench/pack-device-deps.sh: shared/tools/pack-deps.sh plus
# libmicrohttpd) into /tmp/ra-deps, points PATH,
# LD_LIBRARY_PATH and pkg-config at them (pkgconf itself from .dev/deps/*.deb when the
# machine lacks it) and sets P (the prefix's usr) and RA_DEPS_CMAKE (the CMake arguments
# that find them). Without the tarball it sets nothing: the system's packages are used.
# It also gives the scripts their shared pieces: el (progress lines with the elapsed
# seconds), ra_run_variants, ra_cuda_build and ra_dump_traces.
RA_DEPS_CMAKE=()
if [ -f .dev/deps/prefix.tar.xz ]; then
  D=/tmp/ra-deps
  mkdir -p $D && tar xJf .dev/deps/prefix.tar.xz -C $D
  P=$D/prefix/usr
  if ! command -v pkg-config >/dev/null; then
    for f in .dev/deps/*.deb; do dpkg -x "$f" $D/pkgconf; done
    export PATH=$D/pkgconf/usr/bin:$PATH LD_LIBRARY_PATH=$D/pkgconf/usr/lib/x86_64-linux-gnu
  fi
  export LD_LIBRARY_PATH=$P/lib/x86_64-linux-gnu:$P/lib/x86_64-linux-gnu/openblas-pthread:${LD_LIBRARY_PATH:-}
  export PATH=$P/bin:$PATH PKG_CONFIG_PATH=$P/lib/x86_64-linux-gnu/pkgconfig PKG_CONFIG_SYSROOT_DIR=$D/prefix
  RA_DEPS_CMAKE=(-DCMAKE_PREFIX_PATH=$P -DCMAKE_LIBRARY_PATH=$P/lib/x86_64-linux-gnu
                 -DRA_FAISS_C_LIB=$P/lib/x86_64-linux-gnu/libfaiss_c.a)
fi

# ra_run_variants RUN[:V-V...]: a device script's run name with variants after a colon
# (bench/decode/device-run.sh, device-run-ab.sh). Sets RA_RUN (the part before the colon),
# RA_RUN_NAME (the file name: RUN-V-V), RA_RUN_ENV (VAR=value words for `env`) and
# RA_RUN_ARGS (ratd-bench-decode flags). Variants: b8 / b4 the search-code bits
# (RA_GRAPH_CODE_BITS), wN the daemon's workers, pN its --spin-us (RATD_SPIN_US), g graphs
# built on the GPU (--gpu-build), s a sweep of efforts 200,250,300,350, a128 records of a
# multiple of 128 bytes (RA_GRAPH_REC_ALIGN), x the projected-code scan (--index pscan),
# xs the same with a sweep of its candidates 500..1500, avx2 the kernels of an AVX2 host
# (RA_ISA=avx2), np no recall probes (RA_HEAD_PROBE_EVERY=0), lb the build and probe
# threads at SCHED_BATCH (RA_LOW_SCHED=batch, the ninth session's policy), kN N key parts
# per KV head for pscan (RATD_KEY_PARTS), pin / free the daemon's workers pinned one per
# CPU (the default since the eleventh session) or free to move (RATD_PIN_WORKERS=1 / 0),
# pxN pscan's threshold primed for N R passing keys (RA_PSCAN_PRIME_X), wuN N untimed
# warm-up steps (--warmup N: the recall probes settle the default effort first), csN
# the bench's client polling N us for each reply (--client-spin-us N), gr the graph index
# (--index graph). A run with neither x nor gr gets ratd-bench-decode's default index:
# pscan since the thirteenth session, the graph before (older results' plain runs).
# Returns 1 (with a message) on an unknown variant.
ra_run_variants() {
  local rv=$1 v vs
  RA_RUN=${rv%%:*} RA_RUN_NAME=${rv%%:*} RA_RUN_ENV=() RA_RUN_ARGS=()
  [ "$rv" != "$RA_RUN" ] || return 0
  IFS=- read -ra vs <<<"${rv#*:}"
  for v in "${vs[@]}"; do
    case $v in
    b8 | b4) RA_RUN_ENV+=("RA_GRAPH_CODE_BITS=${v#b}") ;;
    w[0-9]*) RA_RUN_ARGS+=(--workers "${v#w}") ;;
    p[0-9]*) RA_RUN_ENV+=("RATD_SPIN_US=${v#p}") ;;
    g) RA_RUN_ARGS+=(--gpu-build) ;;
    s) RA_RUN_ARGS+=(--sweep 200,250,300,350) ;;
    a128) RA_RUN_ENV+=("RA_GRAPH_REC_ALIGN=128") ;;
    x) RA_RUN_ARGS+=(--index pscan) ;;
    gr) RA_RUN_ARGS+=(--index graph) ;;
    xs) RA_RUN_ARGS+=(--index pscan --sweep 500,700,1000,1500) ;;
    avx2) RA_RUN_ENV+=("RA_ISA=avx2") ;;
    np) RA_RUN_ENV+=("RA_HEAD_PROBE_EVERY=0") ;;
    lb) RA_RUN_ENV+=("RA_LOW_SCHED=batch") ;;
    k[0-9]*) RA_RUN_ENV+=("RATD_KEY_PARTS=${v#k}") ;;
    pin) RA_RUN_ENV+=("RATD_PIN_WORKERS=1") ;;
    free) RA_RUN_ENV+=("RATD_PIN_WORKERS=0") ;;
    px[0-9]*) RA_RUN_ENV+=("RA_PSCAN_PRIME_X=${v#px}") ;;
    wu[0-9]*) RA_RUN_ARGS+=(--warmup "${v#wu}") ;;
    cs[0-9]*) RA_RUN_ARGS+=(--client-spin-us "${v#cs}") ;;
    *) echo "unknown variant $v in $rv"; return 1 ;;
    esac
  done
  RA_RUN_NAME="$RA_RUN-${rv#*:}"
}

# el MESSAGE: the message after the seconds since this file was sourced (the scripts'
# progress lines)
T0=$(date +%s)
el() { echo "[$(($(date +%s) - T0)) s] $*"; }

# ra_cuda_build OUT_DIR BUILD_DIR TARGET...: the device scripts' Release build for sm_90
# of the given targets (the machine's GPU and cores in OUT_DIR/machine.txt, the logs in
# OUT_DIR/configure.log and build.log). Returns 1 with the errors shown on failure.
ra_cuda_build() {
  local out=$1 b=$2
  shift 2
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; } >"$out/machine.txt" 2>&1
  cmake -S . -B "$b" -DCMAKE_BUILD_TYPE=Release -DRA_CUDA=ON -DRA_CUDA_ARCHS=90 "${RA_DEPS_CMAKE[@]}" \
    >"$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; return 1; }
  cmake --build "$b" -j"$(nproc)" --target "$@" >"$out/build.log" 2>&1 ||
    { grep -E "error|Error" "$out/build.log" | head -30; return 1; }
}

# ra_dump_traces OUT_DIR BUILD_DIR: the traces of both models by a GPU prefill
# (ratd-lm-eval --device cuda --dump-trace, built in BUILD_DIR), each to /tmp/NAME.trace:
#   kjv16k   bench/models/kjv-byte-llama over 16,383 bytes of bench/data/heldout-kjv.txt
#   sql128k  bench/models/kjv-byte-llama-128k over 131,071 bytes of heldout-sqlite.txt
# with its JSON and log in OUT_DIR/NAME-trace.*. A failed dump leaves no file behind to
# replay (the callers skip a trace that is missing or empty).
ra_dump_traces() {
  local out=$1 b=$2 name model text ctx
  while read -r name model text ctx; do
    timeout 300 "$b/bench/ratd-lm-eval" --device cuda --model "$model" --text "$text" --context "$ctx" \
      --eval 1 --mode full --dump-trace "/tmp/$name.trace" --trace-dtype f16 --quiet --json \
      >"$out/$name-trace.json" 2>"$out/$name-trace.log"
    echo "$name trace rc=$? $(ls -la "/tmp/$name.trace" 2>&1 | awk '{print $5}') bytes"
    el "$name trace"
  done <<'EOT'
kjv16k bench/models/kjv-byte-llama bench/data/heldout-kjv.txt 16383
sql128k bench/models/kjv-byte-llama-128k bench/data/heldout-sqlite.txt 131071
EOT
}
