//! Garbage collection of orphaned heaps on one server: the pages of heaps whose process is
//! gone, found by their missing lease ([`super::lease`]).
//!
//! 1. [`survey`] lists the server's keys (`lru_crawler metadump all`, read line by line,
//!    [`super::dump`]) and groups lego's ([`super::keys`]) by heap: its pages (each with the
//!    CAS token and size the dump showed) and whether its lease is there. Other keys are only
//!    counted.
//! 2. [`collect`] takes the heaps that have pages but no lease in the dump and are not the
//!    caller's own, asks the server again for their leases (a heap whose lease the dump missed,
//!    or that renewed it since, is kept), and deletes the pages of the rest with pipelined
//!    quiet `md KEY C<cas>`: a page is deleted only while it is the value the dump saw, so one
//!    written again since (by a process that was only paused) is kept.
//!
//! Rules: never a key that is not lego's (the key parser accepts only the exact names lego
//! writes), never a heap whose lease is alive, never a heap the caller names as its own.
//! Everything is bounded ([`DumpLimits`]: lines read and time taken; [`DUMP_BUSY_TRIES_MAX`]
//! tries while another crawl runs; every read by the connection's timeout). A dump cut at a
//! bound still gives a safe collection (each heap's lease is checked again): it frees less,
//! and the report says so.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::connection::{Connection, LinesEnd, ServerError};
use super::dump;
use super::keys::{self, LegoKey};
use super::lease::{self, LeaseError};
use super::protocol::{self, ProtocolError, Reply};
use super::PIPELINE_REQUESTS_MAX;

/// The command that lists every item of a server.
const DUMP_COMMAND: &str = "lru_crawler metadump all";
/// Tries of a dump while the server's crawler is busy with another one.
pub const DUMP_BUSY_TRIES_MAX: u32 = 20;
/// Wait between two such tries, in milliseconds.
pub const DUMP_BUSY_WAIT_MS: u64 = 250;

/// Bounds of one dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpLimits {
    /// Lines (items of any program) read at most; lego keeps 24 bytes per page of its own.
    pub lines_max: u64,
    /// Time the dump may take, in milliseconds, busy retries included.
    pub duration_ms: u64,
}

impl DumpLimits {
    /// For `lego pool` and `lego pool gc`: 16 Mi items (64 GiB of pages; at most 384 MiB of
    /// page records), ten minutes.
    pub const COMMAND: DumpLimits = DumpLimits {
        lines_max: 16 << 20,
        duration_ms: 600_000,
    };
    /// For a running program's pool (collecting at connect, on the pool's thread): 1 Mi
    /// items (4 GiB of pages; at most 24 MiB of page records), thirty seconds.
    pub const IN_PROCESS: DumpLimits = DumpLimits {
        lines_max: 1 << 20,
        duration_ms: 30_000,
    };
}

/// Why a dump stopped before `END`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpCut {
    /// At [`DumpLimits::lines_max`].
    Lines,
    /// At [`DumpLimits::duration_ms`].
    Time,
}

/// One page of a heap as the dump showed it (or one parity value of an erasure-coded stripe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPage {
    /// The page, or the stripe of a parity value.
    pub page: u64,
    /// `Some(slot)`: parity value `slot` of stripe `page` (`lego:HEAPID:sSTRIPE:P`).
    pub parity: Option<u8>,
    pub cas: u64,
    /// The item's size in the server's memory, in bytes.
    pub size: u64,
}

/// What one server holds of one heap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeapSurvey {
    /// Whether its lease was in the dump.
    pub lease_seen: bool,
    /// When the lease expires (Unix time on the server's clock); `None` if never or not seen.
    pub lease_exp: Option<u64>,
    /// Bytes of the lease in the server's memory (0 if not seen).
    pub lease_bytes: u64,
    /// Its pages, in page order, each once.
    pub pages: Vec<StoredPage>,
}

impl HeapSurvey {
    /// Items (pages and the lease).
    pub fn items(&self) -> u64 {
        self.pages.len() as u64 + u64::from(self.lease_seen)
    }

    /// Bytes of its items (pages and lease) in the server's memory.
    pub fn bytes(&self) -> u64 {
        self.lease_bytes + self.pages.iter().map(|p| p.size).sum::<u64>()
    }
}

/// What a server holds, as one dump showed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Survey {
    /// lego's heaps, by heap id.
    pub heaps: BTreeMap<u64, HeapSurvey>,
    /// Items that are not lego's, and their bytes.
    pub other_items: u64,
    pub other_bytes: u64,
    /// Lines that were not items (skipped).
    pub unreadable_lines: u64,
    /// Set when the dump stopped at a bound: the counts are then lower bounds.
    pub cut: Option<DumpCut>,
}

impl Survey {
    /// Puts each heap's pages in order, each once: the crawler walks the server's LRU lists
    /// while items move between them, so it may list an item twice.
    fn finish(&mut self) {
        for heap in self.heaps.values_mut() {
            heap.pages.sort_unstable_by_key(|p| (p.parity, p.page));
            heap.pages.dedup_by_key(|p| (p.parity, p.page));
        }
    }

    fn add(&mut self, line: &[u8]) {
        let Ok(item) = dump::parse_line(line) else {
            self.unreadable_lines += 1;
            return;
        };
        match keys::parse_key(&item.key) {
            Some(key) => {
                let heap = self.heaps.entry(key.heap_id()).or_default();
                match key {
                    LegoKey::Page { page, .. } => heap.pages.push(StoredPage {
                        page,
                        parity: None,
                        cas: item.cas,
                        size: item.size,
                    }),
                    LegoKey::Parity { stripe, slot, .. } => heap.pages.push(StoredPage {
                        page: stripe,
                        parity: Some(slot),
                        cas: item.cas,
                        size: item.size,
                    }),
                    LegoKey::Lease { .. } => {
                        heap.lease_seen = true;
                        heap.lease_exp = item.exp;
                        heap.lease_bytes = item.size;
                    }
                }
            }
            None => {
                self.other_items += 1;
                self.other_bytes += item.size;
            }
        }
    }
}

/// What a collection did on one server.
#[derive(Debug, Default)]
pub struct GcReport {
    /// lego heaps with keys on the server.
    pub heaps_found: usize,
    /// Kept because their lease is alive (in the dump, or when asked again).
    pub heaps_live: usize,
    /// Kept because the caller named them as its own.
    pub heaps_mine: usize,
    /// Orphaned heaps whose pages were deleted.
    pub heaps_collected: usize,
    pub keys_deleted: u64,
    /// Pages of orphaned heaps not deleted: written again since the dump, or already gone.
    pub keys_kept: u64,
    /// Bytes the deleted items took in the server's memory.
    pub bytes_freed: u64,
    /// Set when the dump stopped at a bound: a later collection may free more.
    pub cut: Option<DumpCut>,
    /// The first thing that failed (the heaps after it were still tried).
    pub failure: Option<GcError>,
}

/// Why a collection could not list or delete.
#[derive(Debug, Error)]
pub enum GcError {
    #[error("listing the keys of {server} ({DUMP_COMMAND}) failed")]
    Dump {
        server: String,
        #[source]
        source: ServerError,
    },
    #[error(
        "the server {server} was still busy with another crawl after {tries} tries: try again \
         later"
    )]
    Busy { server: String, tries: u32 },
    #[error("checking the leases of the heaps that had none in the dump failed")]
    Leases(#[source] LeaseError),
    #[error("deleting the pages of the orphaned heap {heap_id:016x} on {server} failed")]
    Delete {
        heap_id: u64,
        server: String,
        #[source]
        source: ServerError,
    },
}

/// Lists what the server holds, within `limits`.
pub fn survey(conn: &Connection, limits: &DumpLimits) -> Result<Survey, GcError> {
    let deadline = Instant::now() + Duration::from_millis(limits.duration_ms);
    let mut tries = 0;
    loop {
        tries += 1;
        let mut survey = Survey::default();
        let mut lines = 0u64;
        let end = conn.text_lines(DUMP_COMMAND, deadline, |line| {
            survey.add(line);
            lines += 1;
            if lines >= limits.lines_max {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        survey.finish();
        match end {
            Ok(LinesEnd::End) => return Ok(survey),
            Ok(LinesEnd::Stopped) => {
                survey.cut = Some(DumpCut::Lines);
                return Ok(survey);
            }
            Ok(LinesEnd::Deadline) => {
                survey.cut = Some(DumpCut::Time);
                return Ok(survey);
            }
            Err(ServerError::Protocol(ProtocolError::Busy { .. })) => {
                let wait = Duration::from_millis(DUMP_BUSY_WAIT_MS);
                if tries >= DUMP_BUSY_TRIES_MAX || Instant::now() + wait >= deadline {
                    return Err(GcError::Busy {
                        server: conn.name.clone(),
                        tries,
                    });
                }
                std::thread::sleep(wait);
            }
            Err(source) => {
                return Err(GcError::Dump {
                    server: conn.name.clone(),
                    source,
                })
            }
        }
    }
}

/// Deletes the pages of the heaps `survey` found without a lease, but those in `mine` and
/// those whose lease is there when asked again. Failures are in the report.
pub fn collect(conn: &Connection, survey: &Survey, mine: &[u64]) -> GcReport {
    let mut report = GcReport {
        heaps_found: survey.heaps.len(),
        cut: survey.cut,
        ..GcReport::default()
    };
    let mut candidates = Vec::new();
    for (&heap_id, heap) in &survey.heaps {
        if mine.contains(&heap_id) {
            report.heaps_mine += 1;
        } else if heap.lease_seen || heap.pages.is_empty() {
            report.heaps_live += 1;
        } else {
            candidates.push(heap_id);
        }
    }
    if candidates.is_empty() {
        return report;
    }
    // The dump is a walk over time: a lease may have been missed, or renewed since.
    let leases = match lease::holders(conn, &candidates) {
        Ok(leases) => leases,
        Err(e) => {
            report.failure = Some(GcError::Leases(e));
            return report;
        }
    };
    for (&heap_id, holder) in candidates.iter().zip(&leases) {
        if holder.is_some() {
            report.heaps_live += 1;
            continue;
        }
        let pages = &survey.heaps[&heap_id].pages;
        match delete_pages(conn, heap_id, pages) {
            Ok((deleted, bytes)) => {
                report.heaps_collected += 1;
                report.keys_deleted += deleted;
                report.keys_kept += pages.len() as u64 - deleted;
                report.bytes_freed += bytes;
            }
            Err(e) => {
                report.failure.get_or_insert(e);
            }
        }
    }
    report
}

/// [`survey`], then [`collect`] keeping `mine`: the whole collection on one server.
pub fn collect_orphans(
    conn: &Connection,
    mine: &[u64],
    limits: &DumpLimits,
) -> Result<GcReport, GcError> {
    let survey = survey(conn, limits)?;
    Ok(collect(conn, &survey, mine))
}

/// `lego pool gc --heap ID`: deletes heap `heap_id` on the server, its pages and its lease,
/// when it is seeded (waiting for a restore that will not come) or orphaned; a heap whose
/// lease says a process runs or restores it is kept (`heaps_live`). The lease goes first, by
/// compare and swap with the token read here: a restore that claimed it since changed the
/// token, so the lease stays and so do the pages (`heaps_live`); once the lease is gone a
/// restore is refused instead of finding half the pages. `heaps_found` is 0 when the server
/// holds nothing of the heap.
pub fn collect_heap(
    conn: &Connection,
    heap_id: u64,
    limits: &DumpLimits,
) -> Result<GcReport, GcError> {
    collect_heap_then(conn, heap_id, limits, &mut || {})
}

/// [`collect_heap`], calling `after_read` between reading the lease and deleting it (tests
/// race a restore there).
fn collect_heap_then(
    conn: &Connection,
    heap_id: u64,
    limits: &DumpLimits,
    after_read: &mut dyn FnMut(),
) -> Result<GcReport, GcError> {
    let survey = survey(conn, limits)?;
    let mut report = GcReport {
        heaps_found: 0,
        cut: survey.cut,
        ..GcReport::default()
    };
    let Some(heap) = survey.heaps.get(&heap_id) else {
        return Ok(report);
    };
    report.heaps_found = 1;
    let lease = lease::read(conn, heap_id).map_err(GcError::Leases)?;
    if let Some(read) = &lease {
        if !read.holder.seeded {
            report.heaps_live += 1;
            return Ok(report);
        }
        after_read();
        if !lease::delete_if_unchanged(conn, heap_id, read.cas).map_err(GcError::Leases)? {
            // Claimed by a restore (or renewed) since it was read: not this collection's.
            report.heaps_live += 1;
            return Ok(report);
        }
        report.keys_deleted += 1;
        report.bytes_freed += heap.lease_bytes;
    }
    let (deleted, bytes) = delete_pages(conn, heap_id, &heap.pages)?;
    report.heaps_collected += 1;
    report.keys_deleted += deleted;
    report.keys_kept += heap.pages.len() as u64 - deleted;
    report.bytes_freed += bytes;
    Ok(report)
}

/// Deletes `pages` of `heap_id` while each is the value the dump saw. Returns how many were
/// deleted and their bytes.
fn delete_pages(
    conn: &Connection,
    heap_id: u64,
    pages: &[StoredPage],
) -> Result<(u64, u64), GcError> {
    let (mut deleted, mut bytes) = (0, 0);
    for chunk in pages.chunks(PIPELINE_REQUESTS_MAX) {
        let mut request = Vec::with_capacity(chunk.len() * 64);
        for (k, p) in chunk.iter().enumerate() {
            let opaque = u32::try_from(k).expect("a pipeline's requests are counted in u32");
            let key = match p.parity {
                None => keys::page_key(heap_id, p.page),
                Some(slot) => keys::parity_key(heap_id, p.page, slot),
            };
            protocol::delete_if(&mut request, &key, p.cas, opaque);
        }
        protocol::noop(&mut request);
        // Quiet: only a page not deleted answers (NF gone, EX changed since the dump).
        let mut kept = vec![false; chunk.len()];
        conn.pipeline(&request, |reply| {
            if let Reply::NotDone {
                opaque: Some(opaque),
            } = reply
            {
                if let Some(slot) = usize::try_from(opaque).ok().and_then(|k| kept.get_mut(k)) {
                    *slot = true;
                }
            }
        })
        .map_err(|source| GcError::Delete {
            heap_id,
            server: conn.name.clone(),
            source,
        })?;
        for (p, kept) in chunk.iter().zip(&kept) {
            if !kept {
                deleted += 1;
                bytes += p.size;
            }
        }
    }
    Ok((deleted, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memcached::lease::renew;
    use crate::store::memcached::test_server::TestServer;
    use crate::store::memcached::VALUE_BYTES;

    /// Writes `keys` with page-sized values, as any client could (no lease).
    fn write_raw(conn: &Connection, keys: &[String]) {
        let mut request = Vec::new();
        for (k, key) in keys.iter().enumerate() {
            let value = vec![u8::try_from(k % 251).expect("below 251"); VALUE_BYTES];
            protocol::set(&mut request, key, &value, 0);
        }
        protocol::noop(&mut request);
        let mut refused = 0;
        conn.pipeline(&request, |reply| {
            refused += u32::from(matches!(reply, Reply::NotDone { .. }));
        })
        .expect("writing");
        assert_eq!(refused, 0, "every key stored");
    }

    /// Which of `keys` the server holds.
    fn present(conn: &Connection, keys: &[String]) -> Vec<bool> {
        let mut request = Vec::new();
        for (k, key) in keys.iter().enumerate() {
            protocol::get(&mut request, key, u32::try_from(k).expect("few keys"));
        }
        protocol::noop(&mut request);
        let mut found = vec![false; keys.len()];
        conn.pipeline(&request, |reply| {
            if let Reply::Value { opaque, .. } = reply {
                found[usize::try_from(opaque).expect("small")] = true;
            }
        })
        .expect("reading");
        found
    }

    fn pages_of(heap_id: u64, count: u64) -> Vec<String> {
        (0..count).map(|p| keys::page_key(heap_id, p)).collect()
    }

    /// A live heap (its lease taken), an orphaned one, the caller's own (no lease: it is
    /// named as mine) and keys of other programs, some looking almost like lego's: the
    /// collection deletes exactly the orphan's pages.
    #[test]
    fn gc_deletes_exactly_the_orphaned_heaps_pages() {
        let server = TestServer::start(64, false);
        let conn = Connection::new(&server.addr, 2000).expect("an address");
        let (live, orphan, mine) = (0xa11e, 0x0e0e, 0x3333);
        renew(&conn, live, 60).expect("taking the live heap's lease");
        write_raw(&conn, &pages_of(live, 20));
        write_raw(&conn, &pages_of(orphan, 30));
        write_raw(&conn, &pages_of(mine, 5));
        let others: Vec<String> = [
            "session:42",
            "lego:0e0e:1",
            "lego:0000000000000e0e:01",
            "lego:0000000000000e0e:x",
            "lego:0000000000000E0E:1",
            "xlego:0000000000000e0e:1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        write_raw(&conn, &others);

        let s = survey(&conn, &DumpLimits::COMMAND).expect("a dump");
        assert_eq!(s.cut, None);
        assert_eq!(s.heaps.len(), 3, "{:?}", s.heaps.keys());
        assert!(s.heaps[&live].lease_seen && s.heaps[&live].lease_exp.is_some());
        assert_eq!(s.heaps[&live].items(), 21);
        assert_eq!(s.heaps[&orphan].items(), 30);
        assert!(!s.heaps[&orphan].lease_seen);
        assert_eq!(s.other_items, others.len() as u64);
        assert_eq!(s.unreadable_lines, 0);
        let orphan_bytes = s.heaps[&orphan].bytes();
        assert!(orphan_bytes >= 30 * VALUE_BYTES as u64);

        let report = collect(&conn, &s, &[mine]);
        assert!(report.failure.is_none(), "{:?}", report.failure);
        assert_eq!(
            (
                report.heaps_found,
                report.heaps_live,
                report.heaps_mine,
                report.heaps_collected
            ),
            (3, 1, 1, 1)
        );
        assert_eq!((report.keys_deleted, report.keys_kept), (30, 0));
        assert_eq!(report.bytes_freed, orphan_bytes);

        assert!(present(&conn, &pages_of(orphan, 30)).iter().all(|&p| !p));
        assert!(present(&conn, &pages_of(live, 20)).iter().all(|&p| p));
        assert!(present(&conn, &[keys::lease_key(live)])[0]);
        assert!(present(&conn, &pages_of(mine, 5)).iter().all(|&p| p));
        assert!(present(&conn, &others).iter().all(|&p| p));

        // A second collection finds nothing more to free.
        let again = collect_orphans(&conn, &[mine], &DumpLimits::COMMAND).expect("a dump");
        assert_eq!((again.heaps_found, again.heaps_collected), (2, 0));
        assert_eq!(again.keys_deleted, 0);
    }

    /// A heap seeded from a log (`lego replay --to`) has a lease without a time to live: no
    /// collection frees it, however long it waits for its restore.
    #[test]
    fn gc_leaves_a_seeded_heap_alone() {
        let server = TestServer::start(64, false);
        let conn = Connection::new(&server.addr, 2000).expect("an address");
        let (seeded, orphan) = (0x5eed, 0x0e0e);
        lease::seed(&conn, seeded).expect("seeding");
        write_raw(&conn, &pages_of(seeded, 25));
        write_raw(&conn, &pages_of(orphan, 3));
        let s = survey(&conn, &DumpLimits::COMMAND).expect("a dump");
        assert!(s.heaps[&seeded].lease_seen);
        assert_eq!(
            s.heaps[&seeded].lease_exp, None,
            "a seeded lease never expires"
        );
        let report = collect(&conn, &s, &[]);
        assert!(report.failure.is_none(), "{:?}", report.failure);
        assert_eq!((report.heaps_live, report.heaps_collected), (1, 1));
        assert!(present(&conn, &pages_of(seeded, 25)).iter().all(|&p| p));
        assert!(present(&conn, &pages_of(orphan, 3)).iter().all(|&p| !p));

        // Asked by name, the seeded heap goes (pages and lease); a running one stays.
        let running = 0xbeef;
        renew(&conn, running, 60).expect("taking a lease");
        write_raw(&conn, &pages_of(running, 4));
        let kept = collect_heap(&conn, running, &DumpLimits::COMMAND).expect("a dump");
        assert_eq!((kept.heaps_live, kept.heaps_collected), (1, 0));
        assert!(present(&conn, &pages_of(running, 4)).iter().all(|&p| p));
        let gone = collect_heap(&conn, seeded, &DumpLimits::COMMAND).expect("a dump");
        assert_eq!((gone.heaps_collected, gone.keys_deleted), (1, 26));
        assert!(present(&conn, &pages_of(seeded, 25)).iter().all(|&p| !p));
        assert!(!present(&conn, &[keys::lease_key(seeded)])[0]);
        // A heap the server holds nothing of is not found.
        let none = collect_heap(&conn, 0x404, &DumpLimits::COMMAND).expect("a dump");
        assert_eq!((none.heaps_found, none.heaps_collected), (0, 0));
    }

    /// `lego pool gc --heap` racing a restore: the restore claims the seeded lease between
    /// the collection's read of it and its delete; the delete (by CAS) fails and the pages
    /// stay, for the restore.
    #[test]
    fn gc_of_a_seeded_heap_keeps_it_when_a_restore_claims_it_meanwhile() {
        let server = TestServer::start(64, false);
        let conn = Connection::new(&server.addr, 2000).expect("an address");
        let seeded = 0x5eed;
        lease::seed(&conn, seeded).expect("seeding");
        write_raw(&conn, &pages_of(seeded, 6));
        let report = collect_heap_then(&conn, seeded, &DumpLimits::COMMAND, &mut || {
            let read = lease::read(&conn, seeded)
                .expect("reading")
                .expect("a lease");
            assert!(lease::claim(&conn, seeded, read.cas).expect("claiming"));
        })
        .expect("a dump");
        assert_eq!((report.heaps_live, report.heaps_collected), (1, 0));
        assert_eq!(report.keys_deleted, 0);
        assert!(present(&conn, &pages_of(seeded, 6)).iter().all(|&p| p));
        let holder = lease::read(&conn, seeded)
            .expect("reading")
            .expect("a lease");
        assert!(holder.holder.restoring, "{holder:?}");
    }

    /// The dump is only a snapshot: a heap that took its lease since, and a page written again
    /// since, are kept; a heap whose lease expired is collected.
    #[test]
    fn gc_keeps_what_changed_since_the_dump_and_takes_expired_leases() {
        let server = TestServer::start(64, false);
        let conn = Connection::new(&server.addr, 2000).expect("an address");
        let (late, rewritten, expiring) = (0x1a7e, 0x0b0b, 0xe4e4);
        write_raw(&conn, &pages_of(late, 4));
        write_raw(&conn, &pages_of(rewritten, 4));
        renew(&conn, expiring, 1).expect("a short lease");
        write_raw(&conn, &pages_of(expiring, 3));
        let s = survey(&conn, &DumpLimits::COMMAND).expect("a dump");
        assert!(s.heaps[&expiring].lease_seen);

        renew(&conn, late, 60).expect("a lease after the dump");
        write_raw(&conn, &pages_of(rewritten, 1));
        let report = collect(&conn, &s, &[]);
        assert!(report.failure.is_none(), "{:?}", report.failure);
        assert_eq!((report.heaps_live, report.heaps_collected), (2, 1));
        assert_eq!((report.keys_deleted, report.keys_kept), (3, 1));
        assert!(present(&conn, &pages_of(late, 4)).iter().all(|&p| p));
        assert_eq!(
            present(&conn, &pages_of(rewritten, 4)),
            vec![true, false, false, false],
            "the page written again since the dump is kept"
        );

        // Once its lease has expired, the heap is an orphan like any other (and the page of
        // `rewritten` kept last time goes now).
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut deleted = 0;
        while present(&conn, &pages_of(expiring, 3)).iter().any(|&p| p) {
            assert!(Instant::now() < deadline, "the lease never expired");
            std::thread::sleep(Duration::from_millis(250));
            let report = collect_orphans(&conn, &[], &DumpLimits::COMMAND).expect("a dump");
            assert!(report.failure.is_none(), "{:?}", report.failure);
            deleted += report.keys_deleted;
        }
        assert_eq!(deleted, 1 + 3, "rewritten's last page and expiring's");
        assert!(present(&conn, &pages_of(expiring, 3)).iter().all(|&p| !p));
        assert!(present(&conn, &pages_of(late, 4)).iter().all(|&p| p));
    }

    /// A dump cut at its bound says so, and still collects only orphans.
    #[test]
    fn a_cut_dump_is_reported_and_stays_safe() {
        let server = TestServer::start(64, false);
        let conn = Connection::new(&server.addr, 2000).expect("an address");
        let (live, orphan) = (0x1, 0x2);
        renew(&conn, live, 60).expect("a lease");
        write_raw(&conn, &pages_of(live, 10));
        write_raw(&conn, &pages_of(orphan, 10));
        let limits = DumpLimits {
            lines_max: 5,
            duration_ms: 10_000,
        };
        let s = survey(&conn, &limits).expect("a dump");
        assert_eq!(s.cut, Some(DumpCut::Lines));
        let seen: u64 = s.heaps.values().map(HeapSurvey::items).sum();
        assert_eq!(seen, 5);
        let report = collect(&conn, &s, &[]);
        assert!(report.failure.is_none(), "{:?}", report.failure);
        assert_eq!(report.cut, Some(DumpCut::Lines));
        assert!(present(&conn, &pages_of(live, 10)).iter().all(|&p| p));
        assert!(report.keys_deleted <= 5);
    }

    #[test]
    fn a_server_that_does_not_answer_is_an_error() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .to_string();
        let conn = Connection::new(&addr, 500).expect("an address");
        let e = survey(&conn, &DumpLimits::COMMAND).expect_err("nothing listens");
        assert!(
            e.to_string().contains(&addr) && e.to_string().contains("metadump"),
            "{e}"
        );
    }
}
