//! Whether each server of the pool is up: a server that fails [`FAILURES_TO_DOWN`] times in a
//! row is marked down (no request is sent to it), and probed by the pool's thread with backoff
//! from [`PROBE_FIRST_MS`] doubling to [`PROBE_MAX_MS`] (mcrouter marks a server down after 3
//! failures and probes it every 10 s, backing off to 60 s; lego's first probe is sooner
//! because a page whose only copies are there waits for it).
//!
//! A server that answers a probe is up again. If it restarted meanwhile (another pid, or an
//! uptime that went back), every value it held is gone, and the pool forgets its copies.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures in a row after which a server is marked down.
pub const FAILURES_TO_DOWN: u32 = 3;
/// Wait before the first probe of a server marked down, in milliseconds.
pub const PROBE_FIRST_MS: u64 = 1000;
/// Longest wait between two probes, in milliseconds.
pub const PROBE_MAX_MS: u64 = 30_000;

/// One server's health.
#[derive(Default)]
pub struct Health {
    down: AtomicBool,
    state: Mutex<State>,
    /// Requests that failed (a whole pipeline counts once), for the stats.
    pub errors: AtomicU64,
    /// Times it was marked down.
    pub downs: AtomicU64,
}

#[derive(Default)]
struct State {
    failures: u32,
    next_probe: Option<Instant>,
    backoff_ms: u64,
    /// The server process last seen: (pid, uptime in seconds).
    seen: Option<(u64, u64)>,
}

/// What a probe found.
#[derive(Debug, PartialEq, Eq)]
pub enum Probed {
    /// Up, the same server process as before.
    Same,
    /// Up, but restarted since it was last seen: its values are gone.
    Restarted,
}

impl Health {
    pub fn is_up(&self) -> bool {
        !self.down.load(Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request succeeded.
    pub fn succeeded(&self) {
        let mut s = self.state();
        s.failures = 0;
    }

    /// A request failed; returns true when this marks the server down.
    pub fn failed(&self) -> bool {
        self.errors.fetch_add(1, Relaxed);
        let mut s = self.state();
        s.failures += 1;
        if s.failures >= FAILURES_TO_DOWN && self.is_up() {
            self.down.store(true, Relaxed);
            self.downs.fetch_add(1, Relaxed);
            s.backoff_ms = PROBE_FIRST_MS;
            s.next_probe = Some(Instant::now() + Duration::from_millis(PROBE_FIRST_MS));
            return true;
        }
        false
    }

    /// Whether a down server is due for a probe.
    pub fn probe_due(&self, now: Instant) -> bool {
        !self.is_up() && self.state().next_probe.is_none_or(|t| now >= t)
    }

    /// A probe of a down server failed: wait longer.
    pub fn probe_failed(&self, now: Instant) {
        let mut s = self.state();
        s.backoff_ms = (s.backoff_ms * 2).clamp(PROBE_FIRST_MS, PROBE_MAX_MS);
        s.next_probe = Some(now + Duration::from_millis(s.backoff_ms));
    }

    /// The server answered (a probe, or a periodic look while up) as process `pid`, up for
    /// `uptime_s`: marks it up, and says whether it restarted since it was last seen.
    pub fn answered(&self, pid: u64, uptime_s: u64) -> Probed {
        let mut s = self.state();
        let restarted = match s.seen {
            Some((old_pid, old_uptime)) => old_pid != pid || uptime_s < old_uptime,
            None => false,
        };
        s.seen = Some((pid, uptime_s));
        // A look at an up server (a small `stats`) says nothing of its pages' requests: only
        // a server that was down starts counting its failures again.
        if !self.is_up() {
            s.failures = 0;
        }
        s.next_probe = None;
        self.down.store(false, Relaxed);
        if restarted {
            Probed::Restarted
        } else {
            Probed::Same
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_failures_mark_down_and_a_probe_brings_it_back() {
        let h = Health::default();
        assert_eq!(h.answered(10, 5), Probed::Same);
        assert!(!h.failed() && !h.failed());
        h.succeeded();
        assert!(!h.failed() && !h.failed());
        assert!(h.is_up());
        assert!(h.failed(), "the third failure in a row");
        assert!(!h.is_up());
        assert!(!h.failed(), "already down");
        let now = Instant::now();
        assert!(!h.probe_due(now));
        assert!(h.probe_due(now + Duration::from_millis(PROBE_FIRST_MS)));
        h.probe_failed(now);
        assert!(!h.probe_due(now + Duration::from_millis(PROBE_FIRST_MS)));
        assert!(h.probe_due(now + Duration::from_millis(2 * PROBE_FIRST_MS)));
        for _ in 0..10 {
            h.probe_failed(now);
        }
        assert!(h.probe_due(now + Duration::from_millis(PROBE_MAX_MS)));
        assert_eq!(h.answered(10, 9), Probed::Same);
        assert!(h.is_up());
        assert_eq!(h.answered(11, 1), Probed::Restarted, "another pid");
        assert_eq!(h.answered(11, 0), Probed::Restarted, "uptime went back");
        assert_eq!(h.downs.load(Relaxed), 1);
        assert_eq!(h.errors.load(Relaxed), 6);
    }
}
