# Shared shell helpers for scripts/: sourced, not run.

# as_root CMD...: runs CMD as root (directly, or through sudo).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# need_debs PKG...: installs the Debian packages that are not installed yet.
# Runs apt-get update once per call that has something to install.
need_debs() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo ">> installing Debian packages: ${missing[*]}"
    # A fresh machine may still be running its own apt jobs: wait for the lock.
    local i
    for i in 1 2 3; do
        as_root apt-get -o DPkg::Lock::Timeout=600 update -qq && break
        [ "$i" -eq 3 ] && return 1
        sleep 10
    done
    # Packages that ship services must not start them (nginx, haproxy take ports).
    local rc=/usr/sbin/policy-rc.d had_rc=0
    [ -e "$rc" ] && had_rc=1
    if [ $had_rc -eq 0 ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$rc" >/dev/null
        as_root chmod 755 "$rc"
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
    [ $had_rc -eq 1 ] || as_root rm -f "$rc"
}

# need_rust: makes sure cargo, rustfmt and clippy are there.
need_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || {
        echo "cargo not found: install Rust (https://rustup.rs) and run this again" >&2
        return 1
    }
    if command -v rustup >/dev/null 2>&1; then
        rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
        rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
    fi
}
