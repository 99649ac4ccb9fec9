#!/usr/bin/env bash
# The README's benchmark command: every benchmark against its baseline in one run, on one
# machine, alternating A B A B over several rounds, compared by medians.
#
#   scripts/bench.sh                      full run: 5 rounds, heap 256 MiB over a 64 MiB cache
#                                         (about an hour here, most of it the scheme table)
#   scripts/bench.sh --quick              3 rounds, heap 128 MiB over 32 MiB (~25 min here)
#   scripts/bench.sh [--quick] --only pool   only the memcached pool rows (~1.5 min quick here),
#                                         so that they can be rerun alone on a shared machine
#   scripts/bench.sh [--quick] --only watch  only the rows of what publishing costs (~1 min quick)
#   scripts/bench.sh [--quick] --only swap   only the oversubscribed rows and the cache curve,
#                                         lego vs kernel swap vs zswap
#   scripts/bench.sh [--quick] --only fork   only fork() of a heap 90% evicted (issue 14)
#   scripts/bench.sh [--quick] --only real   only the real programs under pressure (Perl, Python,
#                                         SQLite, Redis, gcc)
#   scripts/bench.sh [--quick] --only codes  only the scheme table: copies against erasure
#                                         codes, with and without a key, on 10 servers
#                                         (~9 min quick here)
#
# Benchmarks (C programs in bench/, compiled into target/bench/bin/) and their baselines:
#   first touch      lego (cache larger than the heap) vs the kernel's anonymous fault (no
#                    shim) and vs the naive userfaultfd floor (bench/uffd_floor.c)
#   oversubscribed   seq, random, zipf, mt over a heap 4x the cache: lego in a memory cgroup
#                    capped at cache + 16 MiB (the stated overhead) with no swap, vs the same
#                    program without the shim in a cgroup capped at the cache with a swap file
#                    on the same disk (kernel swap), the same with zswap on (compressed swap in
#                    RAM, lz4 where the kernel has it), plus an uncapped native run for reference
#   thread scaling   page_sweep mt under lego with 1 .. nproc threads
#   cache curve      zipf at a cache of 10/25/50/100% of the working set, lego vs kernel swap
#                    vs zswap
#                    (target/bench/cache_curve.png)
#   allocator        bench/alloc_bench.c modes, lego with the heap all resident vs glibc:
#                    time and peak RSS (/usr/bin/time -f %M), geometric means of the ratios
#   log append       durable heap: bench/log_write.c checkpoint, epochs of every page of a
#                    256 MiB block appended by lego_checkpoint() (MB/s of the median call) vs
#                    dd oflag=direct conv=fdatasync of as many bytes to the log's file system
#   logging cost     bench/log_write.c update (random word increments over a heap in the
#                    cache, a few seconds) under lego with LEGO_LOG_DIR (default interval and
#                    sync) vs lego without a log; epochs committed from LEGO_STATS
#   replay           lego replay of the log the log-append run left vs dd iflag=direct of
#                    its segments, the page cache dropped before each (needs root)
#   memcached pool   (issue 11) lego's pool store on memcached servers this script starts on
#                    loopback (free ports, -M, -m sized so that each holds a copy of every
#                    page of the heap, -U 0 -t 2), a fresh set for every run, all stopped at
#                    exit; without memcached the rows say "skipped (memcached not installed)":
#     fetch bandwidth   page_sweep seqread (read-only sweeps of a heap 4x the cache, after an
#                    untimed sweep, so the timed ones only fetch, in read-ahead windows) under
#                    lego with LEGO_BACKEND=memcached://ONE, pages read per second of the timed
#                    sweeps, vs bench/mc_raw.c on the same kind of server: the same number of
#                    4104-byte values read back with pipelined `mg KEY v q O<n>` + `mn`, as many
#                    per pipeline as lego's read-ahead reads at once (FETCH_CHUNK_PAGES, read
#                    from runtime/src/pager/mod.rs), one pipeline at a time (lego sends the
#                    next chunk's pipeline before it installs the current one, which the raw
#                    loop does not have to do; the pipelines are the same)
#     pool vs file/swap  seq and random over a heap 4x the cache on three servers, one copy,
#                    vs lego on the file store and vs kernel swap (cgroups as above)
#     sealing        the same seq and random pool runs with LEGO_KEY_FILE (every value
#                    sealed with AES-256-GCM) vs without, alternated in each round
#     replication    page_sweep write (random page writes: every page touched is dirty) over
#                    a heap 4x the cache on three servers, LEGO_REPLICAS=2 pessimistic and
#                    optimistic vs LEGO_REPLICAS=1
#                    A pool run whose server was full or failed (the stats' pool_server_N
#                    full= and errors=) counts as failed: its pages stayed in the cache.
#   schemes          (issue 12) one table, a row per way a pool survives lost servers: 1 copy,
#                    LEGO_REDUNDANCY=replicas:2, replicas:3, rs:4+2, rs:8+2 (replicas pessimistic,
#                    as rs writes), each without and with LEGO_KEY_FILE, all on the same
#                    10 fresh memcached servers (rs:8+2 needs 10), alternated in every
#                    round: page_sweep seq, random and write over a heap 4x the cache. Columns:
#                    pool memory per heap byte (memcached `stats` bytes summed over the servers
#                    after the run, page_sweep keeping its heap at exit, over 4096 x the pages
#                    the pool held, pool_stored_pages), servers that may be lost, the seq and
#                    random times and the random page writes per second (each evicts a dirty
#                    page: write-back bound), each also as a ratio to replicas:2 with the same
#                    key setting, and CPU per page moved (user + sys of the lego process, from
#                    /usr/bin/time, over pages_fetched + pages_written_back; the servers' CPU
#                    is not in it), and the peak RSS of the lego process (no memory cgroup
#                    in these rows: see run_codes). Goals: rs:4+2 at most 1.6 bytes per heap
#                    byte, its seq and random time at most 1.25x replicas:2's, sealing at
#                    most 1.10x.
#   publishing       (issue 15) the random-fault workload over a heap 4x the cache and the
#                    allocator's small-object loop, lego publishing its statistics every
#                    second (LEGO_PUBLISH=on, the default every other lego row runs with) vs
#                    LEGO_PUBLISH=off
#
# Output: the table on stdout; target/bench/results.md and results.json (the table, the cache
# curve and every run's raw numbers); per-run output in target/bench/runs/; every failed run
# (exit status, wrong data, timeout, OOM kill) with its command line in
# target/bench/failures.log. Goals come from issue 3 (the log rows from the durable heap's
# brief); a missed goal is reported, never an error. No timing is asserted anywhere.
#
# lego is built with cargo into $CARGO_TARGET_DIR (default target/); the run uses copies of
# its liblego.so and lego binaries. Logs and images go to /var/tmp/lego-bench-PID-log/,
# removed as each run is done and at exit.
#
# Kernel swap and the cgroups need root and the cgroup v1 memory controller at
# /sys/fs/cgroup/memory; without them those rows say "skipped (reason)" and lego runs
# uncapped. The swap file (/var/tmp/lego-bench-PID.swap) and the cgroups are removed at exit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n==> %s\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

quick=0
only=""   # empty: every benchmark; pool, codes, watch, swap or real: only those rows
while [ "$#" -gt 0 ]; do
    case $1 in
        --quick) quick=1 ;;
        --only)
            [ "$#" -ge 2 ] || die "--only needs a section (expected --only pool, codes, watch, swap or real)"
            case $2 in
                pool | codes | watch | swap | real | fork) only=$2 ;;
                *) die "unknown section '$2' for --only (expected pool, codes, watch, swap, real or fork)" ;;
            esac
            shift ;;
        -h | --help) sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (expected --quick, --only pool|codes|watch|swap|real|fork or nothing)" ;;
    esac
    shift
done

# ---------------------------------------------------------------------------------------------
# Sizes. Every size is in MiB. The oversubscribed heap is 4x the cache (the issue's goals).
if [ "$quick" = 1 ]; then
    mode=quick
    rounds=3              # A B rounds per benchmark
    first_touch_mib=128   # heap touched once
    over_cache_mib=32     # cache for the oversubscribed workloads
    over_heap_mib=128     # heap for the oversubscribed workloads
    seq_sweeps=2          # page_sweep seq ROUNDS
    random_per_page=0.5   # page_sweep random ROUNDS (accesses per page)
    zipf_per_page=1       # page_sweep zipf ROUNDS
    mt_per_page=0.5       # page_sweep mt ROUNDS
    curve_heap_mib=160    # heap of the cache curve (10% of it must be >= lego's 16 MiB minimum)
    curve_rounds=3        # rounds for the cache curve
    alloc_scale=0.25      # alloc_bench SCALE
    update_heap_mib=128   # log_write update: heap, in the cache
    update_mwrites=200    # log_write update: millions of increments (about 3 s here)
    write_per_page=0.5    # page_sweep write ROUNDS (random page writes per page) on the pool
    fork_heap_mib=256     # fork_time: the heap forked (a tenth of it as the cache)
    run_timeout_s=120     # one run; a run past it is killed and reported as a timeout
else
    mode=full
    rounds=5
    first_touch_mib=256
    over_cache_mib=64
    over_heap_mib=256
    seq_sweeps=4
    random_per_page=1
    zipf_per_page=2
    mt_per_page=1
    curve_heap_mib=256
    curve_rounds=5
    alloc_scale=1
    update_heap_mib=256
    update_mwrites=300    # about 5 s here
    write_per_page=1
    fork_heap_mib=1024
    run_timeout_s=300
fi
# The real programs, in both modes (larger inputs made a full run take hours here: each run
# at 10% of its peak takes 20-60x its native time under lego, and more under kernel swap when
# it is not OOM-killed).
real_perl_keys=400000     # the Perl hash-and-sort's keys (about 105 MiB peak)
real_sqlite_rows=300000   # the SQLite table's rows (about 80 MiB peak)
real_redis_keys=200000    # Redis: keys of 200 bytes loaded (about 75 MiB peak)
real_redis_reads=20000    # Redis: random GETs by redis-benchmark, twice
real_gcc_functions=1000   # gcc -O2 on a generated file of this many functions (141 MiB, 9 s)
real_rounds=1             # rounds of each real program at each cache
real_timeout_s=120        # one real program's run, in seconds (run_real sets run_timeout_s to it)
first_touch_cache=2048    # lego's cache for first touch and the allocator: larger than any heap
overhead_mib=16           # lego's stated overhead (README): its cgroup is capped at cache + this
curve_percents="10 25 50 100"
log_mib=256               # log_write checkpoint: the block every timed epoch appends whole
log_epochs=3              # log_write checkpoint: timed epochs per run (the run reports the median)
lego_min_cache_mib=16     # LEGO_CACHE_SIZE's minimum
fork_forks=9              # fork_time: forks timed in each run (the run reports their median)
# The memcached pool (issue 11): servers of the three-server rows, and the pipeline length of
# the raw baseline, which is the chunk lego's read-ahead reads at once (fetch_in_chunks).
pool_servers=3
mc_batch_pages="$(sed -n 's/^pub const FETCH_CHUNK_PAGES: usize = \([0-9]*\);.*/\1/p' runtime/src/pager/mod.rs)"
mc_batch_pages=${mc_batch_pages:-64}
# The scheme table (issue 12): every scheme on the same number of servers, as many as the
# widest code needs (rs:8+2: 10).
codes_schemes="replicas:1 replicas:2 replicas:3 rs:4+2 rs:8+2"
codes_servers=10
ncpu="$(nproc)"
mt_threads=$(( ncpu >= 2 ? ncpu : 2 ))

out_dir=target/bench
bin_dir="$out_dir/bin"
runs_dir="$out_dir/runs"
raw="$out_dir/raw.tsv"          # one line per run: name variant round status exit key=value...
failures="$out_dir/failures.log"
built_dir="${CARGO_TARGET_DIR:-target}/release"
built_lib="$built_dir/liblego.so"
built_cli="$built_dir/lego"
lib="$out_dir/liblego.so"       # the run's own copy: a rebuild during the run cannot change it
cli="$out_dir/lego"             # the same for the lego binary (lego replay)
store_dir=/var/tmp              # lego's page store, its logs and the swap file: the same disk
swap_file="$store_dir/lego-bench-$$.swap"
log_root="$store_dir/lego-bench-$$-log"   # one log directory (and image) per durable run
key_file="$store_dir/lego-bench-$$.key"   # LEGO_KEY_FILE of the sealed pool rows
cg_root=/sys/fs/cgroup/memory
cg_lego="$cg_root/lego-bench-$$-lego"
cg_swap="$cg_root/lego-bench-$$-swap"

if grep -qw hypervisor /proc/cpuinfo 2>/dev/null; then cpu_word=vCPU; else cpu_word=CPU; fi
kernel="$(uname -r)"
machine="$ncpu $cpu_word, Linux $(echo "$kernel" | cut -d. -f1-2)"

# ---------------------------------------------------------------------------------------------
# Clean-up: the swap file, the cgroups, and a run still going when the script is interrupted.
swap_on=0
swap_created=0
child=""
mc_pids=()      # the memcached servers this script started and has not stopped
cleanup() {
    if [ -n "$child" ]; then
        # timeout(1) leads its own process group: end the run we started, and only it.
        kill -KILL -- "-$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    mc_stop
    restore_zswap
    if [ "$swap_on" = 1 ]; then swapoff "$swap_file" 2>/dev/null || note "swapoff $swap_file failed"; fi
    if [ "$swap_created" = 1 ]; then rm -f "$swap_file"; fi
    rm -rf "$log_root"
    rm -f "$key_file"
    for cg in "$cg_lego" "$cg_swap"; do
        if [ -d "$cg" ]; then rmdir "$cg" 2>/dev/null || note "could not remove cgroup $cg"; fi
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Set-up and build.
setup_tools() {
    scripts/test.sh --setup-only
    command -v timeout >/dev/null 2>&1 || die "timeout(1) is missing: install coreutils"
    if ! command -v gnuplot >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "installing gnuplot-nox for the plot"
            export DEBIAN_FRONTEND=noninteractive
            apt-get install -y --no-install-recommends gnuplot-nox >/dev/null 2>&1 \
                || { apt-get update >/dev/null && apt-get install -y --no-install-recommends gnuplot-nox >/dev/null; } \
                || note "could not install gnuplot-nox: the plot will be skipped"
        else
            note "gnuplot is missing (apt-get install gnuplot-nox): the plot will be skipped"
        fi
    fi
}

build() {
    say "cargo build --release"
    cargo build --release
    [ -f "$built_lib" ] || die "$built_lib was not built"
    [ -f "$built_cli" ] || die "$built_cli was not built"
    mkdir -p "$out_dir"
    cp "$built_lib" "$lib.tmp"
    mv -f "$lib.tmp" "$lib"
    cp "$built_cli" "$cli.tmp"
    mv -f "$cli.tmp" "$cli"
    say "compiling bench/*.c into $bin_dir"
    mkdir -p "$bin_dir"
    local src
    for src in bench/*.c; do
        gcc -O2 -pthread -Wall -Wextra -o "$bin_dir/$(basename "$src" .c)" "$src" -lm
    done
    # The timer of the real programs: static, so that their LD_PRELOAD does not load into it.
    gcc -O2 -static -Wall -Wextra -o "$bin_dir/timed" bench/timed.c
    # The Redis driver too: the preload is for redis-server only.
    gcc -O2 -static -Wall -Wextra -o "$bin_dir/redis_drive" bench/redis_drive.c
}

# ---------------------------------------------------------------------------------------------
# Memory cgroups (v1) and the swap file. cgroup_ok/swap_ok say whether each is usable; the
# *_reason variables say why not, for the table.
cgroup_ok=0
cgroup_reason=""
swap_ok=0
swap_reason=""
swap_toggle=0   # 1 when swap cannot be refused per cgroup: lego runs with the swap file off
# zswap (compressed swap in RAM): on only for the zswap-cg runs, its settings restored at exit.
zswap_ok=0
zswap_reason=""
zswap_dir=/sys/module/zswap/parameters
zswap_saved_enabled=""
zswap_saved_compressor=""
zswap_on=0

setup_cgroups_and_swap() {
    say "memory cgroups and swap file"
    if [ "$(id -u)" != 0 ]; then
        cgroup_reason="not root"
    elif [ ! -f "$cg_root/memory.limit_in_bytes" ]; then
        cgroup_reason="no cgroup v1 memory controller at $cg_root"
    elif ! mkdir "$cg_lego" "$cg_swap" 2>/dev/null; then
        cgroup_reason="cannot create cgroups under $cg_root"
    else
        cgroup_ok=1
    fi
    if [ "$cgroup_ok" = 0 ]; then
        swap_reason="$cgroup_reason"
        note "kernel-swap baseline skipped and lego runs uncapped: $cgroup_reason"
        return
    fi
    if [ ! -f "$cg_lego/memory.memsw.limit_in_bytes" ]; then
        swap_toggle=1
        note "no memory.memsw.* (swap accounting off): lego runs with the swap file turned off"
    fi
    local heap_max=$(( over_heap_mib > curve_heap_mib ? over_heap_mib : curve_heap_mib ))
    heap_max=$(( fork_heap_mib > heap_max ? fork_heap_mib : heap_max ))
    local swap_mib=$(( 2 * heap_max )) msg
    if msg="$(dd if=/dev/zero of="$swap_file" bs=1M count="$swap_mib" status=none 2>&1 \
        && chmod 600 "$swap_file" && mkswap "$swap_file" 2>&1 >/dev/null)"; then
        swap_created=1
        if msg="$(swapon "$swap_file" 2>&1)"; then
            swap_on=1
            swap_ok=1
            note "swap file $swap_file ($swap_mib MiB) on; cgroups $cg_lego, $cg_swap"
        else
            swap_created=1
            swap_reason="swapon failed: ${msg:-unknown error}"
        fi
    else
        [ -e "$swap_file" ] && swap_created=1
        swap_reason="cannot create swap file $swap_file: ${msg:-unknown error}"
    fi
    if [ "$swap_ok" = 0 ]; then note "kernel-swap baseline skipped: $swap_reason"; fi
    setup_zswap
    if tail -n +2 /proc/swaps | grep -qv "^$swap_file "; then
        note "other swap devices are active (see /proc/swaps); lego's cgroup still refuses swap"
    fi
}

set_swap() { # on|off, only where swap cannot be refused per cgroup
    [ "$swap_toggle" = 1 ] && [ "$swap_ok" = 1 ] || return 0
    if [ "$1" = on ] && [ "$swap_on" = 0 ]; then swapon "$swap_file" && swap_on=1; fi
    if [ "$1" = off ] && [ "$swap_on" = 1 ]; then swapoff "$swap_file" && swap_on=0; fi
}

# cg_limit DIR BYTES swap|no-swap. v1 wants memsw.limit >= limit at every step, so memsw goes
# to unlimited first.
cg_limit() {
    local dir=$1 bytes=$2 swap=$3
    if [ -f "$dir/memory.memsw.limit_in_bytes" ]; then echo -1 >"$dir/memory.memsw.limit_in_bytes"; fi
    echo "$bytes" >"$dir/memory.limit_in_bytes"
    if [ "$swap" = no-swap ]; then
        if [ -f "$dir/memory.memsw.limit_in_bytes" ]; then echo "$bytes" >"$dir/memory.memsw.limit_in_bytes"; fi
        echo 0 >"$dir/memory.swappiness"
    else
        cat "$cg_root/memory.swappiness" >"$dir/memory.swappiness"
    fi
    # Forget the previous run: its leftover page cache and its peak.
    echo 0 >"$dir/memory.force_empty" 2>/dev/null || true
    echo 0 >"$dir/memory.max_usage_in_bytes"
    if [ -f "$dir/memory.memsw.max_usage_in_bytes" ]; then echo 0 >"$dir/memory.memsw.max_usage_in_bytes"; fi
}

# zswap for the zswap-cg runs: the swap file behind it, lz4 (else zstd, else the kernel's
# default compressor). Off for every other run, as the kernel-swap baseline is measured.
setup_zswap() {
    if [ "$swap_ok" = 0 ]; then
        zswap_reason="$swap_reason"
    elif [ ! -w "$zswap_dir/enabled" ]; then
        zswap_reason="no zswap in this kernel ($zswap_dir)"
    else
        zswap_saved_enabled="$(cat "$zswap_dir/enabled")"
        zswap_saved_compressor="$(cat "$zswap_dir/compressor")"
        local c
        for c in lz4 zstd; do
            if echo "$c" >"$zswap_dir/compressor" 2>/dev/null; then break; fi
        done
        if echo N >"$zswap_dir/enabled" 2>/dev/null; then
            zswap_ok=1
            note "zswap baseline: compressor $(cat "$zswap_dir/compressor"), max_pool_percent $(cat "$zswap_dir/max_pool_percent"), off but for its runs (was enabled=$zswap_saved_enabled, compressor $zswap_saved_compressor; restored at exit)"
        else
            zswap_reason="cannot turn zswap off and on ($zswap_dir/enabled)"
        fi
    fi
    if [ "$zswap_ok" = 0 ]; then note "zswap baseline skipped: $zswap_reason"; fi
}

set_zswap() { # on|off
    [ "$zswap_ok" = 1 ] || return 0
    if [ "$1" = on ] && [ "$zswap_on" = 0 ]; then echo Y >"$zswap_dir/enabled" && zswap_on=1; fi
    if [ "$1" = off ] && [ "$zswap_on" = 1 ]; then echo N >"$zswap_dir/enabled" && zswap_on=0; fi
}

restore_zswap() {
    if [ -n "$zswap_saved_compressor" ]; then
        echo "$zswap_saved_compressor" >"$zswap_dir/compressor" 2>/dev/null || note "could not restore the zswap compressor"
    fi
    if [ -n "$zswap_saved_enabled" ]; then
        echo "$zswap_saved_enabled" >"$zswap_dir/enabled" 2>/dev/null || note "could not restore zswap's enabled setting"
    fi
}

cg_oom_kills() { awk '$1 == "oom_kill" { print $2; found = 1 } END { if (!found) print 0 }' "$1/memory.oom_control"; }

# ---------------------------------------------------------------------------------------------
# memcached servers for the pool rows, on loopback. mc_ok says whether memcached can be run;
# mc_reason says why not, for the table. Each run gets fresh servers (mc_start before it,
# mc_stop after), so no run finds another's values, and a run never fills a server for the
# next one.
mc_ok=0
mc_reason=""
mc_backend=""       # memcached://127.0.0.1:PORT,... of the servers running now
mc_port_first=20000 # free ports are looked for in [first, first + span)
mc_port_span=30000
mc_start_tries=5    # ports tried per server before giving up
mc_ready_ms=5000    # longest wait for a started server to accept connections

setup_memcached() {
    say "memcached for the pool rows"
    if ! command -v memcached >/dev/null 2>&1; then
        mc_reason="memcached not installed"
        note "pool rows skipped: $mc_reason (apt-get install memcached)"
        return
    fi
    mc_ok=1
    note "$(memcached -V 2>/dev/null || echo memcached), on 127.0.0.1, a fresh set of servers for each run"
}

port_in_use() { # PORT: whether something listens on it (or, without ss, accepts on it)
    if command -v ss >/dev/null 2>&1; then
        [ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}

# mc_start N MIB: starts N servers of MIB each on free ports and sets mc_backend; false (with
# a line in failures.log) if one cannot be started.
mc_start() {
    local n=$1 mib=$2 i try port pid waited ports=""
    local -a user=()
    [ "$(id -u)" = 0 ] && user=(-u root)
    for i in $(seq 1 "$n"); do
        for try in $(seq 1 "$mc_start_tries"); do
            port=$(( mc_port_first + (RANDOM * 32768 + RANDOM) % mc_port_span ))
            port_in_use "$port" && continue
            memcached -l 127.0.0.1 -p "$port" -M -m "$mib" -U 0 -t 2 "${user[@]}" \
                >>"$runs_dir/memcached.log" 2>&1 &
            pid=$!
            mc_pids+=("$pid")
            waited=0
            # Ready when it accepts a connection; gone if the port was taken meanwhile.
            while kill -0 "$pid" 2>/dev/null && ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null \
                && [ "$waited" -lt "$mc_ready_ms" ]; do
                sleep 0.02
                waited=$(( waited + 20 ))
            done
            if kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$mc_ready_ms" ]; then
                ports="$ports,127.0.0.1:$port"
                continue 2
            fi
            mc_stop_one "$pid"
        done
        printf '== memcached: could not start a server (%s tries), see %s\n\n' \
            "$mc_start_tries" "$runs_dir/memcached.log" >>"$failures"
        mc_stop
        return 1
    done
    mc_backend="memcached://${ports#,}"
}

mc_stop_one() { # PID: stops one server this script started
    local pid=$1 i keep=()
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${mc_pids[@]}"; do [ "$i" = "$pid" ] || keep+=("$i"); done
    mc_pids=("${keep[@]}")
}

mc_stop() { # stops every server this script started
    local pid
    for pid in "${mc_pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    mc_pids=()
    mc_backend=""
}

stores_left=0   # lego runs that exited normally but left their page store directory behind

# ---------------------------------------------------------------------------------------------
# One measured run.
#   measure NAME VARIANT ROUND SETUP PROGRAM ARGS...
# SETUP: plain | lego:CACHE_MIB | lego-cg:CACHE_MIB (lego capped at cache + overhead, no swap)
#        | swap-cg:CACHE_MIB (no shim, capped at the cache, swap allowed, zswap off)
#        | zswap-cg:CACHE_MIB (the same with zswap on)
#        | lego-log:CACHE_MIB (lego with LEGO_LOG_DIR=$log_root/NAME.VARIANT.ROUND, the
#          default interval and sync) | lego-ckpt:CACHE_MIB (the same, but only
#          lego_checkpoint() and exit start epochs, and the log is never compacted)
# Appends a line to $raw: NAME VARIANT ROUND STATUS EXIT then the program's key=value result
# with rss_kib= (peak RSS) and cgroup_peak_bytes= added, and for the lego-log and lego-ckpt
# runs epochs_committed= and pages_logged= (from LEGO_STATS). The log directory stays for
# the caller (log_dir_of NAME VARIANT ROUND names it), which removes it.
# lego_env: VAR=VALUE words added to a lego run's environment after the defaults (so
# LEGO_BACKEND=memcached://... replaces the file store); set it for one call with
# pool_measure. A run on a pool also gets pages_fetched=, pages_written_back=, and the sum
# over its servers of pool_full= and pool_errors= (from LEGO_STATS), and fails as pool-full
# or pool-errors when either is not 0.
lego_env=()
expect_fnv=""   # set for real programs: the output hash of their native run
measure() {
    local name=$1 variant=$2 round=$3 setup=$4
    shift 4
    local kind=${setup%%:*} cache=${setup#*:}
    local tag="$name.$variant.$round"
    local out="$runs_dir/$tag.out" err="$runs_dir/$tag.err" rss_file="$runs_dir/$tag.rss"
    local cg="" oom_before=0
    # The first line: user and system CPU seconds; the last: peak RSS in KiB.
    local -a cmd=(timeout -k 5 "$run_timeout_s" /usr/bin/time -f $'%U %S\n%M' -o "$rss_file")
    if [ "$cgroup_ok" = 1 ]; then
        case $kind in
            lego-cg) cg=$cg_lego; set_swap off; set_zswap off; cg_limit "$cg" $(( (cache + overhead_mib) << 20 )) no-swap ;;
            swap-cg) cg=$cg_swap; set_swap on; set_zswap off; cg_limit "$cg" $(( cache << 20 )) swap ;;
            zswap-cg) cg=$cg_swap; set_swap on; set_zswap on; cg_limit "$cg" $(( cache << 20 )) swap ;;
        esac
    fi
    if [ -n "$cg" ]; then
        oom_before="$(cg_oom_kills "$cg")"
        # shellcheck disable=SC2016 # $$ and $0 belong to the inner shell
        cmd+=(bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$cg")
    fi
    case $kind in
        lego | lego-cg | lego-log | lego-ckpt)
            cmd+=(env "LD_PRELOAD=$lib" "LEGO_CACHE_SIZE=${cache}M" "LEGO_BACKEND=file:$store_dir"
                "LEGO_STATS=$runs_dir/$tag.stats.json" "${lego_env[@]}") ;;
    esac
    case $kind in
        lego-log | lego-ckpt)
            mkdir -p "$log_root"
            rm -rf "${log_root:?}/$tag"
            cmd+=("LEGO_LOG_DIR=$log_root/$tag") ;;
    esac
    # Epochs only where the program asks for them: LEGO_FLUSH_MS and LEGO_FLUSH_PAGES at their
    # largest, and a LEGO_LOG_MAX no run reaches, so no compaction runs between them.
    if [ "$kind" = lego-ckpt ]; then cmd+=(LEGO_FLUSH_MS=3600000 LEGO_FLUSH_PAGES=16777216 LEGO_LOG_MAX=1T); fi
    cmd+=("$@")

    local rc=0 started=$SECONDS
    "${cmd[@]}" >"$out" 2>"$err" &
    child=$!
    wait "$child" || rc=$?
    child=""

    local result status=ok rss cg_peak=""
    result="$(grep -m1 '^bench=' "$out" || true)"
    if [ -n "$result" ] && { [ "$kind" = lego-log ] || [ "$kind" = lego-ckpt ]; }; then
        local key val
        for key in epochs_committed pages_logged; do
            val="$(grep -o "\"$key\":[0-9]*" "$runs_dir/$tag.stats.json" 2>/dev/null | cut -d: -f2 || true)"
            result="$result $key=${val:-?}"
        done
    fi
    local pool_full="" pool_errors=""
    if [ -n "$result" ] && grep -q '"pool_server_0"' "$runs_dir/$tag.stats.json" 2>/dev/null; then
        local key val
        for key in pages_fetched pages_written_back pool_stored_pages; do
            val="$(grep -o "\"$key\":\"\{0,1\}[0-9]*" "$runs_dir/$tag.stats.json" | tr -d '"' | cut -d: -f2 || true)"
            result="$result $key=${val:-?}"
        done
        pool_full="$(grep -o '"pool_server_[0-9]*":"[^"]*' "$runs_dir/$tag.stats.json" \
            | grep -o ' full=[0-9]*' | awk -F= '{ s += $2 } END { print s + 0 }')"
        pool_errors="$(grep -o '"pool_server_[0-9]*":"[^"]*' "$runs_dir/$tag.stats.json" \
            | grep -o ' errors=[0-9]*' | awk -F= '{ s += $2 } END { print s + 0 }')"
        result="$result pool_full=$pool_full pool_errors=$pool_errors"
    fi
    rss="$(tail -n 1 "$rss_file" 2>/dev/null | grep -E '^[0-9]+$' || true)"
    # CPU per page moved, for the runs on a pool: user + sys over pages fetched and written back.
    local cpu_s
    cpu_s="$(grep -E '^[0-9.]+ [0-9.]+$' "$rss_file" 2>/dev/null | awk '{ print $1 + $2; exit }' || true)"
    if [ -n "$result" ] && [ -n "$cpu_s" ]; then
        result="$result cpu_s=$cpu_s"
        result="$result $(printf '%s\n' "$result" | tr ' ' '\n' | awk -F= -v cpu="$cpu_s" '
            $1 == "pages_fetched" || $1 == "pages_written_back" { if ($2 == "?") bad = 1; n += $2; seen++ }
            END { if (seen == 2 && !bad && n > 0) printf "cpu_us_per_page=%.3f", cpu * 1e6 / n; else printf "cpu_us_per_page=?" }')"
    fi
    if [ -n "$cg" ]; then cg_peak="$(cat "$cg/memory.max_usage_in_bytes")"; fi
    if grep -q '^WRONG DATA' "$out"; then
        status=wrong-data
    elif [ -n "$expect_fnv" ] && [ -n "$result" ] && [ "$rc" = 0 ] \
        && ! printf '%s\n' "$result" | grep -q " output_fnv=$expect_fnv "; then
        status=wrong-output     # a real program's output differs from its native run's
    elif [ -n "$cg" ] && [ "$(cg_oom_kills "$cg")" != "$oom_before" ]; then
        status=oom-killed
    elif [ "$rc" = 124 ] || { [ "$rc" = 137 ] && [ $(( SECONDS - started )) -ge "$run_timeout_s" ]; }; then
        status=timeout
    elif [ "$rc" != 0 ]; then
        status="exit-$rc"
    elif [ -z "$result" ]; then
        status=no-result
    elif [ "${pool_full:-0}" != 0 ]; then
        status=pool-full        # pages stayed in the cache: not a measurement of the pool
    elif [ "${pool_errors:-0}" != 0 ]; then
        status=pool-errors
    fi
    # lego removes its page store directory when it exits normally; count the ones left.
    local store_path
    store_path="$(grep -o '"backend":"file:[^" ]*' "$runs_dir/$tag.stats.json" 2>/dev/null | sed 's/.*file://' || true)"
    if [ -n "$store_path" ] && [ -d "$store_path" ]; then
        if [ "$status" = ok ]; then stores_left=$(( stores_left + 1 )); fi
        rmdir "$store_path" 2>/dev/null || true
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s rss_kib=%s cgroup_peak_bytes=%s elapsed_s=%s\n' "$name" "$variant" "$round" \
        "$status" "$rc" "${result:-bench=none}" "${rss:-?}" "${cg_peak:-?}" "$(( SECONDS - started ))" >>"$raw"

    local shown
    shown="$(printf '%s\n' "$result" | tr ' ' '\n' \
        | grep -E '^(ns_per_page|seconds|us_per_access|mb_per_s|epochs_committed|pages_per_s|child_rss_kib)=' | tr '\n' ' ' || true)"
    printf '    %-18s round %s/%s  %-8s %s%s\n' "$name" "$round" "${rounds_now:-$rounds}" "$variant" \
        "${shown:-}" "$([ "$status" = ok ] || echo " FAILED: $status")" >&2
    if [ "$status" != ok ]; then
        {
            printf '== %s %s round %s: %s (exit %s)\n' "$name" "$variant" "$round" "$status" "$rc"
            printf 'command:'
            printf ' %q' "${cmd[@]}"
            printf '\nstdout (last lines):\n'
            tail -n 5 "$out"
            printf 'stderr (last lines):\n'
            tail -n 10 "$err"
            if [ -n "$pool_full" ]; then
                printf 'pool servers (LEGO_STATS %s):\n' "$runs_dir/$tag.stats.json"
                grep -o '"pool_server_[0-9]*":"[^"]*' "$runs_dir/$tag.stats.json" | sed 's/^"//; s/":"/: /'
            fi
            printf '\n'
        } >>"$failures"
    fi
}

# ---------------------------------------------------------------------------------------------
# The benchmarks.
run_first_touch() {
    say "first touch: $first_touch_mib MiB, lego (cache ${first_touch_cache} MiB) vs kernel vs uffd floor"
    local r
    for r in $(seq 1 "$rounds"); do
        measure first_touch lego "$r" "lego:$first_touch_cache" "$bin_dir/first_touch" "$first_touch_mib"
        measure first_touch kernel "$r" plain "$bin_dir/first_touch" "$first_touch_mib"
        measure first_touch floor "$r" plain "$bin_dir/uffd_floor" "$first_touch_mib"
    done
}

sweep_args() { # the page_sweep arguments of one oversubscribed workload
    case $1 in
        seq) echo "seq $over_heap_mib $seq_sweeps" ;;
        random) echo "random $over_heap_mib $random_per_page" ;;
        zipf) echo "zipf $over_heap_mib $zipf_per_page" ;;
        mt) echo "mt $over_heap_mib $mt_per_page $mt_threads" ;;
    esac
}

run_oversubscribed() {
    say "oversubscribed: heap $over_heap_mib MiB over cache $over_cache_mib MiB; lego vs kernel swap vs zswap vs native"
    local r w
    local -a args
    for r in $(seq 1 "$rounds"); do
        for w in seq random zipf mt; do
            read -r -a args <<<"$(sweep_args "$w")"
            measure "$w" lego "$r" "lego-cg:$over_cache_mib" "$bin_dir/page_sweep" "${args[@]}"
            if [ "$swap_ok" = 1 ]; then
                measure "$w" swap "$r" "swap-cg:$over_cache_mib" "$bin_dir/page_sweep" "${args[@]}"
            fi
            if [ "$zswap_ok" = 1 ]; then
                measure "$w" zswap "$r" "zswap-cg:$over_cache_mib" "$bin_dir/page_sweep" "${args[@]}"
            fi
            measure "$w" native "$r" plain "$bin_dir/page_sweep" "${args[@]}"
        done
    done
}

thread_counts() { # 1, 2, 4, ... up to the CPU count, and the CPU count itself
    local t=1
    while [ "$t" -lt "$ncpu" ]; do echo "$t"; t=$(( t * 2 )); done
    echo "$ncpu"
}

run_thread_scaling() {
    say "thread scaling: page_sweep mt under lego, heap $over_heap_mib MiB over cache $over_cache_mib MiB"
    local r t
    for r in $(seq 1 "$rounds"); do
        for t in $(thread_counts); do
            measure mt_scaling "lego_${t}t" "$r" "lego-cg:$over_cache_mib" \
                "$bin_dir/page_sweep" mt "$over_heap_mib" "$mt_per_page" "$t"
        done
    done
}

curve_cache_mib() { # the cache for PERCENT of the curve's heap, at least lego's minimum
    local c=$(( (curve_heap_mib * $1 + 50) / 100 ))
    echo $(( c < lego_min_cache_mib ? lego_min_cache_mib : c ))
}

run_cache_curve() {
    say "cache curve: zipf over $curve_heap_mib MiB at $curve_percents % cache; lego vs kernel swap vs zswap"
    local r p c rounds_now=$curve_rounds
    for r in $(seq 1 "$curve_rounds"); do
        for p in $curve_percents; do
            c="$(curve_cache_mib "$p")"
            measure "curve_$p" lego "$r" "lego-cg:$c" "$bin_dir/page_sweep" zipf "$curve_heap_mib" "$zipf_per_page"
            if [ "$swap_ok" = 1 ]; then
                measure "curve_$p" swap "$r" "swap-cg:$c" "$bin_dir/page_sweep" zipf "$curve_heap_mib" "$zipf_per_page"
            fi
            if [ "$zswap_ok" = 1 ]; then
                measure "curve_$p" zswap "$r" "zswap-cg:$c" "$bin_dir/page_sweep" zipf "$curve_heap_mib" "$zipf_per_page"
            fi
        done
    done
}

# Real programs under pressure (issue 13): each run natively first (its output hash and peak
# RSS), then at caches of $real_percents % of that peak under lego, kernel swap and zswap, in
# the cgroups of the oversubscribed rows; every run's output must hash as the native one's.
# Python runs with PYTHONMALLOC=malloc everywhere (its own small-object arenas are mapped,
# which lego does not page until anonymous mmap is served, issue 14); Debian's Redis uses its
# own jemalloc over mmap, so it is not here yet.
real_programs="${BENCH_REAL_PROGRAMS:-perl python sqlite redis gcc}"  # BENCH_REAL_PROGRAMS picks some
real_percents="10 25 50"

real_command() { # NAME: sets real_cmd to the program and its arguments
    case $1 in
        perl) real_cmd=(perl -e "my %h; for my \$i (1..$real_perl_keys) { \$h{\"key\$i\"} = \$i * 7 } my @k = sort keys %h; my \$s = 0; \$s += \$h{\$_} for @k; print scalar(@k), \" \$k[0] \$k[-1] \$s\\n\"") ;;
        python) real_cmd=(env PYTHONMALLOC=malloc PYTHONHASHSEED=0 python3 -c "h = {}
for i in range($real_perl_keys): h['key%d' % i] = i * 7
k = sorted(h)
print(len(k), k[0], k[-1], sum(h[x] for x in k))") ;;
        redis) real_cmd=("$bin_dir/redis_drive" "$real_redis_keys" 200 "$real_redis_reads") ;;
        # cc1's collector maps its heap (2 MiB chunks): LEGO_MMAP=1 serves it. The output is
        # the object's checksum.
        gcc) real_cmd=(env LEGO_MMAP=1 sh -c 'gcc -O2 -c "$0" -o "$1" && cksum <"$1"' \
            "$runs_dir/real_gcc.c" "$runs_dir/real_gcc.o") ;;
        sqlite) real_cmd=(sqlite3 :memory: "CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT, v TEXT); WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $real_sqlite_rows) INSERT INTO t SELECT x, printf('%08x', (x * 2654435761) % 4294967296), printf('%d-%0180d', x, x * x) FROM c; CREATE INDEX ik ON t(k); SELECT count(*), sum(length(v)), min(k), max(k) FROM t WHERE k > '8'; SELECT sum(id) FROM (SELECT id FROM t ORDER BY k LIMIT 1000 OFFSET 5000);") ;;
    esac
}

real_gcc_source() { # a C file of $real_gcc_functions small functions and a main that calls them
    awk -v n="$real_gcc_functions" 'BEGIN {
        print "#include <stdio.h>"
        for (i = 0; i < n; i++)
            printf "int f%d(int x){ int a[16]; for(int j=0;j<16;j++) a[j]=x*j+%d; int s=0; for(int j=0;j<16;j++) s+=a[j]^(s<<1); return s+%d; }\n", i, i, i
        print "int main(void){ int s=0;"
        for (i = 0; i < n; i++) printf "s+=f%d(s);\n", i
        print "printf(\"%d\\n\",s);}"
    }'
}

real_cache_mib() { # PEAK_KIB PERCENT: the cache for PERCENT of a peak, at least lego's minimum
    local c=$(( ($1 * $2 / 100 + 512) / 1024 ))
    echo $(( c < lego_min_cache_mib ? lego_min_cache_mib : c ))
}

real_native=()  # NAME PEAK_KIB FNV per program, from its native run
run_real() {
    local run_timeout_s=$real_timeout_s
    say "real programs: perl and python hash-and-sort ($real_perl_keys keys), sqlite in memory ($real_sqlite_rows rows), redis ($real_redis_keys keys, $real_redis_reads random GETs twice), gcc -O2 ($real_gcc_functions functions) at $real_percents % of their peak RSS; lego vs kernel swap vs zswap"
    # Redis' clients run outside the memory cgroup that caps the server (bench/redis_drive.c).
    if [ "$cgroup_ok" = 1 ]; then export REDIS_DRIVE_CLIENT_CGROUP="$cg_root/cgroup.procs"; fi
    local prog r p c peak fnv line rounds_now=$real_rounds
    for prog in $real_programs; do
        local binary=$prog
        case $prog in python) binary=python3 ;; sqlite) binary=sqlite3 ;; redis) binary=redis-benchmark ;; esac
        command -v "$binary" >/dev/null 2>&1 || { note "real program $prog skipped: $binary is not installed"; continue; }
        if [ "$prog" = redis ] && ! command -v redis-server >/dev/null 2>&1; then
            note "real program redis skipped: redis-server is not installed"
            continue
        fi
        if [ "$prog" = gcc ]; then real_gcc_source >"$runs_dir/real_gcc.c"; fi
        real_command "$prog"
        expect_fnv=""
        measure "real_$prog" native 1 plain "$bin_dir/timed" "$prog" "${real_cmd[@]}"
        line="$(awk -F'\t' -v n="real_$prog" '$1 == n && $2 == "native" && $4 == "ok"' "$raw" | tail -n 1)"
        peak="$(printf '%s\n' "$line" | grep -o 'child_rss_kib=[0-9]*' | cut -d= -f2)"
        fnv="$(printf '%s\n' "$line" | grep -o 'output_fnv=[0-9a-f]*' | cut -d= -f2)"
        if [ -z "$peak" ] || [ -z "$fnv" ]; then
            note "real program $prog: the native run failed, so it was not measured under pressure"
            continue
        fi
        real_native+=("$prog $peak $fnv")
        expect_fnv="$fnv"
        for r in $(seq 1 "$real_rounds"); do
            for p in $real_percents; do
                c="$(real_cache_mib "$peak" "$p")"
                measure "real_${prog}_$p" lego "$r" "lego-cg:$c" "$bin_dir/timed" "$prog" "${real_cmd[@]}"
                if [ "$swap_ok" = 1 ]; then
                    measure "real_${prog}_$p" swap "$r" "swap-cg:$c" "$bin_dir/timed" "$prog" "${real_cmd[@]}"
                fi
                if [ "$zswap_ok" = 1 ]; then
                    measure "real_${prog}_$p" zswap "$r" "zswap-cg:$c" "$bin_dir/timed" "$prog" "${real_cmd[@]}"
                fi
            done
        done
        expect_fnv=""
    done
}

build_real_rows() {
    local entry prog peak p c native
    for entry in "${real_native[@]}"; do
        read -r prog peak _ <<<"$entry"
        native="$(median "real_$prog" native seconds)"
        for p in $real_percents; do
            c="$(real_cache_mib "$peak" "$p")"
            compare "$prog under pressure, cache $p% of its $(( (peak + 512) / 1024 )) MiB peak ($c MiB), lego / kernel swap" \
                "real_${prog}_$p" lego swap seconds s le 1.0 "$swap_reason"
            compare "$prog under pressure, cache $p% of its peak ($c MiB), lego / zswap" \
                "real_${prog}_$p" lego zswap seconds s none "" "$zswap_reason"
            if [ -n "$native" ]; then
                # The issue's bar: the Perl hash-and-sort within 10x its native time at half
                # its peak.
                local kind=none goal=""
                if [ "$prog" = perl ] && [ "$p" = 50 ]; then kind=le; goal=10; fi
                add_row "$prog under pressure, cache $p% of its peak ($c MiB), lego / native uncapped" \
                    "$(median "real_${prog}_$p" lego seconds)" "$native" s "$kind" "$goal" \
                    "$(missing_reason "real_${prog}_$p" lego "")"
            fi
        done
    done
}

alloc_modes="small smallmt prodcons xburst realloc large bigblocks frag churnmt"

# fork() with 90% of the heap evicted (issue 14): lego (a served fork: nothing is paged in),
# kernel swap at the same cap, and the program without lego or cap.
run_fork() {
    local cache=$(( fork_heap_mib / 10 ))
    [ "$cache" -ge "$lego_min_cache_mib" ] || cache=$lego_min_cache_mib
    say "fork: heap $fork_heap_mib MiB, cache $cache MiB (90% evicted), $fork_forks forks a run; lego vs kernel swap vs native"
    local r
    for r in $(seq 1 "$rounds"); do
        measure fork lego "$r" "lego-cg:$cache" "$bin_dir/fork_time" "$fork_heap_mib" "$fork_forks"
        if [ "$swap_ok" = 1 ]; then
            measure fork swap "$r" "swap-cg:$cache" "$bin_dir/fork_time" "$fork_heap_mib" "$fork_forks"
        fi
        measure fork native "$r" plain "$bin_dir/fork_time" "$fork_heap_mib" "$fork_forks"
    done
}

build_fork_rows() {
    local cache=$(( fork_heap_mib / 10 ))
    [ "$cache" -ge "$lego_min_cache_mib" ] || cache=$lego_min_cache_mib
    local what="fork() of a $fork_heap_mib MiB heap, 90% evicted (cache $cache MiB), median of $fork_forks forks (bench/fork_time.c)"
    compare "$what, lego / kernel swap at the same cap" fork lego swap fork_ms ms none "" "$swap_reason"
    compare "$what, lego / no lego, no cap (all resident)" fork lego native fork_ms ms none "" ""
    compare "peak RSS of the forked children (each reads a page of every MiB), lego / kernel swap" \
        fork lego swap child_rss_kib kib none "" "$swap_reason"
    compare "peak RSS of the forked children, lego / no lego" fork lego native child_rss_kib kib none "" ""
    compare "peak RSS of the forking process (its children included), lego / kernel swap" \
        fork lego swap rss_kib kib none "" "$swap_reason"
}

run_alloc() {
    say "allocator: lego (cache ${first_touch_cache} MiB, all resident) vs glibc, scale $alloc_scale"
    local r m
    for r in $(seq 1 "$rounds"); do
        for m in $alloc_modes; do
            measure "alloc_$m" lego "$r" "lego:$first_touch_cache" "$bin_dir/alloc_bench" "$m" "$alloc_scale"
            measure "alloc_$m" glibc "$r" plain "$bin_dir/alloc_bench" "$m" "$alloc_scale"
        done
    done
}

# What publishing the statistics costs (issue 15): the same runs with LEGO_PUBLISH on and off.
run_watch() {
    say "publishing statistics: LEGO_PUBLISH=on vs off (random faults over a heap 4x the cache; small-object allocations)"
    local r v
    local -a args
    read -r -a args <<<"$(sweep_args random)"
    for r in $(seq 1 "$rounds"); do
        for v in on off; do
            lego_env=("LEGO_PUBLISH=$v")
            measure watch_random "$v" "$r" "lego-cg:$over_cache_mib" "$bin_dir/page_sweep" "${args[@]}"
            measure watch_alloc "$v" "$r" "lego:$first_touch_cache" "$bin_dir/alloc_bench" small "$alloc_scale"
            lego_env=()
        done
    done
}

build_watch_rows() {
    compare "random page reads (${random_per_page}x pages), heap ${over_heap_mib}M = 4x cache ${over_cache_mib}M, publishing / not" \
        watch_random on off seconds s le 1.05 ""
    compare "allocator small-object loop (all resident), publishing / not" \
        watch_alloc on off seconds s le 1.05 ""
}

# The durable heap. Its baselines and the timed replay are small commands that measure runs
# like a bench program (each prints one bench= line); they are exported so that the
# `bash -c` measure starts under timeout(1) finds them. MB = 10^6 bytes, as dd counts.
drop_page_cache() { # so that the next read comes from the disk; prints dropped or kept (not root)
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then echo 3 >/proc/sys/vm/drop_caches && echo dropped; else echo kept; fi
}

bench_dd_write() { # DIR MIB: MIB from /dev/zero to a new file in DIR, O_DIRECT, fdatasync at the end
    local f="$1/dd-write.$$"
    LC_ALL=C dd if=/dev/zero of="$f" bs=1M count="$2" oflag=direct conv=fdatasync 2>&1 >/dev/null \
        | awk '/ copied, / { b = $1; for (i = 1; i <= NF; i++) if ($i == "copied,") s = $(i + 1) }
            END { if (b > 0 && s > 0) printf "bench=dd_write bytes=%s seconds=%s mb_per_s=%.1f\n", b, s, b / s / 1e6 }'
    rm -f "$f"
}

bench_dd_read() { # LOG_DIR: every segment of the log read with dd iflag=direct, cold
    local seg bytes=0 cache t0 t1
    for seg in "$1"/seg-*.lego; do bytes=$(( bytes + $(stat -c %s "$seg") )); done
    cache="$(drop_page_cache)"
    t0="$(date +%s%N)"
    for seg in "$1"/seg-*.lego; do dd if="$seg" of=/dev/null bs=1M iflag=direct status=none || return 1; done
    t1="$(date +%s%N)"
    awk -v b="$bytes" -v ns="$(( t1 - t0 ))" -v c="$cache" \
        'BEGIN { printf "bench=dd_read bytes=%d seconds=%.6f mb_per_s=%.1f page_cache=%s\n", b, ns / 1e9, b / ns * 1e3, c }'
}

bench_replay() { # LEGO LOG_DIR IMAGE: lego replay, cold; its report goes to stderr
    local cache t0 t1 report bytes image_bytes
    cache="$(drop_page_cache)"
    t0="$(date +%s%N)"
    report="$("$1" replay "$2" -o "$3")" || { printf '%s\n' "$report" >&2; return 1; }
    t1="$(date +%s%N)"
    printf '%s\n' "$report" >&2
    rm -f "$3"
    # A log written without a crash replays whole: anything dropped is a broken log.
    if ! grep -qx 'nothing dropped' <<<"$report"; then
        echo "WRONG DATA: lego replay dropped part of a log written without a crash (see the .err file)"
        return 1
    fi
    bytes="$(sed -n 's/^read [0-9]* segments\{0,1\}, \([0-9]*\) bytes of log$/\1/p' <<<"$report")"
    image_bytes="$(sed -n 's/.* non-zero pages (\([0-9]*\) bytes).*/\1/p' <<<"$report")"
    awk -v b="${bytes:-0}" -v ib="${image_bytes:-0}" -v ns="$(( t1 - t0 ))" -v c="$cache" \
        'BEGIN { if (b > 0) printf "bench=replay bytes=%d image_data_bytes=%d seconds=%.6f mb_per_s=%.1f page_cache=%s\n", b, ib, ns / 1e9, b / ns * 1e3, c }'
}
export -f drop_page_cache bench_dd_write bench_dd_read bench_replay

log_dir_of() { echo "$log_root/$1.$2.$3"; } # NAME VARIANT ROUND: the log of a lego-log/-ckpt run

run_log_append_and_replay() {
    say "durable heap: epochs of $log_mib MiB by lego_checkpoint vs dd oflag=direct; lego replay of that log vs dd iflag=direct"
    mkdir -p "$log_root"
    local r log
    for r in $(seq 1 "$rounds"); do
        measure log_append lego "$r" "lego-ckpt:$first_touch_cache" "$bin_dir/log_write" checkpoint "$log_mib" "$log_epochs"
        measure log_append dd "$r" plain bash -c 'set -o pipefail; bench_dd_write "$@"' bench_dd_write "$log_root" "$log_mib"
        log="$(log_dir_of log_append lego "$r")"
        # The replay needs the log of a successful append run; a failed one leaves the row short.
        if awk -F'\t' -v r="$r" '$1 == "log_append" && $2 == "lego" && $3 == r && $4 == "ok" { f = 1 } END { exit !f }' "$raw"; then
            measure log_replay lego "$r" plain bash -c 'bench_replay "$@"' bench_replay "$cli" "$log" "$log.img"
            measure log_replay dd "$r" plain bash -c 'bench_dd_read "$@"' bench_dd_read "$log"
        fi
        rm -rf "$log" "$log.img"
    done
}

run_log_cost() {
    say "logging cost: $update_mwrites M random writes over $update_heap_mib MiB in the cache, lego with LEGO_LOG_DIR vs without"
    local r
    for r in $(seq 1 "$rounds"); do
        measure log_cost unlogged "$r" "lego:$first_touch_cache" "$bin_dir/log_write" update "$update_heap_mib" "$update_mwrites"
        measure log_cost logged "$r" "lego-log:$first_touch_cache" "$bin_dir/log_write" update "$update_heap_mib" "$update_mwrites"
        rm -rf "$(log_dir_of log_cost logged "$r")"
    done
}

# The memcached pool (issue 11). Every server may hold a copy of every page of the heap: a
# 4104-byte value lands in a 4544-byte slab chunk, so twice the heap leaves room for memcached's
# own overhead; servers of a run never hold two copies of a page.
pool_server_mib() { echo $(( 2 * over_heap_mib + 64 )); }

no_server_run() { # NAME VARIANT ROUND: the line of a run that could not get its servers
    printf '%s\t%s\t%s\tno-server\t1\tbench=none rss_kib=? cgroup_peak_bytes=?\n' "$1" "$2" "$3" >>"$raw"
    printf '    %-18s round %s/%s  %-8s FAILED: no-server\n' "$1" "$3" "$rounds" "$2" >&2
}

# pool_measure "VAR=VALUE ..." SERVERS NAME VARIANT ROUND SETUP PROGRAM ARGS...: measure under
# lego on SERVERS fresh memcached servers (LEGO_BACKEND and the given variables).
pool_measure() {
    local words=$1 n=$2
    shift 2
    if ! mc_start "$n" "$(pool_server_mib)"; then no_server_run "$1" "$2" "$3"; return; fi
    read -r -a lego_env <<<"LEGO_BACKEND=$mc_backend $words"
    measure "$@"
    lego_env=()
    pool_memory_of_run
    mc_stop
}

mc_bytes() { # the sum of the `stats` bytes (item bytes in memory) of the servers of mc_backend
    local hp sum=0 b
    for hp in $(printf '%s' "${mc_backend#memcached://}" | tr ',' ' '); do
        # shellcheck disable=SC2016 # $0 belongs to the inner shell
        b="$(timeout 5 bash -c 'exec 3<>"/dev/tcp/${0%:*}/${0##*:}" && printf "stats\r\nquit\r\n" >&3 && cat <&3' "$hp" 2>/dev/null \
            | awk '$1 == "STAT" && $2 == "bytes" { print $3 + 0 }' || true)"
        [ -n "$b" ] || { echo ""; return; }
        sum=$(( sum + b ))
    done
    echo "$sum"
}

# Adds to the last run's line the servers' memory after it (pool_bytes=) and, over the heap
# bytes the pool held at exit (pool_stored_pages), pool_per_heap_byte= ("?" when unknown).
pool_memory_of_run() {
    local bytes stored per="?"
    bytes="$(mc_bytes)"
    stored="$(tail -n 1 "$raw" | tr ' \t' '\n\n' | sed -n 's/^pool_stored_pages=\([0-9][0-9]*\)$/\1/p')"
    if [ -n "$bytes" ] && [ -n "$stored" ] && [ "$stored" -gt 0 ]; then
        per="$(awk -v b="$bytes" -v p="$stored" 'BEGIN { printf "%.4f", b / (p * 4096) }')"
    fi
    sed -i "\$ s/\$/ pool_bytes=${bytes:-?} pool_per_heap_byte=$per/" "$raw"
}

# raw_measure NAME VARIANT ROUND: bench/mc_raw on one fresh server, the heap's pages read back
# as many times as lego's timed sweeps read them.
raw_measure() {
    if ! mc_start 1 "$(pool_server_mib)"; then no_server_run "$1" "$2" "$3"; return; fi
    measure "$1" "$2" "$3" plain "$bin_dir/mc_raw" "${mc_backend#memcached://}" \
        $(( over_heap_mib * 256 )) "$mc_batch_pages" "$seq_sweeps"
    mc_stop
}

make_key_file() { # the sealed runs' key: 32 random bytes, readable by this user only
    [ -s "$key_file" ] || (umask 077 && head -c 32 /dev/urandom >"$key_file")
}

run_pool() {
    if [ "$mc_ok" = 0 ]; then return; fi
    say "memcached pool: heap $over_heap_mib MiB over cache $over_cache_mib MiB; fetch bandwidth vs raw mg, pool vs file vs swap, sealed vs not, 2 copies vs 1"
    local r w
    local -a args
    make_key_file
    for r in $(seq 1 "$rounds"); do
        pool_measure "" 1 pool_fetch lego "$r" "lego-cg:$over_cache_mib" \
            "$bin_dir/page_sweep" seqread "$over_heap_mib" "$seq_sweeps"
        raw_measure pool_fetch raw "$r"
        for w in seq random; do
            read -r -a args <<<"$(sweep_args "$w")"
            pool_measure "LEGO_REPLICAS=1" "$pool_servers" "pool_$w" pool "$r" "lego-cg:$over_cache_mib" \
                "$bin_dir/page_sweep" "${args[@]}"
            pool_measure "LEGO_REPLICAS=1 LEGO_KEY_FILE=$key_file" "$pool_servers" "pool_$w" sealed "$r" \
                "lego-cg:$over_cache_mib" "$bin_dir/page_sweep" "${args[@]}"
            measure "pool_$w" file "$r" "lego-cg:$over_cache_mib" "$bin_dir/page_sweep" "${args[@]}"
            if [ "$swap_ok" = 1 ]; then
                measure "pool_$w" swap "$r" "swap-cg:$over_cache_mib" "$bin_dir/page_sweep" "${args[@]}"
            fi
        done
        read -r -a args <<<"write $over_heap_mib $write_per_page"
        pool_measure "LEGO_REPLICAS=1" "$pool_servers" pool_write one "$r" "lego-cg:$over_cache_mib" \
            "$bin_dir/page_sweep" "${args[@]}"
        pool_measure "LEGO_REPLICAS=2 LEGO_REPLICATION=pessimistic" "$pool_servers" pool_write pessimistic "$r" \
            "lego-cg:$over_cache_mib" "$bin_dir/page_sweep" "${args[@]}"
        pool_measure "LEGO_REPLICAS=2 LEGO_REPLICATION=optimistic" "$pool_servers" pool_write optimistic "$r" \
            "lego-cg:$over_cache_mib" "$bin_dir/page_sweep" "${args[@]}"
    done
}

codes_variant() { # SCHEME SEALED(0|1): the variant name of a scheme table run
    if [ "$2" = 1 ]; then echo "$1+key"; else echo "$1"; fi
}

codes_losses() { # SCHEME: how many servers it may lose
    case $1 in
        replicas:*) echo $(( ${1#replicas:} - 1 )) ;;
        rs:*+*) echo "${1##*+}" ;;
    esac
}

# The scheme table (issue 12): each scheme, without and with a key, on the same number of
# fresh servers, alternated in every round and every workload. lego runs without a memory
# cgroup here (its cache is still LEGO_CACHE_SIZE): on ten servers its memory beyond the cache
# passes the cache + 16 MiB cap of the other rows (measured: seq sweeps OOM-killed at the
# 48 MiB cap with every scheme, one copy included), so the table shows each scheme's peak RSS.
run_codes() {
    if [ "$mc_ok" = 0 ]; then return; fi
    say "schemes: $codes_schemes, each without and with LEGO_KEY_FILE, on $codes_servers memcached servers; heap $over_heap_mib MiB over cache $over_cache_mib MiB; seq, random, write"
    local r w scheme sealed words
    local -a args
    make_key_file
    for r in $(seq 1 "$rounds"); do
        for w in seq random write; do
            if [ "$w" = write ]; then
                args=(write "$over_heap_mib" "$write_per_page")
            else
                read -r -a args <<<"$(sweep_args "$w")"
            fi
            for scheme in $codes_schemes; do
                for sealed in 0 1; do
                    words="LEGO_REDUNDANCY=$scheme LEGO_REPLICATION=pessimistic PAGE_SWEEP_KEEP_HEAP=1"
                    [ "$sealed" = 0 ] || words="$words LEGO_KEY_FILE=$key_file"
                    pool_measure "$words" "$codes_servers" "codes_$w" "$(codes_variant "$scheme" "$sealed")" \
                        "$r" "lego:$over_cache_mib" "$bin_dir/page_sweep" "${args[@]}"
                done
            done
        done
    done
}

# ---------------------------------------------------------------------------------------------
# Statistics over $raw.
median() { # NAME VARIANT KEY: the median of KEY over the successful runs, or nothing
    awk -F'\t' -v n="$1" -v v="$2" -v k="$3" '
        $1 == n && $2 == v && $4 == "ok" {
            c = split($6, kv, " ")
            for (i = 1; i <= c; i++) {
                eq = index(kv[i], "=")
                if (substr(kv[i], 1, eq - 1) == k && substr(kv[i], eq + 1) != "?") print substr(kv[i], eq + 1)
            }
        }' "$raw" | sort -g | awk '
        { a[NR] = $1 }
        END {
            if (NR == 0) exit
            if (NR % 2) printf "%.10g\n", a[(NR + 1) / 2]
            else printf "%.10g\n", (a[NR / 2] + a[NR / 2 + 1]) / 2
        }'
}

peak() { # VARIANT KEY NAME...: the largest KEY over the successful runs of NAMEs, or nothing
    local variant=$1 key=$2
    shift 2
    awk -F'\t' -v v="$variant" -v k="$key" -v names=" $* " '
        $2 == v && $4 == "ok" && index(names, " " $1 " ") {
            c = split($6, kv, " ")
            for (i = 1; i <= c; i++) {
                eq = index(kv[i], "=")
                x = substr(kv[i], eq + 1)
                if (substr(kv[i], 1, eq - 1) == k && x != "?" && (!found || x + 0 > max + 0)) { max = x; found = 1 }
            }
        }
        END { if (found) print max }' "$raw"
}

failed_runs() { # NAME VARIANT: how many runs did not succeed
    awk -F'\t' -v n="$1" -v v="$2" '$1 == n && $2 == v && $4 != "ok" { c++ } END { print c + 0 }' "$raw"
}

all_runs() { # NAME VARIANT
    awk -F'\t' -v n="$1" -v v="$2" '$1 == n && $2 == v { c++ } END { print c + 0 }' "$raw"
}

calc() { awk "BEGIN { printf \"%.10g\n\", ($1) }"; } # parenthesised: a bare > would redirect

fmt_value() { # VALUE UNIT: a table cell
    [ -n "$1" ] || { echo "—"; return; }
    case $2 in
        ns) awk -v x="$1" 'BEGIN { printf "%.2f us/page", x / 1000 }' ;;
        ms) awk -v x="$1" 'BEGIN { printf "%.2f ms", x }' ;;
        s) awk -v x="$1" 'BEGIN { printf "%.3g s", x }' ;;
        kib) awk -v x="$1" 'BEGIN { printf "%.1f MiB", x / 1024 }' ;;
        bytes) awk -v x="$1" 'BEGIN { printf "%.1f MiB", x / 1048576 }' ;;
        rate) awk -v x="$1" 'BEGIN { printf "%.1f k pages/s", x / 1000 }' ;;
        mbps) awk -v x="$1" 'BEGIN { printf "%.0f MB/s", x }' ;;
        *) echo "$1" ;;
    esac
}

# Rows of the table, one tab-separated line each:
# metric, lego cell, baseline cell, ratio cell, goal cell, status, lego value, baseline value,
# ratio value, unit.
rows=()

# add_row METRIC LEGO BASELINE UNIT GOAL_KIND GOAL NOTE
#   GOAL_KIND: le (ratio <= GOAL is met), gt (ratio > GOAL is met), ge (ratio >= GOAL is met),
#   ge-or (GOAL is "RATIO VALUE": ratio >= RATIO or lego's value >= VALUE is met), none
#   (reference only)
#   NOTE: when set and a value is missing, it replaces the missing cells ("skipped (...)")
add_row() { # METRIC A B UNIT GOAL_KIND GOAL WHY [WHY_B]: WHY_B, when given, for B's cell
    local metric=$1 a=$2 b=$3 unit=$4 kind=$5 goal=$6 why=$7 why_b=${8:-}
    local ratio="" ratio_cell goal_cell status a_cell b_cell
    a_cell="$(fmt_value "$a" "$unit")"
    b_cell="$(fmt_value "$b" "$unit")"
    if [ -n "$a" ] && [ -n "$b" ] && [ "$(calc "$b > 0")" = 1 ]; then ratio="$(calc "$a / $b")"; fi
    if [ -n "$ratio" ]; then
        ratio_cell="$(awk -v x="$ratio" 'BEGIN { printf "%.2f", x }')"
    else
        ratio_cell="${why:-n/a}"
    fi
    [ -n "$a" ] || a_cell="${why:-—}"
    [ -n "$b" ] || b_cell="${why_b:-${why:-—}}"
    if [ -n "$why_b" ] && [ -z "$ratio" ]; then ratio_cell="n/a"; fi
    case $kind in
        none) goal_cell="— (reference)"; status=reference ;;
        le | gt | ge | ge-or)
            local sign="<=" value_goal="" text
            case $kind in gt) sign=">" ;; ge | ge-or) sign=">=" ;; esac
            if [ "$kind" = ge-or ]; then value_goal=${goal#* }; goal=${goal%% *}; fi
            text="$sign $goal"
            [ -z "$value_goal" ] || text="$text or lego >= $(fmt_value "$value_goal" "$unit")"
            if [ -z "$ratio" ] && [ -n "$a" ] && [ "$kind" = le ] \
                && printf '%s' "$why_b" | grep -Eq '^(OOM-killed|timed out)'; then
                # lego finished where the baseline did not: ahead of it.
                goal_cell="$text: met (the baseline did not finish)"; status=met
            elif [ -z "$ratio" ]; then
                goal_cell="$text: not measured"; status=not-measured
            elif [ "$kind" = le ] && [ "$(calc "$ratio <= $goal")" = 1 ]; then
                goal_cell="$text: met"; status=met
            elif [ "$kind" = gt ] && [ "$(calc "$ratio > $goal")" = 1 ]; then
                goal_cell="$text: met"; status=met
            elif [ "$sign" = ">=" ] && [ "$(calc "$ratio >= $goal")" = 1 ]; then
                goal_cell="$text: met"; status=met
            elif [ -n "$value_goal" ] && [ "$(calc "$a >= $value_goal")" = 1 ]; then
                goal_cell="$text: met"; status=met
            else
                local by
                if [ "$kind" = le ]; then by="$(calc "$ratio / $goal")"; else by="$(calc "$goal / $ratio")"; fi
                goal_cell="$text: missed by $(awk -v x="$by" 'BEGIN { printf "%.2fx", x }')"
                status=missed
            fi ;;
    esac
    # "?" for a missing number: read -a would merge the tabs around an empty field.
    rows+=("$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$metric" "$a_cell" "$b_cell" \
        "$ratio_cell" "$goal_cell" "$status" "${a:-?}" "${b:-?}" "${ratio:-?}" "$unit")")
}

failure_note() { # NAME VARIANT...: "k of n VARIANT runs failed" for each variant with failures
    local name=$1 v f n text=""
    shift
    for v in "$@"; do
        f="$(failed_runs "$name" "$v")"
        n="$(all_runs "$name" "$v")"
        if [ "$f" != 0 ]; then text="$text; $f of $n $v runs failed"; fi
    done
    echo "${text#; }"
}

# A cell for a variant that never ran (skipped) or whose runs all failed.
missing_reason() { # NAME VARIANT SKIP_REASON
    if [ "$(all_runs "$1" "$2")" = 0 ]; then
        echo "skipped (${3:-not run})"
    else
        # Each way the runs failed, with when: "OOM-killed after 12-15 s (3 of 3 runs)".
        awk -F'\t' -v n="$1" -v v="$2" '
            $1 == n && $2 == v { all++ }
            $1 == n && $2 == v && $4 != "ok" {
                e = "?"
                if (match($6, /elapsed_s=[0-9]+/)) e = substr($6, RSTART + 10, RLENGTH - 10) + 0
                k = $4; c[k]++
                if (!(k in lo) || e < lo[k]) lo[k] = e
                if (!(k in hi) || e > hi[k]) hi[k] = e
            }
            END {
                out = ""
                for (k in c) {
                    what = (k == "oom-killed") ? "OOM-killed" : (k == "timeout") ? "timed out" : "failed: " k
                    when = (lo[k] == hi[k]) ? lo[k] : lo[k] "-" hi[k]
                    out = out (out == "" ? "" : "; ") sprintf("%s after %s s (%d of %d runs)", what, when, c[k], all)
                }
                print out ", see failures.log"
            }' "$raw"
    fi
}

notes=()

compare() { # METRIC NAME A B KEY UNIT GOAL_KIND GOAL SKIP_REASON_FOR_B
    local metric=$1 name=$2 va=$3 vb=$4 key=$5 unit=$6 kind=$7 goal=$8 skip=$9
    local a b why="" why_b="" fails
    a="$(median "$name" "$va" "$key")"
    b="$(median "$name" "$vb" "$key")"
    if [ -z "$b" ]; then why_b="$(missing_reason "$name" "$vb" "$skip")"; why=$why_b; fi
    if [ -z "$a" ]; then why="$(missing_reason "$name" "$va" "")"; fi
    fails="$(failure_note "$name" "$va" "$vb")"
    if [ -n "$fails" ]; then notes+=("$metric: $fails (target/bench/failures.log)"); fi
    add_row "$metric" "$a" "$b" "$unit" "$kind" "$goal" "$why" "$why_b"
}

compare_keys() { # METRIC NAME A KEY_A B KEY_B UNIT GOAL_KIND GOAL SKIP_REASON_FOR_B: compare
    # with another key for each variant (a rate each program reports under its own name)
    local metric=$1 name=$2 va=$3 ka=$4 vb=$5 kb=$6 unit=$7 kind=$8 goal=$9 skip=${10}
    local a b why="" fails
    a="$(median "$name" "$va" "$ka")"
    b="$(median "$name" "$vb" "$kb")"
    if [ -z "$b" ]; then why="$(missing_reason "$name" "$vb" "$skip")"; fi
    if [ -z "$a" ]; then why="$(missing_reason "$name" "$va" "")"; fi
    fails="$(failure_note "$name" "$va" "$vb")"
    if [ -n "$fails" ]; then notes+=("$metric: $fails (target/bench/failures.log)"); fi
    add_row "$metric" "$a" "$b" "$unit" "$kind" "$goal" "$why"
}

geomean_row() { # METRIC KEY UNIT GOAL [MIN_B]: geometric mean over the allocator modes of
    # lego/glibc (only the modes whose glibc median is at least MIN_B, if given)
    local metric=$1 key=$2 goal=$4 min_b=${5:-0} m a b logs="" n=0 g=""
    for m in $alloc_modes; do
        a="$(median "alloc_$m" lego "$key")"
        b="$(median "alloc_$m" glibc "$key")"
        if [ -n "$a" ] && [ -n "$b" ] && [ "$(calc "$b >= $min_b")" = 1 ]; then
            logs="$logs + log($a / $b)"
            n=$(( n + 1 ))
        fi
    done
    [ "$n" = 0 ] || g="$(calc "exp((0 $logs) / $n)")"
    # The geometric mean is a ratio: show it against 1 so add_row reports it as the ratio.
    add_row "$metric (geometric mean over $n of $(echo "$alloc_modes" | wc -w))" "$g" "${g:+1}" ratio le "$goal" \
        "$([ -n "$g" ] || echo "failed (see failures.log)")"
    local last=$(( ${#rows[@]} - 1 ))
    # Its lego and baseline cells carry no meaning of their own.
    rows[last]="$(printf '%s\n' "${rows[last]}" | awk -F'\t' -v OFS='\t' '{ $2 = "—"; $3 = "—"; print }')"
}

# ---------------------------------------------------------------------------------------------
# The report.
build_swap_rows() { # lego against kernel swap and zswap over the oversubscribed workloads
    local over="heap ${over_heap_mib}M = 4x cache ${over_cache_mib}M"
    compare "sequential sweeps ($seq_sweeps), $over, lego / kernel swap" seq lego swap seconds s le 0.3 "$swap_reason"
    compare "random page reads (${random_per_page}x pages), $over, lego / kernel swap" random lego swap seconds s le 1.0 "$swap_reason"
    compare "zipf 0.99 reads+writes (${zipf_per_page}x pages), $over, lego / kernel swap" zipf lego swap seconds s none "" "$swap_reason"
    compare "$mt_threads threads random reads (${mt_per_page}x pages), $over, lego / kernel swap" mt lego swap seconds s none "" "$swap_reason"
    compare "sequential sweeps ($seq_sweeps), $over, lego / zswap" seq lego zswap seconds s le 1.0 "$zswap_reason"
    compare "random page reads (${random_per_page}x pages), $over, lego / zswap" random lego zswap seconds s le 1.0 "$zswap_reason"
    compare "zipf 0.99 reads+writes (${zipf_per_page}x pages), $over, lego / zswap" zipf lego zswap seconds s le 1.0 "$zswap_reason"
    compare "$mt_threads threads random reads (${mt_per_page}x pages), $over, lego / zswap" mt lego zswap seconds s none "" "$zswap_reason"
    local w
    for w in seq random zipf mt; do
        compare "$w, $over, lego / native without cap (reference)" "$w" lego native seconds s none "" ""
    done
    # What the cgroups saw (page cache and kernel memory included): evicted pages left memory.
    local peak_lego peak_swap
    peak_lego="$(peak lego cgroup_peak_bytes seq random zipf mt)"
    peak_swap="$(peak swap cgroup_peak_bytes seq random zipf mt)"
    if [ "$cgroup_ok" = 1 ]; then
        add_row "peak cgroup memory over seq/random/zipf/mt, lego (cap $(( over_cache_mib + overhead_mib )) MiB) / kernel swap (cap $over_cache_mib MiB)" \
            "$peak_lego" "$peak_swap" bytes none "" "$([ -n "$peak_swap" ] || echo "skipped ($swap_reason)")"
    fi
}

build_rows() {
    local over="heap ${over_heap_mib}M = 4x cache ${over_cache_mib}M"
    compare "first touch, lego / kernel anonymous fault ($first_touch_mib MiB)" \
        first_touch lego kernel ns_per_page ns le 1.0 ""
    compare "first touch, lego / naive uffd floor (1 handler, UFFDIO_ZEROPAGE)" \
        first_touch lego floor ns_per_page ns none "" ""
    compare "first touch, naive uffd floor / kernel anonymous fault" \
        first_touch floor kernel ns_per_page ns none "" ""
    build_swap_rows
    local t prev=""
    for t in $(thread_counts); do
        if [ -n "$prev" ]; then
            compare "multi-threaded faults, lego throughput ${t} / ${prev} threads ($over)" \
                mt_scaling "lego_${t}t" "lego_${prev}t" accesses_per_s rate gt 1.0 ""
        fi
        prev=$t
    done
    if [ "$ncpu" = 1 ]; then notes+=("one CPU: thread scaling not measured"); fi
    if [ "$stores_left" != 0 ]; then
        notes+=("$stores_left lego runs exited normally but left their (empty) page store directory in $store_dir (removed by this script)")
    fi
    local m rss_b rss_goal
    for m in $alloc_modes; do
        compare "allocator $m, time, lego / glibc" "alloc_$m" lego glibc seconds s le 1.25 ""
        # Peak RSS: at most 1.5x glibc's, or glibc's + 4 MiB (lego's code and threads) where
        # that is larger (issue 13).
        rss_b="$(median "alloc_$m" glibc rss_kib)"
        rss_goal=1.5
        if [ -n "$rss_b" ] && [ "$(calc "$rss_b > 0 && ($rss_b + 4096) / $rss_b > 1.5")" = 1 ]; then
            rss_goal="$(awk -v b="$rss_b" 'BEGIN { printf "%.2f", (b + 4096) / b }')"
        fi
        compare "allocator $m, peak RSS, lego / glibc (goal 1.5x or glibc + 4 MiB)" "alloc_$m" lego glibc rss_kib kib le "$rss_goal" ""
    done
    geomean_row "allocator time, lego / glibc" seconds ratio 1.0
    geomean_row "allocator peak RSS where glibc's is >= 16 MiB, lego / glibc" rss_kib ratio 1.2 16384
    local epochs replay_mib
    compare "log append, epochs of every page of $log_mib MiB by lego_checkpoint() (median of $log_epochs per run), lego / dd oflag=direct conv=fdatasync, MB/s" \
        log_append lego dd mb_per_s mbps ge 0.8 ""
    epochs="$(median log_cost logged epochs_committed)"
    compare "logging at the default interval (1 s, fdatasync), $update_mwrites M random writes over $update_heap_mib MiB in the cache (${epochs:-?} epochs committed), lego with log / without" \
        log_cost logged unlogged seconds s le 1.05 ""
    replay_mib="$(median log_replay lego bytes)"
    [ -z "$replay_mib" ] || replay_mib="$(awk -v x="$replay_mib" 'BEGIN { printf "%.0f", x / 1048576 }')"
    compare "replay of the log-append log (${replay_mib:-?} MiB), lego replay / dd iflag=direct of its segments, page cache dropped, MB/s" \
        log_replay lego dd mb_per_s mbps ge-or "0.8 1000" ""
    if grep -q 'page_cache=kept' "$raw"; then
        notes+=("replay: the page cache could not be dropped (not root), so reads may not have come from the disk")
    fi
}

# The pool rows (issue 11). Without memcached every row says why it was skipped.
build_pool_rows() {
    local over="heap ${over_heap_mib}M = 4x cache ${over_cache_mib}M"
    local fetch="fetch bandwidth from one memcached on loopback, $seq_sweeps read-only sweeps (page_sweep seqread), $over, lego pages read per second of the timed sweeps"
    local seq="sequential sweeps ($seq_sweeps), $over"
    local random="random page reads (${random_per_page}x pages), $over"
    local pool="lego on $pool_servers memcached servers (1 copy)"
    local write="random page writes (page_sweep write, ${write_per_page}x pages), $over, $pool_servers memcached servers"
    local raw_what="raw pipelined mg, $mc_batch_pages per pipeline (lego's read-ahead chunk), one at a time (bench/mc_raw.c)"
    if [ "$mc_ok" = 0 ]; then
        local why="skipped ($mc_reason)" m
        add_row "$fetch / $raw_what" "" "" rate ge 0.7 "$why"
        for m in "$seq, $pool / lego on the file store" "$seq, $pool / kernel swap" \
            "$random, $pool / lego on the file store" "$random, $pool / kernel swap"; do
            add_row "$m" "" "" s none "" "$why"
        done
        add_row "$seq, $pool, sealed (LEGO_KEY_FILE) / not sealed" "" "" s le 1.10 "$why"
        add_row "$random, $pool, sealed (LEGO_KEY_FILE) / not sealed" "" "" s le 1.10 "$why"
        add_row "$write, 2 copies pessimistic / 1 copy" "" "" s le 1.25 "$why"
        add_row "$write, 2 copies optimistic / 1 copy" "" "" s le 1.10 "$why"
        return
    fi
    # How many fetches each page read cost over the whole run (an untimed sweep, the timed
    # ones and page_sweep's final check each read every page): about 1 when every page read
    # by a sweep was fetched, so that pages read per second is the fetch rate.
    local fetched per_read=""
    fetched="$(median pool_fetch lego pages_fetched)"
    [ -z "$fetched" ] || per_read="$(awk -v f="$fetched" -v p=$(( over_heap_mib * 256 * (seq_sweeps + 2) )) 'BEGIN { printf "%.2f", f / p }')"
    compare_keys "$fetch (${per_read:-?} fetches per page read, LEGO_STATS) / $raw_what" \
        pool_fetch lego accesses_per_s raw pages_per_s rate ge 0.7 ""
    compare "$seq, $pool / lego on the file store" pool_seq pool file seconds s none "" ""
    compare "$seq, $pool / kernel swap" pool_seq pool swap seconds s none "" "$swap_reason"
    compare "$seq, lego on the file store / kernel swap (the pool's baselines)" pool_seq file swap seconds s none "" "$swap_reason"
    compare "$random, $pool / lego on the file store" pool_random pool file seconds s none "" ""
    compare "$random, $pool / kernel swap" pool_random pool swap seconds s none "" "$swap_reason"
    compare "$random, lego on the file store / kernel swap (the pool's baselines)" pool_random file swap seconds s none "" "$swap_reason"
    compare "$seq, $pool, sealed (LEGO_KEY_FILE) / not sealed" pool_seq sealed pool seconds s le 1.10 ""
    compare "$random, $pool, sealed (LEGO_KEY_FILE) / not sealed" pool_random sealed pool seconds s le 1.10 ""
    compare "$write, 2 copies pessimistic / 1 copy" pool_write pessimistic one seconds s le 1.25 ""
    compare "$write, 2 copies optimistic / 1 copy" pool_write optimistic one seconds s le 1.10 ""
    local peak_one peak_opt
    peak_one="$(peak one cgroup_peak_bytes pool_write)"
    peak_opt="$(peak optimistic cgroup_peak_bytes pool_write)"
    if [ "$cgroup_ok" = 1 ]; then
        add_row "peak cgroup memory of the random page writes, 2 copies optimistic / 1 copy (cap $(( over_cache_mib + overhead_mib )) MiB)" \
            "$peak_opt" "$peak_one" bytes none "" ""
    fi
}

# The scheme table (issue 12): one markdown line per scheme and key setting, and the goal rows.
codes_lines=()

build_codes_rows() {
    local over="heap ${over_heap_mib}M = 4x cache ${over_cache_mib}M, $codes_servers memcached servers"
    if [ "$mc_ok" = 0 ]; then
        local why="skipped ($mc_reason)"
        add_row "pool memory per heap byte, rs:4+2" "" "" "" le 1.6 "$why"
        add_row "sequential sweeps, rs:4+2 / replicas:2" "" "" s le 1.25 "$why"
        add_row "random page reads, rs:4+2 / replicas:2" "" "" s le 1.25 "$why"
        return
    fi
    local scheme sealed v base mem seq rnd wr cpu_r cpu_w seq_b rnd_b wr_b plain_v
    local seal_seq seal_rnd rss
    q() { # A B: A / B to two places, or a dash
        if [ -n "$1" ] && [ -n "$2" ] && [ "$(calc "$2 > 0")" = 1 ]; then
            awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
        else
            echo "—"
        fi
    }
    cell() { # VALUE FORMAT: VALUE printed with FORMAT, or a dash
        if [ -n "$1" ]; then awk -v x="$1" -v f="$2" 'BEGIN { printf f, x }'; else echo "—"; fi
    }
    for scheme in $codes_schemes; do
        for sealed in 0 1; do
            v="$(codes_variant "$scheme" "$sealed")"
            base="$(codes_variant replicas:2 "$sealed")"
            plain_v="$(codes_variant "$scheme" 0)"
            mem="$(median codes_write "$v" pool_per_heap_byte)"
            seq="$(median codes_seq "$v" seconds)"
            rnd="$(median codes_random "$v" seconds)"
            wr="$(median codes_write "$v" accesses_per_s)"
            cpu_r="$(median codes_random "$v" cpu_us_per_page)"
            cpu_w="$(median codes_write "$v" cpu_us_per_page)"
            rss="$(peak "$v" rss_kib codes_seq codes_random codes_write)"
            seq_b="$(median codes_seq "$base" seconds)"
            rnd_b="$(median codes_random "$base" seconds)"
            wr_b="$(median codes_write "$base" accesses_per_s)"
            seal_seq="—"; seal_rnd="—"
            if [ "$sealed" = 1 ]; then
                seal_seq="$(q "$seq" "$(median codes_seq "$plain_v" seconds)")"
                seal_rnd="$(q "$rnd" "$(median codes_random "$plain_v" seconds)")"
            fi
            codes_lines+=("| $scheme | $([ "$sealed" = 1 ] && echo yes || echo no) | $(codes_losses "$scheme") | $(cell "$mem" "%.2f") | $(cell "$seq" "%.3f s") | $(q "$seq" "$seq_b") | $(cell "$rnd" "%.3f s") | $(q "$rnd" "$rnd_b") | $(cell "$wr" "%.0f/s") | $(q "$wr" "$wr_b") | $(cell "$cpu_r" "%.1f us") | $(cell "$cpu_w" "%.1f us") | $(cell "$rss" "%.0f") | $seal_seq | $seal_rnd |")
            local fails
            fails="$(failure_note codes_seq "$v")$(failure_note codes_random "$v")$(failure_note codes_write "$v")"
            if [ -n "$fails" ]; then notes+=("scheme table, $v: $fails (target/bench/failures.log)"); fi
        done
    done
    # The goal rows. Memory: bytes per heap byte against 1 (the ratio is the value).
    mem="$(median codes_write rs:4+2 pool_per_heap_byte)"
    add_row "pool memory per heap byte (memcached stats bytes / 4096 x pool_stored_pages), rs:4+2, random page writes, $over (replicas:3 survives as many losses at $(cell "$(median codes_write replicas:3 pool_per_heap_byte)" "%.2f"))" \
        "$mem" "${mem:+1}" "" le 1.6 "$(missing_reason codes_write rs:4+2 "")"
    compare "sequential sweeps ($seq_sweeps), $over, rs:4+2 / replicas:2" codes_seq rs:4+2 replicas:2 seconds s le 1.25 ""
    compare "random page reads (${random_per_page}x pages), $over, rs:4+2 / replicas:2" codes_random rs:4+2 replicas:2 seconds s le 1.25 ""
    compare "random page writes per second (${write_per_page}x pages), $over, rs:4+2 / replicas:2 (reference)" codes_write rs:4+2 replicas:2 accesses_per_s rate none "" ""
    for scheme in replicas:2 rs:4+2 rs:8+2; do
        compare "sequential sweeps, $scheme, sealed (LEGO_KEY_FILE) / not sealed" codes_seq "$scheme+key" "$scheme" seconds s le 1.10 ""
        compare "random page reads, $scheme, sealed (LEGO_KEY_FILE) / not sealed" codes_random "$scheme+key" "$scheme" seconds s le 1.10 ""
    done
}

curve_lines=() # percent, cache MiB, lego seconds, swap seconds, zswap seconds

build_curve() {
    local p c a b z
    for p in $curve_percents; do
        c="$(curve_cache_mib "$p")"
        a="$(median "curve_$p" lego seconds)"
        b="$(median "curve_$p" swap seconds)"
        z="$(median "curve_$p" zswap seconds)"
        curve_lines+=("$p	$c	${a:-?}	${b:-?}	${z:-?}")
    done
}

plot_curve() {
    local dat="$out_dir/cache_curve.dat" png="$out_dir/cache_curve.png" term=png
    printf '# percent\tcache_mib\tlego_s\tswap_s\tzswap_s\n' >"$dat"
    printf '%s\n' "${curve_lines[@]}" >>"$dat"
    if ! command -v gnuplot >/dev/null 2>&1; then
        notes+=("plot skipped: gnuplot is not installed")
        return
    fi
    if gnuplot -e 'set terminal' 2>&1 | grep -q pngcairo; then term=pngcairo; fi
    gnuplot <<EOF || notes+=("plot failed: gnuplot returned an error")
set terminal $term size 800,500
set output '$png'
set title "zipf 0.99 over a ${curve_heap_mib} MiB heap: time against cache size ($machine)"
set xlabel 'cache, % of the working set'
set ylabel 'seconds (median of $curve_rounds)'
set datafile missing '?'
set key top right
set grid
set xrange [0:105]
set yrange [0:*]
set xtics (10, 25, 50, 100)
plot '$dat' using 1:3 with linespoints lw 2 pt 7 title 'lego (cgroup: cache + ${overhead_mib} MiB, no swap)', \
     '$dat' using 1:4 with linespoints lw 2 pt 5 title 'kernel swap (cgroup: cache, swap file)', \
     '$dat' using 1:5 with linespoints lw 2 pt 9 title 'zswap (the same, zswap on)'
EOF
}

json_str() { # a JSON string literal
    printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"
}

codes_table() { # the scheme table, in markdown
    echo "## Copies and codes (heap $over_heap_mib MiB over cache $over_cache_mib MiB, $codes_servers memcached servers, $rounds rounds, medians)"
    echo
    echo "Ratios \"/ r2\" are against replicas:2 with the same key setting; \"sealed /\" against the same scheme without a key. CPU: user + sys of the lego process per page fetched or written back (the servers' not included). Peak RSS: the largest over the three workloads, cache $over_cache_mib MiB, no memory cgroup."
    echo
    echo "| scheme | key | servers that may be lost | pool bytes per heap byte | seq sweeps | / r2 | random reads | / r2 | random writes | / r2 | CPU per page, reads | CPU per page, writes | peak RSS, KiB | sealed / plain, seq | sealed / plain, random |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${codes_lines[@]}"
}

json_num() { # a JSON number, or null
    if [ -n "$1" ] && [ "$1" != "?" ]; then printf '%s' "$1"; else printf 'null'; fi
}

write_reports() {
    local md="$out_dir/results.md" json="$out_dir/results.json" line
    local commit
    commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if [ -n "$(git status --porcelain -- runtime preload 2>/dev/null)" ]; then
        commit="$commit plus uncommitted changes in runtime/ or preload/"
    fi
    local lib_sum
    lib_sum="$(sha256sum "$lib" | cut -c1-12)"
    local table
    table="$(
        echo "| metric | lego | baseline | ratio | goal | machine |"
        echo "|---|---|---|---|---|---|"
        for line in "${rows[@]}"; do
            printf '%s\n' "$line" | awk -F'\t' -v m="$machine" '{ printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, m }'
        done
    )"
    {
        echo "# lego benchmarks ($mode run${only:+, $only rows only})"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit (liblego.so sha256 $lib_sum), $machine (kernel $kernel), $rounds rounds A B A B, medians."
        echo "Ratios are lego / baseline (lower is better) except thread scaling, log append, replay and the pool's fetch bandwidth (higher is better)."
        echo
        echo "$table"
        echo
        if [ "${#notes[@]}" -gt 0 ]; then
            echo "Notes:"
            printf -- '- %s\n' "${notes[@]}"
            echo
        fi
        if [ "${#codes_lines[@]}" -gt 0 ]; then
            codes_table
            echo
        fi
        if [ "${#curve_lines[@]}" -gt 0 ]; then
            echo "## Time against cache size (zipf 0.99, ${zipf_per_page}x pages, heap $curve_heap_mib MiB)"
            echo
            echo "| cache | lego | kernel swap | zswap | lego / swap | lego / zswap |"
            echo "|---|---|---|---|---|---|"
            for line in "${curve_lines[@]}"; do
                printf '%s\n' "$line" | awk -F'\t' '
                function t(x) { return (x == "?" ? "—" : sprintf("%.3f s", x)) }
                function q(a, b) { return (a != "?" && b != "?" && b > 0) ? sprintf("%.2f", a / b) : "—" }
                {
                    printf "| %s%% (%s MiB) | %s | %s | %s | %s | %s |\n", $1, $2, t($3), t($4), t($5), q($3, $4), q($3, $5)
                }'
            done
            echo
            [ -f "$out_dir/cache_curve.png" ] && echo "![time against cache size](cache_curve.png)" && echo
        fi
        echo "## Set-up"
        echo
        echo "- lego: \`LD_PRELOAD=$lib\` (a copy of $built_lib taken after the build), \`LEGO_BACKEND=file:$store_dir\`; oversubscribed runs in a memory cgroup (v1) capped at cache + $overhead_mib MiB with swap refused (memsw limit = limit, swappiness 0)."
        echo "- kernel swap: the same program without the shim in a memory cgroup capped at the cache size, swap file in $store_dir (same disk), swappiness $(cat /proc/sys/vm/swappiness 2>/dev/null || echo '?'), page-cluster $(cat /proc/sys/vm/page-cluster 2>/dev/null || echo '?'), zswap off."
        if [ "$zswap_ok" = 1 ]; then
            echo "- zswap: the kernel-swap set-up with zswap on (compressor $(cat "$zswap_dir/compressor" 2>/dev/null), max_pool_percent $(cat "$zswap_dir/max_pool_percent" 2>/dev/null)); the swap file behind it. page_sweep's pages hold pseudo-random words, which compress poorly. Measured by hand on this kernel (6.18): zswap kept such pages as they are (\`Zswap\` = \`Zswapped\` in /proc/meminfo, 99 MB for a 128 MiB random run), and its pool is not charged to a v1 memory cgroup's limit (the cgroup's usage stayed at its 32 MiB cap): **the zswap rows hold the cap plus up to the whole evicted heap in RAM**, not the same memory as lego and kernel swap."
        else
            echo "- zswap: skipped ($zswap_reason)."
        fi
        echo "- first touch and allocator: lego with LEGO_CACHE_SIZE=${first_touch_cache}M (heap all resident), no cgroup; peak RSS from \`/usr/bin/time -f %M\`."
        echo "- durable heap: lego with LEGO_CACHE_SIZE=${first_touch_cache}M and LEGO_LOG_DIR in $log_root (the same disk). Log append: \`log_write checkpoint $log_mib $log_epochs\` with epochs started only by lego_checkpoint() (LEGO_FLUSH_MS=3600000, LEGO_FLUSH_PAGES=16777216, LEGO_LOG_MAX=1T), each timed epoch holding every page of the block, vs \`dd if=/dev/zero bs=1M count=$log_mib oflag=direct conv=fdatasync\` into $log_root. Logging cost: \`log_write update $update_heap_mib $update_mwrites\` under lego with the default LEGO_FLUSH_MS and LEGO_SYNC vs without LEGO_LOG_DIR. Replay: \`lego replay\` of the log-append run's log (image in the same directory) vs \`dd iflag=direct bs=1M\` of its segments, page cache dropped before each; MB = 10^6 bytes."
        if [ "$mc_ok" = 1 ]; then
            echo "- memcached pool: $(memcached -V 2>/dev/null || echo memcached) on 127.0.0.1, started by this script for each run (\`memcached -l 127.0.0.1 -p PORT -M -m $(pool_server_mib) -U 0 -t 2\`, default slab classes), stopped after it; lego in the same cgroup as the file-store runs (the servers outside it), \`LEGO_BACKEND=memcached://...\` with one server for the fetch bandwidth and $pool_servers for the other rows, default LEGO_TIMEOUT_MS. Fetch bandwidth: \`page_sweep seqread $over_heap_mib $seq_sweeps\` (accesses_per_s of the timed sweeps) vs \`mc_raw HOST:PORT $(( over_heap_mib * 256 )) $mc_batch_pages $seq_sweeps\` (pages_per_s). Replication: \`page_sweep write $over_heap_mib $write_per_page\` with LEGO_REPLICAS=1, and LEGO_REPLICAS=2 with LEGO_REPLICATION=pessimistic and optimistic."
        else
            echo "- memcached pool: skipped ($mc_reason)."
        fi
        if [ "${#real_native[@]}" -gt 0 ]; then
            echo "- real programs: \`perl\` $(perl -e 'print $^V' 2>/dev/null) building a hash of $real_perl_keys keys and sorting them, and \`sqlite3\` $(sqlite3 -version 2>/dev/null | cut -d' ' -f1) in memory: $real_sqlite_rows rows inserted, an index built, two queries. Each is run natively once (its peak RSS sets the caches: $real_percents % of it, at least $lego_min_cache_mib MiB), then under lego, kernel swap and zswap in the cgroups above, $real_rounds round(s); bench/timed.c (static) times each run and hashes its output, and a run whose output differs from the native one fails as wrong-output. \`python3\` builds and sorts the same hash with \`PYTHONMALLOC=malloc\` in every run (its own small-object arenas are mapped, and lego does not page anonymous mmap until issue 14). Redis is not here: Debian's is built with its own jemalloc over mmap."
        fi
        echo "- programs: bench/*.c, gcc -O2; page_sweep fills every page before the timed part and checks every access and, at the end, every word; log_write checks every word (checkpoint) or the sum of all words (update) at the end, and a replay that drops part of a log fails the run."
        echo
        echo "## Raw runs"
        echo
        echo "| benchmark | variant | round | status | result |"
        echo "|---|---|---|---|---|"
        awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $6 }' "$raw"
    } >"$md"

    {
        printf '{\n  "mode": %s,\n  "machine": %s,\n  "kernel": %s,\n  "commit": %s,\n  "liblego_sha256": %s,\n  "date": %s,\n' \
            "$(json_str "$mode")" "$(json_str "$machine")" "$(json_str "$kernel")" \
            "$(json_str "$commit")" "$(json_str "$lib_sum")" "$(json_str "$(date -u '+%Y-%m-%dT%H:%M:%SZ')")"
        printf '  "only": %s, "pool": {"memcached": %s, "servers": %s, "server_mib": %s, "raw_batch_pages": %s, "write_per_page": %s},\n' \
            "$(json_str "${only:-all}")" "$(json_str "$([ "$mc_ok" = 1 ] && (memcached -V 2>/dev/null || echo memcached) || echo "skipped ($mc_reason)")")" \
            "$pool_servers" "$(pool_server_mib)" "$mc_batch_pages" "$write_per_page"
        printf '  "config": {"rounds": %s, "first_touch_mib": %s, "first_touch_cache_mib": %s, "over_cache_mib": %s, "over_heap_mib": %s, "seq_sweeps": %s, "random_per_page": %s, "zipf_per_page": %s, "mt_per_page": %s, "mt_threads": %s, "curve_heap_mib": %s, "curve_rounds": %s, "alloc_scale": %s, "overhead_mib": %s, "log_mib": %s, "log_epochs": %s, "update_heap_mib": %s, "update_mwrites": %s, "cgroup": %s, "swap": %s},\n' \
            "$rounds" "$first_touch_mib" "$first_touch_cache" "$over_cache_mib" "$over_heap_mib" "$seq_sweeps" \
            "$random_per_page" "$zipf_per_page" "$mt_per_page" "$mt_threads" "$curve_heap_mib" "$curve_rounds" \
            "$alloc_scale" "$overhead_mib" "$log_mib" "$log_epochs" "$update_heap_mib" "$update_mwrites" \
            "$(json_str "$([ "$cgroup_ok" = 1 ] && echo "v1 $cg_root" || echo "skipped ($cgroup_reason)")")" \
            "$(json_str "$([ "$swap_ok" = 1 ] && echo "file $swap_file" || echo "skipped ($swap_reason)")")"
        printf '  "rows": [\n'
        local i=0 f
        for line in "${rows[@]}"; do
            IFS=$'\t' read -r -a f <<<"$line"
            [ "$i" = 0 ] || printf ',\n'
            printf '    {"metric": %s, "lego": %s, "baseline": %s, "ratio": %s, "goal": %s, "status": %s, "lego_value": %s, "baseline_value": %s, "ratio_value": %s, "unit": %s, "machine": %s}' \
                "$(json_str "${f[0]}")" "$(json_str "${f[1]}")" "$(json_str "${f[2]}")" "$(json_str "${f[3]}")" \
                "$(json_str "${f[4]}")" "$(json_str "${f[5]}")" "$(json_num "${f[6]:-}")" "$(json_num "${f[7]:-}")" \
                "$(json_num "${f[8]:-}")" "$(json_str "${f[9]:-}")" "$(json_str "$machine")"
            i=$(( i + 1 ))
        done
        printf '\n  ],\n  "notes": ['
        i=0
        for line in "${notes[@]}"; do
            [ "$i" = 0 ] || printf ', '
            json_str "$line"
            i=$(( i + 1 ))
        done
        printf '],\n  "cache_curve": [\n'
        i=0
        for line in "${curve_lines[@]}"; do
            IFS=$'\t' read -r -a f <<<"$line"
            [ "$i" = 0 ] || printf ',\n'
            printf '    {"percent": %s, "cache_mib": %s, "lego_seconds": %s, "swap_seconds": %s, "zswap_seconds": %s}' \
                "${f[0]}" "${f[1]}" "$(json_num "${f[2]}")" "$(json_num "${f[3]}")" "$(json_num "${f[4]}")"
            i=$(( i + 1 ))
        done
        printf '\n  ],\n  "runs": [\n'
        awk -F'\t' '
            function val(x) { return (x ~ /^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$/) ? x : "\"" x "\"" }
            {
                if (NR > 1) printf ",\n"
                printf "    {\"name\": \"%s\", \"variant\": \"%s\", \"round\": %s, \"status\": \"%s\", \"exit\": %s, \"result\": {", $1, $2, $3, $4, $5
                c = split($6, kv, " ")
                for (i = 1; i <= c; i++) {
                    eq = index(kv[i], "=")
                    v = substr(kv[i], eq + 1)
                    printf "%s\"%s\": %s", (i > 1 ? ", " : ""), substr(kv[i], 1, eq - 1), (v == "?" ? "null" : val(v))
                }
                printf "}}"
            }' "$raw"
        printf '\n  ]\n}\n'
    } >"$json"

    printf '\n%s\n\n' "$table"
    if [ "${#codes_lines[@]}" -gt 0 ]; then codes_table; echo; fi
    if [ "${#notes[@]}" -gt 0 ]; then printf -- '- %s\n' "${notes[@]}"; echo; fi
}

# ---------------------------------------------------------------------------------------------
start_s=$SECONDS
say "lego benchmarks, $mode run on $machine"
setup_tools
build
rm -rf "$runs_dir"
mkdir -p "$runs_dir"
: >"$raw"
: >"$failures"
setup_cgroups_and_swap
setup_memcached
if [ -z "$only" ]; then
    run_first_touch
    run_oversubscribed
    run_thread_scaling
    run_cache_curve
    run_alloc
    run_log_append_and_replay
    run_log_cost
    run_real
    run_fork
elif [ "$only" = fork ]; then
    run_fork
elif [ "$only" = swap ]; then
    run_oversubscribed
    run_cache_curve
elif [ "$only" = real ]; then
    run_real
fi
if [ -z "$only" ] || [ "$only" = pool ]; then run_pool; fi
if [ -z "$only" ] || [ "$only" = codes ]; then run_codes; fi
if [ -z "$only" ] || [ "$only" = watch ]; then run_watch; fi
if [ -z "$only" ]; then
    build_rows
    build_real_rows
    build_fork_rows
elif [ "$only" = fork ]; then
    build_fork_rows
elif [ "$only" = swap ]; then
    build_swap_rows
elif [ "$only" = real ]; then
    build_real_rows
fi
if [ -z "$only" ] || [ "$only" = swap ]; then
    build_curve
    plot_curve
fi
if [ -z "$only" ] || [ "$only" = pool ]; then build_pool_rows; fi
if [ -z "$only" ] || [ "$only" = codes ]; then build_codes_rows; fi
if [ -z "$only" ] || [ "$only" = watch ]; then build_watch_rows; fi
write_reports
failed_total="$(awk -F'\t' '$4 != "ok"' "$raw" | wc -l)"
if [ "$failed_total" != 0 ]; then
    note "$failed_total runs failed: see $failures"
else
    rm -f "$failures"
fi
say "done in $(( SECONDS - start_s )) s: $out_dir/results.md, $out_dir/results.json$([ -n "$only" ] && [ "$only" != swap ] || echo ", $out_dir/cache_curve.png")"
