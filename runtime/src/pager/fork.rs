//! `fork` support. Two ways, chosen at each fork:
//! - **Served** (the heap's userfaultfd reports forks, `EVENT_FORK`, which needs
//!   `CAP_SYS_PTRACE`; the store can keep its copies for a child, `PageStore::fork_freeze`; no
//!   log and no restore image): nothing is paged in. The store freezes the copies it holds, the
//!   `lego-fork` thread reads the `FORK` event (the kernel does not return from `fork()` before
//!   somebody does), serves the faults the child takes before its own runtime runs from the
//!   parent's table, which stays as it was at the fork until the child is up, and hands the
//!   child's userfaultfd to the child over a socket (`handover.rs`). The child's runtime
//!   (`child.rs`) serves it from then on: its evicted pages are read from the copies frozen for
//!   it, its own evictions go to a store of its own.
//! - **Paged in** (otherwise): every evicted page is brought back before the fork, and the
//!   child's copy of the region is ordinary memory, served by nobody (`DETACHED` in the
//!   preload library). With `EVENT_FORK`, `lego-fork` closes the child's userfaultfd at once,
//!   which unregisters the child's region.
//!
//! Rules: the preload library takes the user heap's locks before [`Runtime::prepare_fork`] (they
//! may fault, so the handlers still run then) and the internal heap's after it. From prepare
//! until the parent's side is done, the gate is closed and the forking thread holds the `events`
//! lock for writing and (until the fork returns) the cache lock, so that the child inherits a
//! table nobody was changing and a lock nobody holds. Page-in ignores the cache size (the cache
//! may exceed it until the fork is over) and uses only the buffer mapped at start.

use std::cell::UnsafeCell;
use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex, MutexGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use userfaultfd::{Event, EventBuffer, FaultKind};

use super::buf::PageBuf;
use super::events::FAULT_ERRORS;
use super::fault::{plan_fault, Plan};
use super::fetch::fetch_in_chunks;
use super::handover::{self, ParentEnd};
use super::{PagerError, Runtime, Shared, EVENTS_PER_READ_MAX, FETCH_CHUNK_PAGES, STATS};
use crate::cache::{PageState, Table, IMAGE, SNAP};
use crate::stats::Counter;
use crate::store::PageRead;
use crate::uffd::{Kick, Userfault};
use crate::PAGE_SIZE;

/// Longest the parent waits for a served child to say it is up (or gone), in milliseconds:
/// the child's start is a few threads and a socket message, so only a stopped child (a
/// debugger) takes this long; the child is then given up (it reads zeros where pages were
/// evicted, and says so when it finally runs).
pub const CHILD_START_WAIT_MS_MAX: u64 = 30_000;
/// How often `lego-fork` looks again while it waits for the `FORK` event or the child, in
/// milliseconds (it is woken sooner by the event, the child or the forking thread).
const WATCH_POLL_MS: i32 = 100;
/// Most `REMOVE`/`UNMAP`/`REMAP` events kept while a fork is read: each comes from a program
/// thread that waits in its `madvise`, `munmap` or `mremap` until the event is read, so a
/// process has at most one per thread in flight.
pub const REMOVED_RANGES_MAX: usize = 4096;

/// What `lego-fork` and the forking thread share.
pub(super) struct ForkState {
    /// The buffer `fork` pages evicted pages in through (paged-in forks) and the child's
    /// first faults are read into (served forks).
    buf: Mutex<PageBuf>,
    /// Whether the heap's userfaultfd reports forks.
    events: bool,
    watch: Mutex<Watch>,
    changed: Condvar,
    /// Signalled by the forking thread once `fork()` returned: `lego-fork` reads what is left
    /// and answers whether a `FORK` event came.
    asked: Kick,
    /// The locks the forking thread holds across the fork.
    hold: Hold,
}

#[derive(Default)]
struct Watch {
    /// The fork being prepared, while `lego-fork` works on it.
    current: Option<Pending>,
    /// Set by `lego-fork` when it has read what the fork gave (the answer to `asked`).
    read: bool,
    /// Whether a `FORK` event came.
    forked: bool,
    /// Set by `lego-fork` when it is done with the child (handed over, or closed).
    done: bool,
    /// `REMOVE`/`UNMAP`/`REMAP` ranges read while waiting, applied after the fork (room for
    /// [`REMOVED_RANGES_MAX`] is reserved before the fork: `lego-fork` must not allocate until
    /// it has read the `FORK` event, since the forking thread holds the internal heap's locks).
    removed: Vec<(usize, usize)>,
    /// Ranges that did not fit in `removed`.
    removed_lost: usize,
}

impl Watch {
    fn keep_removed(&mut self, start: usize, end: usize) {
        if self.removed.len() < self.removed.capacity() {
            self.removed.push((start, end));
        } else {
            self.removed_lost += 1;
        }
    }
}

/// One fork in progress.
struct Pending {
    /// Served: the parent's end of the socket the child's userfaultfd goes over.
    served: Option<ParentEnd>,
}

/// The forking thread's hold of the `events` write lock and the cache lock, from
/// [`Runtime::prepare_fork`] to the end of the parent's side (events) or to the fork's return
/// (cache), on both sides of the fork.
struct Hold {
    locks: UnsafeCell<HeldLocks>,
}

#[derive(Default)]
struct HeldLocks {
    events: Option<RwLockWriteGuard<'static, ()>>,
    table: Option<MutexGuard<'static, Table>>,
    /// The generation pipe (read end: the parent's; write end: the child's) and the child's
    /// end of the socket, made in prepare.
    generation: Option<(OwnedFd, OwnedFd)>,
    child_end: Option<handover::ChildEnd>,
    served: bool,
}

// SAFETY: only the thread that forks touches `locks`, between `prepare_fork` and
// `after_fork_parent`/`after_fork_child`: glibc runs the atfork handlers of one fork at a time,
// and the gate (closed in prepare, opened only at the end of the parent's side) keeps a second
// prepare out until the first fork's parent side is done. The guards never leave that thread.
unsafe impl Sync for Hold {}
// SAFETY: as above; `Shared` is moved between threads only as an `Arc` built before any fork.
unsafe impl Send for Hold {}

impl Hold {
    /// # Safety
    /// Only the forking thread, between prepare and the end of either side of the fork.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self) -> &mut HeldLocks {
        // SAFETY: the caller is the only thread touching the locks (see `impl Sync`).
        unsafe { &mut *self.locks.get() }
    }
}

impl ForkState {
    pub(super) fn new(events: bool) -> Result<ForkState, PagerError> {
        let buf = PageBuf::new(FETCH_CHUNK_PAGES).map_err(|source| PagerError::Buffer {
            what: "buffer fork pages evicted pages in through".into(),
            source,
        })?;
        let asked = Kick::new().map_err(|source| PagerError::Thread {
            name: "eventfd of lego-fork".into(),
            source,
        })?;
        Ok(ForkState {
            buf: Mutex::new(buf),
            events,
            watch: Mutex::new(Watch::default()),
            changed: Condvar::new(),
            asked,
            hold: Hold {
                locks: UnsafeCell::new(HeldLocks::default()),
            },
        })
    }

    /// Whether forks are reported on the heap's userfaultfd (then `lego-fork` runs).
    pub(super) fn reports_forks(&self) -> bool {
        self.events
    }

    fn watch(&self) -> MutexGuard<'_, Watch> {
        self.watch.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How the child of a fork is served, as the preload library sees it after the fork.
pub enum ForkedChild {
    /// The child got every page before the fork; its region is ordinary memory.
    Detached,
    /// The child runs a runtime of its own (served fork), given here.
    Served(Box<Runtime>),
}

impl Runtime {
    /// Before `fork`: stops eviction and fault handling; when the fork cannot be served, brings
    /// every evicted page back, so that the child (whose copy of the region is then ordinary
    /// memory, no longer served by lego) sees exactly the parent's heap. The cache may exceed
    /// its size until the fork is over.
    pub fn prepare_fork(&'static self) {
        let sh: &'static Shared = &self.shared;
        sh.gate.close();
        let served = sh.fork.events
            && sh.durable.is_none()
            && sh.restore.is_none()
            && sh.store.fork_freeze();
        let mut pending = Pending { served: None };
        // SAFETY: this is the forking thread, in prepare.
        let held = unsafe { sh.fork.hold.get() };
        *held = HeldLocks::default();
        if served {
            match (handover::pair(), generation_pipe()) {
                (Ok((parent_end, child_end)), Ok(pipe)) => {
                    pending.served = Some(parent_end);
                    held.child_end = Some(child_end);
                    held.generation = Some(pipe);
                    held.served = true;
                }
                (Err(e), _) | (_, Err(e)) => {
                    log::warn!("this fork pages the heap in: cannot make its handover ({e})");
                    sh.store.fork_parent(None);
                }
            }
        }
        if !held.served {
            let mut buf = sh.fork.buf.lock().unwrap_or_else(|e| e.into_inner());
            page_in_everything(sh, &mut buf);
        }
        if sh.fork.events {
            held.events = Some(sh.kernel.applying_events());
            held.table = Some(sh.cache.lock());
            let mut w = sh.fork.watch();
            *w = Watch::default();
            w.removed.reserve(REMOVED_RANGES_MAX);
            w.current = Some(pending);
            drop(w);
            sh.fork.changed.notify_all();
        }
    }

    /// In the parent after `fork`: waits until the child has its userfaultfd (served forks),
    /// applies what the program did to the heap meanwhile, and resumes fault handling and
    /// eviction.
    pub fn after_fork_parent(&'static self) {
        let sh: &'static Shared = &self.shared;
        // SAFETY: this is the forking thread, after the fork, in the parent.
        let held = unsafe { sh.fork.hold.get() };
        drop(held.table.take());
        if sh.fork.events {
            // `fork()` has returned, so its `FORK` event was read: ask lego-fork what it got.
            sh.fork.asked.signal();
            let mut w = sh.fork.watch();
            while !w.read {
                w = sh.fork.changed.wait(w).unwrap_or_else(|e| e.into_inner());
            }
            if w.forked {
                while !w.done {
                    w = sh.fork.changed.wait(w).unwrap_or_else(|e| e.into_inner());
                }
            }
            let forked = w.forked;
            let removed = std::mem::take(&mut w.removed);
            let lost = w.removed_lost;
            w.current = None;
            drop(w);
            if lost > 0 {
                log::error!(
                    "{lost} madvise/munmap/mremap events during a fork did not fit the {REMOVED_RANGES_MAX} kept: \
                     those ranges may read their old bytes"
                );
            }
            for (start, end) in removed {
                super::discard::forget_range(sh, start, end);
            }
            drop(held.events.take());
            // The program's faults read during the fork were not kept (keeping them could
            // allocate): their threads are woken, and fault again.
            let region = &sh.kernel.region;
            let _ = sh.kernel.uffd.wake(region.base, region.len);
            if held.served {
                // The child holds the write end; the store keeps the copies frozen for it
                // until every process holding it is gone.
                let generation = held.generation.take().map(|(read, _write)| read);
                sh.store.fork_parent(if forked { generation } else { None });
                STATS.add(Counter::ForksServed, u64::from(forked));
            }
        }
        *held = HeldLocks::default();
        sh.gate.open();
        let _t = sh.cache.lock();
        sh.cache.want_eviction_all();
    }

    /// In the child after `fork` (one thread): a served child takes its userfaultfd from the
    /// parent and starts its own runtime, returned here; otherwise the child is detached.
    pub fn after_fork_child(
        &'static self,
        config: &crate::config::Config,
    ) -> Result<ForkedChild, PagerError> {
        let sh: &'static Shared = &self.shared;
        // SAFETY: this is the forking thread, after the fork, in the child (its only thread).
        let held = unsafe { sh.fork.hold.get() };
        // The inherited locks: released (nobody else in the child uses them).
        drop(held.table.take());
        drop(held.events.take());
        if !held.served {
            *held = HeldLocks::default();
            return Ok(ForkedChild::Detached);
        }
        let (read, write) = held
            .generation
            .take()
            .expect("a served fork made its generation pipe in prepare");
        drop(read);
        let end = held
            .child_end
            .take()
            .expect("a served fork made its socket in prepare");
        *held = HeldLocks::default();
        let received = end.receive()?;
        let child = self.start_child(config, received.uffd, &received.installed, write)?;
        end.say_up();
        Ok(ForkedChild::Served(Box::new(child)))
    }
}

/// The pipe of a fork generation: `(read end, write end)`, both close-on-exec.
fn generation_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// Brings every evicted page back into memory (for `fork`), ignoring the cache size, and waits
/// until no page is in transit. Called with the gate closed, so no handler or evictor runs;
/// `buf` ([`FETCH_CHUNK_PAGES`] pages) was mapped at start.
fn page_in_everything(sh: &Shared, buf: &mut PageBuf) {
    let pages = sh.cache.lock().high();
    let mut page = 0;
    let mut brought = 0u64;
    while page < pages {
        let state = sh.cache.lock().state(page);
        if state == PageState::Evicted {
            if let Plan::Fetch { first, n } = plan_fault(sh, page, true) {
                fetch_in_chunks(sh, first, n, Some(first), buf, 0);
                brought += n as u64;
                page = first + n;
                continue;
            }
        }
        page += 1;
    }
    STATS.add(Counter::ForkPageIns, brought);
}

/// The `lego-fork` thread (started when the heap's userfaultfd reports forks): for each fork,
/// reads the parent's userfaultfd until the `FORK` event (or until the forking thread says the
/// fork returned without one), then hands the child over or closes its userfaultfd.
pub(super) fn fork_loop(sh: &Shared) {
    // Allocated here, once: while a fork is read, the forking thread holds the internal heap's
    // locks, so nothing on this thread may allocate until the `FORK` event is read.
    let mut events = EventBuffer::new(EVENTS_PER_READ_MAX);
    let mut read: Vec<Event> = Vec::with_capacity(EVENTS_PER_READ_MAX);
    loop {
        let served = {
            let mut w = sh.fork.watch();
            while w.current.is_none() || w.read {
                w = sh
                    .fork
                    .changed
                    .wait_timeout(w, Duration::from_millis(1000))
                    .map(|r| r.0)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            w.current.as_mut().and_then(|p| p.served.take())
        };
        // An ask left from the last fork (answered by its FORK event first) is not this one's:
        // this fork's ask can only come after its FORK event, which nobody has read yet.
        sh.fork.asked.take();
        let child = read_until_fork(sh, &mut events, &mut read);
        {
            let mut w = sh.fork.watch();
            w.read = true;
            w.forked = child.is_some();
        }
        sh.fork.changed.notify_all();
        let Some(child_fd) = child else {
            continue;
        };
        match served {
            Some(end) => {
                let child = Userfault::adopt(child_fd, sh.kernel.uffd.features());
                let mut buf = sh.fork.buf.lock().unwrap_or_else(|e| e.into_inner());
                hand_over(sh, child, end, &mut buf);
            }
            // Paged in: closing the child's userfaultfd unregisters its region.
            None => drop(child_fd),
        }
        sh.fork.watch().done = true;
        sh.fork.changed.notify_all();
    }
}

/// Reads the parent's userfaultfd (the forking thread holds the `events` lock for writing on
/// this thread's behalf) until a `FORK` event, or until the forking thread says `fork()`
/// returned and nothing is left to read. Faults are not kept (their threads are woken after
/// the fork); `REMOVE`/`UNMAP`/`REMAP` ranges are, in room reserved before the fork.
fn read_until_fork(sh: &Shared, buf: &mut EventBuffer, read: &mut Vec<Event>) -> Option<OwnedFd> {
    let k = &sh.kernel;
    let mut got: Option<OwnedFd> = None;
    loop {
        let asked = k.uffd.wait_or_kick(&sh.fork.asked, WATCH_POLL_MS);
        loop {
            read.clear();
            if let Err(e) = k.uffd.read_ready(buf, read) {
                if FAULT_ERRORS.allow() {
                    log::error!("reading userfaultfd events during a fork failed: {e}");
                }
                break;
            }
            if read.is_empty() {
                break;
            }
            let mut w = sh.fork.watch();
            for ev in read.drain(..) {
                match ev {
                    Event::Pagefault { kind, addr, .. } => {
                        let addr = addr as usize;
                        if !k.region.contains(addr) {
                            continue;
                        }
                        // Not kept: the thread is woken after the fork and faults again.
                        if kind != FaultKind::Missing {
                            let _ = k.uffd.wake(addr & !(PAGE_SIZE - 1), PAGE_SIZE);
                        }
                    }
                    Event::Remove { start, end } | Event::Unmap { start, end } => {
                        w.keep_removed(start as usize, end as usize);
                    }
                    Event::Remap { from, len, .. } => {
                        w.keep_removed(from as usize, from as usize + len);
                    }
                    Event::Fork { uffd } => {
                        let fd = crate::uffd::uffd_into_fd(uffd);
                        if got.is_none() {
                            got = Some(fd);
                        } else {
                            // A second fork during this one can only be one without atfork
                            // handlers (a raw `clone`): its child is not served.
                            log::warn!(
                                "a fork without lego's atfork handlers ran during another fork: \
                                 its child reads zeros where pages were evicted"
                            );
                            drop(fd);
                        }
                    }
                }
            }
        }
        if got.is_some() {
            return got;
        }
        // Asked only after `fork()` returned, so its `FORK` event (if any) was among those
        // just read: there is nothing more to wait for.
        if asked {
            return None;
        }
    }
}

/// Serves the child's faults from the parent's table (as it was at the fork: the parent is held
/// still) until the child asks for its userfaultfd, sends it with the pages served meanwhile,
/// and waits until the child says it is up (or is gone).
fn hand_over(sh: &Shared, child: Userfault, end: ParentEnd, buf: &mut PageBuf) {
    let started = Instant::now();
    let mut installed: Vec<u64> = Vec::new();
    let mut events = EventBuffer::new(EVENTS_PER_READ_MAX);
    let mut read: Vec<Event> = Vec::with_capacity(EVENTS_PER_READ_MAX);
    loop {
        if started.elapsed() > Duration::from_millis(CHILD_START_WAIT_MS_MAX) {
            log::error!(
                "a forked child did not ask for its userfaultfd within {CHILD_START_WAIT_MS_MAX} ms: \
                 it is given up (it reads zeros where pages were evicted)"
            );
            return;
        }
        match end.wait(child.raw_fd(), WATCH_POLL_MS) {
            handover::Ready::Child => {}
            handover::Ready::Hello => break,
            handover::Ready::Gone => return,
            handover::Ready::Nothing => continue,
        }
        read.clear();
        if let Err(e) = child.read_ready(&mut events, &mut read) {
            log::debug!("reading the forked child's userfaultfd: {e:?}");
            continue;
        }
        for ev in read.drain(..) {
            match ev {
                Event::Pagefault { addr, .. } => {
                    let addr = addr as usize;
                    if sh.kernel.region.contains(addr) {
                        let page = sh.page_of(addr);
                        serve_child_fault(sh, &child, page, buf);
                        installed.push(page as u64);
                        STATS.add(Counter::ForkWindowPages, 1);
                    }
                }
                Event::Fork { uffd } => drop(uffd),
                other => log::debug!("a forked child's event before its runtime runs: {other:?}"),
            }
        }
    }
    if let Err(e) = end.send(child.into_fd(), &installed) {
        log::error!("handing a forked child its userfaultfd failed ({e}): it cannot run");
        return;
    }
    end.wait_up(Duration::from_millis(CHILD_START_WAIT_MS_MAX));
}

/// Installs `page` in the child as the parent's table had it at the fork: a stored copy read
/// from the store, zeros for a page never written, the parent's bytes for a resident page,
/// poison for a lost one.
fn serve_child_fault(sh: &Shared, child: &Userfault, page: usize, buf: &mut PageBuf) {
    let addr = sh.addr_of(page);
    let (state, flags, crc, version) = {
        let t = sh.cache.lock();
        (t.state(page), t.flags(page), t.crc(page), t.version(page))
    };
    debug_assert_eq!(
        flags & (IMAGE | SNAP),
        0,
        "served forks have no image and no log"
    );
    let src: usize = match state {
        PageState::Evicted => {
            let mut pages = buf.pages_mut(1);
            let mut batch = [PageRead::new(page as u64, &mut *pages[0], crc, version)];
            let ok = sh.store.fetch(&mut batch).is_ok()
                && (sh.store.verifies_reads() || crc32c::crc32c(batch[0].buf) == crc);
            if !ok {
                crate::logging::write_stderr_line(&format!(
                    "lego: SIGBUS: the forked child's heap page at {addr:#x} cannot be read from the store"
                ));
                let _ = child.poison(addr, PAGE_SIZE);
                return;
            }
            buf.addr(0)
        }
        PageState::Poisoned => {
            let _ = child.poison(addr, PAGE_SIZE);
            return;
        }
        PageState::Resident => addr,
        _ => sh.fill.zeros_addr(),
    };
    // SAFETY: `src` is a page of this process (the fetch buffer, the zero run, or the
    // parent's own resident copy of the page, which nothing moves while the gate is closed);
    // `addr` lies in the child's registered region, on the child's userfaultfd.
    if let Err(e) = unsafe { child.copy(addr, src as *const u8, PAGE_SIZE, true, true) } {
        if e.errno != nix::errno::Errno::EEXIST {
            log::debug!(
                "serving the forked child's page at {addr:#x}: {:?}",
                e.errno
            );
        }
    }
}
