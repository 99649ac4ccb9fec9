#!/usr/bin/env bash
# The README's main-job command: run an unmodified python3 whose heap is ~8x the DRAM cache
# under lego, and show that it gives the same answer as without lego while its resident
# memory stays near the cache size.
#
#   scripts/demo.sh [CACHE]         CACHE like 32M (default), 128M, 1G; or LEGO_DEMO_CACHE=...
#   scripts/demo.sh --pool [CACHE]  the same run with its pages on a pool of three memcached
#                                   servers keeping two copies of each, one server killed
#                                   midway
#
# Steps: set-up and release build (as scripts/test.sh does), a native run, then the same
# run through `lego run --cache CACHE` with LEGO_STATS=1; prints both results, the stats and
# peak RSS next to the cache size.
#
# With --pool: three memcached servers on free loopback ports (`-M -m MB`, MB the larger of
# 256 and the heap's size, so the two servers left have room for two copies of most of it;
# the default cache gives 256), the run under lego with
# LEGO_BACKEND=memcached://... and LEGO_REPLICAS=2, one server killed with SIGKILL after
# LEGO_DEMO_KILL_AFTER seconds (default 3); prints both outputs and an OK or FAIL line. The
# servers are always stopped.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

pool=0
if [ "${1:-}" = "--pool" ]; then
    pool=1
    shift
fi
cache="${1:-${LEGO_DEMO_CACHE:-32M}}"
case "$cache" in
    *[kK]) cache_mib=$(( ${cache%?} / 1024 )) ;;
    *[mM]) cache_mib=${cache%?} ;;
    *[gG]) cache_mib=$(( ${cache%?} * 1024 )) ;;
    *) die "CACHE must be a whole number with K, M or G (64M, 1G), not '$cache'" ;;
esac
case "$cache_mib" in
    '' | *[!0-9]*) die "CACHE must be a whole number with K, M or G (64M, 1G), not '$cache'" ;;
esac
[ "$cache_mib" -ge 8 ] || die "CACHE must be at least 8M for this demo, not '$cache'"

scripts/test.sh --setup-only
say "cargo build --release --workspace"
cargo build --release --workspace

# The structure takes about 430 MiB of heap per million entries; aim for 8x the cache.
scale=$(( cache_mib * 8 * 1000000 / 180 ))
script="$root/tests/real/structure.py"
# The real interpreter, not a wrapper script (pyenv): only the program should be preloaded.
python="$(python3 -c 'import sys; print(sys.executable)')"
tmp="$(mktemp -d)"
server_pids=()
# The process PID still is a memcached (not one that took a reaped server's pid).
is_memcached() { [ "$(cat "/proc/$1/comm" 2>/dev/null)" = memcached ]; }
cleanup() {
    local pid
    for pid in "${server_pids[@]}"; do
        if is_memcached "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
export PYTHONMALLOC=malloc PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1

say "native: $python structure.py $scale (a heap of about $(( cache_mib * 8 )) MiB)"
/usr/bin/time -f '%M' -o "$tmp/native.rss" "$python" "$script" "$scale" | tee "$tmp/native.out" \
    || die "the native run failed (exit status ${PIPESTATUS[0]})"

if [ "$pool" = 1 ]; then
    # Servers big enough that the two left after the kill have room for two copies of the
    # heap's pages (a 4 KiB page takes a slab chunk of about 4.5 KiB).
    heap_mib=$(( cache_mib * 8 ))
    server_mib=$(( heap_mib > 256 ? heap_mib : 256 ))
    kill_after="${LEGO_DEMO_KILL_AFTER:-3}"
    case "$kill_after" in
        '' | *[!0-9]*) die "LEGO_DEMO_KILL_AFTER must be a whole number of seconds, not '$kill_after'" ;;
    esac
    command -v memcached >/dev/null 2>&1 || die "memcached is not installed (scripts/test.sh --setup-only installs it)"
    # Three distinct free loopback ports, held together while they are picked.
    read -r -a ports < <("$python" -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
    as_root=()
    if [ "$(id -u)" = 0 ]; then
        # memcached refuses to run as root without naming the user.
        as_root=(-u root)
    fi
    servers=()
    for port in "${ports[@]}"; do
        memcached -l 127.0.0.1 -p "$port" -M -m "$server_mib" -U 0 "${as_root[@]}" \
            >"$tmp/memcached.$port.log" 2>&1 &
        server_pids+=("$!")
        # Not a job of this shell: killing it midway is the point, not news to report.
        disown "$!"
        servers+=("127.0.0.1:$port")
    done
    for port in "${ports[@]}"; do
        tries=0
        until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
            tries=$(( tries + 1 ))
            [ "$tries" -le 100 ] || die "memcached on 127.0.0.1:$port did not start: $(cat "$tmp/memcached.$port.log")"
            sleep 0.1
        done
    done
    backend="memcached://$(IFS=,; echo "${servers[*]}")"
    victim_pid="${server_pids[1]}"
    victim="${servers[1]}"

    say "under lego on a pool: LEGO_BACKEND=$backend LEGO_REPLICAS=2 lego run --cache $cache -- $python structure.py $scale   (memcached -M -m $server_mib each; $victim is killed after ${kill_after}s)"
    # Sleeps in short steps so that stopping it early (the run ended first) leaves no sleep
    # behind; kills only a process that still is memcached.
    (
        for (( step = 0; step < kill_after * 10; step++ )); do
            sleep 0.1
        done
        if is_memcached "$victim_pid" && kill -KILL "$victim_pid" 2>/dev/null; then
            echo "$(date +%T) killed memcached $victim (pid $victim_pid) with SIGKILL" >&2
            touch "$tmp/killed"
        fi
    ) &
    killer=$!
    lego_status=0
    LEGO_STATS=1 LEGO_BACKEND="$backend" LEGO_REPLICAS=2 /usr/bin/time -f '%M' -o "$tmp/lego.rss" \
        "$root/target/release/lego" run --cache "$cache" -- "$python" "$script" "$scale" \
        | tee "$tmp/lego.out" || lego_status="${PIPESTATUS[0]}"
    kill "$killer" 2>/dev/null || true
    wait "$killer" 2>/dev/null || true

    say "result"
    echo "--- native output:"
    cat "$tmp/native.out"
    echo "--- output under lego on the pool ($victim killed midway):"
    cat "$tmp/lego.out"
    echo "---"
    if [ -e "$tmp/killed" ]; then
        when="after $victim was killed"
    else
        when="before any server was killed"
    fi
    if [ "$lego_status" != 0 ]; then
        echo "FAIL: the run under lego ended with $(head -n 1 "$tmp/lego.rss") (exit status $lego_status) $when"
        exit 1
    fi
    if ! cmp -s "$tmp/native.out" "$tmp/lego.out"; then
        echo "FAIL: the output under lego differs from the native output ($when):"
        diff "$tmp/native.out" "$tmp/lego.out" || true
        exit 1
    fi
    if [ ! -e "$tmp/killed" ]; then
        echo "FAIL: the run ended within ${kill_after}s, before any server was killed (set LEGO_DEMO_KILL_AFTER lower)"
        exit 1
    fi
    echo "OK: the output under lego is identical to the native output, although $victim was killed midway"
    exit 0
fi

say "under lego: lego run --cache $cache -- $python structure.py $scale   (LEGO_STATS=1)"
# Keep going if it fails: the comparison below says what went wrong.
lego_status=0
LEGO_STATS=1 /usr/bin/time -f '%M' -o "$tmp/lego.rss" \
    "$root/target/release/lego" run --cache "$cache" -- "$python" "$script" "$scale" \
    | tee "$tmp/lego.out" || lego_status="${PIPESTATUS[0]}"

say "result"
if [ "$lego_status" != 0 ]; then
    # time's report names the signal or status of the program it ran.
    echo "the run under lego FAILED: $(head -n 1 "$tmp/lego.rss") (exit status $lego_status)"
    exit 1
fi
if cmp -s "$tmp/native.out" "$tmp/lego.out"; then
    echo "output under lego is identical to the native output"
else
    echo "OUTPUT DIFFERS from the native run:"
    diff "$tmp/native.out" "$tmp/lego.out" || true
    exit 1
fi
native_kib="$(tail -n 1 "$tmp/native.rss")"
lego_kib="$(tail -n 1 "$tmp/lego.rss")"
printf 'peak RSS native:     %6d MiB\n' $(( native_kib / 1024 ))
printf 'peak RSS under lego: %6d MiB   (cache %d MiB)\n' $(( lego_kib / 1024 )) "$cache_mib"
