# Sourced by the set-up scripts: root commands, one apt-get update, and installing the host
# tools a script lists in HOST_TOOLS ("command-or-path:debian-package" pairs) that are missing.
# The sourcing script defines log() and die(); PQCOMPILE_SKIP_HOST_TOOLS=1 installs nothing.

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "'$*' needs root; run this script as root or install sudo"; fi
}

apt_updated=0
apt_update() {
    if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
}

install_host_tools() {
    [ "${PQCOMPILE_SKIP_HOST_TOOLS:-0}" != 1 ] || return 0
    local missing=() pair tool
    for pair in "${HOST_TOOLS[@]}"; do
        tool="${pair%%:*}"
        if [[ "$tool" == /* ]]; then [ -e "$tool" ] || missing+=("${pair#*:}")
        else command -v "$tool" >/dev/null 2>&1 || missing+=("${pair#*:}"); fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing host tools: ${missing[*]}"
        apt_update
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}
