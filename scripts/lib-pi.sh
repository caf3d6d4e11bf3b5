# Helpers shared by the Pi, packaging and container scripts; sourced, never run.
# Every script fails loudly: a missing tool is an error, never a skip.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# release (fat LTO, what a user installs) or ci (thin LTO, several times faster to build).
PROFILE=${PROFILE:-release}

die() { echo "$(basename "$0"): error: $*" >&2; exit 1; }
log() { echo "== $(basename "$0"): $*" >&2; }

# The target directory cargo uses for a profile ("dev" builds into "debug").
profile_dir() { if [ "$PROFILE" = dev ]; then echo debug; else echo "$PROFILE"; fi; }

# apt_install PKG...: installs the Debian packages that are missing. apt-get
# update runs at most once per script run. A policy-rc.d that exits 101 keeps
# packages that ship services from starting them (and taking ports).
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing Debian packages (${missing[*]}); run as root to install them"
    log "installing ${missing[*]}"
    local made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    if [ -z "${TCPFWD_APT_UPDATED:-}" ]; then
        apt-get update -q >&2 || die "apt-get update failed"
        export TCPFWD_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
    return 0
}

# need CMD...: fails unless every command exists.
need() {
    local c
    for c in "$@"; do command -v "$c" >/dev/null || die "'$c' not found"; done
}

# Rust target triple -> Debian architecture.
deb_arch() {
    case "$1" in
        x86_64-unknown-linux-gnu) echo amd64 ;;
        aarch64-unknown-linux-gnu) echo arm64 ;;
        armv7-unknown-linux-gnueabihf) echo armhf ;;
        *) die "no Debian architecture known for target '$1'" ;;
    esac
}

# Rust target triple -> GNU triple of Debian's cross toolchain.
gnu_triple() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo aarch64-linux-gnu ;;
        armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf ;;
        *) die "no cross toolchain known for target '$1'" ;;
    esac
}

# The release binary of a target (built by scripts/cross or cargo build).
bin_path() {
    if [ "$1" = x86_64-unknown-linux-gnu ]; then
        echo "$CARGO_TARGET_DIR/$(profile_dir)/tcpfwd"
    else
        echo "$CARGO_TARGET_DIR/$1/$(profile_dir)/tcpfwd"
    fi
}

# Picks a random TCP port below the kernel's ephemeral range (so no outgoing
# connection holds it) on which nothing listens on 127.0.0.1.
free_port() {
    local low p
    low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
    [ "$low" -gt 12000 ] || low=32768
    for _ in $(seq 1 50); do
        p=$(( 10000 + RANDOM % (low - 10000) ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

# debian_mirror: the first archive URL apt uses for the suite bookworm
# (one-line .list entries and deb822 .sources paragraphs).
debian_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) while ($i !~ /\]$/) i++; if ($i ~ /^\[/ || $i ~ /\]$/) i++;
                           if ($(i + 1) == "bookworm") { print $i; exit } }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'BEGIN { RS = ""; FS = "\n" }
             { uri = ""; ok = 0; deb = 1
               for (j = 1; j <= NF; j++) {
                   if ($j ~ /^URIs:/) { split($j, a, /[ \t]+/); uri = a[2] }
                   if ($j ~ /^Suites:/ && (" " $j " ") ~ /[ \t]bookworm[ \t]/) ok = 1
                   if ($j ~ /^Types:/ && $j !~ /[ \t]deb([ \t]|$)/) deb = 0
                   if ($j ~ /^Enabled: *no/) deb = 0 }
               if (ok && deb && uri != "") { print uri; exit } }' "$f"
    done | sed -n 1p
}
