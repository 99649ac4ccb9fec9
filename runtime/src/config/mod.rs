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
//! Layout: this file holds [`Config`], the limits, the entry points ([`Config::from_env`],
//! [`Config::from_lookup`]) and the two steps; each concern has its file: `settings.rs` (the
//! names and their documentation), `parse.rs` (reading a value, sizes, machine facts),
//! `backend.rs` (`LEGO_BACKEND` and its table of schemes), `faults.rs` (`LEGO_FAULT_INJECT`),
//! `durable.rs` (the log's settings), `error.rs` ([`ConfigError`]).
//!
//! This module sits at the bottom of the runtime: it imports nothing from the rest of lego but
//! [`PAGE_SIZE`]. It reads the environment and `/proc/meminfo` through Rust std only (no C
//! stdio), because it runs inside a process whose malloc is replaced.

use std::fmt;
use std::path::PathBuf;

use log::LevelFilter;

use crate::PAGE_SIZE;

mod backend;
mod durable;
mod error;
mod faults;
mod mmap;
mod parse;
mod pool;
mod settings;
mod watch;

pub use backend::{parse_backend, BackendSpec};
pub use durable::{LogSettings, LogSync};
pub use error::ConfigError;
pub use faults::{
    FaultEffect, FaultOp, FaultPlan, Stall, FAULT_DELAY_MS_MAX, PANIC_FAULT_POINTS,
    SPAWN_FAULT_THREADS, STALL_FAULT_POINTS,
};
pub use mmap::{MMAP_DEFAULT, MMAP_MIN_BYTES_DEFAULT, MMAP_MIN_BYTES_MAX, MMAP_MIN_BYTES_MIN};
pub use parse::{parse_size, total_ram_bytes, SizeError};
pub use pool::{CodeShape, PoolSettings, Replication, REPLICAS_MAX};
pub use settings::{documented_settings, vars, Setting};
pub use watch::MetricsAddr;

use durable::RawLog;
use faults::{parse_fault_plan, Injection};
use parse::{lookup, online_cpus};
use pool::RawPool;
use settings::SETTINGS;

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
    /// Where the runtime waits on purpose, and how long (`LEGO_FAULT_INJECT=stall:POINT:MS`);
    /// a testing hook.
    pub stall_injection: Option<Stall>,
    /// The durable heap's log (`LEGO_LOG_DIR` and its companions), `None` when unset.
    pub log: Option<LogSettings>,
    /// The heap image to start from (`LEGO_RESTORE`).
    pub restore: Option<PathBuf>,
    /// How a memcached pool keeps its copies (`LEGO_REPLICAS` and its companions); the
    /// defaults with other backends.
    pub pool: PoolSettings,
    /// The key that seals the values sent to a pool (`LEGO_KEY_FILE`), read and checked before
    /// `main` by the preload (`seal::SealKey::load`) and handed to `Runtime::start`; only with
    /// a memcached backend.
    pub key_file: Option<PathBuf>,
    /// Whether statistics are published while the program runs (`LEGO_PUBLISH`).
    pub publish: bool,
    /// Where the metrics are served (`LEGO_METRICS`), `None` when unset.
    pub metrics: Option<MetricsAddr>,
    /// Whether the shim serves large private anonymous mappings from the heap (`LEGO_MMAP`).
    pub mmap: bool,
    /// Smallest mapping it serves, in bytes (`LEGO_MMAP_MIN`): a page multiple within
    /// [`MMAP_MIN_BYTES_MIN`]..=[`MMAP_MIN_BYTES_MAX`].
    pub mmap_min_bytes: u64,
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
    log: RawLog,
    restore: Option<String>,
    pool: RawPool,
    key_file: Option<String>,
    publish: Option<bool>,
    mmap: Option<bool>,
    mmap_min_bytes: Option<Raw<u64>>,
    metrics: Option<MetricsAddr>,
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
            if plan.once {
                f.write_str(", once")?;
            }
        }
        if let Some(thread) = self.spawn_failure {
            write!(f, ", fault injection: the thread {thread} fails to start")?;
        }
        if let Some(Stall { point, ms }) = self.stall_injection {
            write!(f, ", fault injection: a {ms} ms stall at {point}")?;
        }
        Ok(())
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
            .map(|v| backend::parse_backend(&v))
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
        log: RawLog {
            dir: lookup(&get, vars::LOG_DIR),
            flush_ms: durable::parse_flush_ms(&get)?,
            flush_pages: count(vars::FLUSH_PAGES, "pages", FLUSH_PAGES_MIN, FLUSH_PAGES_MAX)?,
            sync: durable::parse_sync(&get)?,
            max_bytes: size(vars::LOG_MAX)?,
        },
        restore: lookup(&get, vars::RESTORE),
        pool: RawPool {
            replicas: count(vars::REPLICAS, "copies", 1, pool::REPLICAS_MAX)?,
            replication: pool::parse_replication(&get)?,
            adaptive_free: pool::parse_adaptive_free(&get)?,
            timeout_ms: count(
                vars::TIMEOUT_MS,
                "milliseconds",
                pool::TIMEOUT_MS_MIN,
                pool::TIMEOUT_MS_MAX,
            )?,
            redundancy: pool::parse_redundancy(&get)?,
        },
        key_file: lookup(&get, vars::KEY_FILE),
        publish: lookup(&get, vars::PUBLISH)
            .map(|v| watch::parse_publish(&v))
            .transpose()?,
        metrics: lookup(&get, vars::METRICS)
            .map(|v| watch::parse_metrics(&v))
            .transpose()?,
        mmap: lookup(&get, vars::MMAP)
            .map(|v| mmap::parse_mmap(&v))
            .transpose()?,
        mmap_min_bytes: match lookup(&get, vars::MMAP_MIN) {
            None => None,
            Some(text) => {
                let value =
                    parse_size(&text, host.total_ram_bytes).map_err(|_| ConfigError::MmapMin {
                        value: text.clone(),
                    })?;
                Some(Raw { text, value })
            }
        },
    })
}

/// Step two: apply defaults and check every bound and every relation between settings.
fn validate(raw: RawSettings, host: Host) -> Result<Config, ConfigError> {
    let (heap_bytes, cache_bytes) = validate_memory(&raw, host)?;
    let backend = backend::resolve(raw.backend, raw.tmpdir)?;
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

    let log = durable::validate(raw.log, cache_bytes)?;
    let pool = pool::validate(raw.pool, &backend)?;
    if raw.key_file.is_some() && !matches!(backend, BackendSpec::Memcached { .. }) {
        return Err(ConfigError::NeedsPool {
            name: vars::KEY_FILE,
        });
    }

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
        stall_injection: match raw.fault_injection {
            Some(Injection::Stall(stall)) => Some(stall),
            _ => None,
        },
        log,
        restore: raw.restore.map(PathBuf::from),
        pool,
        key_file: raw.key_file.map(PathBuf::from),
        publish: raw.publish.unwrap_or(true),
        metrics: raw.metrics,
        mmap: raw.mmap.unwrap_or(MMAP_DEFAULT),
        mmap_min_bytes: match raw.mmap_min_bytes {
            Some(r) => mmap::check_mmap_min(&r.text, r.value)?,
            None => MMAP_MIN_BYTES_DEFAULT,
        },
    })
}

/// The heap and cache sizes, in bytes: defaults applied, rounded to pages, within their bounds
/// and the cache no larger than the heap.
fn validate_memory(raw: &RawSettings, host: Host) -> Result<(u64, u64), ConfigError> {
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
    Ok((heap_bytes, cache_bytes))
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

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests;
