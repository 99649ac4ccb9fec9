//! Arenas: small objects, one lock per arena, per-class lists of slabs with free objects, and
//! a lock-free per-thread cache in front.
//!
//! **Arena choice.** On its first call a thread claims an arena index for itself alone: the
//! claim is its kernel thread id in a process-wide table (`CLAIMS`), found by CAS, lowest free
//! index first. If all [`ARENAS_MAX`] indices are held by live threads, the thread shares one
//! round robin. The choice is kept in a `thread_local` with a const initializer and no
//! destructor (registering a Rust TLS destructor allocates). Claims are process state, not
//! heap state: both heaps of the process use the same index, and a restored heap simply sees
//! new threads.
//!
//! **Thread exit.** A thread that claims an index also sets a pthread key whose destructor
//! runs when it exits (`pthread_setspecific` of a key below 32 allocates nothing): it flushes
//! the thread's caches in every heap registered with [`Heap::flush_caches_at_thread_exit`]
//! back to their slabs, gives back the slabs of that arena that are empty, and releases the
//! claim, so the next thread takes the same index and a program of short-lived threads uses
//! as many arenas as it has threads at once. (Any later call of the exiting thread goes to
//! the locked path.) A claim whose thread died without it (the key could not be set) is taken
//! over once no index is free (`tgkill(pid, tid, 0)` answers ESRCH).
//!
//! **Thread cache.** The thread holding an exclusive claim on index `a` owns arena `a`'s
//! cache (`tcache`, in the region like everything else): per class up to
//! [`TCACHE_COUNT_MAX`] objects that stay allocated as far as their slab knows, linked
//! through their first word and marked by the heap's `tcache_key` in their second. That
//! thread pops and pushes without any lock or atomic read-modify-write; it refills and
//! flushes in batches under the arena lock. The cache takes the thread's frees of objects of
//! any arena (a free by another thread than the slab's owner is no different from a local
//! one): a flush sorts its batch by owning arena and takes each owner's lock once, so remote
//! frees go back to their owner in batches, and a consumer thread's own mallocs reuse what it
//! freed. Frees by a thread without an exclusive claim (and all frees of classes above
//! [`TCACHE_SIZE_MAX`]) take the owning arena's lock. An object bearing the key is in a
//! cache (this thread's or another's): freeing it again is a double free and is refused.
//!
//! The lock-free free path reads the slab's geometry (`start`, `npages`, `class`) without the
//! lock: those never change while the slab holds a live object, so only a garbage pointer can
//! race with a slab being released, and the liveness bits it then reads are atomic.
//!
//! **Slabs.** A slab hands out objects from its free list first (reuse keeps the touched pages
//! few), then by bumping through objects never handed out, which read as zero if the slab was
//! fresh. A slab with free objects is on its arena's partial list for its class; a full slab
//! is on no list; a slab that empties goes back to the page heap unless it is the only one
//! with room.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use super::lock::RawLock;
use super::size_class::{class_of, ClassInfo, CLASSES, CLASS_COUNT};
use super::span::{KIND_SMALL, OBJECT_NIL, OWNER_NONE};
use super::{DiscardFn, Heap, ARENAS_MAX};

/// Largest object size the thread caches hold (glibc's tcache stops at about the same).
pub(crate) const TCACHE_SIZE_MAX: usize = 1024;
const TCACHE_CLASSES: usize = class_of(TCACHE_SIZE_MAX) + 1;
/// Objects one cache bin holds before half of them go back to their slabs.
pub(crate) const TCACHE_COUNT_MAX: u32 = 32;
const TCACHE_FLUSH_COUNT: u32 = TCACHE_COUNT_MAX / 2;
/// A refill takes about this many bytes of objects (never more than `TCACHE_REFILL_MAX`), so
/// that refilling does not touch pages that are not needed yet.
const TCACHE_REFILL_BYTES: usize = 2048;
const TCACHE_REFILL_MAX: usize = 16;

/// Heaps whose caches a thread flushes when it exits (the preload has two).
const EXIT_HEAPS_MAX: usize = 4;

const _: () = assert!(TCACHE_REFILL_MAX as u32 <= TCACHE_COUNT_MAX);
const _: () = assert!(ARENAS_MAX.is_power_of_two() && ARENAS_MAX <= 128);

/// One class's cached objects (exclusive thread only).
#[repr(C)]
#[derive(Clone, Copy)]
struct TCacheBin {
    /// Address of the first cached object, 0 if none.
    head: usize,
    count: u32,
    _reserved: u32,
}

#[repr(C, align(64))]
pub(crate) struct Arena {
    pub lock: RawLock,
    /// Bytes of objects this arena's slabs count as allocated (written under the lock, read
    /// without), including those sitting in the thread cache.
    pub bytes: AtomicU64,
    /// Bytes of objects in the thread cache (written by the exclusive thread only).
    pub cached_bytes: AtomicU64,
    /// Per class: first slab with a free object, or 0 (arena lock).
    partial: UnsafeCell<[u32; CLASS_COUNT]>,
    /// Per cacheable class: the exclusive thread's cache.
    tcache: UnsafeCell<[TCacheBin; TCACHE_CLASSES]>,
}

/// Thread slot value: the arena index in the low bits, [`SLOT_EXCLUSIVE`] if claimed.
const SLOT_EXCLUSIVE: u32 = 1 << 31;
const SLOT_INDEX_MASK: u32 = ARENAS_MAX as u32 - 1;
const SLOT_UNASSIGNED: u32 = u32::MAX;

thread_local! {
    static THREAD_SLOT: Cell<u32> = const { Cell::new(SLOT_UNASSIGNED) };
}

/// Kernel thread id holding each arena index exclusively, 0 if none.
static CLAIMS: [AtomicU32; ARENAS_MAX] = [const { AtomicU32::new(0) }; ARENAS_MAX];
/// Round-robin source of shared arena indices when every index is claimed.
static NEXT_SHARED: AtomicU32 = AtomicU32::new(0);

/// This thread's slot (arena index and whether it is exclusive).
#[inline]
fn thread_slot() -> u32 {
    THREAD_SLOT
        .try_with(|slot| {
            let v = slot.get();
            if v != SLOT_UNASSIGNED {
                return v;
            }
            first_slot(slot)
        })
        .unwrap_or(0)
}

#[cold]
fn first_slot(slot: &Cell<u32>) -> u32 {
    let v = claim_slot();
    // Set before the exit hook is registered: should `pthread_setspecific` allocate after
    // all, that allocation finds the slot taken.
    slot.set(v);
    if v & SLOT_EXCLUSIVE != 0 {
        register_exit_hook(v & SLOT_INDEX_MASK);
    }
    v
}

/// The pthread key whose destructor runs [`thread_exit`]: `EXIT_KEY_NONE` until created,
/// `EXIT_KEY_BUSY` while one thread creates it, `EXIT_KEY_FAILED` if it cannot be.
static EXIT_KEY_STATE: AtomicU32 = AtomicU32::new(EXIT_KEY_NONE);
static EXIT_KEY: AtomicU32 = AtomicU32::new(0);
const EXIT_KEY_NONE: u32 = 0;
const EXIT_KEY_BUSY: u32 = 1;
const EXIT_KEY_READY: u32 = 2;
const EXIT_KEY_FAILED: u32 = 3;

/// Heaps registered with [`Heap::flush_caches_at_thread_exit`], each with its discard
/// callback (stored before the heap is published in its slot).
static EXIT_HEAPS: [AtomicPtr<Heap>; EXIT_HEAPS_MAX] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; EXIT_HEAPS_MAX];
static EXIT_DISCARDS: [AtomicPtr<()>; EXIT_HEAPS_MAX] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; EXIT_HEAPS_MAX];

fn exit_key() -> Option<libc::pthread_key_t> {
    loop {
        match EXIT_KEY_STATE.compare_exchange(
            EXIT_KEY_NONE,
            EXIT_KEY_BUSY,
            Ordering::Acquire,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                let mut key: libc::pthread_key_t = 0;
                // SAFETY: `key` is a valid out slot; the destructor is a plain `extern "C"`
                // function that lives as long as the process (this code is never unloaded).
                let rc = unsafe { libc::pthread_key_create(&mut key, Some(thread_exit)) };
                if rc != 0 {
                    EXIT_KEY_STATE.store(EXIT_KEY_FAILED, Ordering::Release);
                    return None;
                }
                EXIT_KEY.store(key, Ordering::Relaxed);
                EXIT_KEY_STATE.store(EXIT_KEY_READY, Ordering::Release);
                return Some(key);
            }
            Err(EXIT_KEY_READY) => return Some(EXIT_KEY.load(Ordering::Relaxed)),
            Err(EXIT_KEY_FAILED) => return None,
            // Another thread is creating it: a few instructions away.
            Err(_) => std::hint::spin_loop(),
        }
    }
}

/// Arranges for [`thread_exit`] to run when the calling thread, holder of index `index`,
/// exits. Without it the claim stays until a thread takes over dead claims.
fn register_exit_hook(index: u32) {
    let Some(key) = exit_key() else {
        return;
    };
    // The value is never null (a null value runs no destructor): index + 1.
    let value = std::ptr::without_provenance_mut::<libc::c_void>(index as usize + 1);
    // SAFETY: `key` was created by `pthread_key_create`; the value is an integer, never
    // dereferenced.
    unsafe { libc::pthread_setspecific(key, value) };
}

/// The pthread key destructor of a thread holding an exclusive claim (`value` = index + 1):
/// flushes its caches in the registered heaps, gives back their empty slabs, moves the thread
/// to the locked path and releases the claim.
extern "C" fn thread_exit(value: *mut libc::c_void) {
    let index = value.addr().wrapping_sub(1);
    let slot = THREAD_SLOT.try_with(Cell::get).unwrap_or(SLOT_UNASSIGNED);
    if index >= ARENAS_MAX || slot != index as u32 | SLOT_EXCLUSIVE {
        return;
    }
    for (h, d) in EXIT_HEAPS.iter().zip(&EXIT_DISCARDS) {
        let heap = h.load(Ordering::Acquire);
        if heap.is_null() {
            continue;
        }
        let discard = d.load(Ordering::Relaxed);
        // SAFETY: the slot's callback was stored from a `DiscardFn` before the heap was
        // published with release (acquired above), and function pointers round-trip through
        // data pointers on the targets Linux runs on.
        let discard: DiscardFn = unsafe { std::mem::transmute::<*mut (), DiscardFn>(discard) };
        // SAFETY: registered heaps are `'static` (see `flush_caches_at_thread_exit`), and
        // this thread still holds the exclusive claim on `index`.
        unsafe { (*heap).flush_thread_cache(index, discard) };
    }
    // Whatever this thread still frees or allocates now takes the arena's lock.
    let _ = THREAD_SLOT.try_with(|s| s.set(index as u32));
    CLAIMS[index].store(0, Ordering::Release);
}

fn gettid() -> u32 {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    u32::try_from(tid).expect("kernel thread ids are positive 32-bit numbers")
}

/// Whether thread `tid` of this process is gone.
fn thread_is_dead(tid: u32) -> bool {
    // SAFETY: signal 0 only checks that the thread exists; nothing is delivered.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, 0) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

#[cold]
fn claim_slot() -> u32 {
    let me = gettid();
    for (i, c) in CLAIMS.iter().enumerate() {
        if c.load(Ordering::Relaxed) == 0
            && c.compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            return i as u32 | SLOT_EXCLUSIVE;
        }
    }
    for (i, c) in CLAIMS.iter().enumerate() {
        let holder = c.load(Ordering::Relaxed);
        // A claim bearing this thread's own id was left by a dead thread whose id was reused
        // (this thread has claimed nothing yet).
        if (holder == me || holder == 0 || thread_is_dead(holder))
            && c.compare_exchange(holder, me, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            return i as u32 | SLOT_EXCLUSIVE;
        }
    }
    NEXT_SHARED.fetch_add(1, Ordering::Relaxed) & SLOT_INDEX_MASK
}

/// In the child after `fork`: only the calling thread exists, with a new id. It keeps its
/// claim; every other claim is released.
pub(super) fn reset_claims_after_fork() {
    let slot = THREAD_SLOT.try_with(Cell::get).unwrap_or(SLOT_UNASSIGNED);
    let me = gettid();
    for (i, c) in CLAIMS.iter().enumerate() {
        let mine = slot != SLOT_UNASSIGNED
            && slot & SLOT_EXCLUSIVE != 0
            && (slot & SLOT_INDEX_MASK) as usize == i;
        c.store(if mine { me } else { 0 }, Ordering::Release);
    }
}

impl Heap {
    /// Empties every thread cache without returning its objects (after a restore: the image
    /// may have been cut while a thread was halfway through a lock-free cache operation, and the
    /// threads that owned the caches are gone). The cached objects stay allocated as far as
    /// their slabs know: a bounded leak of at most the caches' size.
    pub(super) fn drop_thread_caches(&self) {
        for arena in &self.arenas {
            // SAFETY: called while no thread of this process uses the heap yet (it is being
            // opened), so nobody else touches the caches.
            unsafe {
                for bin in (*arena.tcache.get()).iter_mut() {
                    bin.head = 0;
                    bin.count = 0;
                }
            }
            arena.cached_bytes.store(0, Ordering::Relaxed);
        }
    }

    /// Has every thread that exits flush its cache of this heap back to the slabs and give
    /// back the slabs of its arena that are empty (see the module docs), with `discard` for
    /// the runs that then go back. For the heaps of a process, which live as long as it does.
    /// False if [`EXIT_HEAPS_MAX`] other heaps are registered already (this heap's caches then
    /// wait for the next thread of the same index); registering a heap again changes nothing.
    pub fn flush_caches_at_thread_exit(&'static self, discard: DiscardFn) -> bool {
        static REGISTER: RawLock = RawLock::new();
        let me = std::ptr::from_ref(self).cast_mut();
        REGISTER.lock();
        let done = EXIT_HEAPS.iter().any(|h| h.load(Ordering::Acquire) == me)
            || match EXIT_HEAPS
                .iter()
                .position(|h| h.load(Ordering::Acquire).is_null())
            {
                Some(i) => {
                    EXIT_DISCARDS[i].store(discard as *mut (), Ordering::Relaxed);
                    EXIT_HEAPS[i].store(me, Ordering::Release);
                    true
                }
                None => false,
            };
        REGISTER.unlock();
        done
    }

    /// Empties arena `a`'s cache into the slabs and gives back the slabs of `a` that hold no
    /// object (those an arena keeps for the next allocation of their class).
    ///
    /// # Safety
    /// The calling thread holds the exclusive claim on index `a`.
    unsafe fn flush_thread_cache(&self, a: usize, discard: DiscardFn) {
        let arena = &self.arenas[a];
        for class in 0..TCACHE_CLASSES {
            while (*arena.tcache.get())[class].count > 0 {
                self.tcache_flush(arena, class, TCACHE_FLUSH_COUNT, discard);
            }
        }
        let mut empty = [0u32; CLASS_COUNT];
        let mut count = 0;
        arena.lock.lock();
        let partial = &mut *arena.partial.get();
        for (class, head) in partial.iter_mut().enumerate() {
            let si = *head;
            // Only the kept slab can be empty: any other that empties is given back at once.
            if si != 0 && (*self.span(si)).used == 0 && (*self.span(si)).next == 0 {
                *head = 0;
                let s = self.span(si);
                debug_assert_eq!(usize::from((*s).class), class);
                (*s).owner.store(OWNER_NONE, Ordering::Release);
                empty[count] = si;
                count += 1;
            }
        }
        arena.lock.unlock();
        for &si in &empty[..count] {
            self.give_back(si, false, discard);
        }
    }

    /// One object of `class`: its address (null if the heap is full) and whether it reads as
    /// zero.
    #[inline]
    pub(super) fn alloc_small(&self, class: usize) -> (*mut u8, bool) {
        let slot = thread_slot();
        let a = (slot & SLOT_INDEX_MASK) as usize;
        let arena = &self.arenas[a];
        if slot & SLOT_EXCLUSIVE != 0 && class < TCACHE_CLASSES {
            // SAFETY: this thread holds the exclusive claim on index `a`, so it alone touches
            // arena `a`'s cache; cached objects are allocated objects of this heap.
            unsafe {
                let bin = &mut (*arena.tcache.get())[class];
                if bin.count > 0 {
                    let p = self.base().with_addr(bin.head);
                    bin.head = p.cast::<usize>().read();
                    // Clear the key: the object leaves the cache.
                    p.cast::<u64>().add(1).write(0);
                    bin.count -= 1;
                    let cached = arena.cached_bytes.load(Ordering::Relaxed);
                    arena
                        .cached_bytes
                        .store(cached - u64::from(CLASSES[class].size), Ordering::Relaxed);
                    return (p, false);
                }
                return self.tcache_refill(arena, a, class);
            }
        }
        arena.lock.lock();
        // SAFETY: the arena lock is held.
        let r = unsafe { self.alloc_small_locked(arena, a, class) };
        arena.lock.unlock();
        r
    }

    /// Takes a batch of objects under the lock: one to return, the rest into the cache.
    ///
    /// # Safety
    /// The calling thread holds the exclusive claim on index `a`, and `arena` is arena `a`.
    unsafe fn tcache_refill(&self, arena: &Arena, a: usize, class: usize) -> (*mut u8, bool) {
        let size = CLASSES[class].size as usize;
        let batch = (TCACHE_REFILL_BYTES / size).clamp(1, TCACHE_REFILL_MAX);
        let bin = &mut (*arena.tcache.get())[class];
        arena.lock.lock();
        let first = self.alloc_small_locked(arena, a, class);
        let mut added = 0u64;
        if !first.0.is_null() {
            for _ in 1..batch {
                let (p, _) = self.alloc_small_locked(arena, a, class);
                if p.is_null() {
                    break;
                }
                self.tcache_push(bin, p);
                added += size as u64;
            }
        }
        arena.lock.unlock();
        let cached = arena.cached_bytes.load(Ordering::Relaxed);
        arena.cached_bytes.store(cached + added, Ordering::Relaxed);
        first
    }

    /// # Safety
    /// `bin` belongs to the calling thread's exclusive arena and `p` is an allocated object
    /// of its class and arena that nothing else refers to.
    #[inline]
    unsafe fn tcache_push(&self, bin: &mut TCacheBin, p: *mut u8) {
        p.cast::<usize>().write(bin.head);
        p.cast::<u64>().add(1).write(self.tcache_key);
        bin.head = p.addr();
        bin.count += 1;
    }

    /// Frees `ptr`, an object of any arena, into the calling thread's cache. `None` if the
    /// class is not cached; `Some(false)` if `ptr` is not a live object (double free,
    /// garbage).
    ///
    /// # Safety
    /// The calling thread holds the exclusive claim on `arena`'s index, and `si` is the page
    /// map's descriptor for `page`, the page of `ptr`, as read just before.
    #[inline]
    unsafe fn tcache_free(
        &self,
        arena: &Arena,
        ptr: *mut u8,
        page: u32,
        si: u32,
        discard: DiscardFn,
    ) -> Option<bool> {
        let s = self.span(si);
        let owner = (*s).owner.load(Ordering::Acquire);
        if owner == OWNER_NONE || owner as usize > ARENAS_MAX {
            return Some(false);
        }
        let class = (*s).class as usize;
        if class >= TCACHE_CLASSES {
            return None;
        }
        let start = (*s).start;
        if page < start || page - start >= (*s).npages {
            return Some(false);
        }
        let info = &CLASSES[class];
        let Some(idx) = info.object_at(ptr.addr() - self.page_addr(start).addr()) else {
            return Some(false);
        };
        if !(*s).is_live(idx) {
            return Some(false);
        }
        // The key says the object sits in a cache, this thread's or another's: freeing it
        // again is refused (a live object whose second word happens to equal the 64-bit key
        // is refused too, as the locked path does).
        if ptr.cast::<u64>().add(1).read() == self.tcache_key {
            return Some(false);
        }
        let bin = &mut (*arena.tcache.get())[class];
        if bin.count >= TCACHE_COUNT_MAX {
            self.tcache_flush(arena, class, TCACHE_FLUSH_COUNT, discard);
        }
        let bin = &mut (*arena.tcache.get())[class];
        self.tcache_push(bin, ptr);
        let cached = arena.cached_bytes.load(Ordering::Relaxed);
        arena
            .cached_bytes
            .store(cached + u64::from(info.size), Ordering::Relaxed);
        Some(true)
    }

    /// Returns up to `n` cached objects of `class` to their slabs, giving back slabs that
    /// empty. The objects may belong to any arena: the batch is sorted by owner and each
    /// owner's lock is taken once.
    ///
    /// # Safety
    /// The calling thread holds the exclusive claim on `arena`'s index.
    unsafe fn tcache_flush(&self, arena: &Arena, class: usize, n: u32, discard: DiscardFn) {
        let bin = &mut (*arena.tcache.get())[class];
        // Every slab released by the batch must fit `released`, or it would be lost.
        let n = n.min(bin.count).min(TCACHE_FLUSH_COUNT);
        let mut batch = [(0u32, 0u32, std::ptr::null_mut::<u8>()); TCACHE_FLUSH_COUNT as usize];
        for item in &mut batch[..n as usize] {
            let p = self.base().with_addr(bin.head);
            bin.head = p.cast::<usize>().read();
            bin.count -= 1;
            p.cast::<u64>().add(1).write(0);
            let (_, si) = self
                .route(p)
                .expect("a cached object lies in a slab of the heap");
            // A cached object is allocated as far as its slab knows, so the slab stays owned
            // by its arena until the object is freed below.
            let owner = (*self.span(si)).owner.load(Ordering::Acquire);
            debug_assert!(owner >= 1 && owner as usize <= ARENAS_MAX);
            *item = (owner, si, p);
        }
        let batch = &mut batch[..n as usize];
        batch.sort_unstable_by_key(|&(owner, _, _)| owner);
        let mut released = [0u32; TCACHE_FLUSH_COUNT as usize];
        let mut released_count = 0;
        for group in batch.chunk_by(|x, y| x.0 == y.0) {
            let owner_arena = &self.arenas[group[0].0 as usize - 1];
            owner_arena.lock.lock();
            for &(_, si, p) in group {
                let s = self.span(si);
                let idx = CLASSES[class]
                    .object_at(p.addr() - self.page_addr((*s).start).addr())
                    .expect("a cached object starts an object slot");
                if self.free_small_locked(owner_arena, si, idx, p) {
                    released[released_count] = si;
                    released_count += 1;
                }
            }
            owner_arena.lock.unlock();
        }
        let cached = arena.cached_bytes.load(Ordering::Relaxed);
        arena.cached_bytes.store(
            cached - u64::from(n) * u64::from(CLASSES[class].size),
            Ordering::Relaxed,
        );
        for &si in &released[..released_count] {
            self.give_back(si, false, discard);
        }
    }

    /// # Safety
    /// `arena` is arena `a` and its lock is held.
    #[inline]
    unsafe fn alloc_small_locked(&self, arena: &Arena, a: usize, class: usize) -> (*mut u8, bool) {
        let partial = &mut *arena.partial.get();
        let mut si = partial[class];
        if si == 0 {
            si = self.new_slab(a, class);
            if si == 0 {
                return (std::ptr::null_mut(), false);
            }
            partial[class] = si;
        }
        let s = self.span(si);
        let info: &ClassInfo = &CLASSES[class];
        let size = info.size as usize;
        let slab = self.page_addr((*s).start);
        let (idx, zeroed) = if (*s).free_head != OBJECT_NIL {
            let idx = (*s).free_head as usize;
            (*s).free_head = slab.add(idx * size).cast::<u16>().read();
            (idx, false)
        } else {
            let idx = (*s).bump as usize;
            (*s).bump += 1;
            (idx, (*s).fresh != 0)
        };
        debug_assert!(idx < (*s).capacity as usize);
        debug_assert!(!(*s).is_live(idx));
        (*s).set_live(idx);
        (*s).used += 1;
        if (*s).used == (*s).capacity {
            // Full: off the partial list (it is the head, the slab allocations come from).
            let next = (*s).next;
            partial[class] = next;
            if next != 0 {
                (*self.span(next)).prev = 0;
            }
            (*s).next = 0;
        }
        let bytes = arena.bytes.load(Ordering::Relaxed);
        arena.bytes.store(bytes + size as u64, Ordering::Relaxed);
        (slab.add(idx * size), zeroed)
    }

    /// A new empty slab of `class` owned by arena `a`, or 0 if the heap is full.
    ///
    /// # Safety
    /// Arena `a`'s lock is held (the page lock is taken inside, in lock order).
    unsafe fn new_slab(&self, a: usize, class: usize) -> u32 {
        let info = &CLASSES[class];
        let mut g = self.lock_pages();
        let Some(si) = self.alloc_run(g.state(), info.pages, 1) else {
            return 0;
        };
        let s = self.span(si);
        (*s).kind = KIND_SMALL;
        (*s).class = class as u8;
        (*s).used = 0;
        (*s).capacity = info.objects as u16;
        (*s).bump = 0;
        (*s).free_head = OBJECT_NIL;
        (*s).clear_all_live();
        (*s).next = 0;
        (*s).prev = 0;
        for p in (*s).start..(*s).start + (*s).npages {
            self.pagemap(p).store(si, Ordering::Release);
        }
        (*s).owner.store(a as u32 + 1, Ordering::Release);
        si
    }

    /// Index of the live object at `ptr` (on page `page`) in slab `si` of arena `a`, if it is
    /// one.
    ///
    /// # Safety
    /// Arena `a`'s lock is held. `si` is a descriptor index (it may name anything: ownership
    /// is checked first, and a slab owned by `a` cannot change while the lock is held).
    pub(super) unsafe fn slab_object(
        &self,
        ptr: *mut u8,
        page: u32,
        si: u32,
        a: usize,
    ) -> Option<usize> {
        let s = self.span(si);
        if (*s).owner.load(Ordering::Acquire) != a as u32 + 1 {
            return None;
        }
        if page < (*s).start || page - (*s).start >= (*s).npages {
            return None;
        }
        let info = &CLASSES[(*s).class as usize];
        let offset = ptr.addr() - self.page_addr((*s).start).addr();
        let idx = info.object_at(offset)?;
        // An object bearing the cache key sits in a thread cache: as good as free.
        let cached = ptr.cast::<u64>().add(1).read() == self.tcache_key;
        (idx < (*s).bump as usize && (*s).is_live(idx) && !cached).then_some(idx)
    }

    /// Frees the object at `ptr` of slab `si`, which the lock-free read said arena `a` owns;
    /// false if it is not a live object.
    pub(super) fn free_small(
        &self,
        ptr: *mut u8,
        page: u32,
        si: u32,
        a: usize,
        discard: DiscardFn,
    ) -> bool {
        let slot = thread_slot();
        if slot & SLOT_EXCLUSIVE != 0 {
            let mine = &self.arenas[(slot & SLOT_INDEX_MASK) as usize];
            // SAFETY: the slot says this thread holds the exclusive claim on `mine`'s index.
            if let Some(ok) = unsafe { self.tcache_free(mine, ptr, page, si, discard) } {
                return ok;
            }
        }
        let arena = &self.arenas[a];
        arena.lock.lock();
        // SAFETY: the arena lock is held; `slab_object` checks `si` before anything changes.
        let release = unsafe {
            let Some(idx) = self.slab_object(ptr, page, si, a) else {
                arena.lock.unlock();
                return false;
            };
            self.free_small_locked(arena, si, idx, ptr)
        };
        arena.lock.unlock();
        if release {
            // The slab is out of the arena (owner cleared); only the page heap can see it now.
            self.give_back(si, false, discard);
        }
        true
    }

    /// Puts object `idx` (at `ptr`) of slab `si` back; true if the slab emptied and was taken
    /// out of the arena, to be given back to the page heap.
    ///
    /// # Safety
    /// `arena`'s lock is held and object `idx` of slab `si` (owned by it) is live.
    #[inline]
    unsafe fn free_small_locked(&self, arena: &Arena, si: u32, idx: usize, ptr: *mut u8) -> bool {
        let s = self.span(si);
        let class = (*s).class as usize;
        let size = CLASSES[class].size as u64;
        (*s).clear_live(idx);
        ptr.cast::<u16>().write((*s).free_head);
        (*s).free_head = idx as u16;
        let was_full = (*s).used == (*s).capacity;
        (*s).used -= 1;
        let bytes = arena.bytes.load(Ordering::Relaxed);
        arena.bytes.store(bytes - size, Ordering::Relaxed);
        let partial = &mut *arena.partial.get();
        if was_full {
            let head = partial[class];
            (*s).prev = 0;
            (*s).next = head;
            if head != 0 {
                (*self.span(head)).prev = si;
            }
            partial[class] = si;
        }
        // Keep the last slab with room so a malloc/free loop does not churn the page heap.
        if (*s).used != 0 || (partial[class] == si && (*s).next == 0) {
            return false;
        }
        let (prev, next) = ((*s).prev, (*s).next);
        if prev != 0 {
            (*self.span(prev)).next = next;
        } else {
            partial[class] = next;
        }
        if next != 0 {
            (*self.span(next)).prev = prev;
        }
        (*s).next = 0;
        (*s).prev = 0;
        (*s).owner.store(OWNER_NONE, Ordering::Release);
        true
    }
}

// Test-only views of the calling thread's claim and of an arena's counters.
#[cfg(test)]
impl Heap {
    /// The calling thread's arena index, if it holds it exclusively.
    pub(super) fn exclusive_arena() -> Option<usize> {
        let slot = thread_slot();
        (slot & SLOT_EXCLUSIVE != 0).then_some((slot & SLOT_INDEX_MASK) as usize)
    }

    /// Bytes arena `a`'s slabs count as allocated, and bytes sitting in its cache.
    pub(super) fn arena_bytes(&self, a: usize) -> (u64, u64) {
        let arena = &self.arenas[a];
        (
            arena.bytes.load(Ordering::Relaxed),
            arena.cached_bytes.load(Ordering::Relaxed),
        )
    }

    /// Whether arena `a` holds no slab (none partial; full ones would hold objects).
    pub(super) fn arena_holds_no_slab(&self, a: usize) -> bool {
        let arena = &self.arenas[a];
        arena.lock.lock();
        // SAFETY: the arena lock is held.
        let empty = unsafe { (*arena.partial.get()).iter().all(|&si| si == 0) };
        arena.lock.unlock();
        empty
    }
}
