//! The kernel side of the pager: the heap's region and its userfaultfd, the staging
//! userfaultfd, the `PAGEMAP_SCAN` scanner, and the `events` lock that orders reading events
//! against installing pages; reading events and applying the non-fault ones (`REMOVE`,
//! `UNMAP`, `REMAP`) to the page table; and the faults a thread read but was not going to
//! serve, handed to the handlers.
//!
//! Rules: events are read only with the `events` lock held for writing, and the non-fault
//! ones are applied to the table under that same hold ([`pump_events`]); every install holds
//! it for reading ([`Kernel::installing`]). A thread that reads fault messages it will not
//! serve defers them and kicks the handlers; it never drops them. Nothing here waits for
//! another runtime thread while holding the lock.

use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use userfaultfd::{Event, EventBuffer, FaultKind};

use super::{discard, Shared, EVENTS_PER_READ_MAX, STATS};
use crate::logging::RateLimit;
use crate::region::Region;
use crate::stats::Counter;
use crate::uffd::{Kick, PagemapScanner, Userfault};
use crate::PAGE_SIZE;

/// Failures reading events or installing pages: at most this many a second are logged.
pub(super) static FAULT_ERRORS: RateLimit = RateLimit::new(8);

/// The heap's address space as the kernel sees it, and the lock that orders events and
/// installs.
pub(super) struct Kernel {
    pub(super) region: Region,
    pub(super) uffd: Userfault,
    /// A second userfaultfd, with no events, for the areas pages are moved out into (the
    /// evictor's staging, discard's scratch, the epoch snapshot): pages moved there are
    /// dropped with `MADV_DONTNEED`, which on the heap's userfaultfd would send a `REMOVE`.
    pub(super) staging_uffd: Userfault,
    pub(super) scanner: PagemapScanner,
    /// Readers: installs. Writer: reading events and applying the non-fault ones.
    events: RwLock<()>,
    /// Faults read by a thread that was not going to handle them (see [`pump_for_install`]).
    deferred: Mutex<Vec<usize>>,
    /// Wakes the handlers when `deferred` gets work.
    kick: Kick,
}

impl Kernel {
    pub(super) fn new(
        region: Region,
        uffd: Userfault,
        staging_uffd: Userfault,
        scanner: PagemapScanner,
        kick: Kick,
    ) -> Kernel {
        Kernel {
            region,
            uffd,
            staging_uffd,
            scanner,
            events: RwLock::new(()),
            deferred: Mutex::new(Vec::new()),
            kick,
        }
    }

    pub(super) fn page_of(&self, addr: usize) -> usize {
        (addr - self.region.base) / PAGE_SIZE
    }

    pub(super) fn addr_of(&self, page: usize) -> usize {
        self.region.base + page * PAGE_SIZE
    }

    /// The `events` lock for reading: held around every `UFFDIO_COPY` into the heap.
    pub(super) fn installing(&self) -> RwLockReadGuard<'_, ()> {
        self.events.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The `events` lock for writing: reading events and applying them, discards, the cut.
    pub(super) fn applying_events(&self) -> RwLockWriteGuard<'_, ()> {
        self.events.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout_ms` until the userfaultfd is readable or the handlers are kicked.
    pub(super) fn wait_readable(&self, timeout_ms: i32) -> bool {
        self.uffd.wait_readable(&self.kick, timeout_ms)
    }

    /// Hands `faults` to the handlers and wakes them.
    pub(super) fn defer(&self, faults: Vec<usize>) {
        self.deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(faults);
        self.kick.signal();
    }

    pub(super) fn take_deferred(&self) -> Vec<usize> {
        std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Reads every ready event with the `events` lock held for writing, applies the non-fault
/// events to the page table at once, and appends the addresses of missing-page faults in the
/// region to `faults`.
pub(super) fn pump_events(sh: &Shared, buf: &mut EventBuffer, faults: &mut Vec<usize>) {
    let _w = sh.kernel.applying_events();
    pump_events_locked(sh, buf, faults);
}

/// [`pump_events`] for a caller that holds the `events` lock for writing already (the epoch
/// cut).
pub(super) fn pump_events_locked(sh: &Shared, buf: &mut EventBuffer, faults: &mut Vec<usize>) {
    let k = &sh.kernel;
    let mut events: Vec<Event> = Vec::with_capacity(EVENTS_PER_READ_MAX);
    loop {
        events.clear();
        if let Err(e) = k.uffd.read_ready(buf, &mut events) {
            if FAULT_ERRORS.allow() {
                log::error!("reading userfaultfd events failed: {e}");
            }
            return;
        }
        if events.is_empty() {
            return;
        }
        for ev in &events {
            match ev {
                Event::Pagefault { kind, addr, .. } => {
                    let addr = *addr as usize;
                    if !k.region.contains(addr) {
                        continue;
                    }
                    match kind {
                        FaultKind::Missing => faults.push(addr),
                        // Asynchronous write-protection resolves write faults in the kernel;
                        // such a message can only be stale. Waking is always safe.
                        _ => {
                            STATS.add(Counter::FaultsWriteProtect, 1);
                            let _ = k.uffd.wake(addr & !(PAGE_SIZE - 1), PAGE_SIZE);
                        }
                    }
                }
                Event::Remove { start, end } => {
                    STATS.add(Counter::EventsRemove, 1);
                    discard::forget_range(sh, *start as usize, *end as usize);
                }
                Event::Unmap { start, end } => {
                    STATS.add(Counter::EventsUnmap, 1);
                    log::warn!(
                        "the program unmapped {:#x}..{:#x} inside lego's heap region",
                        *start as usize,
                        *end as usize
                    );
                    discard::forget_range(sh, *start as usize, *end as usize);
                }
                Event::Remap { from, len, .. } => {
                    STATS.add(Counter::EventsRemap, 1);
                    log::warn!(
                        "the program moved {len} bytes at {:#x} out of lego's heap region with mremap",
                        *from as usize
                    );
                    discard::forget_range(sh, *from as usize, *from as usize + len);
                }
                // Forks with lego's atfork handlers are read by `lego-fork` (the forking
                // thread holds this lock meanwhile); one read here skipped them (`_Fork`, a
                // raw `clone`): dropping its descriptor leaves the child's region ordinary
                // memory, reading zeros where pages were evicted.
                // (The descriptor closes when `events` is cleared.)
                Event::Fork { .. } => {
                    if FAULT_ERRORS.allow() {
                        log::warn!(
                            "a fork without lego's atfork handlers: the child reads zeros where \
                             the heap's pages were evicted"
                        );
                    }
                }
            }
        }
    }
}

/// Called when the kernel refused an install with `EAGAIN` because a non-fault event (a
/// program's `madvise` or `munmap`) waits to be read: reads and applies it, keeps the faults
/// read along the way for the handlers, and wakes them.
pub(super) fn pump_for_install(sh: &Shared) {
    let mut buf = EventBuffer::new(EVENTS_PER_READ_MAX);
    let mut faults = Vec::new();
    pump_events(sh, &mut buf, &mut faults);
    if !faults.is_empty() {
        sh.kernel.defer(faults);
    }
    std::thread::yield_now();
}
