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
    # Packages that ship services must not start them (nginx, haproxy take
    # port 80): Debian's maintainer scripts ask policy-rc.d, and 101 is "no".
    # Ours is used for the install even where one exists (it might allow
    # starts); the one that was there comes back afterwards, also on failure.
    # A saved one left by an interrupted run is the original: keep it.
    local rc=/usr/sbin/policy-rc.d saved=/usr/sbin/policy-rc.d.tcpfwd-saved status=0
    if { [ -e "$rc" ] || [ -L "$rc" ]; } && ! { [ -e "$saved" ] || [ -L "$saved" ]; }; then
        as_root mv -f "$rc" "$saved"
    fi
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$rc" >/dev/null
    as_root chmod 755 "$rc"
    DEBIAN_FRONTEND=noninteractive as_root apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" || status=$?
    as_root rm -f "$rc"
    if [ -e "$saved" ] || [ -L "$saved" ]; then as_root mv -f "$saved" "$rc"; fi
    return $status
}

# need_server_debs PKG...: need_debs for servers the tests run themselves on
# their own ports (nginx, haproxy). need_debs keeps the packages' services from
# starting; on a host booted with systemd, those just installed are also
# disabled, so that they do not start on port 80 at the next boot. A package
# that was already installed keeps the state its owner gave it.
need_server_debs() {
    local fresh=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || fresh+=("$p")
    done
    [ ${#fresh[@]} -eq 0 ] && return 0
    need_debs "${fresh[@]}"
    if [ -d /run/systemd/system ]; then
        for p in "${fresh[@]}"; do
            as_root systemctl disable --now "$p.service" >/dev/null 2>&1 || true
        done
    fi
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
