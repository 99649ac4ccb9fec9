#!/usr/bin/env bash
# The recovery script: rebuild a program's heap from its log directory (LEGO_LOG_DIR) as of
# the last committed epoch, and print the command that restarts the program on it.
#
#   scripts/replay.sh LOG_DIR [IMAGE] [--epoch N | --checkpoint] [--strict]
#
#   LOG_DIR     the directory the program logged to (LEGO_LOG_DIR)
#   IMAGE       the heap image to write (mode 0600); default: LOG_DIR.img next to LOG_DIR.
#               An existing file there is replaced only if it is a lego image.
#   --epoch N   point-in-time recovery: rebuild epoch N instead of the last one
#   --checkpoint  rebuild the newest program checkpoint (an epoch the program made with
#               lego_checkpoint(), where its invariants hold) instead of the last epoch
#   --strict    refuse (non-zero exit, no image) when anything in the log is damaged, instead
#               of recovering the last complete epoch before the damage
#
# Builds target/release/lego and liblego.so with `cargo build --release` when they are
# missing or older than the sources (so it needs cargo only then), runs `lego replay`, which
# prints what it recovered and what it left out, and exits with its status: 0 when an epoch
# was recovered, non-zero with a message when the log holds nothing usable.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
usage_text="usage: scripts/replay.sh LOG_DIR [IMAGE] [--epoch N | --checkpoint] [--strict]"
usage() { die "$usage_text"; }

log_dir=""
image=""
epoch_args=()
strict_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --epoch)
            [ $# -ge 2 ] || usage
            [ ${#epoch_args[@]} -eq 0 ] || die "give one of --epoch N and --checkpoint ($usage_text)"
            epoch_args=(--epoch "$2")
            shift 2
            ;;
        --checkpoint)
            [ ${#epoch_args[@]} -eq 0 ] || die "give one of --epoch N and --checkpoint ($usage_text)"
            epoch_args=(--checkpoint)
            shift
            ;;
        --strict)
            strict_args=(--strict)
            shift
            ;;
        -h | --help) usage ;;
        -*) die "unknown option $1 ($usage_text)" ;;
        *)
            if [ -z "$log_dir" ]; then
                log_dir="$1"
            elif [ -z "$image" ]; then
                image="$1"
            else
                usage
            fi
            shift
            ;;
    esac
done
[ -n "$log_dir" ] || usage
[ -d "$log_dir" ] || die "$log_dir is not a directory (give the program's LEGO_LOG_DIR)"
log_dir="${log_dir%/}"
[ -n "$log_dir" ] || die "LOG_DIR cannot be /"
image="${image:-$log_dir.img}"

target_dir="${CARGO_TARGET_DIR:-$root/target}"
lego="$target_dir/release/lego"
lib="$target_dir/release/liblego.so"

# Whether the tool must be (re)built: missing, or older than any source it is built from.
needs_build() {
    [ -x "$lego" ] && [ -f "$lib" ] || return 0
    local newer
    newer="$(find "$root/runtime" "$root/preload" "$root/Cargo.toml" "$root/Cargo.lock" \
        \( -name '*.rs' -o -name '*.c' -o -name '*.h' -o -name 'Cargo.toml' -o -name 'Cargo.lock' \) \
        -newer "$lego" -print -quit)"
    [ -n "$newer" ]
}

if needs_build; then
    command -v cargo >/dev/null 2>&1 \
        || die "cargo is not on PATH and $lego is missing or stale: install Rust (https://rustup.rs)"
    say "building lego: cargo build --release"
    (cd "$root" && cargo build --release)
fi

say "lego replay $log_dir -o $image ${epoch_args[*]:-} ${strict_args[*]:-}"
report="$("$lego" replay "$log_dir" -o "$image" "${epoch_args[@]}" "${strict_args[@]}")" || exit $?
printf '%s\n' "$report"

image_abs="$(cd "$(dirname "$image")" && pwd)/$(basename "$image")"
log_abs="$(cd "$log_dir" && pwd)"
say "restart the program on the recovered heap (same binary, same arguments):"
printf '    LEGO_RESTORE=%q LD_PRELOAD=%q PROGRAM [ARGS...]\n' "$image_abs" "$lib"
if [ ${#epoch_args[@]} -eq 0 ]; then
    printf '\nto keep logging to the same directory, add LEGO_LOG_DIR=%q\n' "$log_abs"
else
    # The epoch recovered, from the report's first line ("recovered [program checkpoint]
    # epoch N ...").
    recovered="$(printf '%s\n' "$report" | sed -n '1s/^recovered [a-z ]*epoch \([0-9][0-9]*\).*/\1/p')"
    printf '\nto keep logging to the same directory, add LEGO_LOG_DIR=%q: the log then\n' "$log_abs"
    printf 'continues from epoch %s, and the epochs after it are dropped\n' "${recovered:-?}"
fi
