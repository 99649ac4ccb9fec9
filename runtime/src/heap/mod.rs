//! The allocator: a malloc whose whole state lives inside the region it manages.
//!
//! lego runs two of these per process: the program's heap (a huge userfaultfd region, so
//! every page touched may fault and every page may be evicted) and the runtime's own heap
//! (Rust's global allocator). Rules this module keeps:
//! - **The region is the heap image.** Header, locks, arenas, page map and span descriptors
//!   are at fixed offsets from the base or reachable from it by region offsets; nothing in the
//!   region points outside it. A region saved and mapped back at the same base is reopened
//!   with [`Heap::open`].
//! - **It never allocates** (it *is* the allocator) and never calls libc's malloc; its locks
//!   are futex words inside the region.
//! - **Touch few pages.** Small objects are carved from page-sized slabs of one size class,
//!   handed out from a per-slab bump so a new slab is touched one object at a time; metadata
//!   is touched lazily (the page map is a sparse array, descriptors are allocated on demand).
//!   Freed large runs are given back through a discard callback, and the heap remembers which
//!   free pages read as zero so `calloc` skips the memset on them.
//!
//! Layout of the region (pages): `[header][page map: u32 per page][span directory: u32 per
//! descriptor page][data...]`; the data area is handed out by a bump pointer (`top`), so
//! everything the heap ever wrote lies below [`Heap::top_bytes`]. The page map names, for the
//! pages that need it, the descriptor of the span holding the page (all pages of a slab; the
//! first and last page of a large allocation or free run). Entries may be stale: a lookup is
//! trusted only if the named descriptor is live and covers the page, which is then necessarily
//! the span holding it. Descriptor pages are taken from `top` like data and listed in the span
//! directory, so a descriptor is named by a `u32` (directory slot × 64 + slot in its page)
//! wherever its page lies: pages are `u32` too, and the region can be as large as
//! [`REGION_BYTES_MAX`] (16 TiB). The page map and the directory are reserved for the whole
//! region but touched only where the heap has used it (4 GiB and 64 MiB of address space for a
//! 4 TiB region, a few pages of it for a small program).
//!
//! Besides `malloc`'s slabs and large runs, the page heap hands out runs for the program's
//! anonymous mappings when the preload serves them (`LEGO_MMAP=1`, see `mapped`): their own
//! span kind, which `free` refuses.
//!
//! Threads: each thread claims one of [`ARENAS_MAX`] arena indices for itself (shared round
//! robin once all are held by live threads), remembered in a `thread_local` that both heaps
//! share; the claiming thread keeps a lock-free cache of small objects in its arena (see
//! `arena`), which also takes its frees of other arenas' objects and returns them to their
//! owners in batches. A thread that exits flushes its caches and releases its index (a pthread
//! key destructor), so short-lived threads reuse the arenas of dead ones. Page runs come from
//! the page heap under one lock. Lock order: arena, then page heap; arenas in index order
//! (only `prepare_fork` takes more than one).

mod arena;
mod lock;
mod mapped;
mod pages;
mod size_class;
mod span;
#[cfg(test)]
mod tests;

use std::cell::UnsafeCell;
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use thiserror::Error;

use self::arena::Arena;
use self::lock::RawLock;
use self::pages::PageState;
use self::size_class::{class_of, CLASSES, SMALL_MAX_BYTES};
use self::span::{Span, OWNER_LARGE, SPAN_BYTES};

pub use self::mapped::{MapError, Unmapping, PROT_RW};
use crate::PAGE_SIZE;

/// Called with page-aligned ranges whose content is no longer needed; afterwards they must
/// read as zero (the heap hands them out as fresh memory).
pub type DiscardFn = fn(addr: *mut u8, len: usize);

/// "LEGOHEAP", little-endian.
pub const HEAP_MAGIC: u64 = u64::from_le_bytes(*b"LEGOHEAP");
/// Version of the heap image format; bump on any change to the layout or the class table.
pub const HEAP_VERSION: u32 = 5;
/// Arenas for small objects; threads beyond this many share them round robin.
pub const ARENAS_MAX: usize = 64;
/// Largest region a heap can manage, in pages: page indices (the header, descriptors, the
/// page map's slots) are `u32`.
pub const REGION_PAGES_MAX: usize = u32::MAX as usize;
/// Largest region a heap can manage, in bytes (16 TiB less one page).
pub const REGION_BYTES_MAX: usize = REGION_PAGES_MAX * PAGE_SIZE;
/// Descriptors in one descriptor page.
const SPANS_PER_PAGE: usize = PAGE_SIZE / SPAN_BYTES;
/// Smallest data area a heap is worth formatting, in pages.
pub const DATA_PAGES_MIN: usize = 64;
/// Free runs at least this long are given back (discarded) when they hold dirty pages.
pub const DISCARD_MIN_BYTES: usize = 64 * 1024;
/// Default of [`Heap::set_retain_bytes`].
pub const RETAIN_BYTES_DEFAULT: usize = 32 << 20;
/// With [`Heap::set_retain_max_bytes`], freed dirty runs are kept up to this fraction
/// (1/divisor) of the bytes of live large allocations.
pub const RETAIN_LIVE_DIVISOR: u64 = 2;
/// Requests above this many bytes are page runs rather than size-class objects.
pub const LARGE_MIN_BYTES: usize = SMALL_MAX_BYTES + 1;

const _: () = assert!(DISCARD_MIN_BYTES.is_multiple_of(PAGE_SIZE));
const _: () = assert!(ARENAS_MAX < OWNER_LARGE as usize);
// Every descriptor index the largest region's directory can hold fits in a `u32`.
const _: () = assert!(span_dir_slots(REGION_PAGES_MAX) * SPANS_PER_PAGE <= u32::MAX as usize + 1);
// The largest heap the configuration accepts is one this allocator can format.
const _: () = assert!(crate::config::HEAP_BYTES_MAX <= REGION_BYTES_MAX as u64);

/// Slots of the span directory of a region of `region_pages` pages: enough for every
/// descriptor page it can ever need. Descriptors are never freed and one is taken from a new
/// page only when fewer than two are spare, while every live descriptor but the spare ones
/// holds at least one page of its own (and descriptor pages hold none), so fewer than
/// `region_pages / SPANS_PER_PAGE + 1` pages of descriptors can exist. A heap that would need
/// more (it cannot) fails the allocation rather than overrun the directory.
const fn span_dir_slots(region_pages: usize) -> usize {
    region_pages / SPANS_PER_PAGE + 1
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeapError {
    #[error("heap base {base:#x} is not page-aligned")]
    MisalignedBase { base: usize },
    #[error("heap region length {len} is not a multiple of the page size ({PAGE_SIZE})")]
    MisalignedLength { len: usize },
    #[error("heap region of {len} bytes is too small: at least {min} bytes are needed")]
    RegionTooSmall { len: usize, min: usize },
    #[error(
        "heap region of {len} bytes is too large: at most {REGION_BYTES_MAX} bytes are supported"
    )]
    RegionTooLarge { len: usize },
    #[error("no heap image at {base:#x}: magic is {found:#018x}, expected {HEAP_MAGIC:#018x}")]
    BadMagic { base: usize, found: u64 },
    #[error("heap image at {base:#x} has format version {found}, this build reads version {HEAP_VERSION}")]
    BadVersion { base: usize, found: u32 },
    #[error("heap image at {base:#x} was made for a region of {stored} bytes, not {len}")]
    LengthMismatch {
        base: usize,
        stored: u64,
        len: usize,
    },
    #[error("heap image was made at base {stored:#x} but is mapped at {base:#x}; it must be mapped back at its own address")]
    BaseMismatch { base: usize, stored: usize },
}

/// The heap header, at offset 0 of its region. All-zero bytes are a valid (unformatted) value
/// of every field, which is how [`Heap::create`] can format memory that reads as zero.
#[repr(C)]
pub struct Heap {
    magic: u64,
    version: u32,
    region_pages: u32,
    region_len: u64,
    /// Address of the region when it was formatted; `open` refuses any other.
    base_addr: usize,
    pagemap_offset: usize,
    /// Where the span directory starts: slot `d` holds the page of descriptors `d * 64` to
    /// `d * 64 + 63` (descriptor 0, in slot 0's page, is never used: 0 means none).
    span_dir_offset: usize,
    /// Slots of the span directory.
    span_dir_slots: u32,
    /// First page of the data area.
    data_start_page: u32,
    /// Bump pointer, in pages: every page at or above it has never been handed out. Written
    /// under the page lock, read without it for statistics.
    top_page: AtomicU32,
    root: AtomicUsize,
    invalid_frees: AtomicU64,
    /// Bytes of live large allocations (page lock).
    large_bytes: AtomicU64,
    /// Pages of freed, dirty runs kept for reuse before freed runs are given back (see
    /// [`Heap::set_retain_bytes`]).
    retain_pages: AtomicU32,
    /// How far the retain budget may grow following the live large allocations, in pages
    /// (see [`Heap::set_retain_max_bytes`]); 0 keeps it fixed.
    retain_max_pages: AtomicU32,
    /// Marks objects sitting in a thread cache (second word); derived from the base so that
    /// it is fixed for the image and unlikely to appear in program data.
    tcache_key: u64,
    pages_lock: RawLock,
    pages: UnsafeCell<PageState>,
    arenas: [Arena; ARENAS_MAX],
}

// SAFETY: every mutable field is an atomic, or sits in an `UnsafeCell` reached only with the
// lock that guards it held (`pages` under `pages_lock`, an arena's state under its lock), and
// the region memory behind the header follows the same rules (see `span` for descriptors).
unsafe impl Sync for Heap {}

/// A page-lock guard; dropping it unlocks.
struct PagesGuard<'h> {
    heap: &'h Heap,
}

impl<'h> PagesGuard<'h> {
    #[inline]
    fn state(&mut self) -> &mut PageState {
        // SAFETY: the page lock is held for the guard's life and the guard is borrowed
        // mutably, so this is the only reference to the page state.
        unsafe { &mut *self.heap.pages.get() }
    }
}

impl Drop for PagesGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.heap.pages_lock.unlock();
    }
}

/// What a lookup found at a pointer handed to `free`, `realloc` or `usable_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Small { class: usize },
    Large { pages: usize },
}

impl Heap {
    /// Formats a new heap in `[base, base+len)`.
    ///
    /// # Safety
    /// `base` is page-aligned, `[base, base+len)` is mapped read-write, reads as zero, is used
    /// by nothing else and stays mapped for the rest of the process.
    pub unsafe fn create(base: *mut u8, len: usize) -> Result<&'static Heap, HeapError> {
        let layout = Layout::new(base, len)?;
        let heap = base.cast::<Heap>();
        // SAFETY: the caller hands over the zeroed region; all-zero is a valid `Heap` (plain
        // integers, atomics, arrays of them), and only the header's own bytes are written.
        unsafe {
            (*heap).magic = HEAP_MAGIC;
            (*heap).version = HEAP_VERSION;
            (*heap).region_pages = layout.region_pages;
            (*heap).region_len = len as u64;
            (*heap).base_addr = base.expose_provenance();
            (*heap).pagemap_offset = layout.pagemap_offset;
            (*heap).span_dir_offset = layout.span_dir_offset;
            (*heap).span_dir_slots = layout.span_dir_slots;
            (*heap).data_start_page = layout.data_start_page;
            (*heap).tcache_key = tcache_key(base.addr());
            (*heap).retain_pages.store(
                RETAIN_BYTES_DEFAULT.div_ceil(PAGE_SIZE) as u32,
                Ordering::Relaxed,
            );
            (*heap)
                .top_page
                .store(layout.data_start_page, Ordering::Release);
            Ok(&*heap)
        }
    }

    /// Attaches to a heap image already present at `base` (after a restore), checking its
    /// magic, version, length and base. Locks are reset: no thread of this process holds them.
    ///
    /// # Safety
    /// `[base, base+len)` is mapped read-write, holds only what an earlier heap at this very
    /// address wrote (saved while no heap call was in flight), and stays mapped.
    pub unsafe fn open(base: *mut u8, len: usize) -> Result<&'static Heap, HeapError> {
        let layout = Layout::new(base, len)?;
        let addr = base.expose_provenance();
        let heap = base.cast::<Heap>();
        // SAFETY: the region is mapped and at least one header long (checked by the layout);
        // the header's fields are plain integers, so any bytes are a valid value to check.
        let h = unsafe { &*heap };
        if h.magic != HEAP_MAGIC {
            return Err(HeapError::BadMagic {
                base: addr,
                found: h.magic,
            });
        }
        if h.version != HEAP_VERSION {
            return Err(HeapError::BadVersion {
                base: addr,
                found: h.version,
            });
        }
        if h.region_len != len as u64 || h.region_pages != layout.region_pages {
            return Err(HeapError::LengthMismatch {
                base: addr,
                stored: h.region_len,
                len,
            });
        }
        if h.base_addr != addr {
            return Err(HeapError::BaseMismatch {
                base: addr,
                stored: h.base_addr,
            });
        }
        h.reset_locks();
        h.drop_thread_caches();
        Ok(h)
    }

    #[inline]
    pub fn malloc(&self, size: usize) -> *mut u8 {
        if size <= SMALL_MAX_BYTES {
            self.alloc_small(class_of(size)).0
        } else {
            self.alloc_large(size, 1).0
        }
    }

    /// `n * size` zeroed bytes; null if the product overflows or the heap is full. Memory
    /// known to read as zero (never handed out, or discarded) is not written.
    pub fn calloc(&self, n: usize, size: usize) -> *mut u8 {
        let Some(bytes) = n.checked_mul(size) else {
            return ptr::null_mut();
        };
        let (p, zeroed) = if bytes <= SMALL_MAX_BYTES {
            self.alloc_small(class_of(bytes))
        } else {
            self.alloc_large(bytes, 1)
        };
        if !p.is_null() && !zeroed {
            // SAFETY: `p` is a fresh allocation of at least `bytes` bytes.
            unsafe { ptr::write_bytes(p, 0, bytes) };
        }
        p
    }

    /// glibc semantics: null `ptr` is `malloc(size)`; `size == 0` frees and returns null; on
    /// failure null is returned and `ptr` stays valid. An invalid `ptr` is counted and null
    /// returned.
    // `ptr` is only read after `lookup` proved it a live allocation of this heap, which is
    // what the C contract of realloc promises anyway; the API is safe like `free`'s.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn realloc(&self, ptr: *mut u8, size: usize, discard: DiscardFn) -> *mut u8 {
        if ptr.is_null() {
            return self.malloc(size);
        }
        if size == 0 {
            self.free(ptr, discard);
            return ptr::null_mut();
        }
        let Some(block) = self.lookup(ptr) else {
            self.count_invalid_free();
            return ptr::null_mut();
        };
        let usable = match block {
            Block::Small { class } => {
                let usable = CLASSES[class].size as usize;
                // Stay put unless the block would be less than half used.
                if size <= usable && size > usable / 2 {
                    return ptr;
                }
                usable
            }
            Block::Large { pages } => {
                let usable = pages * PAGE_SIZE;
                if size > SMALL_MAX_BYTES && self.resize_large_in_place(ptr, pages, size, discard) {
                    return ptr;
                }
                usable
            }
        };
        let new = self.malloc(size);
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct, `new` holds at least `size` bytes and
            // `ptr` at least `usable`.
            unsafe { ptr::copy_nonoverlapping(ptr, new, size.min(usable)) };
            self.free(ptr, discard);
        }
        new
    }

    /// `size` bytes aligned to `align` (a power of two; otherwise null).
    pub fn memalign(&self, align: usize, size: usize) -> *mut u8 {
        if !align.is_power_of_two() {
            return ptr::null_mut();
        }
        if align <= 16 {
            return self.malloc(size);
        }
        if align <= PAGE_SIZE && size <= SMALL_MAX_BYTES {
            // A class whose size is a multiple of `align` has every object aligned, as slabs
            // start on a page; powers of two are classes, so the search ends.
            let mut class = class_of(size.max(align));
            while !(CLASSES[class].size as usize).is_multiple_of(align) {
                class += 1;
            }
            return self.alloc_small(class).0;
        }
        let Some(size) = size.checked_next_multiple_of(PAGE_SIZE) else {
            return ptr::null_mut();
        };
        self.alloc_large(size.max(LARGE_MIN_BYTES), align.max(PAGE_SIZE) / PAGE_SIZE)
            .0
    }

    /// Frees `ptr` (null is ignored). A pointer in the region that is not a live allocation
    /// is counted in [`Heap::invalid_frees`] and otherwise ignored.
    pub fn free(&self, ptr: *mut u8, discard: DiscardFn) {
        if ptr.is_null() {
            return;
        }
        let Some((page, si)) = self.route(ptr) else {
            self.count_invalid_free();
            return;
        };
        // SAFETY: `route` returns indices of descriptors (the page map only ever holds them).
        let owner = unsafe { (*self.span(si)).owner.load(Ordering::Acquire) };
        let ok = match owner {
            OWNER_LARGE => self.free_large(ptr, page, si, discard),
            o if o >= 1 && o as usize <= ARENAS_MAX => {
                self.free_small(ptr, page, si, o as usize - 1, discard)
            }
            _ => false,
        };
        if !ok {
            self.count_invalid_free();
        }
    }

    /// Bytes usable at `ptr` (at least what was asked); 0 for anything but a live allocation.
    pub fn usable_size(&self, ptr: *mut u8) -> usize {
        match self.lookup(ptr) {
            Some(Block::Small { class }) => CLASSES[class].size as usize,
            Some(Block::Large { pages }) => pages * PAGE_SIZE,
            None => 0,
        }
    }

    #[inline]
    pub fn contains(&self, ptr: *const u8) -> bool {
        let base = self.base_addr;
        let p = ptr.addr();
        p >= base && p - base < self.region_len as usize
    }

    /// The one user pointer kept in the header (null until set).
    pub fn root(&self) -> *mut u8 {
        ptr::with_exposed_provenance_mut(self.root.load(Ordering::Acquire))
    }

    pub fn set_root(&self, p: *mut u8) {
        self.root.store(p.expose_provenance(), Ordering::Release);
    }

    /// Bytes of live allocations, counted at their class or page-run size.
    pub fn bytes_in_use(&self) -> u64 {
        // A cache may hold objects of other arenas' slabs, so only the totals compare.
        let (counted, cached) = self.arenas.iter().fold((0u64, 0u64), |(b, c), a| {
            (
                b + a.bytes.load(Ordering::Relaxed),
                c + a.cached_bytes.load(Ordering::Relaxed),
            )
        });
        counted.saturating_sub(cached) + self.large_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of the region below the bump pointer: header, page map (reserved, touched
    /// lazily), descriptor pages and every page ever handed out. The heap never wrote above it.
    /// How many bytes of freed runs may stay dirty (not given back) for reuse: reusing them
    /// costs nothing, while giving a run back and touching it again costs a system call and a
    /// fault per run on a paged heap. Past this, freed runs of at least [`DISCARD_MIN_BYTES`]
    /// are given back, largest first, down to half of it. (A budget that follows the bytes
    /// in use was tried: with blocks of 64 KiB to 4 MiB it cost five times the time of glibc
    /// for a tenth less memory.)
    pub fn set_retain_bytes(&self, bytes: usize) {
        let pages = u32::try_from(bytes / PAGE_SIZE).unwrap_or(u32::MAX);
        self.retain_pages.store(pages, Ordering::Relaxed);
    }

    /// Lets the retain budget follow what the program reuses: it is then the larger of the
    /// fixed budget ([`Heap::set_retain_bytes`]) and half ([`RETAIN_LIVE_DIVISOR`]) of the bytes of
    /// live large allocations, up to `bytes`. A program that keeps hundreds of MiB of big
    /// blocks and replaces them one at a time (glibc keeps such blocks in its heap, its mmap
    /// threshold rising with the blocks freed) then reuses freed blocks instead of faulting
    /// every page of each new one in again, while the memory kept stays a fraction of the
    /// memory the program holds anyway. 0 (the default) keeps the budget fixed.
    pub fn set_retain_max_bytes(&self, bytes: usize) {
        let pages = u32::try_from(bytes / PAGE_SIZE).unwrap_or(u32::MAX);
        self.retain_max_pages.store(pages, Ordering::Relaxed);
    }

    /// Bytes of freed runs kept dirty for reuse right now.
    pub fn retained_bytes(&self) -> u64 {
        let g = self.lock_pages();
        // SAFETY: the page lock is held by `g`.
        let pages = unsafe { (*self.pages.get()).dirty_free_pages };
        drop(g);
        pages * PAGE_SIZE as u64
    }

    pub fn top_bytes(&self) -> u64 {
        u64::from(self.top_page.load(Ordering::Acquire)) * PAGE_SIZE as u64
    }

    /// The parts of its region, as byte ranges from `base`, that the heap formatted at `base`
    /// may have written so far, read from its header without attaching to it: the header and
    /// the page map's slots of the pages below top, then the span directory and the data area
    /// up to top. For a 4 TiB heap that is a few MiB of address space until it is used, where
    /// everything below top would be 4 GiB (the page map). `None` if `base` holds no heap of
    /// this format version.
    ///
    /// # Safety
    /// `base` is page-aligned and its first page is mapped and readable (reading it must not
    /// fault into a handler that is not running yet).
    pub unsafe fn written_ranges(base: *const u8) -> Option<[std::ops::Range<usize>; 2]> {
        let h = base.cast::<Heap>();
        // SAFETY: the fields read lie in the first page (the header starts with them), which
        // the caller says is readable; they are written once by `create` but for top, an
        // atomic, and any bytes are a valid value of these integer fields.
        let (magic, version, pagemap_offset, span_dir_offset, top) = unsafe {
            (
                ptr::addr_of!((*h).magic).read(),
                ptr::addr_of!((*h).version).read(),
                ptr::addr_of!((*h).pagemap_offset).read(),
                ptr::addr_of!((*h).span_dir_offset).read(),
                (*ptr::addr_of!((*h).top_page)).load(Ordering::Acquire),
            )
        };
        if magic != HEAP_MAGIC || version != HEAP_VERSION {
            return None;
        }
        let top = top as usize * PAGE_SIZE;
        // Page-map slots exist only for pages below top (top only grows).
        let pagemap_end = pagemap_offset + (top / PAGE_SIZE * 4).next_multiple_of(PAGE_SIZE);
        Some([0..pagemap_end.min(span_dir_offset), span_dir_offset..top])
    }

    /// Frees (and reallocs) of pointers in the region that were not live allocations.
    pub fn invalid_frees(&self) -> u64 {
        self.invalid_frees.load(Ordering::Relaxed)
    }

    /// Takes every lock of the heap, in the fixed order (arenas by index, then the page
    /// heap), so `fork` copies a consistent heap. Pair with one of the two `after_fork_*`.
    pub fn prepare_fork(&self) {
        for a in &self.arenas {
            a.lock.lock();
        }
        self.pages_lock.lock();
    }

    /// In the parent after `fork`: releases what `prepare_fork` took.
    pub fn after_fork_parent(&self) {
        self.pages_lock.unlock();
        for a in self.arenas.iter().rev() {
            a.lock.unlock();
        }
    }

    /// In the child after `fork`: the locks are held on behalf of threads that do not exist
    /// here, so they are reset rather than unlocked.
    pub fn after_fork_child(&self) {
        self.reset_locks();
        arena::reset_claims_after_fork();
    }

    fn reset_locks(&self) {
        self.pages_lock.reset();
        for a in &self.arenas {
            a.lock.reset();
        }
    }

    // ----- internals shared by the submodules -----

    #[inline]
    fn base(&self) -> *mut u8 {
        ptr::with_exposed_provenance_mut(self.base_addr)
    }

    /// Address of page `page` of the region.
    #[inline]
    fn page_addr(&self, page: u32) -> *mut u8 {
        self.base().wrapping_add(page as usize * PAGE_SIZE)
    }

    /// Descriptor `si`: slot `si % 64` of the descriptor page in directory slot `si / 64`.
    /// `si` is a descriptor index handed out by the page heap (the page map only holds those),
    /// so its directory slot was filled before `si` was published.
    #[inline]
    fn span(&self, si: u32) -> *mut Span {
        let slot = si as usize / SPANS_PER_PAGE;
        let page = self.span_dir(slot).load(Ordering::Relaxed);
        self.base()
            .wrapping_add(page as usize * PAGE_SIZE + si as usize % SPANS_PER_PAGE * SPAN_BYTES)
            .cast()
    }

    /// Span directory slot `slot` (< `span_dir_slots`): the page holding its descriptors.
    #[inline]
    fn span_dir(&self, slot: usize) -> &AtomicU32 {
        debug_assert!(slot < self.span_dir_slots as usize);
        let at = self.base().wrapping_add(self.span_dir_offset + slot * 4);
        // SAFETY: the directory lies inside the mapped region (see `Layout`), slots are 4-byte
        // aligned and only ever accessed atomically. A slot is written under the page lock
        // before any descriptor of its page is stored in the page map (with release), and
        // readers reach `si` through the page map (with acquire) or under the page lock.
        unsafe { &*at.cast::<AtomicU32>() }
    }

    /// Page-map entry of `page` (< region pages).
    #[inline]
    fn pagemap(&self, page: u32) -> &AtomicU32 {
        debug_assert!(page < self.region_pages);
        let at = self
            .base()
            .wrapping_add(self.pagemap_offset + page as usize * 4);
        // SAFETY: the page map lies inside the mapped region (see `Layout`), entries are
        // 4-byte aligned, and they are only ever accessed atomically.
        unsafe { &*at.cast::<AtomicU32>() }
    }

    #[inline]
    fn lock_pages(&self) -> PagesGuard<'_> {
        self.pages_lock.lock();
        PagesGuard { heap: self }
    }

    /// Page index and page-map entry of a pointer into the data area, if any. Pages at or
    /// above top never had an entry (top only grows), so they read as 0 without a look at top.
    #[inline]
    fn route(&self, ptr: *mut u8) -> Option<(u32, u32)> {
        let off = ptr.addr().wrapping_sub(self.base_addr);
        let page = off / PAGE_SIZE;
        if page < self.data_start_page as usize || page >= self.region_pages as usize {
            return None;
        }
        let page = page as u32;
        let si = self.pagemap(page).load(Ordering::Acquire);
        (si != 0).then_some((page, si))
    }

    /// What is at `ptr`, if it is a live allocation (checked under the owning lock).
    fn lookup(&self, ptr: *mut u8) -> Option<Block> {
        let (page, si) = self.route(ptr)?;
        let s = self.span(si);
        // SAFETY: `si` names a descriptor (the page map only holds descriptor indices).
        let owner = unsafe { (*s).owner.load(Ordering::Acquire) };
        if owner == OWNER_LARGE {
            let _g = self.lock_pages();
            // SAFETY: the page lock guards large descriptors; `live_large` checks `si` first.
            unsafe {
                self.live_large(ptr, page, si).then(|| Block::Large {
                    pages: (*s).npages as usize,
                })
            }
        } else if owner >= 1 && owner as usize <= ARENAS_MAX {
            let a = owner as usize - 1;
            let arena = &self.arenas[a];
            arena.lock.lock();
            // SAFETY: the arena lock is held; `slab_object` re-checks ownership first.
            let found = unsafe { self.slab_object(ptr, page, si, a) };
            // SAFETY: as above.
            let class = found.map(|_| unsafe { (*s).class } as usize);
            arena.lock.unlock();
            class.map(|class| Block::Small { class })
        } else {
            None
        }
    }

    fn count_invalid_free(&self) {
        self.invalid_frees.fetch_add(1, Ordering::Relaxed);
    }
}

/// The thread-cache key of a heap based at `base` (splitmix64 finalizer; never 0).
fn tcache_key(base: usize) -> u64 {
    let mut z = (base as u64) ^ HEAP_MAGIC;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// Where things go in a region of a given length.
struct Layout {
    region_pages: u32,
    pagemap_offset: usize,
    span_dir_offset: usize,
    span_dir_slots: u32,
    data_start_page: u32,
}

impl Layout {
    fn new(base: *mut u8, len: usize) -> Result<Layout, HeapError> {
        if !base.addr().is_multiple_of(PAGE_SIZE) || base.is_null() {
            return Err(HeapError::MisalignedBase { base: base.addr() });
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(HeapError::MisalignedLength { len });
        }
        if len > REGION_BYTES_MAX {
            return Err(HeapError::RegionTooLarge { len });
        }
        let region_pages = len / PAGE_SIZE;
        let pagemap_offset = std::mem::size_of::<Heap>().next_multiple_of(PAGE_SIZE);
        let pagemap_bytes = (region_pages * 4).next_multiple_of(PAGE_SIZE);
        let span_dir_offset = pagemap_offset + pagemap_bytes;
        let span_dir_slots = span_dir_slots(region_pages);
        let data_start = span_dir_offset + (span_dir_slots * 4).next_multiple_of(PAGE_SIZE);
        let min = data_start + DATA_PAGES_MIN * PAGE_SIZE;
        if len < min {
            return Err(HeapError::RegionTooSmall { len, min });
        }
        Ok(Layout {
            region_pages: u32::try_from(region_pages)
                .expect("REGION_BYTES_MAX bounds the page count"),
            pagemap_offset,
            span_dir_offset,
            span_dir_slots: u32::try_from(span_dir_slots)
                .expect("REGION_BYTES_MAX bounds the directory"),
            data_start_page: u32::try_from(data_start / PAGE_SIZE)
                .expect("REGION_BYTES_MAX bounds the page count"),
        })
    }
}

// Debug-only consistency helpers used by the tests.
#[cfg(test)]
impl Heap {
    fn is_small(&self, ptr: *mut u8) -> bool {
        matches!(self.lookup(ptr), Some(Block::Small { .. }))
    }

    fn locks_free(&self) -> bool {
        !self.pages_lock.is_held() && self.arenas.iter().all(|a| !a.lock.is_held())
    }
}
