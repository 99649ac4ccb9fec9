#!/usr/bin/env bash
# The README's main-job command: run an unmodified python3 whose heap is ~8x the DRAM cache
# under lego, and show that it gives the same answer as without lego while its resident
# memory stays near the cache size.
#
#   scripts/demo.sh [CACHE]      CACHE like 32M (default), 128M, 1G; or LEGO_DEMO_CACHE=...
#
# Steps: set-up and release build (as scripts/test.sh does), a native run, then the same
# run through `lego run --cache CACHE` with LEGO_STATS=1; prints both results, the stats and
# peak RSS next to the cache size.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

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
trap 'rm -rf "$tmp"' EXIT
export PYTHONMALLOC=malloc PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1

say "native: $python structure.py $scale (a heap of about $(( cache_mib * 8 )) MiB)"
/usr/bin/time -f '%M' -o "$tmp/native.rss" "$python" "$script" "$scale" | tee "$tmp/native.out" \
    || die "the native run failed (exit status ${PIPESTATUS[0]})"

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
