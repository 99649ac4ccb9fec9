//! Span descriptors: one 64-byte record per run of pages (a free run, a slab of small objects
//! of one class, or one large allocation), kept in descriptor pages carved from the heap's
//! bump area and named by a `u32` index (the page's slot in the span directory × 64 + the
//! descriptor's slot in its page), so the heap image holds no absolute pointers of its own
//! and descriptors can lie anywhere in a region of up to 2^32 pages.
//!
//! Which lock guards which field:
//! - `owner` is atomic: it is read without any lock to route a `free` to the right lock, then
//!   re-checked under that lock.
//! - `start`, `npages`, `kind`, `fresh`, `prot` belong to the page heap (its lock), except that a span
//!   owned by an arena keeps them stable while owned.
//! - `next`/`prev` link the span in a page-heap free bucket (page lock) or, while it is a slab,
//!   in its arena's partial list (arena lock).
//! - `class`, `used`, `capacity`, `bump`, `free_head`, `live` belong to the owning arena.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Bytes of one descriptor.
pub(crate) const SPAN_BYTES: usize = 64;

/// `owner` of a span no arena owns: a free run, a run being discarded, an unused descriptor.
pub(crate) const OWNER_NONE: u32 = 0;
/// `owner` of a large allocation (guarded by the page lock). Slabs have `owner = arena + 1`.
pub(crate) const OWNER_LARGE: u32 = u32::MAX;

/// A descriptor in the pool of unused ones.
pub(crate) const KIND_UNUSED: u8 = 0;
/// A free run of pages, in a free bucket.
pub(crate) const KIND_FREE: u8 = 1;
/// A slab of small objects owned by an arena.
pub(crate) const KIND_SMALL: u8 = 2;
/// One large allocation.
pub(crate) const KIND_LARGE: u8 = 3;
/// A free run whose dirty pages are being discarded outside the lock; in no bucket yet.
pub(crate) const KIND_LIMBO: u8 = 4;
/// A served anonymous mapping (`mmap` through the shim with `LEGO_MMAP=1`), or a piece of
/// one: every page's page-map entry names it, and `prot` holds its protection.
pub(crate) const KIND_MAPPED: u8 = 5;

/// `owner` of a served mapping (guarded by the page lock): neither `free` nor `realloc`
/// accepts it.
pub(crate) const OWNER_MAPPED: u32 = u32::MAX - 1;

/// `prot` of a mapping piece whose protection is not known exactly (a split failed for want
/// of a descriptor): treated as not read-write.
pub(crate) const PROT_MIXED: u8 = 0xff;

/// End of an in-slab free list (object indices are < `SPAN_OBJECTS_MAX`).
pub(crate) const OBJECT_NIL: u16 = u16::MAX;

#[repr(C, align(64))]
pub(crate) struct Span {
    pub owner: AtomicU32,
    /// First page (index from the region base).
    pub start: u32,
    pub npages: u32,
    pub next: u32,
    pub prev: u32,
    pub kind: u8,
    pub class: u8,
    /// Free run: every page reads as zero. Slab: objects never handed out (index >= `bump`)
    /// read as zero.
    pub fresh: u8,
    /// A mapping's `PROT_*` bits ([`PROT_MIXED`] when unknown); 0 for every other kind.
    pub prot: u8,
    /// Live objects of a slab.
    pub used: u16,
    /// Objects a slab holds.
    pub capacity: u16,
    /// Objects of a slab handed out at least once; the rest are carved on demand so that a new
    /// slab's pages are touched one at a time, as they are needed.
    pub bump: u16,
    /// First object of the slab's free list; the link is a `u16` in the object's first bytes.
    pub free_head: u16,
    /// One bit per live object: catches double frees and frees of non-objects exactly.
    /// Written only under the owning arena's lock (load + store, no read-modify-write);
    /// atomic because the arena's exclusive thread reads it without the lock (see `arena`).
    pub live: [AtomicU64; 4],
}

impl Span {
    #[inline]
    pub fn is_live(&self, idx: usize) -> bool {
        self.live[idx / 64].load(Ordering::Relaxed) & (1 << (idx % 64)) != 0
    }

    /// Caller holds the owning arena's lock.
    #[inline]
    pub fn set_live(&self, idx: usize) {
        let w = &self.live[idx / 64];
        w.store(
            w.load(Ordering::Relaxed) | (1 << (idx % 64)),
            Ordering::Relaxed,
        );
    }

    /// Caller holds the owning arena's lock.
    #[inline]
    pub fn clear_live(&self, idx: usize) {
        let w = &self.live[idx / 64];
        w.store(
            w.load(Ordering::Relaxed) & !(1 << (idx % 64)),
            Ordering::Relaxed,
        );
    }

    /// Caller holds the lock that owns the descriptor.
    pub fn clear_all_live(&self) {
        for w in &self.live {
            w.store(0, Ordering::Relaxed);
        }
    }
}

const _: () = assert!(std::mem::size_of::<Span>() == SPAN_BYTES);
const _: () = assert!(super::size_class::SPAN_OBJECTS_MAX <= 4 * 64);
