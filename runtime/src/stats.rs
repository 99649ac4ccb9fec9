//! Run statistics: event counters, the resident-page gauge, and a fault latency histogram,
//! turned at exit into a human summary or one JSON object.
//!
//! Every value is an `AtomicU64` updated with `Relaxed` ordering: the fault path bumps them on
//! every fault, so an update must cost one uncontended atomic add and never a lock. Nothing
//! orders counters against each other, so a [`StatsSnapshot`] taken while the runtime runs is
//! a set of individually exact values, not one consistent cut; the report at exit is taken
//! after the handlers have stopped.
//!
//! This module sits at the bottom of the runtime; it only knows [`crate::config::StatsSink`].
//! Reporting writes through Rust std (fd 2 or a file), never C stdio.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::StatsSink;
use crate::PAGE_SIZE;

/// Buckets of the fault latency histogram. Bucket `i` counts latencies `ns` with
/// `floor(log2(ns)) == i` (bucket 0 also holds 0 ns); 64 buckets cover every `u64`.
pub const LATENCY_BUCKETS: usize = 64;

/// File mode of the JSON stats file: it reveals addresses of the process, so only the owner
/// may read it.
const STATS_FILE_MODE: u32 = 0o600;

const MIB: f64 = (1u64 << 20) as f64;

/// Declares the counters once: the [`Counter`] enum, the plain fields of [`StatsSnapshot`],
/// and the snake_case names used in the summary and the JSON keys.
macro_rules! counters {
    ($( $(#[$doc:meta])* $variant:ident => $field:ident, )+) => {
        /// An event counter. Each is a monotonically increasing `u64`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Counter {
            $( $(#[$doc])* $variant, )+
        }

        impl Counter {
            /// Every counter, in declaration order (their index order).
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)+];

            /// The counter's snake_case name, as used in the summary and the JSON keys.
            pub const fn name(self) -> &'static str {
                match self {
                    $( Counter::$variant => stringify!($field), )+
                }
            }
        }

        /// A copy of every statistic at one moment, as plain numbers.
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $( $(#[$doc])* pub $field: u64, )+
            /// Pages resident in the DRAM cache when the snapshot was taken.
            pub resident_pages: u64,
            /// Largest value `resident_pages` ever had.
            pub peak_resident_pages: u64,
            /// Number of faults whose latency was recorded.
            pub fault_count: u64,
            /// Fault latency percentiles and maximum, in nanoseconds. Each percentile is the
            /// upper bound of the histogram bucket that holds it (capped at the maximum).
            pub fault_latency_p50_ns: u64,
            /// 90th percentile; see `fault_latency_p50_ns`.
            pub fault_latency_p90_ns: u64,
            /// 99th percentile; see `fault_latency_p50_ns`.
            pub fault_latency_p99_ns: u64,
            /// Largest latency recorded, exact.
            pub fault_latency_max_ns: u64,
            /// Free-form facts the runtime adds before reporting (dirty-tracking mode,
            /// backend, cache size, region base and length, ...). Keys should be snake_case
            /// and must not reuse a counter's name.
            pub extra: Vec<(String, String)>,
        }

        impl StatsSnapshot {
            /// The value of one counter.
            pub fn get(&self, c: Counter) -> u64 {
                match c {
                    $( Counter::$variant => self.$field, )+
                }
            }

            pub(crate) fn set(&mut self, c: Counter, value: u64) {
                match c {
                    $( Counter::$variant => self.$field = value, )+
                }
            }
        }
    };
}

counters! {
    /// Faults on never-touched (or discarded) pages, served by zero-filling.
    FaultsZeroFill => faults_zero_fill,
    /// Faults served by fetching the page from the store.
    FaultsFetch => faults_fetch,
    /// Faults that found the page already resident (another thread served it first).
    FaultsSpurious => faults_spurious,
    /// Write-protect faults (first write to a clean page under write-protect dirty tracking).
    FaultsWriteProtect => faults_write_protect,
    /// Pages made resident by zero-filling.
    PagesZeroFilled => pages_zero_filled,
    /// Pages read back from the store, read-ahead included.
    PagesFetched => pages_fetched,
    /// Pages fetched ahead of a fault on a neighbouring page.
    PagesReadAhead => pages_read_ahead,
    /// Windows a handler fetched for a sequential stream with no thread waiting.
    Prefetches => prefetches,
    /// Pages removed from the cache.
    PagesEvicted => pages_evicted,
    /// Evicted pages written to the store because they were dirty.
    PagesWrittenBack => pages_written_back,
    /// Evicted pages dropped without a write because the store already held them.
    PagesDroppedClean => pages_dropped_clean,
    /// Pages the allocator gave back (freed large runs); they read back as zeros.
    PagesDiscarded => pages_discarded,
    /// Bytes read from the store.
    BytesFetched => bytes_fetched,
    /// Bytes written to the store.
    BytesWrittenBack => bytes_written_back,
    /// Store reads that failed.
    FetchErrors => fetch_errors,
    /// Store writes that failed.
    StoreErrors => store_errors,
    /// Pages that could not be served and made the faulting thread receive SIGBUS.
    PagesPoisoned => pages_poisoned,
    /// `free` calls on pointers outside the managed heap (memory from before the shim).
    ForeignFrees => foreign_frees,
    /// userfaultfd REMOVE events (madvise(DONTNEED) on the region).
    EventsRemove => events_remove,
    /// userfaultfd UNMAP events.
    EventsUnmap => events_unmap,
    /// userfaultfd REMAP events (mremap of part of the region).
    EventsRemap => events_remap,
    /// Pages brought back before a fork that could not be served (the child is detached).
    ForkPageIns => fork_page_ins,
    /// Forks whose child runs a runtime of its own, its evicted pages left evicted.
    ForksServed => forks_served,
    /// Pages served to a forked child before its runtime ran (from the parent's side).
    ForkWindowPages => fork_window_pages,
    /// Epochs committed to the durable heap's log.
    EpochsCommitted => epochs_committed,
    /// Pages (contents and zero records) appended to the log by epochs.
    PagesLogged => pages_logged,
    /// Time spent in epoch cuts (the part where threads that touch dirty pages wait), in
    /// microseconds.
    EpochCutMicros => epoch_cut_micros,
    /// Pages an epoch copied while the program could write them (they would not move).
    EpochPagesCopied => epoch_pages_copied,
    /// Times an epoch, before emptying its snapshot, waited for a fault handler still copying
    /// pages back from it.
    EpochSnapshotWaits => epoch_snapshot_waits,
    /// Epochs or compactions the log failed to write.
    LogErrors => log_errors,
    /// Compactions of the log into a checkpoint.
    LogCompactions => log_compactions,
    /// Pages read back from the log because the store could not give them (the log as the
    /// copy of last resort).
    PagesFromLog => pages_from_log,
    /// Eviction candidates kept resident until the log held their content (a store with one
    /// copy and a log).
    EvictionsHeldForLog => evictions_held_for_log,
    /// Anonymous mappings the shim served from the heap (`LEGO_MMAP=1`).
    MappingsServed => mappings_served,
    /// Bytes of those mappings, as asked by `mmap` and grown by `mremap`.
    MappedBytes => mapped_bytes,
    /// Evicted pages that belonged to a served mapping (counted in `pages_evicted` too).
    MappedPagesEvicted => mapped_pages_evicted,
}

/// Number of counters.
pub const COUNTERS: usize = Counter::ALL.len();

/// The counters that hold bytes; the summary also shows them in MiB.
const BYTE_COUNTERS: &[Counter] = &[Counter::BytesFetched, Counter::BytesWrittenBack];

/// Live statistics, shared by every thread of the runtime (usually one `static`).
#[derive(Debug)]
pub struct Stats {
    counters: [AtomicU64; COUNTERS],
    resident_pages: AtomicU64,
    peak_resident_pages: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS],
    latency_max_ns: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    /// All zeros. `const` so the runtime can keep its statistics in a `static`.
    pub const fn new() -> Stats {
        Stats {
            counters: [const { AtomicU64::new(0) }; COUNTERS],
            resident_pages: AtomicU64::new(0),
            peak_resident_pages: AtomicU64::new(0),
            latency_buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS],
            latency_max_ns: AtomicU64::new(0),
        }
    }

    /// Adds `n` to a counter.
    #[inline]
    pub fn add(&self, c: Counter, n: u64) {
        self.counters[c as usize].fetch_add(n, Relaxed);
    }

    /// The current value of a counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.counters[c as usize].load(Relaxed)
    }

    /// Sets the resident-page gauge, and raises the peak if this is a new maximum.
    #[inline]
    pub fn set_resident_pages(&self, pages: u64) {
        self.resident_pages.store(pages, Relaxed);
        self.peak_resident_pages.fetch_max(pages, Relaxed);
    }

    /// Records the latency of one fault, from the event's arrival to the page's wake-up.
    #[inline]
    pub fn record_fault_latency_ns(&self, ns: u64) {
        self.latency_buckets[latency_bucket(ns)].fetch_add(1, Relaxed);
        self.latency_max_ns.fetch_max(ns, Relaxed);
    }

    /// Copies every statistic into plain numbers and computes the latency percentiles.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut snap = StatsSnapshot::default();
        for &c in Counter::ALL {
            snap.set(c, self.get(c));
        }
        snap.resident_pages = self.resident_pages.load(Relaxed);
        snap.peak_resident_pages = self.peak_resident_pages.load(Relaxed);

        let buckets: [u64; LATENCY_BUCKETS] =
            std::array::from_fn(|i| self.latency_buckets[i].load(Relaxed));
        let max_ns = self.latency_max_ns.load(Relaxed);
        snap.fault_count = buckets.iter().fold(0u64, |sum, &n| sum.saturating_add(n));
        snap.fault_latency_p50_ns = percentile_ns(&buckets, max_ns, 50);
        snap.fault_latency_p90_ns = percentile_ns(&buckets, max_ns, 90);
        snap.fault_latency_p99_ns = percentile_ns(&buckets, max_ns, 99);
        snap.fault_latency_max_ns = max_ns;
        snap
    }
}

/// The histogram bucket of a latency: `floor(log2(ns))`, with 0 ns in bucket 0.
fn latency_bucket(ns: u64) -> usize {
    // `ilog2` of a non-zero u64 is at most 63, which fits any usize.
    (ns | 1).ilog2() as usize
}

/// The largest latency that falls in bucket `i`: `2^(i+1) - 1`.
fn bucket_upper_ns(i: usize) -> u64 {
    if i + 1 >= LATENCY_BUCKETS {
        u64::MAX
    } else {
        (1u64 << (i + 1)) - 1
    }
}

/// The `percent`-th percentile of the histogram, reported as the upper bound of the bucket
/// that holds it, capped at the exact maximum (which is also an upper bound). 0 when empty.
fn percentile_ns(buckets: &[u64; LATENCY_BUCKETS], max_ns: u64, percent: u64) -> u64 {
    let total: u64 = buckets.iter().fold(0u64, |sum, &n| sum.saturating_add(n));
    if total == 0 {
        return 0;
    }
    // The rank of the sample, 1-based: ceil(total * percent / 100), at least 1.
    let rank = (u128::from(total) * u128::from(percent))
        .div_ceil(100)
        .max(1);
    let mut seen = 0u128;
    for (i, &n) in buckets.iter().enumerate() {
        seen += u128::from(n);
        if seen >= rank {
            return bucket_upper_ns(i).min(max_ns);
        }
    }
    max_ns
}

fn mib(bytes: u64) -> f64 {
    // Precision loss above 2^53 bytes is irrelevant for a human-readable figure.
    bytes as f64 / MIB
}

fn pages_to_bytes(pages: u64) -> u64 {
    pages.saturating_mul(PAGE_SIZE as u64)
}

impl StatsSnapshot {
    /// A multi-line human summary for stderr, starting with `lego: stats`. Every counter is
    /// listed by its snake_case name; byte and page counts are also shown in MiB.
    pub fn summary_text(&self) -> String {
        const WIDTH: usize = 22;
        let mut out = String::from("lego: stats\n");
        // Writing into a String cannot fail.
        let mut line = |name: &str, value: String| {
            let _ = writeln!(out, "lego:   {name:<WIDTH$} {value}");
        };
        for &c in Counter::ALL {
            let n = self.get(c);
            let value = if BYTE_COUNTERS.contains(&c) {
                format!("{n} ({:.1} MiB)", mib(n))
            } else if c.name().starts_with("pages_") {
                format!("{n} ({:.1} MiB)", mib(pages_to_bytes(n)))
            } else {
                n.to_string()
            };
            line(c.name(), value);
        }
        line(
            "resident_pages",
            format!(
                "{} ({:.1} MiB)",
                self.resident_pages,
                mib(pages_to_bytes(self.resident_pages))
            ),
        );
        line(
            "peak_resident_pages",
            format!(
                "{} ({:.1} MiB)",
                self.peak_resident_pages,
                mib(pages_to_bytes(self.peak_resident_pages))
            ),
        );
        line(
            "fault_latency_ns",
            format!(
                "p50 <= {} p90 <= {} p99 <= {} max {} ({} faults)",
                self.fault_latency_p50_ns,
                self.fault_latency_p90_ns,
                self.fault_latency_p99_ns,
                self.fault_latency_max_ns,
                self.fault_count
            ),
        );
        for (key, value) in &self.extra {
            // A control character in a free-form value must not break the one-fact-per-line
            // layout (every line starts with "lego:").
            let clean = |s: &str| -> String {
                s.chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect()
            };
            line(&clean(key), clean(value));
        }
        out
    }

    /// One JSON object with flat keys: every counter by its snake_case name, the resident
    /// gauges, `fault_count`, `"fault_latency_ns": {"p50", "p90", "p99", "max"}`, then the
    /// extra pairs as strings. An extra key that collides with a built-in key is written as
    /// `extra_<key>` so the object never has duplicate keys.
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        let mut numbers: Vec<(&str, u64)> = Counter::ALL
            .iter()
            .map(|&c| (c.name(), self.get(c)))
            .collect();
        numbers.push(("resident_pages", self.resident_pages));
        numbers.push(("peak_resident_pages", self.peak_resident_pages));
        numbers.push(("fault_count", self.fault_count));
        for (i, (key, value)) in numbers.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_string(&mut out, key);
            let _ = write!(out, ":{value}");
        }
        let _ = write!(
            out,
            ",\"fault_latency_ns\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"max\":{}}}",
            self.fault_latency_p50_ns,
            self.fault_latency_p90_ns,
            self.fault_latency_p99_ns,
            self.fault_latency_max_ns
        );
        for (key, value) in &self.extra {
            out.push(',');
            let built_in =
                numbers.iter().any(|(k, _)| k == key) || key.as_str() == "fault_latency_ns";
            if built_in {
                push_json_string(&mut out, &format!("extra_{key}"));
            } else {
                push_json_string(&mut out, key);
            }
            out.push(':');
            push_json_string(&mut out, value);
        }
        out.push('}');
        out
    }
}

/// Appends `s` as a JSON string literal, escaping quotes, backslashes and control characters.
pub fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Delivers a snapshot to its sink: nothing for `Off`, the summary on fd 2 for `Stderr`, and
/// for `Json` the object written to the file (mode 0600). The file is written under a
/// temporary name and renamed into place, so a reader never sees half an object.
pub fn report(snapshot: &StatsSnapshot, sink: &StatsSink) -> std::io::Result<()> {
    match sink {
        StatsSink::Off => Ok(()),
        StatsSink::Stderr => {
            // std's stderr is unbuffered: this is write(2) on fd 2, no C stdio.
            std::io::stderr().write_all(snapshot.summary_text().as_bytes())
        }
        StatsSink::Json(path) => write_json_file(path, &snapshot.to_json()),
    }
}

fn write_json_file(path: &Path, json: &str) -> std::io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = Path::new(&tmp_name);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(STATS_FILE_MODE)
            .open(tmp)?;
        file.write_all(json.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(tmp, path)
    })();
    if written.is_err() {
        // Best effort: leave nothing behind; the original error is the one worth reporting.
        let _ = std::fs::remove_file(tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal JSON validator (RFC 8259 grammar), enough to prove `to_json` parses.
    /// Returns the top-level object's keys and their raw value text.
    mod json {
        pub fn parse_object(s: &str) -> Result<Vec<(String, String)>, String> {
            let mut p = Parser {
                b: s.as_bytes(),
                i: 0,
            };
            p.ws();
            let fields = p.object()?;
            p.ws();
            if p.i != p.b.len() {
                return Err(format!("trailing text at {}", p.i));
            }
            Ok(fields)
        }

        struct Parser<'a> {
            b: &'a [u8],
            i: usize,
        }

        impl Parser<'_> {
            fn ws(&mut self) {
                while self.i < self.b.len() && b" \t\r\n".contains(&self.b[self.i]) {
                    self.i += 1;
                }
            }
            fn eat(&mut self, c: u8) -> Result<(), String> {
                if self.b.get(self.i) == Some(&c) {
                    self.i += 1;
                    Ok(())
                } else {
                    Err(format!("expected {:?} at {}", c as char, self.i))
                }
            }
            fn object(&mut self) -> Result<Vec<(String, String)>, String> {
                self.eat(b'{')?;
                let mut fields = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(fields);
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.ws();
                    self.eat(b':')?;
                    self.ws();
                    let start = self.i;
                    self.value()?;
                    let raw = String::from_utf8(self.b[start..self.i].to_vec())
                        .map_err(|e| e.to_string())?;
                    fields.push((key, raw));
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(fields);
                        }
                        _ => return Err(format!("expected , or }} at {}", self.i)),
                    }
                }
            }
            fn value(&mut self) -> Result<(), String> {
                match self.b.get(self.i) {
                    Some(b'{') => self.object().map(|_| ()),
                    Some(b'"') => self.string().map(|_| ()),
                    Some(b'-' | b'0'..=b'9') => self.number(),
                    _ => {
                        for lit in [&b"true"[..], b"false", b"null"] {
                            if self.b[self.i..].starts_with(lit) {
                                self.i += lit.len();
                                return Ok(());
                            }
                        }
                        Err(format!("bad value at {}", self.i))
                    }
                }
            }
            fn number(&mut self) -> Result<(), String> {
                let start = self.i;
                if self.b.get(self.i) == Some(&b'-') {
                    self.i += 1;
                }
                let digits = self.b[self.i..]
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .count();
                if digits == 0 || (digits > 1 && self.b[self.i] == b'0') {
                    return Err(format!("bad number at {start}"));
                }
                self.i += digits;
                Ok(())
            }
            fn string(&mut self) -> Result<String, String> {
                self.eat(b'"')?;
                let mut out = String::new();
                loop {
                    let c = *self.b.get(self.i).ok_or("unterminated string")?;
                    self.i += 1;
                    match c {
                        b'"' => return Ok(out),
                        b'\\' => {
                            let e = *self.b.get(self.i).ok_or("bad escape")?;
                            self.i += 1;
                            match e {
                                b'"' => out.push('"'),
                                b'\\' => out.push('\\'),
                                b'/' => out.push('/'),
                                b'n' => out.push('\n'),
                                b'r' => out.push('\r'),
                                b't' => out.push('\t'),
                                b'b' => out.push('\u{8}'),
                                b'f' => out.push('\u{c}'),
                                b'u' => {
                                    let hex = std::str::from_utf8(
                                        self.b.get(self.i..self.i + 4).ok_or("short \\u")?,
                                    )
                                    .map_err(|e| e.to_string())?;
                                    let code =
                                        u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                                    out.push(char::from_u32(code).ok_or("bad \\u")?);
                                    self.i += 4;
                                }
                                _ => return Err(format!("bad escape at {}", self.i)),
                            }
                        }
                        c if c < 0x20 => return Err(format!("raw control char at {}", self.i)),
                        _ => {
                            // Copy one UTF-8 sequence as is.
                            let start = self.i - 1;
                            let mut end = self.i;
                            while end < self.b.len() && (self.b[end] & 0xC0) == 0x80 {
                                end += 1;
                            }
                            out.push_str(
                                std::str::from_utf8(&self.b[start..end])
                                    .map_err(|e| e.to_string())?,
                            );
                            self.i = end;
                        }
                    }
                }
            }
        }
    }

    fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no key {key}"))
    }

    #[test]
    fn counters_add_and_snapshot() {
        static STATS: Stats = Stats::new();
        for (i, &c) in Counter::ALL.iter().enumerate() {
            STATS.add(c, i as u64 + 1);
            STATS.add(c, 100);
        }
        let snap = STATS.snapshot();
        for (i, &c) in Counter::ALL.iter().enumerate() {
            assert_eq!(STATS.get(c), i as u64 + 101, "{}", c.name());
            assert_eq!(snap.get(c), i as u64 + 101, "{}", c.name());
        }
        assert_eq!(snap.faults_zero_fill, 101);
        assert_eq!(snap.fork_page_ins, 22 + 100);
        assert_eq!(snap.log_compactions, 31 + 100);
        assert_eq!(snap.evictions_held_for_log, 33 + 100);
        assert_eq!(snap.mapped_pages_evicted, COUNTERS as u64 + 100);
        assert_eq!(COUNTERS, 36);
    }

    #[test]
    fn resident_gauge_keeps_peak() {
        let stats = Stats::new();
        stats.set_resident_pages(10);
        stats.set_resident_pages(500);
        stats.set_resident_pages(42);
        let snap = stats.snapshot();
        assert_eq!(snap.resident_pages, 42);
        assert_eq!(snap.peak_resident_pages, 500);
    }

    #[test]
    fn buckets_and_bounds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 0);
        assert_eq!(latency_bucket(2), 1);
        assert_eq!(latency_bucket(3), 1);
        assert_eq!(latency_bucket(1024), 10);
        assert_eq!(latency_bucket(u64::MAX), 63);
        assert_eq!(bucket_upper_ns(0), 1);
        assert_eq!(bucket_upper_ns(10), 2047);
        assert_eq!(bucket_upper_ns(62), u64::MAX >> 1);
        assert_eq!(bucket_upper_ns(63), u64::MAX);
        for ns in [0, 1, 5, 1000, 123_456_789, u64::MAX] {
            assert!(ns <= bucket_upper_ns(latency_bucket(ns)));
        }
    }

    #[test]
    fn percentiles_on_known_data() {
        let stats = Stats::new();
        assert_eq!(stats.snapshot().fault_latency_p99_ns, 0, "empty histogram");
        // 50 faults of 1000 ns (bucket 9: 512..=1023 ... 1000 is in bucket 9),
        // 40 of 10_000 ns (bucket 13: 8192..=16383), 9 of 100_000 ns (bucket 16: 65536..=131071),
        // 1 of 5_000_000 ns.
        for _ in 0..50 {
            stats.record_fault_latency_ns(1000);
        }
        for _ in 0..40 {
            stats.record_fault_latency_ns(10_000);
        }
        for _ in 0..9 {
            stats.record_fault_latency_ns(100_000);
        }
        stats.record_fault_latency_ns(5_000_000);
        let snap = stats.snapshot();
        assert_eq!(snap.fault_count, 100);
        assert_eq!(snap.fault_latency_p50_ns, 1023);
        assert_eq!(snap.fault_latency_p90_ns, 16383);
        assert_eq!(snap.fault_latency_p99_ns, 131_071);
        assert_eq!(snap.fault_latency_max_ns, 5_000_000);

        // A single sample: every percentile is capped by the exact maximum.
        let one = Stats::new();
        one.record_fault_latency_ns(3000);
        let snap = one.snapshot();
        assert_eq!(
            (
                snap.fault_latency_p50_ns,
                snap.fault_latency_p99_ns,
                snap.fault_latency_max_ns
            ),
            (3000, 3000, 3000)
        );
    }

    fn sample() -> StatsSnapshot {
        let stats = Stats::new();
        stats.add(Counter::PagesEvicted, 1234);
        stats.add(Counter::PagesFetched, 567);
        stats.add(Counter::BytesFetched, 567 * 4096);
        stats.add(Counter::ForeignFrees, 3);
        stats.set_resident_pages(8192);
        stats.record_fault_latency_ns(2500);
        let mut snap = stats.snapshot();
        snap.extra
            .push(("backend".into(), "file:/tmp/x \"q\"\\\n\u{1}é".into()));
        snap.extra
            .push(("region_base".into(), "0x7f0000000000".into()));
        snap.extra.push(("pages_evicted".into(), "collides".into()));
        snap
    }

    #[test]
    fn json_is_valid_and_has_every_key() {
        let snap = sample();
        let text = snap.to_json();
        let fields = json::parse_object(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        for &c in Counter::ALL {
            let raw = field(&fields, c.name());
            assert_eq!(raw.parse::<u64>().ok(), Some(snap.get(c)), "{}", c.name());
        }
        assert_eq!(field(&fields, "pages_evicted"), "1234");
        assert_eq!(field(&fields, "peak_resident_pages"), "8192");
        assert_eq!(field(&fields, "resident_pages"), "8192");
        assert_eq!(field(&fields, "fault_count"), "1");
        let latency = json::parse_object(field(&fields, "fault_latency_ns")).expect("object");
        assert_eq!(field(&latency, "max"), "2500");
        assert_eq!(field(&latency, "p50"), "2500");
        assert_eq!(field(&fields, "region_base"), "\"0x7f0000000000\"");
        assert_eq!(field(&fields, "extra_pages_evicted"), "\"collides\"");
        let mut keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        let n = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), n, "duplicate keys in {text}");
        // The escaped string round-trips.
        let mut probe = String::new();
        push_json_string(&mut probe, "file:/tmp/x \"q\"\\\n\u{1}é");
        let wrapped = format!("{{\"k\":{probe}}}");
        assert!(json::parse_object(&wrapped).is_ok(), "{wrapped}");
        assert!(probe.contains("\\u0001"));
    }

    #[test]
    fn json_validator_rejects_garbage() {
        for bad in [
            "{",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":01}",
            "{\"a\":\"\n\"}",
            "{} x",
        ] {
            assert!(json::parse_object(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn summary_lists_every_counter() {
        let snap = sample();
        let text = snap.summary_text();
        assert!(text.starts_with("lego: stats\n"), "{text}");
        for &c in Counter::ALL {
            assert!(text.contains(c.name()), "{} missing:\n{text}", c.name());
        }
        assert!(text.contains("pages_evicted"));
        assert!(text.contains("1234 (4.8 MiB)"), "{text}");
        assert!(text.contains("2322432 (2.2 MiB)"), "{text}");
        assert!(text.contains("peak_resident_pages"));
        assert!(text.contains("8192 (32.0 MiB)"), "{text}");
        assert!(text.contains("p50 <= 2500"), "{text}");
        assert!(text.contains("region_base"));
        assert!(text.contains("0x7f0000000000"));
        for line in text.lines() {
            assert!(line.starts_with("lego: "), "{line}");
        }
    }

    #[test]
    fn report_writes_private_json_file() {
        use std::os::unix::fs::PermissionsExt;
        let test_dir = crate::test_support::TestDir::new("stats");
        let dir = test_dir.path();
        let path = dir.join("stats.json");
        let snap = sample();
        report(&snap, &StatsSink::Json(path.clone())).expect("report");
        let text = std::fs::read_to_string(&path).expect("read back");
        assert!(json::parse_object(text.trim_end()).is_ok());
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Only the final file remains: no temporary left behind.
        let entries = std::fs::read_dir(dir).expect("list").count();
        assert_eq!(entries, 1);
        report(&snap, &StatsSink::Off).expect("off is a no-op");
        let err = report(&snap, &StatsSink::Json(dir.join("missing/stats.json")));
        assert!(err.is_err());
    }
}
