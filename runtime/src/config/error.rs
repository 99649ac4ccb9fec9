//! [`ConfigError`]: every way a setting can be wrong, one line each.

use thiserror::Error;

use super::faults::{FAULT_DELAY_MS_MAX, SPAWN_FAULT_THREADS, STALL_FAULT_POINTS};
use super::parse::SizeError;
use super::settings::vars;
use super::{CACHE_BYTES_MIN, FLUSH_MS_MAX, FLUSH_MS_MIN, HEAP_BYTES_MAX, LOG_MAX_BYTES_MIN};

/// A setting that is set but wrong. Every message is one line that names the variable, the
/// value and what would be right.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// A setting of the log while `LEGO_LOG_DIR` is unset.
    #[error(
        "{name} is set but {} is not: {name} tunes the durable heap's log, which only runs \
         with a log directory; set {} or unset {name}",
        vars::LOG_DIR,
        vars::LOG_DIR
    )]
    NeedsLogDir {
        /// The variable.
        name: &'static str,
    },
    /// A pool setting with a backend that is not a pool.
    #[error(
        "{name} tunes a memcached pool, but LEGO_BACKEND is not one: set \
         LEGO_BACKEND=memcached://HOST:PORT[,HOST:PORT...] or unset {name}"
    )]
    NeedsPool {
        /// The variable.
        name: &'static str,
    },
    /// More copies than servers.
    #[error(
        "{name}={setting} asks for more copies than the pool has servers ({servers}): \
         every copy of a page lives on a different server"
    )]
    ReplicasAboveServers {
        /// The variable that asked (`LEGO_REPLICAS` or `LEGO_REDUNDANCY`).
        name: &'static str,
        /// Its value, as written.
        setting: String,
        /// Servers in LEGO_BACKEND.
        servers: usize,
    },
    /// `LEGO_REDUNDANCY` is neither `replicas:N` nor `rs:K+M`.
    #[error(
        "{}={value:?} is not a redundancy: expected replicas:N (N copies of every page, 1 to 8) \
         or rs:K+M (stripes of K pages, K = 2, 4, 8 or 16, with M parity pages, 1 to 4), such \
         as rs:4+2",
        vars::REDUNDANCY
    )]
    Redundancy {
        /// The value as set.
        value: String,
    },
    /// `LEGO_REDUNDANCY=rs:K+M` with K or M outside their bounds.
    #[error(
        "{}={value:?} is not a code lego supports: K (data pages of a stripe) must be 2, 4, 8 \
         or 16 and M (parity pages) 1 to 4, such as rs:4+2",
        vars::REDUNDANCY
    )]
    CodeShape {
        /// The value as set.
        value: String,
    },
    /// A stripe of more values than the pool has servers.
    #[error(
        "{}={value} needs {values} servers (every value of a stripe lives on a different \
         server), but the pool has {servers}: add servers to LEGO_BACKEND or choose a smaller \
         code",
        vars::REDUNDANCY
    )]
    CodeAboveServers {
        /// The value as set.
        value: String,
        /// K + M.
        values: usize,
        /// Servers in LEGO_BACKEND.
        servers: usize,
    },
    /// `LEGO_REDUNDANCY` and `LEGO_REPLICAS` both set, saying different things.
    #[error(
        "{}={redundancy} and {}={replicas} disagree: set only one of them (LEGO_REPLICAS=N is \
         LEGO_REDUNDANCY=replicas:N)",
        vars::REDUNDANCY,
        vars::REPLICAS
    )]
    RedundancyConflict {
        /// LEGO_REDUNDANCY as set.
        redundancy: String,
        /// LEGO_REPLICAS as set.
        replicas: String,
    },
    /// An erasure code with a replication mode other than pessimistic.
    #[error(
        "{}={redundancy} writes parity with its data, so {}={mode} is not supported with it: \
         set {}=pessimistic (the default with a code) or use LEGO_REDUNDANCY=replicas:N",
        vars::REDUNDANCY,
        vars::REPLICATION,
        vars::REPLICATION
    )]
    CodeNeedsPessimistic {
        /// LEGO_REDUNDANCY as set.
        redundancy: String,
        /// The mode asked for.
        mode: &'static str,
    },
    /// `LEGO_PUBLISH` is not on or off.
    #[error(
        "{}={value:?} is not a switch: expected on (the default) or off",
        vars::PUBLISH
    )]
    Publish {
        /// The value as set.
        value: String,
    },
    /// `LEGO_MMAP` is not on or off.
    #[error(
        "{}={value:?} is not a switch: expected 1 (serve large anonymous mappings from the \
         managed heap) or 0 (the default: leave them to the kernel)",
        vars::MMAP
    )]
    Mmap {
        /// The value as set.
        value: String,
    },
    /// `LEGO_MMAP_MIN` is out of range.
    #[error(
        "{}={value:?} is out of range: expected a size from 4096 (4K) to 1T; mappings of at \
         least this many bytes are served (default 256K)",
        vars::MMAP_MIN
    )]
    MmapMin {
        /// The value as set.
        value: String,
    },
    /// `LEGO_METRICS` is not an address.
    #[error(
        "{}={value:?} is not where metrics can be served: expected IP:PORT (such as \
         127.0.0.1:9464), localhost:PORT or unix:PATH (an absolute path)",
        vars::METRICS
    )]
    Metrics {
        /// The value as set.
        value: String,
    },
    /// `LEGO_REPLICATION` is not a mode.
    #[error("LEGO_REPLICATION={value:?} is not a replication mode: expected pessimistic, optimistic or adaptive")]
    Replication {
        /// The value as set.
        value: String,
    },
    /// `LEGO_SYNC` is not a sync mode.
    #[error(
        "{}={value:?} is not a sync mode: expected fdatasync (the default) or none",
        vars::SYNC
    )]
    Sync {
        /// The value as set.
        value: String,
    },
    /// `LEGO_LOG_MAX` is below [`LOG_MAX_BYTES_MIN`].
    #[error(
        "{}={shown} ({bytes} bytes) is too small: the log needs at least 16 MiB \
         ({LOG_MAX_BYTES_MIN} bytes) between compactions",
        vars::LOG_MAX
    )]
    LogMaxTooSmall {
        /// The value as set (quoted).
        shown: String,
        /// The size in bytes.
        bytes: u64,
    },
    /// `LEGO_FLUSH_MS` is neither a number of milliseconds in range nor `manual`.
    #[error(
        "{}={value:?} is not an epoch interval: expected a whole number of milliseconds from \
         {FLUSH_MS_MIN} to {FLUSH_MS_MAX}, or manual (epochs only at lego_checkpoint() and at \
         exit)",
        vars::FLUSH_MS
    )]
    FlushMs {
        /// The value as set.
        value: String,
    },
    /// `LEGO_FLUSH_PAGES` would start automatic epochs that `LEGO_FLUSH_MS=manual` rules out.
    #[error(
        "{} is set but {}=manual takes epochs only at lego_checkpoint() and at exit: unset \
         {} or give {} a number of milliseconds",
        vars::FLUSH_PAGES,
        vars::FLUSH_MS,
        vars::FLUSH_PAGES,
        vars::FLUSH_MS
    )]
    ManualWithFlushPages,
    /// The value is not valid UTF-8.
    #[error("{name}={value:?} is not valid UTF-8: expected a plain text value")]
    NotUnicode {
        /// The variable.
        name: &'static str,
        /// The value, with invalid bytes replaced.
        value: String,
    },
    /// A size variable could not be parsed. The size error is part of the message (not a
    /// `#[source]`) because the message must be one complete line, and error reporters that
    /// print the source chain would repeat it.
    #[error("{name}={problem}")]
    Size {
        /// The variable.
        name: &'static str,
        /// What is wrong with the value (it starts with the quoted value).
        problem: SizeError,
    },
    /// The cache is below [`CACHE_BYTES_MIN`].
    #[error(
        "{}={shown} ({bytes} bytes) is too small: the cache needs at least 16 MiB \
         ({CACHE_BYTES_MIN} bytes) to hold eviction batches and zero-fill runs",
        vars::CACHE_SIZE
    )]
    CacheTooSmall {
        /// The value as set (quoted), or a description of the default.
        shown: String,
        /// The cache size in bytes after rounding down to pages.
        bytes: u64,
    },
    /// The heap is above [`HEAP_BYTES_MAX`].
    #[error(
        "{}={shown} ({bytes} bytes) is too large: the largest heap accepted is 8T \
         ({HEAP_BYTES_MAX} bytes)",
        vars::HEAP_SIZE
    )]
    HeapTooLarge {
        /// The value as set (quoted).
        shown: String,
        /// The heap size in bytes.
        bytes: u64,
    },
    /// The cache is larger than the heap.
    #[error(
        "{}={cache_shown} ({cache_bytes} bytes) is larger than {}={heap_shown} \
         ({heap_bytes} bytes): the cache holds part of the heap, so it must not exceed it",
        vars::CACHE_SIZE,
        vars::HEAP_SIZE
    )]
    CacheLargerThanHeap {
        /// The cache value as set (quoted), or a description of the default.
        cache_shown: String,
        /// The cache size in bytes.
        cache_bytes: u64,
        /// The heap value as set (quoted), or a description of the default.
        heap_shown: String,
        /// The heap size in bytes.
        heap_bytes: u64,
    },
    /// The backend has no `SCHEME:` prefix or an unknown scheme.
    #[error(
        "{}={value:?} is not a known backend: expected one of {}",
        vars::BACKEND,
        super::backend::known_forms()
    )]
    UnknownBackend {
        /// The value as set.
        value: String,
    },
    /// `file:DIR` with an empty or relative DIR.
    #[error(
        "{}={value:?} does not name an absolute directory: expected file:DIR with DIR an \
         absolute path (file:/var/tmp)",
        vars::BACKEND
    )]
    BackendDirNotAbsolute {
        /// The value as set.
        value: String,
    },
    /// `memcached://...` with a bad server list.
    #[error(
        "{}={value:?} is not a pool of servers ({problem}): expected \
         memcached://HOST:PORT[,HOST:PORT...] (memcached://127.0.0.1:11211)",
        vars::BACKEND
    )]
    BackendServers {
        /// The value as set.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// `LEGO_BACKEND` is unset and `TMPDIR`, which gives the default, is relative.
    #[error(
        "{}={value:?} is not an absolute directory, and {} defaults to file:$TMPDIR: set \
         TMPDIR to an absolute path or {}=file:DIR",
        vars::TMPDIR,
        vars::BACKEND,
        vars::BACKEND
    )]
    TmpdirNotAbsolute {
        /// The value of `TMPDIR`.
        value: String,
    },
    /// `LEGO_STATS` is not 0, 1 or a `.json` path.
    #[error(
        "{}={value:?} is not a stats destination: expected 0 (none), 1 (summary on stderr) \
         or a path ending in .json",
        vars::STATS
    )]
    Stats {
        /// The value as set.
        value: String,
    },
    /// `LEGO_LOG_LEVEL` is not a level name.
    #[error(
        "{}={value:?} is not a log level: expected off, error, warn, info, debug or trace",
        vars::LOG_LEVEL
    )]
    LogLevel {
        /// The value as set.
        value: String,
    },
    /// A count that is not a whole number within its bounds.
    #[error("{name}={value:?} is not a whole number of {unit} from {min} to {max}")]
    Count {
        /// The variable.
        name: &'static str,
        /// The value as set.
        value: String,
        /// What is counted ("threads", "pages").
        unit: &'static str,
        /// Smallest accepted value.
        min: usize,
        /// Largest accepted value.
        max: usize,
    },
    /// `LEGO_FAULT_INJECT` does not follow `OP:EFFECT:after=N[:once]`, `spawn:THREAD`,
    /// `panic:fork` or `stall:POINT:MS`.
    #[error(
        "{}={value:?} is not a fault plan ({problem}): expected OP:ERRNO:after=N with OP \
         fetch, store or readback and ERRNO eio or enospc (fetch:eio:after=100), \
         fetch:corrupt:after=N, readback:corrupt:after=N, \
         fetch:delay=MS:after=N or store:delay=MS:after=N with MS from 1 to \
         {FAULT_DELAY_MS_MAX}, any of these ending in :once to hit one call only, \
         spawn:THREAD with THREAD one of {}, panic:fork, or stall:POINT:MS with POINT \
         one of {} and MS from 1 to {FAULT_DELAY_MS_MAX}",
        vars::FAULT_INJECT,
        SPAWN_FAULT_THREADS.join(", "),
        STALL_FAULT_POINTS.join(", ")
    )]
    FaultPlan {
        /// The value as set.
        value: String,
        /// Which part is wrong.
        problem: &'static str,
    },
}
