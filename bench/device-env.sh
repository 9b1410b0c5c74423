# bench/device-env.sh: sourced by the device scripts (bench/*/device-run*.sh) on a CUDA
# machine without package access. Unpacks the project's C dependencies (.dev/deps/
# prefix.tar.xz, made by shared/tools/pack-deps.sh) into /tmp/ra-deps, points PATH,
# LD_LIBRARY_PATH and pkg-config at them (pkgconf itself from .dev/deps/*.deb when the
# machine lacks it) and sets P (the prefix's usr) and RA_DEPS_CMAKE (the CMake arguments
# that find them). Without the tarball it sets nothing: the system's packages are used.
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
