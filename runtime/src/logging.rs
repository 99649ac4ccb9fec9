//! The backend of the `log` facade: each record becomes one line on fd 2, written with one
//! `write(2)`, formatted in a stack buffer without allocating.
//!
//! Rules: this module never allocates and never touches C stdio, because it runs inside a
//! process whose malloc is replaced, possibly while the allocator or a fault handler is in the
//! middle of its work. A line is `lego[PID]: LEVEL target: message`, at most
//! [`LINE_BYTES_MAX`] bytes; a longer one is cut and ends in `...`. One `write(2)` per line
//! keeps lines from different threads and processes whole.
//!
//! Fault-path messages go through a [`RateLimit`] (or the [`error_limited!`](crate::error_limited)
//! and [`warn_limited!`](crate::warn_limited) macros), so a storm of failing pages cannot
//! flood stderr or slow the handlers down.
//!
//! [`error_chain`] is the one-line form of an error and its sources that every message of the
//! crate uses; it allocates, so it is called where a message is built, not by the logger.

use core::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// The `log` crate, re-exported for the rate-limited macros so their callers need not depend
/// on it.
#[doc(hidden)]
pub use log as __log;

/// Longest line written, in bytes, newline included.
pub const LINE_BYTES_MAX: usize = 512;

/// What ends a line that did not fit.
const TRUNCATION_MARK: &[u8] = b"...\n";

/// Bytes of text a line may hold, leaving room for the truncation mark.
const LINE_TEXT_BYTES_MAX: usize = LINE_BYTES_MAX - TRUNCATION_MARK.len();

const _: () = assert!(LINE_BYTES_MAX > TRUNCATION_MARK.len() + 64);

/// How many messages per second each call site of the rate-limited macros may log.
pub const LIMITED_MESSAGES_PER_SECOND: u32 = 10;

/// The installed logger. It has no state: the level lives in `log::max_level()`.
struct StderrLogger;

static LOGGER: StderrLogger = StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = LineBuf::new();
        format_record(
            &mut line,
            std::process::id(),
            record.level(),
            record.target(),
            *record.args(),
        );
        write_stderr(line.finish());
    }

    fn flush(&self) {}
}

/// Installs lego's logger at `level`. Idempotent: later calls only change the level.
pub fn init(level: LevelFilter) {
    // An error means a logger is already installed (ours, from an earlier call, or one a Rust
    // host program set up); either way records reach a logger, so there is nothing to do.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Writes `line` and a newline to fd 2 with one `write(2)`, without allocating, whatever the
/// log level: for fatal messages printed before exiting (the caller writes the `lego: `
/// prefix). Line breaks inside become spaces; a line longer than [`LINE_BYTES_MAX`] is cut.
pub fn write_stderr_line(line: &str) {
    write_stderr_fmt(format_args!("{line}"));
}

/// Makes every panic in this process print one `lego: internal error` line with `write(2)`
/// and abort. The default hook may allocate (a backtrace, the thread's name), which inside
/// the internal heap's lock (a panic in the allocator, or on a thread holding it) would
/// deadlock instead of ending the process. The hook itself is allocated here, once.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        write_stderr_fmt(format_args!(
            "lego: internal error, aborting: {info} (please report it)"
        ));
        // SAFETY: `abort` has no preconditions; it ends the process at once.
        unsafe { libc::abort() }
    }));
}

/// Like [`write_stderr_line`], but formats `message` into a stack buffer first, so that not
/// even the caller allocates: usable from a signal handler as long as the arguments' own
/// `Display` implementations do not allocate.
pub fn write_stderr_fmt(message: fmt::Arguments<'_>) {
    let mut line = LineBuf::new();
    // An error only means the line was cut, which `finish` shows.
    let _ = line.write_fmt(message);
    write_stderr(line.finish());
}

/// A fixed-size line buffer on the stack. Text beyond `LINE_TEXT_BYTES_MAX` is dropped (at
/// a character boundary) and the line is marked as cut; line breaks inside the text become
/// spaces so that one record is always one line.
pub struct LineBuf {
    bytes: [u8; LINE_BYTES_MAX],
    len: usize,
    truncated: bool,
}

impl Default for LineBuf {
    fn default() -> Self {
        LineBuf::new()
    }
}

impl LineBuf {
    /// An empty line.
    pub const fn new() -> LineBuf {
        LineBuf {
            bytes: [0; LINE_BYTES_MAX],
            len: 0,
            truncated: false,
        }
    }

    /// Ends the line (`\n`, or `...\n` if text was dropped) and returns its bytes.
    pub fn finish(&mut self) -> &[u8] {
        let end: &[u8] = if self.truncated {
            TRUNCATION_MARK
        } else {
            b"\n"
        };
        // `len <= LINE_TEXT_BYTES_MAX` leaves room for the longest ending.
        self.bytes[self.len..self.len + end.len()].copy_from_slice(end);
        &self.bytes[..self.len + end.len()]
    }

    fn push(&mut self, s: &str) {
        let bytes = s.as_bytes();
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        for b in &mut self.bytes[self.len..self.len + bytes.len()] {
            if *b == b'\n' || *b == b'\r' {
                *b = b' ';
            }
        }
        self.len += bytes.len();
    }
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.truncated {
            return Err(fmt::Error);
        }
        let room = LINE_TEXT_BYTES_MAX - self.len;
        if s.len() <= room {
            self.push(s);
            return Ok(());
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.push(&s[..cut]);
        self.truncated = true;
        // Stop the formatting early: nothing more will fit.
        Err(fmt::Error)
    }
}

/// Formats `lego[PID]: LEVEL target: message` into `line` (without the newline).
fn format_record(
    line: &mut LineBuf,
    pid: u32,
    level: Level,
    target: &str,
    args: fmt::Arguments<'_>,
) {
    // An error only means the line was cut, which `finish` shows.
    let _ = write!(line, "lego[{pid}]: {level} {target}: {args}");
}

/// One `write(2)` of `bytes` to fd 2. Failures are ignored: there is nowhere left to report
/// them.
fn write_stderr(bytes: &[u8]) {
    let _ = write_once(libc::STDERR_FILENO, bytes);
}

/// One `write(2)` of `bytes` to `fd`, retried only if a signal interrupted it; returns what
/// the call returned. A short write is not completed: a second `write` could interleave with
/// another thread's line, and stderr writes of a few hundred bytes are not short in practice.
fn write_once(fd: libc::c_int, bytes: &[u8]) -> isize {
    loop {
        // SAFETY: `bytes` is a live slice, valid for reads of `bytes.len()` bytes for the whole
        // call; a closed or invalid `fd` only makes the call return an error.
        let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        let interrupted =
            written < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR);
        if !interrupted {
            return written;
        }
    }
}

/// Lets at most `per_second` events through per wall-clock second and counts the rest.
/// Lock-free: the second and the count share one atomic word, so the limit is exact even when
/// many threads ask at once.
#[derive(Debug)]
pub struct RateLimit {
    per_second: u32,
    /// High 32 bits: the low 32 bits of the current second; low 32 bits: events let through
    /// in that second (never above `per_second`).
    state: AtomicU64,
    /// Events refused since the last [`RateLimit::take_suppressed`].
    suppressed: AtomicU64,
}

const COUNT_MASK: u64 = 0xFFFF_FFFF;

impl RateLimit {
    /// A limiter that lets `per_second` events through per second (none if 0).
    pub const fn new(per_second: u32) -> RateLimit {
        RateLimit {
            per_second,
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether one more event may go through now; a refusal is counted as suppressed.
    pub fn allow(&self) -> bool {
        self.allow_at(now_seconds())
    }

    fn allow_at(&self, second: u64) -> bool {
        let window = second << 32;
        let mut current = self.state.load(Relaxed);
        loop {
            let next = if current & !COUNT_MASK != window {
                // A new second starts with a fresh budget.
                window
            } else {
                current
            };
            if next & COUNT_MASK >= u64::from(self.per_second) {
                self.suppressed.fetch_add(1, Relaxed);
                return false;
            }
            match self
                .state
                .compare_exchange_weak(current, next + 1, Relaxed, Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Events refused since the last call, and resets that count (to report "N suppressed").
    pub fn take_suppressed(&self) -> u64 {
        self.suppressed.swap(0, Relaxed)
    }

    /// Events refused since the last [`RateLimit::take_suppressed`], without resetting.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Relaxed)
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it). Reads the vDSO clock: no
/// syscall, no allocation.
fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Logs at `$level` through a per-call-site [`RateLimit`] of `$per_second` messages per
/// second; when messages were dropped, the next one that goes through says how many.
/// Prefer [`error_limited!`](crate::error_limited) and [`warn_limited!`](crate::warn_limited).
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $per_second:expr; $($arg:tt)+) => {{
        static LIMIT: $crate::logging::RateLimit = $crate::logging::RateLimit::new($per_second);
        let level: $crate::logging::__log::Level = $level;
        if $crate::logging::__log::log_enabled!(level) && LIMIT.allow() {
            let suppressed = LIMIT.take_suppressed();
            if suppressed == 0 {
                $crate::logging::__log::log!(level, $($arg)+);
            } else {
                $crate::logging::__log::log!(
                    level,
                    "{} ({} similar messages suppressed)",
                    format_args!($($arg)+),
                    suppressed
                );
            }
        }
    }};
}

/// `log::error!` limited to [`LIMITED_MESSAGES_PER_SECOND`](crate::logging::LIMITED_MESSAGES_PER_SECOND)
/// messages per second at this call site; for the fault path.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!(
            $crate::logging::__log::Level::Error,
            $crate::logging::LIMITED_MESSAGES_PER_SECOND;
            $($arg)+
        )
    };
}

/// `log::warn!` limited to [`LIMITED_MESSAGES_PER_SECOND`](crate::logging::LIMITED_MESSAGES_PER_SECOND)
/// messages per second at this call site; for the fault path.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!(
            $crate::logging::__log::Level::Warn,
            $crate::logging::LIMITED_MESSAGES_PER_SECOND;
            $($arg)+
        )
    };
}

/// An error and its sources, joined with ": ", for one-line messages (the crate's one
/// formatter of error chains: the CLI, the preload library, the pager's reports and replay's
/// descriptions all use it). Unlike the rest of this module it allocates: it builds messages
/// before they are logged or printed, never inside the logger.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn formatted(level: Level, target: &str, args: fmt::Arguments<'_>) -> String {
        let mut line = LineBuf::new();
        format_record(&mut line, 1234, level, target, args);
        String::from_utf8(line.finish().to_vec()).expect("lines are UTF-8")
    }

    #[test]
    fn record_format() {
        assert_eq!(
            formatted(
                Level::Warn,
                "lego_runtime::pager",
                format_args!("page {:#x} failed: {}", 0x7f00_0000_1000u64, "EIO")
            ),
            "lego[1234]: WARN lego_runtime::pager: page 0x7f0000001000 failed: EIO\n"
        );
        assert_eq!(
            formatted(Level::Error, "t", format_args!("x")),
            "lego[1234]: ERROR t: x\n"
        );
        assert_eq!(
            formatted(Level::Trace, "t", format_args!("")),
            "lego[1234]: TRACE t: \n"
        );
    }

    #[test]
    fn line_breaks_become_spaces() {
        assert_eq!(
            formatted(Level::Info, "t", format_args!("a\nb\r\nc")),
            "lego[1234]: INFO t: a b  c\n"
        );
    }

    #[test]
    fn long_lines_are_cut_with_a_mark() {
        let long = "x".repeat(2000);
        let line = formatted(Level::Info, "t", format_args!("{long}"));
        assert_eq!(line.len(), LINE_BYTES_MAX);
        assert!(line.starts_with("lego[1234]: INFO t: xxx"));
        assert!(line.ends_with("x...\n"));

        // Exactly full: no mark.
        let prefix = "lego[1234]: INFO t: ".len();
        let exact = "y".repeat(LINE_TEXT_BYTES_MAX - prefix);
        let line = formatted(Level::Info, "t", format_args!("{exact}"));
        assert_eq!(line.len(), LINE_TEXT_BYTES_MAX + 1);
        assert!(line.ends_with("y\n"));

        // Many small pieces and multi-byte characters: cut at a character boundary.
        let line = formatted(
            Level::Info,
            "t",
            format_args!("{}{}{}", "é".repeat(300), 1, "ü".repeat(300)),
        );
        assert!(line.len() <= LINE_BYTES_MAX);
        assert!(line.ends_with("...\n"));
    }

    #[test]
    fn plain_line_format() {
        let mut line = LineBuf::new();
        let _ = line.write_fmt(format_args!("lego: bad value {}", 42));
        assert_eq!(line.finish(), b"lego: bad value 42\n");
        let mut line = LineBuf::new();
        let _ = line.write_fmt(format_args!("{}", "z".repeat(1000)));
        let bytes = line.finish();
        assert_eq!(bytes.len(), LINE_BYTES_MAX);
        assert!(bytes.ends_with(b"z...\n"));
    }

    #[test]
    fn one_write_per_line() {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a writable array of two ints, as pipe(2) requires.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let mut line = LineBuf::new();
        format_record(&mut line, 7, Level::Info, "t", format_args!("hello"));
        let bytes = line.finish();
        let written = write_once(fds[1], bytes);
        assert_eq!(usize::try_from(written).ok(), Some(bytes.len()));
        let mut back = [0u8; LINE_BYTES_MAX];
        // SAFETY: `back` is writable for its whole length; `fds[0]` is the pipe's read end.
        let read = unsafe { libc::read(fds[0], back.as_mut_ptr().cast(), back.len()) };
        assert_eq!(
            &back[..usize::try_from(read).expect("read succeeded")],
            bytes
        );
        // SAFETY: both fds were opened above and are closed once.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert!(
            write_once(fds[1], b"x") < 0,
            "a closed fd is an error, not a crash"
        );
    }

    #[test]
    fn init_is_idempotent() {
        init(LevelFilter::Off);
        init(LevelFilter::Off);
        let installed: *const dyn Log = log::logger();
        assert!(std::ptr::addr_eq(installed, &LOGGER as *const StderrLogger));
        // With logging off, the rate-limited macros do nothing and do not use their budget.
        for _ in 0..100 {
            crate::error_limited!("never shown {}", 1);
            crate::warn_limited!("never shown");
        }
    }

    #[test]
    fn rate_limit_per_second() {
        let limit = RateLimit::new(3);
        let allowed = (0..10).filter(|_| limit.allow_at(100)).count();
        assert_eq!(allowed, 3);
        assert_eq!(limit.suppressed(), 7);
        assert_eq!(limit.take_suppressed(), 7);
        assert_eq!(limit.suppressed(), 0);
        // The next second has a fresh budget.
        let allowed = (0..10).filter(|_| limit.allow_at(101)).count();
        assert_eq!(allowed, 3);
        // So does a clock that stepped back.
        assert!(limit.allow_at(50));
        assert_eq!(limit.take_suppressed(), 7);

        let never = RateLimit::new(0);
        assert!(!never.allow_at(1));
        assert!(!never.allow_at(2));
        assert_eq!(never.suppressed(), 2);

        let real = RateLimit::new(1);
        // Within one real second at most one of two calls passes (the second may tick over).
        let a = real.allow();
        assert!(a, "the first call always passes");
    }

    #[test]
    fn rate_limit_is_exact_across_threads() {
        const THREADS: usize = 4;
        const CALLS: usize = 10_000;
        let limit = Arc::new(RateLimit::new(100));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let limit = Arc::clone(&limit);
                std::thread::spawn(move || (0..CALLS).filter(|_| limit.allow_at(7)).count())
            })
            .collect();
        let allowed: usize = handles
            .into_iter()
            .map(|h| h.join().expect("thread ran"))
            .sum();
        assert_eq!(allowed, 100);
        assert_eq!(limit.suppressed(), (THREADS * CALLS - 100) as u64);
    }

    /// Sources are joined with ": ", and a source whose text the message already ends with
    /// (a `#[error(transparent)]` or "{source}" message) is not repeated.
    #[test]
    fn error_chain_joins_sources_once() {
        #[derive(Debug, thiserror::Error)]
        enum Outer {
            #[error("reading heap.img failed")]
            Read(#[source] std::io::Error),
            #[error("{0}")]
            Same(#[source] std::io::Error),
        }
        let io = || std::io::Error::other("disk on fire");
        assert_eq!(
            error_chain(&Outer::Read(io())),
            "reading heap.img failed: disk on fire"
        );
        assert_eq!(error_chain(&Outer::Same(io())), "disk on fire");
        assert_eq!(error_chain(&io()), "disk on fire");
    }
}
