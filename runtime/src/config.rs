//! Every `LEGO_*` setting: its name, default, parsing and validation, in one place.
//!
//! Configuration happens in two steps, as ripgrep and raft-engine do it: first each variable is
//! parsed on its own into a raw value (a size, a number, a backend spec), then `validate` turns
//! the raw values into a [`Config`], applying defaults and checking the rules that relate
//! settings to each other (the cache must fit in the heap, ...). Nothing here falls back
//! silently: a value that is set but wrong is an error that names the variable, the value and
//! what would be right, in one line, so the preload library can print it and exit.
//!
//! An empty value (or one made only of whitespace) means the variable is unset. Every variable
//! is documented once, in [`documented_settings`]; the README table is checked against it.
//!
//! This module sits at the bottom of the runtime: it imports nothing from the rest of lego but
//! [`PAGE_SIZE`]. It reads the environment and `/proc/meminfo` through Rust std only (no C
//! stdio), because it runs inside a process whose malloc is replaced.

use std::fmt;
use std::path::{Path, PathBuf};

use log::LevelFilter;
use thiserror::Error;

use crate::PAGE_SIZE;

/// `PAGE_SIZE` as a `u64`, for byte arithmetic on sizes.
const PAGE_BYTES: u64 = PAGE_SIZE as u64;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Smallest accepted DRAM cache, in bytes. The evictor writes back up to
/// `EVICT_BATCH_PAGES_MAX` pages (4 MiB) per batch while the handlers keep faulting pages in
/// and zero-filling runs of fresh pages; below 16 MiB those in-flight batches and runs would
/// take most of the cache and every fault would wait for an eviction.
pub const CACHE_BYTES_MIN: u64 = 16 * MIB;

/// Largest accepted heap, in bytes (8 TiB). The heap is one reserved (not committed) virtual
/// region, and what lego keeps per heap page (the allocator's page map and span directory in
/// the region, the page table's state and checksum in a `MAP_NORESERVE` array) is touched only
/// where the heap is used, so a large heap costs address space, not memory. What bounds it:
/// - the allocator names pages with 32 bits (`heap::REGION_BYTES_MAX`, 16 TiB less a page;
///   asserted in `heap`);
/// - the file store keeps page `i` at byte `i * 4096` of one sparse file and a heap image
///   adds a header page, and ext4 (4 KiB blocks) holds files of at most
///   [`STORE_FILE_BYTES_MAX`];
/// - with a durable heap the epoch snapshot area is as large as the heap, so the two take
///   [`HEAP_ADDRESS_SPACE_BYTES_MAX`] at most, a quarter of the 128 TiB user address space of
///   x86-64 and arm64 with 4-level tables, which leaves room for the program's own mappings.
///
/// 8 TiB is the largest power of two under all three.
pub const HEAP_BYTES_MAX: u64 = 8 * TIB;

/// Largest file the page store and a heap image can need, in bytes: ext4's limit with 4 KiB
/// blocks (tmpfs and XFS allow more).
pub const STORE_FILE_BYTES_MAX: u64 = 16 * TIB;

/// Address space the heap and its epoch snapshot area may take together, in bytes.
pub const HEAP_ADDRESS_SPACE_BYTES_MAX: u64 = 32 * TIB;

/// Default heap reservation, in bytes: large enough for most programs, and free because the
/// region is reserved with `MAP_NORESERVE` and only touched pages cost anything.
pub const HEAP_BYTES_DEFAULT: u64 = 64 * GIB;

/// Default DRAM cache, as a percentage of total RAM (capped at the heap size).
pub const CACHE_PERCENT_OF_RAM_DEFAULT: u64 = 25;

/// Bounds on the number of fault-handler threads.
pub const HANDLER_THREADS_MIN: usize = 1;
/// Upper bound on handler threads: more than this only adds contention on the page table.
pub const HANDLER_THREADS_MAX: usize = 256;

/// Bounds on the eviction batch, in pages.
pub const EVICT_BATCH_PAGES_MIN: usize = 16;
/// Upper bound on the eviction batch, in pages (4 MiB): larger batches hold too much of the
/// cache in flight at once.
pub const EVICT_BATCH_PAGES_MAX: usize = 1024;
/// Default eviction batch, in pages (1 MiB).
pub const EVICT_BATCH_PAGES_DEFAULT: usize = 256;

// The cache must hold several full eviction batches (see `CACHE_BYTES_MIN`), and both limits
// must be page multiples so that rounding never crosses them.
const _: () = assert!(CACHE_BYTES_MIN >= 4 * EVICT_BATCH_PAGES_MAX as u64 * PAGE_BYTES);
const _: () = assert!(CACHE_BYTES_MIN / PAGE_BYTES * PAGE_BYTES == CACHE_BYTES_MIN);
const _: () = assert!(HEAP_BYTES_MAX / PAGE_BYTES * PAGE_BYTES == HEAP_BYTES_MAX);
const _: () = assert!(HEAP_BYTES_DEFAULT <= HEAP_BYTES_MAX);
// The store's file and an image (a header page, then every page of the heap) fit in one file.
const _: () = assert!(HEAP_BYTES_MAX + PAGE_BYTES <= STORE_FILE_BYTES_MAX);
// The heap and the snapshot area of a durable heap fit in the address space set aside.
const _: () = assert!(2 * HEAP_BYTES_MAX <= HEAP_ADDRESS_SPACE_BYTES_MAX);
// The message of `ConfigError::HeapTooLarge` names the limit as "8 TiB".
const _: () = assert!(HEAP_BYTES_MAX == 8 * TIB);
const _: () = assert!(EVICT_BATCH_PAGES_MIN <= EVICT_BATCH_PAGES_DEFAULT);
const _: () = assert!(EVICT_BATCH_PAGES_DEFAULT <= EVICT_BATCH_PAGES_MAX);

/// Bounds on the epoch interval (`LEGO_FLUSH_MS`), in milliseconds.
pub const FLUSH_MS_MIN: usize = 10;
/// Upper bound on the epoch interval, in milliseconds (one hour).
pub const FLUSH_MS_MAX: usize = 3_600_000;
/// Default epoch interval, in milliseconds.
pub const FLUSH_MS_DEFAULT: usize = 1000;
/// Smallest `LEGO_FLUSH_PAGES`, in pages.
pub const FLUSH_PAGES_MIN: usize = 16;
/// Largest `LEGO_FLUSH_PAGES`, in pages (64 GiB of dirty pages).
pub const FLUSH_PAGES_MAX: usize = 1 << 24;
/// Smallest `LEGO_LOG_MAX`, in bytes: below it compaction would run all the time.
pub const LOG_MAX_BYTES_MIN: u64 = 16 * MIB;

/// Longest fraction accepted in a size ("1.123456789G"), in digits; keeps the arithmetic in
/// 64 bits exact.
const SIZE_FRACTION_DIGITS_MAX: usize = 9;

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

const SETTINGS: &[Setting] = &[
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
                  fetched page comes back changed (fetch:corrupt:after=N); readback:... does \
                  the same to an epoch's reads of evicted pages only; spawn:THREAD makes \
                  starting the runtime thread THREAD (lego-logwrite) fail; panic:fork panics \
                  inside fork() with every lock of the internal heap held.",
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
];

/// Every `LEGO_*` variable lego reads, each listed once with its default.
pub fn documented_settings() -> &'static [Setting] {
    SETTINGS
}

/// The validated configuration of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// DRAM cache size in bytes (`LEGO_CACHE_SIZE`); a page multiple, at least
    /// [`CACHE_BYTES_MIN`], at most `heap_bytes`.
    pub cache_bytes: u64,
    /// Reserved heap size in bytes (`LEGO_HEAP_SIZE`); a page multiple, at most
    /// [`HEAP_BYTES_MAX`].
    pub heap_bytes: u64,
    /// Where evicted pages live (`LEGO_BACKEND`).
    pub backend: BackendSpec,
    /// Where statistics go at exit (`LEGO_STATS`).
    pub stats: StatsSink,
    /// Level of the runtime's own log messages (`LEGO_LOG_LEVEL`).
    pub log_level: LevelFilter,
    /// Number of fault-handler threads (`LEGO_HANDLER_THREADS`), within
    /// [`HANDLER_THREADS_MIN`]..=[`HANDLER_THREADS_MAX`].
    pub handler_threads: usize,
    /// Pages per eviction batch (`LEGO_EVICT_BATCH`), within
    /// [`EVICT_BATCH_PAGES_MIN`]..=[`EVICT_BATCH_PAGES_MAX`].
    pub evict_batch_pages: usize,
    /// Store failures to inject (`LEGO_FAULT_INJECT`); a testing hook, `None` in normal runs.
    pub fault_injection: Option<FaultPlan>,
    /// A runtime thread whose start fails on purpose (`LEGO_FAULT_INJECT=spawn:THREAD`); a
    /// testing hook, `None` in normal runs.
    pub spawn_failure: Option<&'static str>,
    /// Where the shim panics on purpose (`LEGO_FAULT_INJECT=panic:fork`); a testing hook.
    pub panic_injection: Option<&'static str>,
    /// The durable heap's log (`LEGO_LOG_DIR` and its companions), `None` when unset.
    pub log: Option<LogSettings>,
    /// The heap image to start from (`LEGO_RESTORE`).
    pub restore: Option<PathBuf>,
}

/// Settings of the durable heap's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// The log directory (`LEGO_LOG_DIR`).
    pub dir: PathBuf,
    /// Longest time between epochs, in milliseconds (`LEGO_FLUSH_MS`); `None` for
    /// `LEGO_FLUSH_MS=manual`: epochs only at `lego_checkpoint()` and at exit.
    pub flush_ms: Option<u64>,
    /// Dirty pages that start an epoch early (`LEGO_FLUSH_PAGES`).
    pub flush_pages: usize,
    /// Whether epochs wait for the disk (`LEGO_SYNC`).
    pub sync: LogSync,
    /// Log size that triggers a compaction, in bytes (`LEGO_LOG_MAX`); `None`: follow the
    /// heap's live size.
    pub log_max_bytes: Option<u64>,
}

/// `LEGO_SYNC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSync {
    /// `fdatasync` before and after each commit record.
    Fdatasync,
    /// Never wait for the disk.
    None,
}

/// Which page store holds evicted pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// A private O_DIRECT file created under `dir` (an absolute path).
    File {
        /// Directory in which the store creates its private directory and file.
        dir: PathBuf,
    },
}

/// The backend schemes [`BackendSpec`] knows, as shown in error messages.
const KNOWN_BACKENDS: &str = "file:DIR";

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::File { dir } => write!(f, "file:{}", dir.display()),
        }
    }
}

/// Where the statistics go when the program exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsSink {
    /// No statistics.
    Off,
    /// A human summary on stderr.
    Stderr,
    /// One JSON object written to this file.
    Json(PathBuf),
}

/// Fault injection for tests: which store operation fails, after how many successful pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// The operation that fails.
    pub op: FaultOp,
    /// How many pages of that operation succeed before every later call fails.
    pub after_pages: u64,
    /// What a failing call does.
    pub effect: FaultEffect,
    /// Only the first page past `after_pages` is affected; then the store works again.
    pub once: bool,
}

/// What an injected store fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultEffect {
    /// The call fails with this errno (`libc::EIO` or `libc::ENOSPC`).
    Errno(i32),
    /// The call succeeds, but every page it reads comes back with one byte changed (a store
    /// that hands back a damaged or foreign copy). Fetches only.
    Corrupt,
    /// The call succeeds after a delay of this many milliseconds.
    Delay { ms: u64 },
}

/// The runtime threads whose start `LEGO_FAULT_INJECT=spawn:THREAD` can make fail.
pub const SPAWN_FAULT_THREADS: &[&str] = &["lego-logwrite", "lego-flush", "lego-evict"];
/// Where `LEGO_FAULT_INJECT=panic:POINT` can make the shim panic.
pub const PANIC_FAULT_POINTS: &[&str] = &["fork"];

/// A page store operation that fault injection can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// Reading pages back from the store.
    Fetch,
    /// Writing evicted pages to the store.
    Store,
    /// Reading evicted pages back from the store for an epoch of the log (the program's own
    /// fetches are not touched): the epoch's read-back seam on its own.
    ReadBack,
}

/// The errno names `LEGO_FAULT_INJECT` accepts.
const FAULT_ERRNOS: &[(&str, i32)] = &[("eio", libc::EIO), ("enospc", libc::ENOSPC)];

/// What `parse_size` expects, shown in its errors.
const SIZE_EXPECTED: &str = "expected a number with an optional K, M, G or T suffix (512M, 4G) \
                             or a percentage of RAM (25%)";

/// Why a size could not be parsed. Each message starts with the quoted text, so that
/// [`ConfigError`] can prefix it with the variable's name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SizeError {
    /// Not a number with a known suffix.
    #[error("{text:?} is not a size: {SIZE_EXPECTED}")]
    NotASize {
        /// The text as given.
        text: String,
    },
    /// Zero bytes (or a fraction that rounds to zero).
    #[error("{text:?} is zero: a size must be at least one byte")]
    Zero {
        /// The text as given.
        text: String,
    },
    /// Larger than 64 bits can hold.
    #[error("{text:?} is too large: a size must be less than 16 EiB")]
    TooLarge {
        /// The text as given.
        text: String,
    },
    /// A percentage outside 1..=100.
    #[error("{text:?} is not a valid share of RAM: expected a percentage from 1% to 100%")]
    PercentOutOfRange {
        /// The text as given.
        text: String,
    },
    /// A percentage, but the machine's RAM could not be read.
    #[error(
        "{text:?} is a percentage of RAM, but the amount of RAM could not be read from \
         /proc/meminfo: give the size in bytes instead (512M, 4G)"
    )]
    RamUnknown {
        /// The text as given.
        text: String,
    },
}

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
        "{}={value:?} is not a known backend: expected one of {KNOWN_BACKENDS}",
        vars::BACKEND
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
    /// `LEGO_FAULT_INJECT` does not follow `OP:ERRNO:after=N`.
    #[error(
        "{}={value:?} is not a fault plan ({problem}): expected OP:ERRNO:after=N with OP \
         fetch, store or readback and ERRNO eio or enospc (fetch:eio:after=100), \
         fetch:corrupt:after=N, readback:corrupt:after=N, \
         spawn:THREAD with THREAD one of {}, or panic:fork",
        vars::FAULT_INJECT,
        SPAWN_FAULT_THREADS.join(", ")
    )]
    FaultPlan {
        /// The value as set.
        value: String,
        /// Which part is wrong.
        problem: &'static str,
    },
}

/// Facts about the machine that defaults depend on; passed in so tests are deterministic.
#[derive(Debug, Clone, Copy)]
struct Host {
    total_ram_bytes: u64,
    online_cpus: usize,
}

impl Host {
    fn probe() -> Host {
        Host {
            total_ram_bytes: total_ram_bytes(),
            online_cpus: online_cpus(),
        }
    }
}

/// A value as the user set it, kept next to its parsed form so errors can quote it.
#[derive(Debug, Clone)]
struct Raw<T> {
    text: String,
    value: T,
}

impl<T> Raw<T> {
    fn shown(&self) -> String {
        format!("{:?}", self.text)
    }
}

/// `LEGO_FLUSH_MS` as parsed.
#[derive(Debug, Clone)]
enum FlushMs {
    Every(Raw<usize>),
    Manual,
}

/// The settings after parsing each variable on its own, before defaults and cross-checks.
#[derive(Debug, Clone, Default)]
struct RawSettings {
    cache_bytes: Option<Raw<u64>>,
    heap_bytes: Option<Raw<u64>>,
    backend: Option<BackendSpec>,
    /// `TMPDIR`, read only for the default backend.
    tmpdir: Option<String>,
    stats: Option<StatsSink>,
    log_level: Option<LevelFilter>,
    handler_threads: Option<Raw<usize>>,
    evict_batch_pages: Option<Raw<usize>>,
    fault_injection: Option<Injection>,
    log_dir: Option<String>,
    flush_ms: Option<FlushMs>,
    flush_pages: Option<Raw<usize>>,
    sync: Option<LogSync>,
    log_max_bytes: Option<Raw<u64>>,
    restore: Option<String>,
}

impl Config {
    /// Reads and validates every `LEGO_*` variable from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        // `from_lookup` takes `String`s; reject non-UTF-8 values here, by name, rather than
        // treating them as unset. TMPDIR only matters when it gives the default backend.
        let backend_set = std::env::var_os(vars::BACKEND).is_some_and(|v| !v.is_empty());
        let names = SETTINGS.iter().map(|s| s.name);
        let tmpdir = (!backend_set).then_some(vars::TMPDIR);
        for name in names.chain(tmpdir) {
            if let Some(value) = std::env::var_os(name) {
                if value.to_str().is_none() {
                    return Err(ConfigError::NotUnicode {
                        name,
                        value: value.to_string_lossy().into_owned(),
                    });
                }
            }
        }
        Config::from_lookup(|name| std::env::var_os(name).and_then(|v| v.into_string().ok()))
    }

    /// Reads and validates the settings through `get`, which maps a variable name to its value
    /// (`None` when unset). Machine facts (RAM, CPUs) come from the running system.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Config::from_lookup_on(get, Host::probe())
    }

    fn from_lookup_on(
        get: impl Fn(&str) -> Option<String>,
        host: Host,
    ) -> Result<Config, ConfigError> {
        let raw = parse_raw(get, host)?;
        validate(raw, host)
    }

    /// The cache size in pages.
    pub fn cache_pages(&self) -> u64 {
        self.cache_bytes / PAGE_BYTES
    }

    /// The heap size in pages.
    pub fn heap_pages(&self) -> u64 {
        self.heap_bytes / PAGE_BYTES
    }
}

impl fmt::Display for Config {
    /// One line for the `info` log: the settings that shape the run.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cache {} bytes, heap {} bytes, backend {}, {} handler threads, eviction batch {} \
             pages",
            self.cache_bytes,
            self.heap_bytes,
            self.backend,
            self.handler_threads,
            self.evict_batch_pages
        )?;
        if let Some(plan) = &self.fault_injection {
            write!(
                f,
                ", fault injection: {:?} {:?} after {} pages",
                plan.op, plan.effect, plan.after_pages
            )?;
        }
        if let Some(thread) = self.spawn_failure {
            write!(f, ", fault injection: the thread {thread} fails to start")?;
        }
        Ok(())
    }
}

/// Returns the variable's value, or `None` when it is unset or empty. Surrounding whitespace
/// is dropped: it is never meaningful in these values and easy to paste by accident.
fn lookup(get: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    let value = get(name)?;
    let trimmed = value.trim();
    if trimmed.is_empty() {
        None
    } else {
        Some(trimmed.to_owned())
    }
}

/// Step one: parse each variable on its own.
fn parse_raw(get: impl Fn(&str) -> Option<String>, host: Host) -> Result<RawSettings, ConfigError> {
    let size = |name: &'static str| -> Result<Option<Raw<u64>>, ConfigError> {
        let Some(text) = lookup(&get, name) else {
            return Ok(None);
        };
        let value = parse_size(&text, host.total_ram_bytes)
            .map_err(|problem| ConfigError::Size { name, problem })?;
        Ok(Some(Raw { text, value }))
    };
    let count = |name: &'static str, unit: &'static str, min: usize, max: usize| {
        let Some(text) = lookup(&get, name) else {
            return Ok(None);
        };
        match text.parse::<usize>() {
            Ok(value) => Ok(Some(Raw { text, value })),
            Err(_) => Err(ConfigError::Count {
                name,
                value: text,
                unit,
                min,
                max,
            }),
        }
    };
    Ok(RawSettings {
        cache_bytes: size(vars::CACHE_SIZE)?,
        heap_bytes: size(vars::HEAP_SIZE)?,
        backend: lookup(&get, vars::BACKEND)
            .map(|v| parse_backend(&v))
            .transpose()?,
        tmpdir: lookup(&get, vars::TMPDIR),
        stats: lookup(&get, vars::STATS)
            .map(|v| parse_stats(&v))
            .transpose()?,
        log_level: lookup(&get, vars::LOG_LEVEL)
            .map(|v| parse_log_level(&v))
            .transpose()?,
        handler_threads: count(
            vars::HANDLER_THREADS,
            "threads",
            HANDLER_THREADS_MIN,
            HANDLER_THREADS_MAX,
        )?,
        evict_batch_pages: count(
            vars::EVICT_BATCH,
            "pages",
            EVICT_BATCH_PAGES_MIN,
            EVICT_BATCH_PAGES_MAX,
        )?,
        fault_injection: lookup(&get, vars::FAULT_INJECT)
            .map(|v| parse_fault_plan(&v))
            .transpose()?,
        log_dir: lookup(&get, vars::LOG_DIR),
        flush_ms: match lookup(&get, vars::FLUSH_MS) {
            Some(text) if text.eq_ignore_ascii_case("manual") => Some(FlushMs::Manual),
            Some(text) => match text.parse::<usize>() {
                Ok(value) => Some(FlushMs::Every(Raw { text, value })),
                Err(_) => return Err(ConfigError::FlushMs { value: text }),
            },
            None => None,
        },
        flush_pages: count(vars::FLUSH_PAGES, "pages", FLUSH_PAGES_MIN, FLUSH_PAGES_MAX)?,
        sync: lookup(&get, vars::SYNC)
            .map(|v| match v.to_ascii_lowercase().as_str() {
                "fdatasync" => Ok(LogSync::Fdatasync),
                "none" => Ok(LogSync::None),
                _ => Err(ConfigError::Sync { value: v }),
            })
            .transpose()?,
        log_max_bytes: size(vars::LOG_MAX)?,
        restore: lookup(&get, vars::RESTORE),
    })
}

/// Step two: apply defaults and check every bound and every relation between settings.
fn validate(raw: RawSettings, host: Host) -> Result<Config, ConfigError> {
    // Heap first: the default cache is capped by it.
    let (heap_bytes, heap_shown) = match &raw.heap_bytes {
        Some(heap) => {
            if heap.value > HEAP_BYTES_MAX {
                return Err(ConfigError::HeapTooLarge {
                    shown: heap.shown(),
                    bytes: heap.value,
                });
            }
            // Cannot overflow: the value is at most HEAP_BYTES_MAX, a page multiple.
            (heap.value.div_ceil(PAGE_BYTES) * PAGE_BYTES, heap.shown())
        }
        None => (HEAP_BYTES_DEFAULT, "64G (the default)".to_owned()),
    };

    let (cache_bytes, cache_shown) = match &raw.cache_bytes {
        Some(cache) => (round_down_to_page(cache.value), cache.shown()),
        None => {
            // The default is a share of RAM; on a machine whose quarter of RAM is larger than
            // the heap, it is capped at the heap rather than failing a run nobody configured.
            let share =
                u128::from(host.total_ram_bytes) * u128::from(CACHE_PERCENT_OF_RAM_DEFAULT) / 100;
            let share = u64::try_from(share).expect("a share of at most 100% of RAM fits in u64");
            (
                round_down_to_page(share.min(heap_bytes)),
                format!("{CACHE_PERCENT_OF_RAM_DEFAULT}% of RAM (the default)"),
            )
        }
    };
    if cache_bytes < CACHE_BYTES_MIN {
        return Err(ConfigError::CacheTooSmall {
            shown: cache_shown,
            bytes: cache_bytes,
        });
    }
    if cache_bytes > heap_bytes {
        return Err(ConfigError::CacheLargerThanHeap {
            cache_shown,
            cache_bytes,
            heap_shown,
            heap_bytes,
        });
    }

    let backend = match raw.backend {
        Some(backend) => backend,
        None => match raw.tmpdir {
            Some(tmpdir) => {
                if !Path::new(&tmpdir).is_absolute() {
                    return Err(ConfigError::TmpdirNotAbsolute { value: tmpdir });
                }
                BackendSpec::File {
                    dir: PathBuf::from(tmpdir),
                }
            }
            None => BackendSpec::File {
                dir: PathBuf::from("/tmp"),
            },
        },
    };

    let handler_threads = match raw.handler_threads {
        Some(threads) => check_count(
            threads,
            vars::HANDLER_THREADS,
            "threads",
            HANDLER_THREADS_MIN,
            HANDLER_THREADS_MAX,
        )?,
        // A machine with more CPUs than the bound gets the bound, not an error.
        None => host
            .online_cpus
            .clamp(HANDLER_THREADS_MIN, HANDLER_THREADS_MAX),
    };
    let evict_batch_pages = match raw.evict_batch_pages {
        Some(pages) => check_count(
            pages,
            vars::EVICT_BATCH,
            "pages",
            EVICT_BATCH_PAGES_MIN,
            EVICT_BATCH_PAGES_MAX,
        )?,
        None => EVICT_BATCH_PAGES_DEFAULT,
    };

    let log = match raw.log_dir {
        Some(dir) => {
            let flush_pages_set = raw.flush_pages.is_some();
            let flush_pages = match raw.flush_pages {
                Some(pages) => check_count(
                    pages,
                    vars::FLUSH_PAGES,
                    "pages",
                    FLUSH_PAGES_MIN,
                    FLUSH_PAGES_MAX,
                )?,
                None => usize::try_from(cache_bytes / PAGE_BYTES / 4)
                    .unwrap_or(FLUSH_PAGES_MAX)
                    .clamp(FLUSH_PAGES_MIN, FLUSH_PAGES_MAX),
            };
            let log_max_bytes = match raw.log_max_bytes {
                Some(max) if max.value < LOG_MAX_BYTES_MIN => {
                    return Err(ConfigError::LogMaxTooSmall {
                        shown: max.shown(),
                        bytes: max.value,
                    })
                }
                other => other.map(|max| max.value),
            };
            let flush_ms = match raw.flush_ms {
                Some(FlushMs::Every(ms)) if (FLUSH_MS_MIN..=FLUSH_MS_MAX).contains(&ms.value) => {
                    Some(ms.value as u64)
                }
                Some(FlushMs::Every(ms)) => return Err(ConfigError::FlushMs { value: ms.text }),
                Some(FlushMs::Manual) => {
                    if flush_pages_set {
                        return Err(ConfigError::ManualWithFlushPages);
                    }
                    None
                }
                None => Some(FLUSH_MS_DEFAULT as u64),
            };
            Some(LogSettings {
                dir: PathBuf::from(dir),
                flush_ms,
                flush_pages,
                sync: raw.sync.unwrap_or(LogSync::Fdatasync),
                log_max_bytes,
            })
        }
        None => {
            let set = [
                (vars::FLUSH_MS, raw.flush_ms.is_some()),
                (vars::FLUSH_PAGES, raw.flush_pages.is_some()),
                (vars::SYNC, raw.sync.is_some()),
                (vars::LOG_MAX, raw.log_max_bytes.is_some()),
            ];
            if let Some((name, _)) = set.iter().find(|(_, set)| *set) {
                return Err(ConfigError::NeedsLogDir { name });
            }
            None
        }
    };

    Ok(Config {
        cache_bytes,
        heap_bytes,
        backend,
        stats: raw.stats.unwrap_or(StatsSink::Off),
        log_level: raw.log_level.unwrap_or(LevelFilter::Off),
        handler_threads,
        evict_batch_pages,
        fault_injection: match raw.fault_injection {
            Some(Injection::Store(plan)) => Some(plan),
            _ => None,
        },
        spawn_failure: match raw.fault_injection {
            Some(Injection::Spawn(thread)) => Some(thread),
            _ => None,
        },
        panic_injection: match raw.fault_injection {
            Some(Injection::Panic(point)) => Some(point),
            _ => None,
        },
        log,
        restore: raw.restore.map(PathBuf::from),
    })
}

fn check_count(
    raw: Raw<usize>,
    name: &'static str,
    unit: &'static str,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    if (min..=max).contains(&raw.value) {
        Ok(raw.value)
    } else {
        Err(ConfigError::Count {
            name,
            value: raw.text,
            unit,
            min,
            max,
        })
    }
}

fn round_down_to_page(bytes: u64) -> u64 {
    bytes / PAGE_BYTES * PAGE_BYTES
}

fn parse_backend(value: &str) -> Result<BackendSpec, ConfigError> {
    let Some((scheme, arg)) = value.split_once(':') else {
        return Err(ConfigError::UnknownBackend {
            value: value.to_owned(),
        });
    };
    match scheme {
        "file" => {
            let dir = Path::new(arg);
            if arg.is_empty() || !dir.is_absolute() {
                return Err(ConfigError::BackendDirNotAbsolute {
                    value: value.to_owned(),
                });
            }
            Ok(BackendSpec::File {
                dir: dir.to_path_buf(),
            })
        }
        _ => Err(ConfigError::UnknownBackend {
            value: value.to_owned(),
        }),
    }
}

fn parse_stats(value: &str) -> Result<StatsSink, ConfigError> {
    match value {
        "0" => Ok(StatsSink::Off),
        "1" => Ok(StatsSink::Stderr),
        path if path.ends_with(".json") => Ok(StatsSink::Json(PathBuf::from(path))),
        _ => Err(ConfigError::Stats {
            value: value.to_owned(),
        }),
    }
}

fn parse_log_level(value: &str) -> Result<LevelFilter, ConfigError> {
    const LEVELS: &[(&str, LevelFilter)] = &[
        ("off", LevelFilter::Off),
        ("error", LevelFilter::Error),
        ("warn", LevelFilter::Warn),
        ("info", LevelFilter::Info),
        ("debug", LevelFilter::Debug),
        ("trace", LevelFilter::Trace),
    ];
    LEVELS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value))
        .map(|&(_, level)| level)
        .ok_or_else(|| ConfigError::LogLevel {
            value: value.to_owned(),
        })
}

/// What `LEGO_FAULT_INJECT` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Injection {
    Store(FaultPlan),
    Spawn(&'static str),
    Panic(&'static str),
}

fn parse_fault_plan(value: &str) -> Result<Injection, ConfigError> {
    let fail = |problem: &'static str| ConfigError::FaultPlan {
        value: value.to_owned(),
        problem,
    };
    // `spawn:THREAD` and `panic:POINT` name one of a fixed list.
    let named = |list: &[&'static str], name: &str| list.iter().copied().find(|&n| n == name);
    if let Some(thread) = value.strip_prefix("spawn:") {
        return named(SPAWN_FAULT_THREADS, thread)
            .map(Injection::Spawn)
            .ok_or_else(|| fail("unknown thread"));
    }
    if let Some(point) = value.strip_prefix("panic:") {
        return named(PANIC_FAULT_POINTS, point)
            .map(Injection::Panic)
            .ok_or_else(|| fail("unknown panic point"));
    }
    let mut parts = value.split(':');
    let (Some(op), Some(errno), Some(after), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(fail("it needs exactly three parts separated by ':'"));
    };
    let op = if op.eq_ignore_ascii_case("fetch") {
        FaultOp::Fetch
    } else if op.eq_ignore_ascii_case("store") {
        FaultOp::Store
    } else if op.eq_ignore_ascii_case("readback") {
        FaultOp::ReadBack
    } else {
        return Err(fail("unknown operation"));
    };
    let effect = if errno.eq_ignore_ascii_case("corrupt") {
        if op == FaultOp::Store {
            return Err(fail("only fetched pages can come back corrupt"));
        }
        FaultEffect::Corrupt
    } else {
        FAULT_ERRNOS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(errno))
            .map(|&(_, errno)| FaultEffect::Errno(errno))
            .ok_or_else(|| fail("unknown errno"))?
    };
    let after_pages = after
        .strip_prefix("after=")
        .ok_or_else(|| fail("the third part must be after=N"))?
        .parse::<u64>()
        .map_err(|_| fail("N must be a whole number of pages"))?;
    Ok(Injection::Store(FaultPlan {
        op,
        after_pages,
        effect,
        once: false,
    }))
}

/// Parses a size in bytes: a whole number ("4096"), a number with a binary suffix ("512K",
/// "512M", "4G", "1T", "1.5G"; "MiB" and "MB" both mean 2^20), or a percentage of
/// `total_ram_bytes` from 1% to 100% ("25%", "12.5%"). Suffixes are case-insensitive.
/// Fractions of a byte are rounded down; zero is rejected.
pub fn parse_size(text: &str, total_ram_bytes: u64) -> Result<u64, SizeError> {
    let not_a_size = || SizeError::NotASize {
        text: text.to_owned(),
    };
    let trimmed = text.trim();
    let number_end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(number_end);
    let number = Decimal::parse(number).ok_or_else(not_a_size)?;
    let suffix = suffix.trim_start();

    if suffix == "%" {
        if total_ram_bytes == 0 {
            return Err(SizeError::RamUnknown {
                text: text.to_owned(),
            });
        }
        // percent * RAM / 100, computed in 128 bits so that no RAM size can overflow.
        let scaled = number.scale(u128::from(total_ram_bytes));
        let bytes = scaled / 100;
        let in_range =
            scaled >= u128::from(total_ram_bytes) && scaled <= u128::from(total_ram_bytes) * 100;
        if !in_range {
            return Err(SizeError::PercentOutOfRange {
                text: text.to_owned(),
            });
        }
        // A share of a (reported) RAM below 100 bytes can round down to nothing.
        if bytes == 0 {
            return Err(SizeError::Zero {
                text: text.to_owned(),
            });
        }
        return u64::try_from(bytes).map_err(|_| SizeError::TooLarge {
            text: text.to_owned(),
        });
    }

    let multiplier = size_multiplier(suffix).ok_or_else(not_a_size)?;
    if multiplier == 1 && number.fraction_digits > 0 {
        // "1.5" bytes is most likely a missing suffix, not a request for one byte.
        return Err(not_a_size());
    }
    let bytes =
        u64::try_from(number.scale(u128::from(multiplier))).map_err(|_| SizeError::TooLarge {
            text: text.to_owned(),
        })?;
    if bytes == 0 {
        return Err(SizeError::Zero {
            text: text.to_owned(),
        });
    }
    Ok(bytes)
}

/// Bytes per unit for a size suffix: "", "B", "K", "KB", "KiB", ... (case-insensitive).
fn size_multiplier(suffix: &str) -> Option<u64> {
    let lower = suffix.to_ascii_lowercase();
    let unit = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    match unit {
        "" => Some(1),
        "k" => Some(KIB),
        "m" => Some(MIB),
        "g" => Some(GIB),
        "t" => Some(TIB),
        _ => None,
    }
}

/// A non-negative decimal number kept exact: `mantissa / 10^fraction_digits`.
#[derive(Debug, Clone, Copy)]
struct Decimal {
    mantissa: u128,
    fraction_digits: usize,
}

impl Decimal {
    /// Parses "123", "1.5", "0.25"; rejects "", ".", "1.", ".5", "1.2.3" and too many digits.
    fn parse(text: &str) -> Option<Decimal> {
        let (whole, fraction) = match text.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (text, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(whole) || whole.len() > 20 {
            return None;
        }
        let fraction = match fraction {
            Some(f) if all_digits(f) && f.len() <= SIZE_FRACTION_DIGITS_MAX => f,
            Some(_) => return None,
            None => "",
        };
        // At most 20 + 9 digits: below 10^29 < 2^128, so this cannot fail.
        let mantissa = format!("{whole}{fraction}").parse::<u128>().ok()?;
        Some(Decimal {
            mantissa,
            fraction_digits: fraction.len(),
        })
    }

    /// `self * factor`, rounded down. Saturates (to a value no u64 can hold) on overflow.
    fn scale(self, factor: u128) -> u128 {
        let divisor = 10u128.pow(u32::try_from(self.fraction_digits).unwrap_or(u32::MAX));
        self.mantissa.saturating_mul(factor) / divisor
    }
}

/// Total RAM of the machine in bytes, from `MemTotal` in `/proc/meminfo`, or from
/// `sysinfo(2)` if that file cannot be read. Returns 0 if neither works.
pub fn total_ram_bytes() -> u64 {
    if let Some(bytes) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total(&text))
    {
        return bytes;
    }
    // SAFETY: `sysinfo` is plain old data for which all-zero bytes are a valid value.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable `struct sysinfo`; the call only fills it in.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return 0;
    }
    // `c_ulong` is `u64` on the 64-bit targets lego runs on, but not everywhere.
    #[allow(clippy::useless_conversion)]
    let total = u64::from(info.totalram);
    total.saturating_mul(u64::from(info.mem_unit))
}

/// Extracts `MemTotal` (given in kB) from the text of `/proc/meminfo`, in bytes.
fn parse_meminfo_total(text: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut fields = rest.split_whitespace();
    let kib = fields.next()?.parse::<u64>().ok()?;
    if fields.next() != Some("kB") {
        return None;
    }
    kib.checked_mul(KIB)
}

/// The number of CPUs this process may run on (affinity and cgroup quota included).
fn online_cpus() -> usize {
    if let Ok(n) = std::thread::available_parallelism() {
        return n.get();
    }
    // SAFETY: sysconf has no preconditions; it returns -1 on error.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    const RAM: u64 = 16 * GIB;
    const HOST: Host = Host {
        total_ram_bytes: RAM,
        online_cpus: 8,
    };

    fn config_on(pairs: &[(&str, &str)], host: Host) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Config::from_lookup_on(|name| map.get(name).cloned(), host)
    }

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        config_on(pairs, HOST)
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        match config(pairs) {
            Ok(c) => panic!("{pairs:?} was accepted: {c:?}"),
            Err(e) => {
                let text = e.to_string();
                assert!(!text.contains('\n'), "multi-line message: {text}");
                text
            }
        }
    }

    #[test]
    fn sizes_in_every_accepted_form() {
        let cases: &[(&str, u64)] = &[
            ("4096", 4096),
            ("1", 1),
            ("4096B", 4096),
            ("512K", 512 * KIB),
            ("512k", 512 * KIB),
            ("512KB", 512 * KIB),
            ("512KiB", 512 * KIB),
            ("512M", 512 * MIB),
            ("512MB", 512 * MIB),
            ("512MiB", 512 * MIB),
            ("512mib", 512 * MIB),
            ("4G", 4 * GIB),
            ("4 G", 4 * GIB),
            ("4GiB", 4 * GIB),
            ("1T", TIB),
            ("1.5G", 3 * GIB / 2),
            ("0.5M", MIB / 2),
            ("1.25K", 1280),
            ("1.0001K", 1024), // fractions of a byte round down
            ("25%", RAM / 4),
            ("100%", RAM),
            ("1%", RAM / 100),
            ("12.5%", RAM / 8),
            (" 8M ", 8 * MIB),
            ("16384T", 16384 * TIB),
        ];
        for &(text, want) in cases {
            assert_eq!(parse_size(text, RAM), Ok(want), "{text}");
        }
    }

    #[test]
    fn sizes_rejected() {
        let not_a_size = [
            "banana", "", "M", "-1", "1.", ".5", "1.2.3", "4X", "4GG", "1e9", "0x10", "1.5", "5%%",
            "%",
        ];
        for text in not_a_size {
            assert!(
                matches!(parse_size(text, RAM), Err(SizeError::NotASize { .. })),
                "{text}: {:?}",
                parse_size(text, RAM)
            );
        }
        for text in ["0", "0K", "0.0001K", "0G"] {
            assert!(
                matches!(parse_size(text, RAM), Err(SizeError::Zero { .. })),
                "{text}"
            );
        }
        for text in ["0%", "200%", "100.5%", "0.5%"] {
            assert!(
                matches!(
                    parse_size(text, RAM),
                    Err(SizeError::PercentOutOfRange { .. })
                ),
                "{text}"
            );
        }
        for text in ["16777216T", "99999999999999999999"] {
            assert!(
                matches!(parse_size(text, RAM), Err(SizeError::TooLarge { .. })),
                "{text}"
            );
        }
        assert!(matches!(
            parse_size("25%", 0),
            Err(SizeError::RamUnknown { .. })
        ));
    }

    #[test]
    fn defaults() {
        let c = config(&[]).expect("defaults are valid");
        assert_eq!(c.cache_bytes, RAM / 4);
        assert_eq!(c.heap_bytes, 64 * GIB);
        assert_eq!(
            c.backend,
            BackendSpec::File {
                dir: PathBuf::from("/tmp")
            }
        );
        assert_eq!(c.stats, StatsSink::Off);
        assert_eq!(c.log_level, LevelFilter::Off);
        assert_eq!(c.handler_threads, 8);
        assert_eq!(c.evict_batch_pages, EVICT_BATCH_PAGES_DEFAULT);
        assert_eq!(c.fault_injection, None);
    }

    #[test]
    fn default_backend_follows_tmpdir() {
        let c = config(&[("TMPDIR", "/var/tmp")]).expect("valid");
        assert_eq!(
            c.backend,
            BackendSpec::File {
                dir: PathBuf::from("/var/tmp")
            }
        );
        let e = error(&[("TMPDIR", "scratch")]);
        assert!(e.starts_with("TMPDIR=\"scratch\""), "{e}");
        // An explicit backend wins over TMPDIR, even a bad TMPDIR.
        let c = config(&[("TMPDIR", "scratch"), ("LEGO_BACKEND", "file:/srv")]).expect("valid");
        assert_eq!(
            c.backend,
            BackendSpec::File {
                dir: PathBuf::from("/srv")
            }
        );
    }

    #[test]
    fn default_cache_is_capped_by_heap_and_rounded_to_pages() {
        let host = Host {
            total_ram_bytes: 1024 * GIB + 123,
            online_cpus: 1000,
        };
        let c = config_on(&[("LEGO_HEAP_SIZE", "100G")], host).expect("valid");
        assert_eq!(c.cache_bytes, 100 * GIB);
        assert_eq!(c.handler_threads, HANDLER_THREADS_MAX);
        let host = Host {
            total_ram_bytes: 8 * GIB + 5,
            online_cpus: 0,
        };
        let c = config_on(&[], host).expect("valid");
        assert_eq!(c.cache_bytes % PAGE_BYTES, 0);
        assert_eq!(c.handler_threads, 1);
    }

    #[test]
    fn default_cache_on_tiny_machine_is_an_error_not_a_fallback() {
        let host = Host {
            total_ram_bytes: 32 * MIB,
            online_cpus: 1,
        };
        let e = config_on(&[], host).expect_err("8 MiB cache is too small");
        assert!(e.to_string().contains("25% of RAM (the default)"), "{e}");
    }

    #[test]
    fn every_setting_parsed() {
        let c = config(&[
            ("LEGO_CACHE_SIZE", "48M"),
            ("LEGO_HEAP_SIZE", "1G"),
            ("LEGO_BACKEND", "file:/var/lib/lego"),
            ("LEGO_STATS", "/tmp/out.json"),
            ("LEGO_LOG_LEVEL", "DeBuG"),
            ("LEGO_HANDLER_THREADS", "3"),
            ("LEGO_EVICT_BATCH", "1024"),
            ("LEGO_FAULT_INJECT", "store:enospc:after=7"),
        ])
        .expect("valid");
        assert_eq!(
            c,
            Config {
                cache_bytes: 48 * MIB,
                heap_bytes: GIB,
                backend: BackendSpec::File {
                    dir: PathBuf::from("/var/lib/lego")
                },
                stats: StatsSink::Json(PathBuf::from("/tmp/out.json")),
                log_level: LevelFilter::Debug,
                handler_threads: 3,
                evict_batch_pages: 1024,
                fault_injection: Some(FaultPlan {
                    op: FaultOp::Store,
                    after_pages: 7,
                    effect: FaultEffect::Errno(libc::ENOSPC),
                    once: false
                }),
                spawn_failure: None,
                panic_injection: None,
                log: None,
                restore: None,
            }
        );
        assert_eq!(c.cache_pages(), 48 * MIB / PAGE_BYTES);
        assert_eq!(c.heap_pages(), GIB / PAGE_BYTES);
        assert!(c.to_string().contains("fault injection"));
    }

    #[test]
    fn rounding_to_pages() {
        let c = config(&[
            ("LEGO_CACHE_SIZE", "16777217"),
            ("LEGO_HEAP_SIZE", "1073741825"),
        ])
        .expect("valid");
        assert_eq!(c.cache_bytes, 16 * MIB);
        assert_eq!(c.heap_bytes, GIB + PAGE_BYTES);
        let c = config(&[("LEGO_HEAP_SIZE", "8T")]).expect("the maximum is accepted");
        assert_eq!(c.heap_bytes, HEAP_BYTES_MAX);
    }

    #[test]
    fn other_accepted_forms() {
        for (value, want) in [
            ("0", StatsSink::Off),
            ("1", StatsSink::Stderr),
            ("stats.json", StatsSink::Json(PathBuf::from("stats.json"))),
        ] {
            assert_eq!(config(&[("LEGO_STATS", value)]).expect(value).stats, want);
        }
        for (value, want) in [
            ("off", LevelFilter::Off),
            ("ERROR", LevelFilter::Error),
            ("warn", LevelFilter::Warn),
            ("Info", LevelFilter::Info),
            ("trace", LevelFilter::Trace),
        ] {
            assert_eq!(
                config(&[("LEGO_LOG_LEVEL", value)]).expect(value).log_level,
                want
            );
        }
        let plan = config(&[("LEGO_FAULT_INJECT", "fetch:eio:after=0")])
            .expect("valid")
            .fault_injection;
        assert_eq!(
            plan,
            Some(FaultPlan {
                op: FaultOp::Fetch,
                after_pages: 0,
                effect: FaultEffect::Errno(libc::EIO),
                once: false
            })
        );
        let plan = config(&[("LEGO_FAULT_INJECT", "fetch:corrupt:after=5")])
            .expect("valid")
            .fault_injection;
        assert_eq!(
            plan,
            Some(FaultPlan {
                op: FaultOp::Fetch,
                after_pages: 5,
                effect: FaultEffect::Corrupt,
                once: false
            })
        );
        let plan = config(&[("LEGO_FAULT_INJECT", "readback:corrupt:after=0")])
            .expect("valid")
            .fault_injection;
        assert_eq!(
            plan.map(|p| (p.op, p.effect)),
            Some((FaultOp::ReadBack, FaultEffect::Corrupt))
        );
        let c = config(&[("LEGO_FAULT_INJECT", "spawn:lego-logwrite")]).expect("valid");
        assert_eq!(c.spawn_failure, Some("lego-logwrite"));
        let c = config(&[("LEGO_FAULT_INJECT", "panic:fork")]).expect("valid");
        assert_eq!(c.panic_injection, Some("fork"));
        assert_eq!(c.fault_injection, None);
        for threads in ["1", "256"] {
            config(&[("LEGO_HANDLER_THREADS", threads)]).expect(threads);
        }
        config(&[("LEGO_EVICT_BATCH", "16")]).expect("16 is the minimum");
    }

    #[test]
    fn empty_means_unset() {
        let empty: Vec<(&str, &str)> = SETTINGS
            .iter()
            .map(|s| (s.name, ""))
            .chain([("TMPDIR", "  ")])
            .collect();
        assert_eq!(config(&empty), config(&[]));
    }

    #[test]
    fn rejections_name_variable_value_and_expectation() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("LEGO_CACHE_SIZE", "banana")],
                "LEGO_CACHE_SIZE=\"banana\" is not a size: expected a number with an optional \
                 K, M, G or T suffix (512M, 4G) or a percentage of RAM (25%)",
            ),
            (&[("LEGO_CACHE_SIZE", "0")], "LEGO_CACHE_SIZE=\"0\" is zero"),
            (
                &[("LEGO_CACHE_SIZE", "200%")],
                "LEGO_CACHE_SIZE=\"200%\" is not a valid share of RAM",
            ),
            (
                &[("LEGO_CACHE_SIZE", "8M")],
                "LEGO_CACHE_SIZE=\"8M\" (8388608 bytes) is too small",
            ),
            (
                &[("LEGO_CACHE_SIZE", "2G"), ("LEGO_HEAP_SIZE", "1G")],
                "LEGO_CACHE_SIZE=\"2G\" (2147483648 bytes) is larger than \
                 LEGO_HEAP_SIZE=\"1G\" (1073741824 bytes): the cache holds part of the heap, \
                 so it must not exceed it",
            ),
            (
                &[("LEGO_CACHE_SIZE", "100G")],
                "LEGO_CACHE_SIZE=\"100G\" (107374182400 bytes) is larger than \
                 LEGO_HEAP_SIZE=64G (the default)",
            ),
            (
                &[("LEGO_HEAP_SIZE", "8796093026304")],
                "LEGO_HEAP_SIZE=\"8796093026304\" (8796093026304 bytes) is too large: the \
                 largest heap accepted is 8T (8796093022208 bytes)",
            ),
            (
                &[("LEGO_HEAP_SIZE", "64T")],
                "LEGO_HEAP_SIZE=\"64T\" (70368744177664 bytes) is too large",
            ),
            (
                &[("LEGO_HEAP_SIZE", "x")],
                "LEGO_HEAP_SIZE=\"x\" is not a size",
            ),
            (
                &[("LEGO_BACKEND", "redis:x")],
                "LEGO_BACKEND=\"redis:x\" is not a known backend: expected one of file:DIR",
            ),
            (
                &[("LEGO_BACKEND", "/tmp")],
                "LEGO_BACKEND=\"/tmp\" is not a known backend",
            ),
            (
                &[("LEGO_BACKEND", "file:tmp")],
                "LEGO_BACKEND=\"file:tmp\" does not name an absolute directory",
            ),
            (
                &[("LEGO_BACKEND", "file:")],
                "LEGO_BACKEND=\"file:\" does not name an absolute directory",
            ),
            (
                &[("LEGO_STATS", "yes")],
                "LEGO_STATS=\"yes\" is not a stats destination",
            ),
            (
                &[("LEGO_STATS", "2")],
                "LEGO_STATS=\"2\" is not a stats destination",
            ),
            (
                &[("LEGO_LOG_LEVEL", "loud")],
                "LEGO_LOG_LEVEL=\"loud\" is not a log level: expected off, error, warn, info, \
                 debug or trace",
            ),
            (
                &[("LEGO_HANDLER_THREADS", "0")],
                "LEGO_HANDLER_THREADS=\"0\" is not a whole number of threads from 1 to 256",
            ),
            (
                &[("LEGO_HANDLER_THREADS", "257")],
                "LEGO_HANDLER_THREADS=\"257\" is not a whole number",
            ),
            (
                &[("LEGO_HANDLER_THREADS", "two")],
                "LEGO_HANDLER_THREADS=\"two\" is not a whole number",
            ),
            (
                &[("LEGO_EVICT_BATCH", "8")],
                "LEGO_EVICT_BATCH=\"8\" is not a whole number of pages from 16 to 1024",
            ),
            (
                &[("LEGO_EVICT_BATCH", "2048")],
                "LEGO_EVICT_BATCH=\"2048\" is not a whole number",
            ),
            (
                &[("LEGO_FAULT_INJECT", "fetch:eio")],
                "LEGO_FAULT_INJECT=\"fetch:eio\" is not a fault plan (it needs exactly three \
                 parts",
            ),
            (
                &[("LEGO_FAULT_INJECT", "read:eio:after=1")],
                "(unknown operation)",
            ),
            (
                &[("LEGO_FAULT_INJECT", "fetch:eperm:after=1")],
                "(unknown errno)",
            ),
            (
                &[("LEGO_FAULT_INJECT", "fetch:eio:before=1")],
                "(the third part must be after=N)",
            ),
            (
                &[("LEGO_FAULT_INJECT", "fetch:eio:after=-1")],
                "(N must be a whole number of pages)",
            ),
            (
                &[("LEGO_FAULT_INJECT", "fetch:eio:after=1:x")],
                "(it needs exactly three parts",
            ),
            (
                &[("LEGO_FAULT_INJECT", "store:corrupt:after=1")],
                "(only fetched pages can come back corrupt)",
            ),
            (
                &[("LEGO_FAULT_INJECT", "spawn:lego-nothing")],
                "(unknown thread): expected",
            ),
        ];
        for &(pairs, want) in cases {
            let got = error(pairs);
            assert!(got.contains(want), "{pairs:?}:\n got  {got}\n want {want}");
        }
    }

    #[test]
    fn every_variable_read_is_documented_once() {
        let read = RefCell::new(Vec::<String>::new());
        Config::from_lookup_on(
            |name| {
                read.borrow_mut().push(name.to_owned());
                None
            },
            HOST,
        )
        .expect("defaults are valid");
        let mut read = read.into_inner();
        read.retain(|n| n != vars::TMPDIR);
        read.sort();
        let mut documented: Vec<String> = SETTINGS.iter().map(|s| s.name.to_owned()).collect();
        documented.sort();
        let before = documented.len();
        documented.dedup();
        assert_eq!(before, documented.len(), "a setting is documented twice");
        assert_eq!(read, documented);
        for s in documented_settings() {
            assert!(s.name.starts_with("LEGO_"));
            assert!(!s.default.is_empty() && !s.example.is_empty() && !s.meaning.is_empty());
        }
    }

    #[test]
    fn documented_examples_are_accepted() {
        for s in documented_settings() {
            let mut pairs = vec![(s.name, s.example)];
            // The cache example must fit the heap example and vice versa.
            if s.name == vars::HEAP_SIZE {
                pairs.push((vars::CACHE_SIZE, "512M"));
            }
            // The log's settings tune a log.
            if [vars::FLUSH_MS, vars::FLUSH_PAGES, vars::SYNC, vars::LOG_MAX].contains(&s.name) {
                pairs.push((vars::LOG_DIR, "/var/lib/app/heap"));
            }
            config(&pairs).unwrap_or_else(|e| panic!("{}={}: {e}", s.name, s.example));
        }
    }

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       16318464 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(16318464 * KIB));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: x kB\n"), None);
        assert!(total_ram_bytes() > 0, "this machine's RAM is readable");
        assert!(online_cpus() >= 1);
    }

    /// Marks the child process that [`from_env_reads_the_process_environment`] starts.
    const CHILD_MARKER: &str = "LEGO_CONFIG_TEST_CHILD";

    /// Runs `Config::from_env` in a child copy of this test binary with `env` set (the
    /// environment of this process is shared by parallel tests, so it is never modified), and
    /// returns the child's one-line answer.
    fn from_env_in_child(env: &[(&str, std::ffi::OsString)]) -> String {
        use std::process::Command;
        let exe = std::env::current_exe().expect("the test binary has a path");
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", "config::tests::from_env_child", "--nocapture"]);
        cmd.args(["--test-threads", "1"]);
        for s in SETTINGS {
            cmd.env_remove(s.name);
        }
        cmd.env_remove(vars::TMPDIR).env(CHILD_MARKER, "1");
        for (name, value) in env {
            cmd.env(name, value);
        }
        let out = cmd.output().expect("the child runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        stdout
            .lines()
            .find_map(|l| l.split_once("from_env: ").map(|(_, answer)| answer))
            .unwrap_or_else(|| panic!("no answer in: {stdout}"))
            .to_owned()
    }

    #[test]
    fn from_env_child() {
        if std::env::var_os(CHILD_MARKER).is_none() {
            return;
        }
        match Config::from_env() {
            Ok(c) => println!(
                "from_env: ok {:?} {:?} {}",
                c.backend, c.stats, c.cache_bytes
            ),
            Err(e) => println!("from_env: err {e}"),
        }
    }

    #[test]
    fn from_env_reads_the_process_environment() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let got = from_env_in_child(&[
            ("LEGO_CACHE_SIZE", "32M".into()),
            ("LEGO_STATS", "1".into()),
            ("TMPDIR", "/var/tmp".into()),
        ]);
        assert_eq!(
            got,
            format!("ok File {{ dir: \"/var/tmp\" }} Stderr {}", 32 * MIB)
        );
        let got = from_env_in_child(&[("LEGO_CACHE_SIZE", "banana".into())]);
        assert!(
            got.starts_with("err LEGO_CACHE_SIZE=\"banana\" is not a size"),
            "{got}"
        );
        let got = from_env_in_child(&[("LEGO_CACHE_SIZE", "".into())]);
        assert!(got.starts_with("ok "), "empty means unset: {got}");
        let bad = OsString::from_vec(b"4\xffG".to_vec());
        let got = from_env_in_child(&[("LEGO_HEAP_SIZE", bad.clone())]);
        assert!(
            got.starts_with("err LEGO_HEAP_SIZE=\"4\u{fffd}G\" is not valid UTF-8"),
            "{got}"
        );
        // A non-UTF-8 TMPDIR only matters when it would give the default backend.
        let got = from_env_in_child(&[("TMPDIR", bad.clone())]);
        assert!(got.starts_with("err TMPDIR="), "{got}");
        let got = from_env_in_child(&[("TMPDIR", bad), ("LEGO_BACKEND", "file:/srv".into())]);
        assert!(got.starts_with("ok File { dir: \"/srv\" }"), "{got}");
    }

    #[test]
    fn log_settings_need_a_log_dir_and_have_defaults() {
        let err = config(&[("LEGO_FLUSH_MS", "200")]).expect_err("refused");
        let msg = err.to_string();
        assert!(
            msg.starts_with("LEGO_FLUSH_MS is set but LEGO_LOG_DIR is not"),
            "{msg}"
        );
        assert!(config(&[("LEGO_SYNC", "none")]).is_err());
        let c = config(&[
            ("LEGO_LOG_DIR", "/var/lib/app/heap"),
            ("LEGO_CACHE_SIZE", "64M"),
        ])
        .expect("valid");
        let log = c.log.expect("a log");
        assert_eq!(log.dir, PathBuf::from("/var/lib/app/heap"));
        assert_eq!(log.flush_ms, Some(FLUSH_MS_DEFAULT as u64));
        assert_eq!(log.flush_pages, 4096, "a quarter of a 64 MiB cache");
        assert_eq!(log.sync, LogSync::Fdatasync);
        assert_eq!(log.log_max_bytes, None);
        let msg = config(&[("LEGO_LOG_DIR", "/l"), ("LEGO_SYNC", "always")])
            .expect_err("bad sync")
            .to_string();
        assert!(
            msg.starts_with("LEGO_SYNC=\"always\" is not a sync mode"),
            "{msg}"
        );
        let msg = config(&[("LEGO_LOG_DIR", "/l"), ("LEGO_FLUSH_MS", "5")])
            .expect_err("too short")
            .to_string();
        assert!(msg.contains("from 10 to 3600000, or manual"), "{msg}");
        let msg = config(&[("LEGO_LOG_DIR", "/l"), ("LEGO_FLUSH_MS", "often")])
            .expect_err("not a number")
            .to_string();
        assert!(
            msg.starts_with("LEGO_FLUSH_MS=\"often\" is not an epoch interval"),
            "{msg}"
        );
        for manual in ["manual", "MANUAL"] {
            let c = config(&[("LEGO_LOG_DIR", "/l"), ("LEGO_FLUSH_MS", manual)]).expect(manual);
            assert_eq!(c.log.expect("a log").flush_ms, None);
        }
        let msg = config(&[
            ("LEGO_LOG_DIR", "/l"),
            ("LEGO_FLUSH_MS", "manual"),
            ("LEGO_FLUSH_PAGES", "100"),
        ])
        .expect_err("contradiction")
        .to_string();
        assert!(
            msg.starts_with("LEGO_FLUSH_PAGES is set but LEGO_FLUSH_MS=manual"),
            "{msg}"
        );
        let msg = config(&[("LEGO_LOG_DIR", "/l"), ("LEGO_LOG_MAX", "1M")])
            .expect_err("too small")
            .to_string();
        assert!(msg.starts_with("LEGO_LOG_MAX=\"1M\""), "{msg}");
        assert!(config(&[("LEGO_LOG_DIR", "")])
            .expect("empty")
            .log
            .is_none());
        let c = config(&[("LEGO_RESTORE", "/tmp/heap.img")]).expect("restore alone");
        assert_eq!(c.restore, Some(PathBuf::from("/tmp/heap.img")));
    }
}
