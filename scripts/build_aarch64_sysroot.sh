#!/usr/bin/env bash
# Build an aarch64 sysroot in which pqcompile runs compiled models under qemu-user.
#
# Usage:  scripts/build_aarch64_sysroot.sh [DEST]
#         DEST defaults to ${PQCOMPILE_CACHE:-$HOME/.cache/pqcompile}/aarch64-sysroot
#
# Result (what pqcompile.targets.emulator.find_sysroot() expects):
#   DEST/root   Debian bookworm arm64 files: glibc, CPython 3.11 and the libraries it loads
#   DEST/site   aarch64 wheels unpacked: apache-tvm, apache-tvm-ffi, numpy, ml_dtypes, ...
#   DEST/.complete   stamp written last; when it matches this recipe the script does nothing
#
# Recipe (Debian/Ubuntu host, root or passwordless sudo; needs the Debian and PyPI mirrors):
#   1. host tools, installed only when missing:
#        apt-get install -y --no-install-recommends qemu-user gcc-aarch64-linux-gnu \
#            libc6-dev-arm64-cross gcc-riscv64-linux-gnu libc6-dev-riscv64-cross
#   2. dpkg --add-architecture arm64 && apt-get update
#   3. apt-get download <ARM64_PACKAGES below>:arm64, then dpkg -x each into DEST/root
#   4. pip download --only-binary=:all: --platform manylinux_2_28_aarch64 (and the older
#      manylinux tags) --python-version 3.11 apache-tvm==0.27.0.post1
#      apache-tvm-ffi==0.1.14.post0 numpy ml_dtypes typing_extensions, unzipped into DEST/site.
#      numpy and ml_dtypes are pinned to the host's versions so both sides compute alike.
#   5. smoke test: qemu-aarch64 -L DEST/root DEST/root/usr/bin/python3.11 -c "import tvm"
# Everything is built in DEST.partial and renamed at the end, so an interrupted run never
# leaves a DEST that looks complete. Takes about 2-4 minutes (downloads ~150 MB).
#
# Environment overrides: PYTHON (host interpreter running pip, default python3),
# PQCOMPILE_TVM_VERSION, PQCOMPILE_TVM_FFI_VERSION, PQCOMPILE_SKIP_HOST_TOOLS=1.
set -euo pipefail

DEST="${1:-${PQCOMPILE_CACHE:-$HOME/.cache/pqcompile}/aarch64-sysroot}"
PYTHON="${PYTHON:-python3}"
TVM_VERSION="${PQCOMPILE_TVM_VERSION:-0.27.0.post1}"
# Newer apache-tvm-ffi releases crash in tvm::ffi::ToJSONGraph: keep this pin.
TVM_FFI_VERSION="${PQCOMPILE_TVM_FFI_VERSION:-0.1.14.post0}"

# Python 3.11 and every shared library it, its extension modules and the wheels load.
ARM64_PACKAGES=(
    python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
    libc6 libgcc-s1 libstdc++6 libgomp1 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0
    liblzma5 libzstd1 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1
    libcrypt1 libdb5.3 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3
    libkrb5support0 libcom-err2 libkeyutils1
)
# Present in some releases only (Debian bookworm builds decimal without libmpdec).
OPTIONAL_ARM64_PACKAGES=(libmpdec3)
# "command or file:Debian package". The cross libc is only a Recommends of the cross gcc, and
# linking an exported library fails with "cannot find -lc" without it.
HOST_TOOLS=(
    qemu-aarch64:qemu-user
    aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu
    /usr/aarch64-linux-gnu/lib/libc.so:libc6-dev-arm64-cross
    riscv64-linux-gnu-gcc:gcc-riscv64-linux-gnu
    /usr/riscv64-linux-gnu/lib/libc.so:libc6-dev-riscv64-cross
)

log() { printf '[aarch64-sysroot] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

source "$(dirname "${BASH_SOURCE[0]}")/host_tools.sh"  # as_root, apt_update, install_host_tools

host_pin() {  # "name==version" when the host interpreter has the package, else "name"
    "$PYTHON" - "$1" <<'EOF'
import sys
from importlib import metadata
name = sys.argv[1]
try:
    print(f"{name}=={metadata.version(name)}")
except metadata.PackageNotFoundError:
    print(name)
EOF
}

NUMPY_REQ="$(host_pin numpy)"
ML_DTYPES_REQ="$(host_pin ml_dtypes)"
WHEELS=("apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" "$NUMPY_REQ"
        "$ML_DTYPES_REQ" typing_extensions)
STAMP="v1 ${ARM64_PACKAGES[*]} ${WHEELS[*]}"


install_host_tools
command -v qemu-aarch64 >/dev/null 2>&1 || die "qemu-aarch64 missing: apt-get install qemu-user"

# Host tools are checked first so that a cached sysroot on a fresh machine still gets them.
if [ -f "$DEST/.complete" ] && [ "$(cat "$DEST/.complete")" = "$STAMP" ]; then
    log "up to date: $DEST"
    exit 0
fi

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    log "enabling the arm64 architecture in dpkg"
    as_root dpkg --add-architecture arm64
    apt_updated=0
    apt_update
elif ! apt-cache show python3.11-minimal:arm64 >/dev/null 2>&1; then
    apt_update
fi

PARTIAL="$DEST.partial"
rm -rf "$PARTIAL"
mkdir -p "$PARTIAL/root" "$PARTIAL/site" "$PARTIAL/debs" "$PARTIAL/wheels"

packages=("${ARM64_PACKAGES[@]}")
for pkg in "${OPTIONAL_ARM64_PACKAGES[@]}"; do
    if apt-cache show "$pkg:arm64" >/dev/null 2>&1; then packages+=("$pkg"); fi
done
log "downloading ${#packages[@]} arm64 packages"
(
    cd "$PARTIAL/debs"
    # apt drops privileges to _apt for downloads, which cannot write here as root.
    apt-get download -qq -o APT::Sandbox::User=root "${packages[@]/%/:arm64}"
)
for deb in "$PARTIAL"/debs/*.deb; do
    dpkg -x "$deb" "$PARTIAL/root"
done

log "downloading aarch64 wheels: ${WHEELS[*]}"
platforms=()
for minor in 36 35 34 33 32 31 30 29 28 27 26 25 24 17; do
    platforms+=(--platform "manylinux_2_${minor}_aarch64")
done
platforms+=(--platform manylinux2014_aarch64)
"$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    "${platforms[@]}" --python-version 3.11 --implementation cp \
    --dest "$PARTIAL/wheels" "${WHEELS[@]}"
for whl in "$PARTIAL"/wheels/*.whl; do
    "$PYTHON" -m zipfile -e "$whl" "$PARTIAL/site"
done
rm -rf "$PARTIAL/debs" "$PARTIAL/wheels"

log "smoke test: importing tvm under qemu-aarch64 (about 15 s)"
env -i PATH=/usr/bin:/bin HOME="$HOME" LANG=C.UTF-8 PYTHONNOUSERSITE=1 \
    PYTHONPATH="$PARTIAL/site" \
    qemu-aarch64 -L "$PARTIAL/root" "$PARTIAL/root/usr/bin/python3.11" -s -c \
    "import numpy, tvm, platform; print('aarch64 python', platform.machine(), 'tvm',
tvm.__version__, 'numpy', numpy.__version__)" \
    || die "the sysroot in $PARTIAL does not import tvm; see the error above"

printf '%s' "$STAMP" > "$PARTIAL/.complete"
rm -rf "$DEST"
mv "$PARTIAL" "$DEST"
log "done: $DEST"
