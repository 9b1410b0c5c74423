#!/usr/bin/env bash
# bench/pack-device-deps.sh [OUT_DIR]: the dependency tarball the device scripts unpack
# (bench/device-env.sh reads .dev/deps/prefix.tar.xz; put /.dev/ in .git/info/exclude).
# ../shared/tools/pack-deps.sh packs ZeroMQ, protobuf-c, hwloc, cmocka, FAISS (+ its C API)
# and OpenBLAS but not libmicrohttpd, which the daemon's --metrics endpoint needs since
# cmake/RatdDeps.cmake requires it; this adds its Debian packages to the prefix, with the
# .pc's Requires.private (gnutls, whose .pc the device lacks: the build links the shared
# library, the device has libgnutls.so.30) removed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$root/.dev/deps}")
"$root/../shared/tools/pack-deps.sh" "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q libmicrohttpd-dev libmicrohttpd12 >/dev/null)
mkdir "$work/x"
tar xJf "$out/prefix.tar.xz" -C "$work/x"
for f in "$work"/*.deb; do dpkg -x "$f" "$work/x/prefix"; done
sed -i '/^Requires/d' "$work/x/prefix/usr/lib/x86_64-linux-gnu/pkgconfig/libmicrohttpd.pc"
tar cJf "$out/prefix.tar.xz" -C "$work/x" prefix
echo "packed: $out/prefix.tar.xz (with libmicrohttpd)"
