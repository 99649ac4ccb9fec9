#!/usr/bin/env bash
# The README's test command: set up what the tests need, build the release artifacts the
# integration tests drive (target/release/liblego.so, target/release/lego), run every test,
# then the linters.
#
#   scripts/test.sh               set-up, build, test, clippy, fmt --check
#   scripts/test.sh --setup-only  only install missing tools (used by scripts/demo.sh)
#
# Set-up is idempotent: tools already present are not touched; missing ones are installed
# with apt-get when running as root, otherwise the script says what to install and stops.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Debian package for each tool the build or the tests use.
missing_packages() {
    local missing=()
    command -v gcc >/dev/null 2>&1 || missing+=(gcc)
    command -v g++ >/dev/null 2>&1 || missing+=(g++)
    command -v sqlite3 >/dev/null 2>&1 || missing+=(sqlite3)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    [ -x /usr/bin/time ] || missing+=(time)
    command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
    command -v memcached >/dev/null 2>&1 || missing+=(memcached)
    # Redis is one of the real programs (redis-server; redis-cli and redis-benchmark drive it).
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
    # lego top is tested in a real terminal.
    command -v tmux >/dev/null 2>&1 || missing+=(tmux)
    # ip (network namespaces for the pool's network tests) lives in /usr/sbin, which is not
    # on every user's PATH.
    command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2)
    if command -v dpkg-query >/dev/null 2>&1; then
        dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q 'install ok installed' \
            || missing+=(libclang-dev)
    fi
    echo "${missing[@]}"
}

setup() {
    local missing
    missing="$(missing_packages)"
    if [ -n "$missing" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "installing missing packages: $missing"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update
            # shellcheck disable=SC2086 # one word per package
            apt-get install -y --no-install-recommends $missing
        else
            die "missing packages: $missing (install them, or run this script as root on Debian/Ubuntu)"
        fi
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH: install Rust (https://rustup.rs)"
    if command -v rustup >/dev/null 2>&1; then
        for component in clippy rustfmt; do
            if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
                say "installing the $component component"
                rustup component add "$component"
            fi
        done
    fi
}

setup
if [ "${1:-}" = "--setup-only" ]; then
    exit 0
fi

say "cargo build --release --workspace"
cargo build --release --workspace

# --no-fail-fast: one failing test binary must not hide the others' results.
say "cargo test --release --workspace"
cargo test --release --workspace --no-fail-fast

say "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

say "cargo fmt --check"
cargo fmt --all --check

say "all tests and checks passed"
