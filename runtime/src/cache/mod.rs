//! The DRAM cache's bookkeeping: one entry per page of the region saying where its content is
//! (never written, resident, in the store, or on its way between them), the checksum of the
//! copy in the store, how many pages are resident, and which resident pages to evict next.
//!
//! Rules: every state change happens with the [`Cache`] lock held, and the resident count is
//! changed in the same critical section as the states it counts, so it can never drift. A page
//! in a transit state (`Filling`, `Fetching`, `Evicting`) belongs to the one thread that put it
//! there; nobody else changes it but to set the `REMOVED` flag, which the owner honours when it
//! finishes. This module does no I/O; its only system call reserves the table's memory at
//! start (see `array`): the table has an entry for every page of the heap, but its memory is
//! committed only as the used part of the heap grows. With a log, the table also keeps the
//! durable heap's dirty set (`dirty`).

pub(crate) mod array;
mod dirty;

use std::sync::{Mutex, MutexGuard};

use thiserror::Error;

use self::array::ZeroArray;
pub use self::dirty::PageSet;
use crate::region::RegionError;
use crate::PAGE_SIZE;

/// Bytes of address space the table reserves per page of the heap: a state word and a CRC.
pub const TABLE_BYTES_PER_PAGE: usize = std::mem::size_of::<u16>() + std::mem::size_of::<u32>();
/// Most address space the table may reserve, in bytes (touched only where the heap is used).
pub const TABLE_BYTES_MAX: usize = 64 << 30;
/// Largest table, in pages.
pub const TABLE_PAGES_MAX: usize = TABLE_BYTES_MAX / TABLE_BYTES_PER_PAGE;

/// Why a page table could not be made.
#[derive(Debug, Error)]
pub enum CacheError {
    #[error(
        "a page table for {pages} pages is too large: at most {TABLE_PAGES_MAX} pages \
         ({TABLE_BYTES_MAX} bytes of table) are supported"
    )]
    TooLarge { pages: usize },
    #[error("cannot reserve the page table for {pages} pages")]
    Reserve {
        pages: usize,
        #[source]
        source: RegionError,
    },
}

// The largest accepted heap (8 TiB: 12 GiB of table) has a table.
const _: () = assert!(crate::config::HEAP_BYTES_MAX / PAGE_SIZE as u64 <= TABLE_PAGES_MAX as u64);

/// Where a page's content is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// Never written, or discarded: it reads as zeros and is filled with zeros on first touch.
    Absent = 0,
    /// Mapped in the region (counted as resident).
    Resident = 1,
    /// Not mapped; the store holds it, with the checksum kept in the table.
    Evicted = 2,
    /// Being filled with zeros by a handler (counted as resident).
    Filling = 3,
    /// Being fetched from the store by a handler (counted as resident).
    Fetching = 4,
    /// Being moved out and written back by the evictor (counted as resident).
    Evicting = 5,
    /// Its content was lost (the store failed): every access raises `SIGBUS`.
    Poisoned = 6,
}

impl PageState {
    /// Whether a page in this state may move to `to`. Staying is always allowed. Absent,
    /// resident, evicted and poisoned pages may become absent (the program discarded them);
    /// the transit states (`Filling`, `Fetching`, `Evicting`) belong to one thread, which
    /// settles them.
    pub fn may_become(self, to: PageState) -> bool {
        use PageState::*;
        self == to
            || matches!(
                (self, to),
                (Absent, Filling | Resident | Evicted)
                    | (Resident | Evicted | Poisoned, Absent)
                    | (Filling, Resident | Absent | Poisoned)
                    // Evicting or an epoch's snapshot put back (`Filling` from `Resident`).
                    | (Resident, Evicting | Filling)
                    | (Evicting, Resident | Evicted | Absent | Poisoned)
                    | (Evicted, Fetching | Poisoned)
                    | (Fetching, Resident | Evicted | Absent | Poisoned)
            )
    }
}

const STATE_MASK: u16 = 0b111;
/// Flag: the program discarded the page (`madvise`, `free` of a large run) while it was in a
/// transit state; the owner turns it `Absent` when it finishes.
pub const REMOVED: u16 = 1 << 3;
/// Flag: the store holds a copy of this page whose CRC32C is in the checksum table. For a
/// resident page it means the copy may equal the page (clean) if it was not written since.
pub const STORED: u16 = 1 << 4;
/// Flag: second chance for the clock: set when the page is installed or found written.
pub const REFERENCED: u16 = 1 << 5;
/// Flag: the page's content is in the restore image (`LEGO_RESTORE`) and nowhere else yet; its
/// checksum is not in the table (replay checked the log's checksums when it built the image).
pub const IMAGE: u16 = 1 << 6;
// Bit 7 was `LOGDIRTY`: whether a page is log-dirty is now the table's dirty set
// ([`Table::set_log_dirty`], `dirty.rs`).
/// Flag: the epoch being written reads this evicted page's copy from the store: the evictor
/// leaves the page alone and a discard keeps the store's copy until the epoch has it.
pub const LOGHOLD: u16 = 1 << 8;
/// Flag: a `Resident` page that an epoch cut moved into its snapshot slot and has not put back
/// yet: it is not in the region, and a fault on it copies it back from the slot.
pub const SNAP: u16 = 1 << 9;
/// Flag: the page belongs to a mapping the shim serves (`LEGO_MMAP`), for the statistics.
pub const MAPPED: u16 = 1 << 10;
/// Flag: the page's protection is not read-write (a served mapping's `mprotect`): the evictor
/// never picks it (`UFFDIO_MOVE` moves only between writable areas), and no fault run crosses
/// it (a run is copied into one VMA, and a protection change splits the VMA there).
pub const PINNED: u16 = 1 << 11;

impl PageState {
    fn from_bits(bits: u16) -> PageState {
        match bits & STATE_MASK {
            0 => PageState::Absent,
            1 => PageState::Resident,
            2 => PageState::Evicted,
            3 => PageState::Filling,
            4 => PageState::Fetching,
            5 => PageState::Evicting,
            _ => PageState::Poisoned,
        }
    }

    /// True for the states whose page occupies (or is about to occupy) DRAM.
    pub fn counts_resident(self) -> bool {
        matches!(
            self,
            PageState::Resident | PageState::Filling | PageState::Fetching | PageState::Evicting
        )
    }
}

/// The page table and the counters, guarded by the cache lock.
pub struct Table {
    entries: ZeroArray<u16>,
    crcs: ZeroArray<u32>,
    /// The version of each page's store copy: a per-page counter, 0 until first stored.
    versions: ZeroArray<u32>,
    resident: usize,
    /// Pages not `Absent` (the heap's live size, for the log's default limit).
    live: usize,
    /// Clock hand: the page index where the next victim search starts.
    hand: usize,
    /// One past the highest page index ever made resident: the clock never looks beyond it.
    high: usize,
    /// The pages changed since the log last recorded them, when the heap has a log.
    log_dirty: Option<PageSet>,
}

impl Table {
    pub fn state(&self, page: usize) -> PageState {
        PageState::from_bits(self.entries[page])
    }

    pub fn flags(&self, page: usize) -> u16 {
        self.entries[page] & !STATE_MASK
    }

    pub fn has_flag(&self, page: usize, flag: u16) -> bool {
        self.entries[page] & flag != 0
    }

    pub fn set_flag(&mut self, page: usize, flag: u16, on: bool) {
        if on {
            self.entries[page] |= flag;
        } else {
            self.entries[page] &= !flag;
        }
    }

    /// Moves `page` to `state`, keeping its flags, and keeps the resident count exact. Only the
    /// transitions of the page's life cycle are accepted ([`PageState::may_become`]); any other
    /// is a bug in the pager, and stops the process before it can serve a wrong page.
    pub fn set_state(&mut self, page: usize, state: PageState) {
        let old = self.state(page);
        assert!(
            old.may_become(state),
            "page {page}: a {old:?} page cannot become {state:?}"
        );
        match (old.counts_resident(), state.counts_resident()) {
            (false, true) => {
                self.resident += 1;
                self.high = self.high.max(page + 1);
            }
            (true, false) => self.resident -= 1,
            _ => {}
        }
        match (old == PageState::Absent, state == PageState::Absent) {
            (true, false) => self.live += 1,
            (false, true) => self.live -= 1,
            _ => {}
        }
        self.entries[page] = (self.entries[page] & !STATE_MASK) | state as u16;
    }

    pub fn crc(&self, page: usize) -> u32 {
        self.crcs[page]
    }

    /// The version of the page's store copy (0: never stored).
    pub fn version(&self, page: usize) -> u32 {
        self.versions[page]
    }

    /// The version the page's next store copy gets: one more than the last, never 0 (after
    /// 2^32 - 1 writes of one page it wraps; a store copy that old is long overwritten).
    pub fn next_version(&self, page: usize) -> u32 {
        self.versions[page].wrapping_add(1).max(1)
    }

    /// Records that `version` of the page was handed out, for a write that may or may not have
    /// reached the store: the next one gets a later version.
    pub fn use_version(&mut self, page: usize, version: u32) {
        self.versions[page] = version;
    }

    /// Records that the store holds `version` of the page, with checksum `crc`.
    pub fn set_stored(&mut self, page: usize, crc: u32, version: u32) {
        debug_assert_ne!(version, 0, "a stored page has a version");
        self.crcs[page] = crc;
        self.versions[page] = version;
        self.set_flag(page, STORED, true);
    }

    pub fn forget_stored(&mut self, page: usize) {
        self.set_flag(page, STORED, false);
    }

    pub fn resident(&self) -> usize {
        self.resident
    }

    /// Pages that are not `Absent`: resident, evicted, in transit or poisoned.
    pub fn live(&self) -> usize {
        self.live
    }

    pub fn pages(&self) -> usize {
        self.entries.len()
    }

    /// Counts `page` as used (for a page that becomes `Evicted` without ever being resident:
    /// a restored heap's pages), so that scans over the used part of the table see it.
    pub fn note_used(&mut self, page: usize) {
        self.high = self.high.max(page + 1);
    }

    /// One past the highest page index ever made resident (or noted used).
    pub fn high(&self) -> usize {
        self.high
    }

    /// Length of the run starting at `page` (at most `max` pages) whose pages are all in a
    /// state accepted by `accept` and not [`PINNED`] (a run is installed into one VMA).
    pub fn run_len(&self, page: usize, max: usize, accept: impl Fn(PageState) -> bool) -> usize {
        let end = (page + max).min(self.entries.len());
        (page..end)
            .take_while(|&p| accept(self.state(p)) && !self.has_flag(p, PINNED))
            .count()
    }

    /// Length of the run ending just before `page` (at most `max` pages, going down) whose
    /// pages are all in a state accepted by `accept` and not [`PINNED`].
    pub fn run_len_before(
        &self,
        page: usize,
        max: usize,
        accept: impl Fn(PageState) -> bool,
    ) -> usize {
        (page.saturating_sub(max)..page)
            .rev()
            .take_while(|&p| accept(self.state(p)) && !self.has_flag(p, PINNED))
            .count()
    }

    /// Chooses up to `max` resident pages to evict with the clock algorithm (a page whose
    /// `REFERENCED` flag is set gets a second chance: the flag is cleared and the page kept),
    /// marks them `Evicting` and appends their indexes to `out`, sorted. Gives up after two
    /// sweeps over the used part of the table.
    pub fn pick_victims(&mut self, max: usize, out: &mut Vec<usize>) {
        self.pick_victims_where(max, out, false);
    }

    /// [`Table::pick_victims`], skipping log-dirty pages when `log_clean_only` (the log must
    /// hold a page's content before it is evicted: see the pager's `log_first`).
    pub fn pick_victims_where(&mut self, max: usize, out: &mut Vec<usize>, log_clean_only: bool) {
        let start_len = out.len();
        if self.high == 0 {
            return;
        }
        let mut visited = 0;
        let limit = self.high * 2;
        while out.len() - start_len < max && visited < limit {
            if self.hand >= self.high {
                self.hand = 0;
            }
            let p = self.hand;
            self.hand += 1;
            visited += 1;
            if self.state(p) != PageState::Resident || self.has_flag(p, LOGHOLD | SNAP | PINNED) {
                continue;
            }
            if log_clean_only && self.is_log_dirty(p) {
                continue;
            }
            if self.has_flag(p, REFERENCED) {
                self.set_flag(p, REFERENCED, false);
                continue;
            }
            self.set_state(p, PageState::Evicting);
            out.push(p);
        }
        out[start_len..].sort_unstable();
    }
}

/// The cache: its page table behind one lock, and its capacity.
pub struct Cache {
    table: Mutex<Table>,
    capacity_pages: usize,
}

impl Cache {
    /// A cache of `capacity_pages` over a region of `pages` pages (at most
    /// [`TABLE_PAGES_MAX`]), all `Absent`; with `track_log_dirty` (the heap has a log) its
    /// table keeps the dirty set, empty at first.
    pub fn new(
        pages: usize,
        capacity_pages: usize,
        track_log_dirty: bool,
    ) -> Result<Cache, CacheError> {
        assert!(
            capacity_pages > 0,
            "a cache needs room for at least one page"
        );
        if pages > TABLE_PAGES_MAX {
            return Err(CacheError::TooLarge { pages });
        }
        let reserve_err = |source| CacheError::Reserve { pages, source };
        Ok(Cache {
            table: Mutex::new(Table {
                entries: ZeroArray::new(pages).map_err(reserve_err)?,
                crcs: ZeroArray::new(pages).map_err(reserve_err)?,
                versions: ZeroArray::new(pages).map_err(reserve_err)?,
                resident: 0,
                live: 0,
                hand: 0,
                high: 0,
                log_dirty: if track_log_dirty {
                    Some(PageSet::new(pages).map_err(reserve_err)?)
                } else {
                    None
                },
            }),
            capacity_pages,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Table> {
        // A poisoned lock means a runtime thread panicked, which aborts the process
        // (panic = "abort"); recovering the guard is then moot but harmless.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn capacity_pages(&self) -> usize {
        self.capacity_pages
    }

    /// In a forked child: a cache of `capacity_pages` over the table the child inherited (the
    /// parent's at the fork, copied with the rest of its memory); `installed` pages, which the
    /// parent put into the child's region before the child's runtime ran, are resident.
    ///
    /// # Safety
    /// Only in a forked child while it has one thread, with nobody holding the lock (the parent
    /// held it across the fork and the child released it); `self` must never be used or dropped
    /// afterwards: the new cache owns the table's memory.
    pub unsafe fn inherit(&self, capacity_pages: usize, installed: &[u64]) -> Cache {
        assert!(
            capacity_pages > 0,
            "a cache needs room for at least one page"
        );
        let guard = self.lock();
        // SAFETY: a bitwise copy of the table; the caller guarantees the original is never
        // used or dropped again, so the copy is the only owner of its arrays.
        let mut table: Table = unsafe { std::ptr::read(&*guard) };
        drop(guard);
        for &p in installed {
            let Ok(p) = usize::try_from(p) else { continue };
            if p >= table.pages() {
                continue;
            }
            match table.state(p) {
                PageState::Evicted => {
                    table.set_state(p, PageState::Fetching);
                    table.set_state(p, PageState::Resident);
                }
                PageState::Absent => {
                    table.set_state(p, PageState::Filling);
                    table.set_state(p, PageState::Resident);
                }
                _ => {}
            }
        }
        Cache {
            table: Mutex::new(table),
            capacity_pages,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_life_cycle_transitions_are_allowed() {
        use PageState::*;
        let all = [
            Absent, Resident, Evicted, Filling, Fetching, Evicting, Poisoned,
        ];
        let allowed: Vec<(PageState, PageState)> = all
            .iter()
            .flat_map(|&a| all.iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| a != b && a.may_become(b))
            .collect();
        assert_eq!(allowed.len(), 21, "{allowed:?}");
        // A few that would lose data or skip an owner.
        assert!(
            !Evicted.may_become(Resident),
            "an evicted page is fetched first"
        );
        assert!(
            !Poisoned.may_become(Resident),
            "a lost page never comes back"
        );
        assert!(!Absent.may_become(Fetching), "nothing to fetch");
        assert!(!Evicting.may_become(Fetching));
    }

    #[test]
    #[should_panic(expected = "cannot become")]
    fn a_wrong_transition_stops_the_process() {
        let cache = Cache::new(8, 8, false).expect("reserve");
        let mut t = cache.lock();
        t.set_state(3, PageState::Evicted);
        t.set_state(3, PageState::Resident);
    }

    #[test]
    fn resident_count_follows_states() {
        let cache = Cache::new(16, 8, false).expect("reserve");
        let mut t = cache.lock();
        t.set_state(3, PageState::Filling);
        t.set_state(3, PageState::Resident);
        t.set_state(4, PageState::Evicted);
        t.set_state(4, PageState::Fetching);
        assert_eq!(t.resident(), 2);
        t.set_state(3, PageState::Evicting);
        t.set_state(3, PageState::Evicted);
        assert_eq!(t.resident(), 1);
        t.set_state(4, PageState::Absent);
        assert_eq!(t.resident(), 0);
        assert_eq!(t.live(), 1, "the evicted page 3 is live");
        t.set_state(3, PageState::Poisoned);
        assert_eq!(t.live(), 1);
        t.set_state(3, PageState::Absent);
        assert_eq!(t.live(), 0);
    }

    #[test]
    fn flags_survive_state_changes() {
        let cache = Cache::new(4, 4, false).expect("reserve");
        let mut t = cache.lock();
        t.set_stored(1, 0xdead_beef, 1);
        t.set_state(1, PageState::Resident);
        assert!(t.has_flag(1, STORED));
        assert_eq!(t.crc(1), 0xdead_beef);
        t.forget_stored(1);
        assert!(!t.has_flag(1, STORED));
        assert_eq!(t.state(1), PageState::Resident);
    }

    #[test]
    fn clock_gives_referenced_pages_a_second_chance() {
        let cache = Cache::new(8, 8, false).expect("reserve");
        let mut t = cache.lock();
        for p in 0..4 {
            t.set_state(p, PageState::Resident);
        }
        t.set_flag(1, REFERENCED, true);
        let mut v = Vec::new();
        t.pick_victims(2, &mut v);
        assert_eq!(v, vec![0, 2]);
        assert_eq!(t.state(0), PageState::Evicting);
        assert_eq!(t.state(1), PageState::Resident);
        v.clear();
        t.pick_victims(8, &mut v);
        assert_eq!(v, vec![1, 3]);
        assert_eq!(
            t.resident(),
            4,
            "evicting pages still count until written back"
        );
    }

    #[test]
    fn pinned_pages_are_never_victims_and_end_runs() {
        let cache = Cache::new(8, 8, false).expect("reserve");
        let mut t = cache.lock();
        for p in 0..4 {
            t.set_state(p, PageState::Resident);
        }
        t.set_flag(1, PINNED, true);
        let mut v = Vec::new();
        t.pick_victims(8, &mut v);
        assert_eq!(v, vec![0, 2, 3]);
        t.set_flag(6, PINNED, true);
        assert_eq!(t.run_len(4, 4, |s| s == PageState::Absent), 2);
        assert_eq!(t.run_len_before(8, 4, |s| s == PageState::Absent), 1);
    }

    #[test]
    fn clock_skips_non_resident_pages_and_stops() {
        let cache = Cache::new(8, 8, false).expect("reserve");
        let mut t = cache.lock();
        t.set_state(5, PageState::Evicted);
        t.set_state(5, PageState::Fetching);
        let mut v = Vec::new();
        t.pick_victims(4, &mut v);
        assert!(v.is_empty());
    }

    #[test]
    fn run_len_stops_at_other_states_and_table_end() {
        let cache = Cache::new(8, 8, false).expect("reserve");
        let mut t = cache.lock();
        t.set_state(3, PageState::Resident);
        assert_eq!(t.run_len(0, 16, |s| s == PageState::Absent), 3);
        assert_eq!(t.run_len(4, 16, |s| s == PageState::Absent), 4);
        assert_eq!(t.run_len(4, 2, |s| s == PageState::Absent), 2);
        assert_eq!(t.run_len_before(3, 16, |s| s == PageState::Absent), 3);
        assert_eq!(t.run_len_before(8, 16, |s| s == PageState::Absent), 4);
        assert_eq!(t.run_len_before(8, 2, |s| s == PageState::Absent), 2);
        assert_eq!(t.run_len_before(0, 16, |s| s == PageState::Absent), 0);
    }

    /// The table of a 4 TiB heap: pages far apart keep their state and checksum, the clock
    /// finds them, and the table's memory follows the pages used, not the heap's size.
    #[test]
    fn table_of_a_4_tib_heap_is_lazy() {
        let pages = (4usize << 40) / PAGE_SIZE;
        let cache = Cache::new(pages, 1024, true).expect("12 GiB of address space");
        let mut t = cache.lock();
        assert_eq!(t.pages(), pages);
        let used = [0, 1 << 20, 1 << 26, pages - 1];
        for (i, &p) in used.iter().enumerate() {
            t.set_state(p, PageState::Resident);
            t.set_stored(p, i as u32 + 1, 1);
            t.set_log_dirty(p);
        }
        assert_eq!(t.log_dirty_pages().collect::<Vec<_>>(), used);
        assert_eq!(t.high(), pages);
        assert_eq!(t.resident(), used.len());
        for (i, &p) in used.iter().enumerate() {
            assert_eq!(t.crc(p), i as u32 + 1);
            assert!(t.has_flag(p, STORED));
        }
        assert_eq!(t.state(pages / 2), PageState::Absent);
    }
}
