//! The names of the variables lego reads ([`vars`]) and their documentation ([`Setting`],
//! [`documented_settings`]): each setting documented once, with its default and an example,
//! for `lego --help` and the README table (which follows it).
//!
//! Rules: a name lives in [`vars`] and nowhere else; every variable read is listed here once.

/// The names of the variables lego reads. Keep every name here and nowhere else.
pub mod vars {
    /// DRAM cache size.
    pub const CACHE_SIZE: &str = "LEGO_CACHE_SIZE";
    /// Reserved heap (region) size.
    pub const HEAP_SIZE: &str = "LEGO_HEAP_SIZE";
    /// Page store backend.
    pub const BACKEND: &str = "LEGO_BACKEND";
    /// Where statistics go at exit.
    pub const STATS: &str = "LEGO_STATS";
    /// Log level of the runtime's own messages.
    pub const LOG_LEVEL: &str = "LEGO_LOG_LEVEL";
    /// Number of fault-handler threads.
    pub const HANDLER_THREADS: &str = "LEGO_HANDLER_THREADS";
    /// Pages per eviction batch.
    pub const EVICT_BATCH: &str = "LEGO_EVICT_BATCH";
    /// Fault injection (testing hook).
    pub const FAULT_INJECT: &str = "LEGO_FAULT_INJECT";
    /// Directory of the durable heap's log.
    pub const LOG_DIR: &str = "LEGO_LOG_DIR";
    /// Longest time between two epochs.
    pub const FLUSH_MS: &str = "LEGO_FLUSH_MS";
    /// Dirty pages that start an epoch early.
    pub const FLUSH_PAGES: &str = "LEGO_FLUSH_PAGES";
    /// Whether the log waits for the disk.
    pub const SYNC: &str = "LEGO_SYNC";
    /// Log size that triggers a compaction.
    pub const LOG_MAX: &str = "LEGO_LOG_MAX";
    /// Heap image to restore at start.
    pub const RESTORE: &str = "LEGO_RESTORE";
    pub const REPLICAS: &str = "LEGO_REPLICAS";
    /// Copies or erasure coding of a pool's pages.
    pub const REDUNDANCY: &str = "LEGO_REDUNDANCY";
    pub const REPLICATION: &str = "LEGO_REPLICATION";
    pub const ADAPTIVE_FREE: &str = "LEGO_ADAPTIVE_FREE";
    pub const TIMEOUT_MS: &str = "LEGO_TIMEOUT_MS";
    /// Key that seals every value sent to a pool.
    pub const KEY_FILE: &str = "LEGO_KEY_FILE";
    /// Whether statistics are published while the program runs.
    pub const PUBLISH: &str = "LEGO_PUBLISH";
    /// Where the metrics endpoint listens.
    pub const METRICS: &str = "LEGO_METRICS";
    /// Whether large private anonymous mappings are served from the managed heap.
    pub const MMAP: &str = "LEGO_MMAP";
    /// Smallest mapping served with `LEGO_MMAP=1`.
    pub const MMAP_MIN: &str = "LEGO_MMAP_MIN";
    /// Not lego's own: the default backend directory comes from it.
    pub const TMPDIR: &str = "TMPDIR";
}

/// One documented setting, for `lego --help` and the README table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The variable's name, e.g. `LEGO_CACHE_SIZE`.
    pub name: &'static str,
    /// The default, as a user would read it.
    pub default: &'static str,
    /// An example value.
    pub example: &'static str,
    /// What the setting means, in one sentence.
    pub meaning: &'static str,
}

pub(super) const SETTINGS: &[Setting] = &[
    Setting {
        name: vars::CACHE_SIZE,
        default: "25% of RAM (at most the heap size)",
        example: "512M",
        meaning: "DRAM cache: how much of the heap stays resident; a size (4096, 512K, 512M, 4G, \
                  1.5G, 1T) or a percentage of RAM (25%); at least 16M; rounded down to pages.",
    },
    Setting {
        name: vars::HEAP_SIZE,
        default: "64G",
        example: "256G",
        meaning: "Virtual size reserved for the program's heap; at least the cache size, at \
                  most 8T; rounded up to pages.",
    },
    Setting {
        name: vars::BACKEND,
        default: "file:$TMPDIR (file:/tmp if TMPDIR is unset)",
        example: "file:/var/tmp",
        meaning: "Page store for evicted pages: file:DIR keeps them in a private O_DIRECT file \
                  under the absolute directory DIR.",
    },
    Setting {
        name: vars::STATS,
        default: "0",
        example: "/tmp/lego-stats.json",
        meaning: "Statistics at exit: 0 for none, 1 for a summary on stderr, or a path ending \
                  in .json to write them as one JSON object.",
    },
    Setting {
        name: vars::LOG_LEVEL,
        default: "off",
        example: "info",
        meaning: "Runtime log level on stderr: off, error, warn, info, debug or trace.",
    },
    Setting {
        name: vars::HANDLER_THREADS,
        default: "number of online CPUs (at most 256)",
        example: "4",
        meaning: "Number of threads that serve page faults, from 1 to 256.",
    },
    Setting {
        name: vars::EVICT_BATCH,
        default: "256",
        example: "512",
        meaning: "Pages evicted and written back together, from 16 to 1024.",
    },
    Setting {
        name: vars::FAULT_INJECT,
        default: "unset",
        example: "fetch:eio:after=100",
        meaning: "Testing hook: after N pages succeed, every fetch (fetch:ERRNO:after=N) or \
                  store (store:ERRNO:after=N) fails with ERRNO (eio or enospc), or every \
                  fetched page comes back changed (fetch:corrupt:after=N), or every fetch or \
                  store waits MS milliseconds first (fetch:delay=MS:after=N, MS up to 60000); \
                  :once at the end (fetch:eio:after=N:once) hits only the next call, then the \
                  store works again; readback:... does \
                  the same to an epoch's reads of evicted pages only; spawn:THREAD makes \
                  starting the runtime thread THREAD (lego-logwrite) fail; panic:fork panics \
                  inside fork() with every lock of the internal heap held; \
                  stall:snapshot:MS makes a fault handler wait MS milliseconds before it \
                  copies pages back from an epoch's snapshot.",
    },
    Setting {
        name: vars::LOG_DIR,
        default: "unset (no log: the heap is not durable)",
        example: "/var/lib/app/heap",
        meaning: "Durable heap: append epochs of changed pages to a log in this directory \
                  (created 0700, one writer at a time); `lego replay` rebuilds the heap from it.",
    },
    Setting {
        name: vars::FLUSH_MS,
        default: "1000",
        example: "200",
        meaning: "Longest time between two epochs of the log, in milliseconds, from 10 to \
                  3600000, or manual: epochs only at lego_checkpoint() and at exit; needs \
                  LEGO_LOG_DIR.",
    },
    Setting {
        name: vars::FLUSH_PAGES,
        default: "a quarter of the cache, in pages",
        example: "8192",
        meaning: "Dirty pages that start an epoch before LEGO_FLUSH_MS is up, from 16 to \
                  16777216; needs LEGO_LOG_DIR.",
    },
    Setting {
        name: vars::SYNC,
        default: "fdatasync",
        example: "none",
        meaning: "fdatasync: an epoch counts once the disk has it (survives a machine crash); \
                  none: never wait for the disk (survives a crash of the program only); needs \
                  LEGO_LOG_DIR.",
    },
    Setting {
        name: vars::LOG_MAX,
        default: "4 times the heap's live size, at least 64M",
        example: "2G",
        meaning: "Log size (a size, at least 16M) above which the log is compacted into a \
                  checkpoint of the live heap and older segments are removed; needs LEGO_LOG_DIR.",
    },
    Setting {
        name: vars::RESTORE,
        default: "unset",
        example: "/tmp/heap.img",
        meaning: "Start from this heap image (made by `lego replay`): the heap is mapped at its \
                  old address and pages are read from the image as they are touched.",
    },
    Setting {
        name: vars::REPLICAS,
        default: "1",
        example: "2",
        meaning: "Copies of every evicted page, each on a different server of the pool, from 1 \
                  to 8 and at most the number of servers; needs LEGO_BACKEND=memcached://.",
    },
    Setting {
        name: vars::REDUNDANCY,
        default: "replicas:1 (LEGO_REPLICAS)",
        example: "rs:4+2",
        meaning: "How a pool survives lost servers: replicas:N (N copies of every page, as \
                  LEGO_REPLICAS=N) or rs:K+M (stripes of K pages, K = 2, 4, 8 or 16, with M \
                  parity pages, 1 to 4, on K+M different servers: M servers may be lost at \
                  (K+M)/K times the memory); rs writes pessimistically and is not sealed \
                  (LEGO_KEY_FILE); needs LEGO_BACKEND=memcached://.",
    },
    Setting {
        name: vars::REPLICATION,
        default: "adaptive",
        example: "pessimistic",
        meaning: "pessimistic: a write-back completes when every copy is stored; optimistic: \
                  when the first is, the others follow from a bounded queue; adaptive: \
                  pessimistic while the pool has room, optimistic when it is scarce; needs \
                  LEGO_BACKEND=memcached://.",
    },
    Setting {
        name: vars::ADAPTIVE_FREE,
        default: "20%",
        example: "10%",
        meaning: "Free share of the pool's memory below which adaptive replication turns \
                  optimistic (and back above it plus 5 points), from 1% to 90%; needs \
                  LEGO_BACKEND=memcached://.",
    },
    Setting {
        name: vars::TIMEOUT_MS,
        default: "2000",
        example: "500",
        meaning: "Bound on every connect, read and write to a pool server, in milliseconds, \
                  from 10 to 60000; a server that misses it counts a failure; needs \
                  LEGO_BACKEND=memcached://.",
    },
    Setting {
        name: vars::KEY_FILE,
        default: "unset (values sent to the pool are not sealed)",
        example: "/home/me/.lego-key",
        meaning: "File of 32 random bytes, mode 0600, owned by you: every value sent to the pool \
                  is encrypted and authenticated with AES-256-GCM under it; needs \
                  LEGO_BACKEND=memcached://.",
    },
    Setting {
        name: vars::PUBLISH,
        default: "on",
        example: "off",
        meaning: "Whether the program's statistics are published while it runs (once a second, \
                  in $XDG_RUNTIME_DIR/lego/PID.json, owner-only), for lego stats and lego top.",
    },
    Setting {
        name: vars::METRICS,
        default: "unset (no endpoint)",
        example: "127.0.0.1:9464",
        meaning: "Serve the statistics over HTTP (GET /metrics) in Prometheus' text format, on \
                  IP:PORT, localhost:PORT or unix:PATH.",
    },
    Setting {
        name: vars::MMAP,
        default: "0",
        example: "1",
        meaning: "1: the program's private anonymous mappings of at least LEGO_MMAP_MIN bytes \
                  (mmap, munmap, mremap, madvise, mprotect) are served from the managed heap and \
                  paged like it; 0: they are ordinary memory.",
    },
    Setting {
        name: vars::MMAP_MIN,
        default: "256K",
        example: "1M",
        meaning: "Smallest anonymous mapping served with LEGO_MMAP=1, a size from 4K to 1T, \
                  rounded up to pages; smaller mappings stay ordinary memory.",
    },
];

/// Every `LEGO_*` variable lego reads, each listed once with its default.
pub fn documented_settings() -> &'static [Setting] {
    SETTINGS
}
