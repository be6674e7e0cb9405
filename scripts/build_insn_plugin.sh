#!/usr/bin/env bash
# Build pqcompile's TCG instruction-count plugin (libpqcount.so) for the installed qemu-user.
#
# Usage:  scripts/build_insn_plugin.sh [DEST]
#         DEST defaults to ${PQCOMPILE_CACHE:-$HOME/.cache/pqcompile}/qemu-plugin
#
# Result (what pqcompile.targets.insn_count expects):
#   DEST/libpqcount.so  scripts/qemu_plugin/pqcount.c, built against the qemu-plugin.h of the
#                       qemu source package qemu-user was built from
#   DEST/src/           the two source files it was built from (pqcount.c, qemu-plugin.h)
#   DEST/.complete      stamp written last; when it names the installed qemu-user and the
#                       plugin source's hash the script does nothing (about 0.1 s)
# Check:  qemu-aarch64 -plugin DEST/libpqcount.so -d plugin PROGRAM  prints "insns: N" (and a
#         "mark: N" line per lseek(-1, 0x5051434d, SEEK_SET) the program makes)
#
# Recipe (Debian host, root or passwordless sudo; needs only the Debian mirror):
#   1. apt-get install -y gcc pkg-config libglib2.0-dev xz-utils (only what is missing)
#   2. without deb-src entries, write /etc/apt/sources.list.d/pqcompile-deb-src.sources: the
#      Debian entries of the configured sources with "Types: deb-src"; apt-get update
#   3. apt-get source --download-only qemu=<source version of the installed qemu-user>
#      (~24 MB), extract include/qemu/qemu-plugin.h from the .orig tarball (or the whole
#      unpacked package when a Debian patch changes it; none does in 1:7.2+dfsg-7+deb12u18)
#   4. gcc -O2 -fPIC -shared $(pkg-config --cflags glib-2.0) -I include/qemu pqcount.c \
#          -o libpqcount.so $(pkg-config --libs glib-2.0)
#   5. smoke test: count a tiny static aarch64 program with two marks under qemu-aarch64
# The plugin API is versioned per QEMU release (QEMU_PLUGIN_VERSION): the stamp records the
# qemu-user version, so upgrading qemu-user rebuilds the plugin. Takes about 10 s.
#
# Environment overrides: PQCOMPILE_SKIP_HOST_TOOLS=1 (install nothing with apt-get).
set -euo pipefail

DEST="${1:-${PQCOMPILE_CACHE:-$HOME/.cache/pqcompile}/qemu-plugin}"
FILES=(include/qemu/qemu-plugin.h)
PLUGIN_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/qemu_plugin/pqcount.c"
[ -f "$PLUGIN_SRC" ] || { printf '[insn-plugin] error: %s is missing\n' "$PLUGIN_SRC" >&2; exit 1; }
SRC_LIST=/etc/apt/sources.list.d/pqcompile-deb-src.sources
# "command or file:Debian package"
HOST_TOOLS=(
    qemu-aarch64:qemu-user
    gcc:gcc
    pkg-config:pkg-config
    /usr/include/glib-2.0/glib.h:libglib2.0-dev
    xz:xz-utils
    aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu
    /usr/aarch64-linux-gnu/lib/libc.so:libc6-dev-arm64-cross
)

log() { printf '[insn-plugin] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

source "$(dirname "${BASH_SOURCE[0]}")/host_tools.sh"  # as_root, apt_update, install_host_tools


dpkg -s qemu-user >/dev/null 2>&1 || [ "${PQCOMPILE_SKIP_HOST_TOOLS:-0}" != 1 ] \
    || die "qemu-user is not installed: apt-get install qemu-user"
install_host_tools

# The source package qemu-user was built from; "+bN" binary rebuilds share their source.
SRC_VERSION="$(dpkg-query -W -f='${source:Version}' qemu-user)"
BIN_VERSION="$(dpkg-query -W -f='${Version}' qemu-user)"
STAMP="v2 qemu-user=$BIN_VERSION source=$SRC_VERSION plugin=$(sha256sum "$PLUGIN_SRC" | cut -c1-16)"
if [ -f "$DEST/.complete" ] && [ -f "$DEST/libpqcount.so" ] \
        && [ "$(cat "$DEST/.complete")" = "$STAMP" ]; then
    log "up to date: $DEST/libpqcount.so (qemu-user $BIN_VERSION)"
    exit 0
fi

# deb-src entries mirroring the configured Debian "deb" entries (deb822 and one-line formats).
write_deb_src_list() {
    local out
    out="$(
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -f "$f" ] && [ "$f" != "$SRC_LIST" ] || continue
            awk 'BEGIN { RS = ""; ORS = "\n\n" }
                 /(^|\n)Types:[^\n]*(^|[ \t])deb([ \t]|\n|$)/ && /URIs:[^\n]*debian/ {
                     n = split($0, lines, "\n"); out = ""
                     for (i = 1; i <= n; i++) {
                         if (lines[i] ~ /^#/) continue
                         if (lines[i] ~ /^Types:/) lines[i] = "Types: deb-src"
                         out = out lines[i] "\n"
                     }
                     printf "%s\n", out
                 }' "$f"
        done
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -f "$f" ] || continue
            sed -n 's/^deb \(.*debian.*\)$/\1/p' "$f" | while read -r line; do
                # one-line "deb [opts] URI SUITE COMPONENTS..." as a deb822 stanza
                opts=""; if [[ "$line" == \[* ]]; then opts="${line%%]*}"; line="${line#*] }"; fi
                read -r uri suite comps <<<"$line"
                printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: %s\n' \
                    "$uri" "$suite" "$comps"
                if [[ "$opts" == *signed-by=* ]]; then
                    key="${opts#*signed-by=}"; printf 'Signed-By: %s\n' "${key%% *}"
                fi
                printf '\n'
            done
        done
    )"
    [ -n "$out" ] || die "no Debian entries in /etc/apt/sources.list{,.d/} to derive deb-src \
entries from; add a deb-src entry for your Debian mirror"
    log "adding deb-src entries for the configured Debian mirror: $SRC_LIST"
    printf '# Written by pqcompile scripts/build_insn_plugin.sh: source packages of the\n# %s\n\n%s\n' \
        "configured Debian mirror (the qemu plugin is built from qemu's source package)." \
        "$out" | as_root tee "$SRC_LIST" >/dev/null
    apt_updated=0
    apt_update
}

has_source() {  # (no pipe into grep -q: with pipefail, apt-cache's SIGPIPE would count as failure)
    local versions
    versions="$(apt-cache showsrc qemu 2>/dev/null || true)"
    grep -qx "Version: $SRC_VERSION" <<<"$versions"
}

if ! has_source; then
    if [ ! -f "$SRC_LIST" ]; then
        write_deb_src_list
    else
        apt_update
    fi
fi
has_source || die "the Debian mirror offers no source package qemu=$SRC_VERSION (for the installed \
qemu-user $BIN_VERSION): upgrade qemu-user (apt-get install qemu-user) and run this again"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pqcompile-qemu-src.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
log "downloading the qemu $SRC_VERSION source package (~24 MB)"
(
    cd "$WORK"
    # apt drops privileges to _apt for downloads, which cannot write here as root.
    apt-get source --download-only -qq -o APT::Sandbox::User=root "qemu=$SRC_VERSION" >/dev/null
)
orig=("$WORK"/qemu_*.orig.tar.*)
debian=("$WORK"/qemu_*.debian.tar.*)
[ -f "${orig[0]}" ] && [ -f "${debian[0]}" ] \
    || die "apt-get source fetched no .orig/.debian tarballs for qemu=$SRC_VERSION"

tar -xf "${debian[0]}" -C "$WORK" debian/patches
touched=()
if [ -f "$WORK/debian/patches/series" ]; then
    while read -r name _; do
        [ -n "$name" ] && [[ "$name" != \#* ]] || continue
        for f in "${FILES[@]}"; do
            if grep -q -E "^\+\+\+ [^/]+/$f([[:space:]]|\$)" "$WORK/debian/patches/$name"; then
                touched+=("$name")
            fi
        done
    done < "$WORK/debian/patches/series"
fi
if [ "${#touched[@]}" -eq 0 ]; then
    # Debian's patches leave both files alone: take them from the upstream tarball.
    mkdir "$WORK/src"
    tar -xf "${orig[0]}" -C "$WORK/src" --strip-components=1 --wildcards "${FILES[@]/#/*/}"
else
    log "debian/patches ${touched[*]} change the plugin sources: unpacking the whole package"
    command -v dpkg-source >/dev/null 2>&1 || die "dpkg-source missing: apt-get install dpkg-dev"
    (cd "$WORK" && dpkg-source --no-check -q -x ./*.dsc src >/dev/null)
fi
for f in "${FILES[@]}"; do
    [ -f "$WORK/src/$f" ] || die "$f is not in the qemu $SRC_VERSION source package"
done

log "building libpqcount.so with gcc and glib-2.0 headers"
PARTIAL="$DEST.partial"
rm -rf "$PARTIAL"
mkdir -p "$PARTIAL/src"
cp "$PLUGIN_SRC" "$WORK/src/include/qemu/qemu-plugin.h" "$PARTIAL/src/"
# shellcheck disable=SC2046  # pkg-config prints several words on purpose
gcc -O2 -fPIC -shared -Wall -Wno-unused-parameter $(pkg-config --cflags glib-2.0) \
    -I "$PARTIAL/src" "$PARTIAL/src/pqcount.c" -o "$PARTIAL/libpqcount.so" \
    $(pkg-config --libs glib-2.0)

log "smoke test: counting a tiny aarch64 program with two marks under qemu-aarch64"
cat > "$WORK/loop.c" <<'EOF'
#include <unistd.h>
int main(void) {
    volatile long s = 0;
    lseek(-1, 0x5051434d, SEEK_SET);
    for (long i = 0; i < 1000; i++) s += i;
    lseek(-1, 0x5051434d, SEEK_SET);
    return 0;
}
EOF
aarch64-linux-gnu-gcc -O1 -static "$WORK/loop.c" -o "$WORK/loop"
out="$(qemu-aarch64 -plugin "$PARTIAL/libpqcount.so" -d plugin "$WORK/loop" 2>&1)" \
    || die "qemu-aarch64 did not run the plugin: $out"
grep -qE '^insns: [1-9][0-9]*$' <<<"$out" \
    || die "qemu-aarch64 -plugin printed no instruction count: $out"
mapfile -t marks < <(sed -n 's/^mark: //p' <<<"$out")
[ "${#marks[@]}" -eq 2 ] && [ $((marks[1] - marks[0])) -ge 1000 ] \
    || die "the plugin did not record the program's two marks 1000+ instructions apart: $out"
log "smoke test: $(tr '\n' ' ' <<<"$out")(the loop: $((marks[1] - marks[0])) instructions)"

printf '%s' "$STAMP" > "$PARTIAL/.complete"
rm -rf "$DEST"
mv "$PARTIAL" "$DEST"
log "done: $DEST/libpqcount.so"
