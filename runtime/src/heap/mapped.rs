//! Served anonymous mappings (`LEGO_MMAP=1`): page runs of the page heap handed to the
//! program's `mmap` instead of to `malloc`, as spans of kind `KIND_MAPPED`.
//!
//! A mapping is one or more adjacent `KIND_MAPPED` spans: `mprotect` and a partial `munmap`
//! split a span at their boundaries, so that each span has one protection (recorded in the
//! span, for the shim's bookkeeping and for a restored heap). Unlike a large allocation, every
//! page of a mapping span has its page-map entry, so that any address inside it is found in
//! one look-up (`munmap`, `madvise` and `mprotect` name arbitrary page ranges).
//!
//! Rules: the heap never makes a system call here; whoever calls it applies protections and
//! discards pages (the shim, through the runtime). Unmapping happens in two steps:
//! [`Heap::unmap_begin`] takes the pieces out of use (limbo, in no bucket, so no one can be
//! handed pages that are about to be discarded under them), the caller discards them with no
//! heap lock held, then [`Heap::unmap_finish`] files them as fresh free runs. `free` and
//! `realloc` refuse a mapping (its owner is `OWNER_MAPPED`), and the mapping calls refuse
//! anything that is not one.

use std::sync::atomic::Ordering;

use thiserror::Error;

use super::pages::PageState;
use super::span::{KIND_LIMBO, KIND_MAPPED, OWNER_MAPPED, OWNER_NONE, PROT_MIXED};
use super::{DiscardFn, Heap};
use crate::PAGE_SIZE;

/// `PROT_READ | PROT_WRITE`, the only protection whose pages the pager may evict.
pub const PROT_RW: u8 = (libc::PROT_READ | libc::PROT_WRITE) as u8;
/// Descriptors one split-at-both-ends needs.
const SPANS_PER_SPLIT_MAX: u32 = 2;

const _: () = assert!(libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC < PROT_MIXED as i32);

/// Why a mapping call was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MapError {
    /// Part of the range is not a served mapping (heap pages, free pages, or beyond the heap).
    #[error("the range {addr:#x}+{len:#x} is not wholly inside served mappings")]
    NotMapped { addr: usize, len: usize },
    /// No room in the region, or no descriptor for a split.
    #[error("the heap has no room for a mapping of {len} bytes")]
    NoRoom { len: usize },
    /// The range's pieces have different protections (the kernel refuses such an `mremap`:
    /// it spans two VMAs).
    #[error("the range {addr:#x}+{len:#x} has pieces of different protections")]
    Mixed { addr: usize, len: usize },
}

/// What [`Heap::unmap_begin`] took out of use, for the caller's discard and
/// [`Heap::unmap_finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unmapping {
    pub addr: usize,
    pub len: usize,
    /// Some piece was not read-write: the caller puts the protection back before discarding.
    pub protected: bool,
}

impl Heap {
    /// Takes a run of `len` bytes (rounded up to pages) for a mapping with protection `prot`
    /// (`PROT_*` bits). The pages read as zero: a reused dirty run is given back through
    /// `discard` first. The caller applies `prot` to the range (nothing here is a system
    /// call). `None` if the region has no room.
    pub fn map_pages(&self, len: usize, prot: u8, discard: DiscardFn) -> Option<*mut u8> {
        if len == 0 || len > self.region_len as usize {
            return None;
        }
        let npages = u32::try_from(len.div_ceil(PAGE_SIZE)).ok()?;
        let mut g = self.lock_pages();
        let st = g.state();
        // SAFETY: the page lock is held.
        let (addr, fresh) = unsafe {
            let si = self.alloc_run(st, npages, 1)?;
            let s = self.span(si);
            (*s).kind = KIND_MAPPED;
            (*s).prot = prot;
            let fresh = (*s).fresh != 0;
            (*s).fresh = 0;
            self.map_all(si);
            (*s).owner.store(OWNER_MAPPED, Ordering::Release);
            (self.page_addr((*s).start), fresh)
        };
        drop(g);
        if !fresh {
            // Nobody else can reach these pages yet: the program learns of them on return.
            discard(addr, npages as usize * PAGE_SIZE);
        }
        Some(addr)
    }

    /// Whether every page of `[addr, addr+len)` lies in a served mapping.
    pub fn is_mapped(&self, addr: usize, len: usize) -> bool {
        let Some((first, end)) = self.page_range(addr, len) else {
            return false;
        };
        let _g = self.lock_pages();
        // SAFETY: the page lock is held.
        unsafe { self.covered(first, end) }
    }

    /// Whether any page of `[addr, addr+len)` (clipped to the region) lies in a served mapping.
    pub fn overlaps_mapping(&self, addr: usize, len: usize) -> bool {
        let base = self.base_addr;
        let start = addr.max(base);
        let end = addr
            .saturating_add(len)
            .min(base + self.region_len as usize);
        if start >= end {
            return false;
        }
        let first = ((start - base) / PAGE_SIZE) as u32;
        let last = ((end - base).div_ceil(PAGE_SIZE)) as u32;
        let _g = self.lock_pages();
        let mut p = first;
        while p < last {
            // SAFETY: the page lock is held.
            match unsafe { self.mapped_span_at(p) } {
                Some(_) => return true,
                None => p += 1,
            }
        }
        false
    }

    /// The protection of `[addr, addr+len)` if every page of it is mapped with one protection
    /// (an `mremap` of it is then possible; the kernel refuses one that spans two VMAs).
    pub fn mapping_prot(&self, addr: usize, len: usize) -> Result<u8, MapError> {
        let (first, end) = self
            .page_range(addr, len)
            .ok_or(MapError::NotMapped { addr, len })?;
        let _g = self.lock_pages();
        let mut p = first;
        let mut prot = None;
        while p < end {
            // SAFETY: the page lock is held.
            let Some(si) = (unsafe { self.mapped_span_at(p) }) else {
                return Err(MapError::NotMapped { addr, len });
            };
            let s = self.span(si);
            // SAFETY: the page lock guards mapping descriptors.
            let (sp, next) = unsafe { ((*s).prot, (*s).start + (*s).npages) };
            if prot.is_some_and(|q| q != sp) {
                return Err(MapError::Mixed { addr, len });
            }
            prot = Some(sp);
            p = next;
        }
        prot.ok_or(MapError::NotMapped { addr, len })
    }

    /// Records protection `prot` for `[addr, addr+len)`, every page of which is mapped,
    /// splitting the pieces at both ends. (The caller has applied it to the pages.) Without a
    /// descriptor for a split, the piece that would have been split is marked of mixed
    /// protection, which only makes a later unmap put the protection back needlessly.
    pub fn protect_pages(&self, addr: usize, len: usize, prot: u8) -> Result<(), MapError> {
        let (first, end) = self
            .page_range(addr, len)
            .ok_or(MapError::NotMapped { addr, len })?;
        let mut g = self.lock_pages();
        let st = g.state();
        // SAFETY: the page lock is held.
        unsafe {
            if !self.covered(first, end) {
                return Err(MapError::NotMapped { addr, len });
            }
            self.ensure_spares(st, SPANS_PER_SPLIT_MAX);
            let exact = self.split_at(st, first) && self.split_at(st, end);
            let mut p = first;
            while p < end {
                let si = self
                    .mapped_span_at(p)
                    .expect("a covered range stays mapped under the page lock");
                let s = self.span(si);
                let inside = (*s).start >= first && (*s).start + (*s).npages <= end;
                (*s).prot = if exact || inside { prot } else { PROT_MIXED };
                p = (*s).start + (*s).npages;
            }
        }
        Ok(())
    }

    /// Step one of `munmap` of `[addr, addr+len)`, every page of which must be mapped: the
    /// pieces are split at both ends and taken out of use (limbo). The caller then puts the
    /// protection back if [`Unmapping::protected`], discards the pages, and calls
    /// [`Heap::unmap_finish`].
    pub fn unmap_begin(&self, addr: usize, len: usize) -> Result<Unmapping, MapError> {
        let (first, end) = self
            .page_range(addr, len)
            .ok_or(MapError::NotMapped { addr, len })?;
        let mut g = self.lock_pages();
        let st = g.state();
        // SAFETY: the page lock is held.
        unsafe {
            if !self.covered(first, end) {
                return Err(MapError::NotMapped { addr, len });
            }
            self.ensure_spares(st, SPANS_PER_SPLIT_MAX);
            if st_spares(st) < self.splits_needed(first, end) {
                return Err(MapError::NoRoom { len });
            }
            let split = self.split_at(st, first) && self.split_at(st, end);
            debug_assert!(split, "the spares were counted");
            let mut protected = false;
            let mut p = first;
            while p < end {
                let si = self
                    .mapped_span_at(p)
                    .expect("a covered range stays mapped under the page lock");
                let s = self.span(si);
                debug_assert!((*s).start == p && (*s).start + (*s).npages <= end);
                protected |= (*s).prot != PROT_RW;
                (*s).owner.store(OWNER_NONE, Ordering::Release);
                (*s).kind = KIND_LIMBO;
                p += (*s).npages;
            }
            Ok(Unmapping {
                addr: self.page_addr(first).addr(),
                len: (end - first) as usize * PAGE_SIZE,
                protected,
            })
        }
    }

    /// Step two of `munmap`: the pieces [`Heap::unmap_begin`] took out of use, discarded by
    /// the caller since, become fresh free runs.
    pub fn unmap_finish(&self, u: Unmapping) {
        let Some((first, end)) = self.page_range(u.addr, u.len) else {
            return;
        };
        let mut g = self.lock_pages();
        let mut p = first;
        while p < end {
            let si = self.pagemap(p).load(Ordering::Relaxed);
            let s = self.span(si);
            // SAFETY: the page lock is held; the limbo pieces are this call's alone (in no
            // bucket, owned by no one), each page's entry still naming its piece.
            let npages = unsafe {
                assert!(
                    si != 0 && (*s).kind == KIND_LIMBO && (*s).start == p,
                    "an unmapped piece left limbo behind the caller's back"
                );
                (*s).npages
            };
            // SAFETY: as above; `release_run` may merge it with fresh free neighbours, never
            // with the next piece (limbo, not free).
            unsafe {
                (*s).prot = 0;
                let purge = self.release_run(g.state(), si, true);
                debug_assert!(purge.is_none(), "a fresh run never starts a purge");
            }
            p += npages;
        }
    }

    /// Grows the mapping that ends at `addr + old_len` to `new_len` bytes without moving it,
    /// taking the free run or the untouched space right after it: `Ok(prot)` of the grown
    /// piece (the caller applies it to the new tail if it is not read-write), `Err` if it
    /// cannot (the caller moves the mapping). The new pages read as zero (a dirty free run is
    /// given back through `discard` first).
    pub fn grow_in_place(
        &self,
        addr: usize,
        old_len: usize,
        new_len: usize,
        discard: DiscardFn,
    ) -> Result<u8, MapError> {
        let (first, end) = self
            .page_range(addr, old_len)
            .ok_or(MapError::NotMapped { addr, len: old_len })?;
        let new_end = self
            .page_range(addr, new_len)
            .map(|(_, e)| e)
            .ok_or(MapError::NoRoom { len: new_len })?;
        if new_end <= end {
            return Err(MapError::NoRoom { len: new_len });
        }
        let extra = new_end - end;
        let mut g = self.lock_pages();
        let st = g.state();
        // SAFETY: the page lock is held.
        let (si, dirty) = unsafe {
            if !self.covered(first, end) {
                return Err(MapError::NotMapped { addr, len: old_len });
            }
            let si = self
                .mapped_span_at(end - 1)
                .expect("a covered range stays mapped under the page lock");
            let s = self.span(si);
            if (*s).start + (*s).npages != end {
                // More of the mapping follows: growing would overlap it.
                return Err(MapError::NoRoom { len: new_len });
            }
            let top = self.top_page.load(Ordering::Relaxed);
            let dirty = if end == top {
                if u64::from(top) + u64::from(extra) > u64::from(self.region_pages) {
                    return Err(MapError::NoRoom { len: new_len });
                }
                self.top_page.store(top + extra, Ordering::Release);
                false
            } else if let Some(r) = self.free_run_at(end) {
                let rs = self.span(r);
                if (*rs).start != end || (*rs).npages < extra {
                    return Err(MapError::NoRoom { len: new_len });
                }
                let dirty = (*rs).fresh == 0;
                self.remove_free(st, r);
                if (*rs).npages == extra {
                    self.put_spare(st, r);
                } else {
                    (*rs).start += extra;
                    (*rs).npages -= extra;
                    self.insert_free(st, r);
                }
                dirty
            } else {
                return Err(MapError::NoRoom { len: new_len });
            };
            (*s).npages += extra;
            self.map_all(si);
            (si, dirty)
        };
        // SAFETY: the page lock is still held (`g`).
        let prot = unsafe { (*self.span(si)).prot };
        drop(g);
        if dirty {
            // The program learns of the new tail on return.
            discard(self.page_addr(end), extra as usize * PAGE_SIZE);
        }
        Ok(prot)
    }

    // ----- internals -----

    /// The pages `[first, end)` of `[addr, addr+len)` if it is page-aligned, non-empty and
    /// inside the data area.
    fn page_range(&self, addr: usize, len: usize) -> Option<(u32, u32)> {
        if len == 0 || !addr.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        let off = addr.checked_sub(self.base_addr)?;
        let end = off.checked_add(len.checked_next_multiple_of(PAGE_SIZE)?)?;
        if end > self.region_len as usize {
            return None;
        }
        let first = u32::try_from(off / PAGE_SIZE).ok()?;
        if first < self.data_start_page {
            return None;
        }
        Some((first, u32::try_from(end / PAGE_SIZE).ok()?))
    }

    /// The mapping piece holding `page`, if any.
    ///
    /// # Safety
    /// The page lock is held (it guards mapping descriptors).
    unsafe fn mapped_span_at(&self, page: u32) -> Option<u32> {
        if page < self.data_start_page || page >= self.region_pages {
            return None;
        }
        let si = self.pagemap(page).load(Ordering::Relaxed);
        if si == 0 {
            return None;
        }
        let s = self.span(si);
        // Entries may be stale; one that names a live mapping piece covering the page is
        // right (pieces never overlap).
        ((*s).owner.load(Ordering::Relaxed) == OWNER_MAPPED
            && (*s).kind == KIND_MAPPED
            && page >= (*s).start
            && page - (*s).start < (*s).npages)
            .then_some(si)
    }

    /// Whether every page of `[first, end)` is in a mapping piece.
    ///
    /// # Safety
    /// The page lock is held.
    unsafe fn covered(&self, first: u32, end: u32) -> bool {
        let mut p = first;
        while p < end {
            let Some(si) = self.mapped_span_at(p) else {
                return false;
            };
            let s = self.span(si);
            p = (*s).start + (*s).npages;
        }
        true
    }

    /// Descriptors splitting `[first, end)` (covered) out of its pieces takes: one per end
    /// that falls inside a piece.
    ///
    /// # Safety
    /// The page lock is held and the range is covered.
    unsafe fn splits_needed(&self, first: u32, end: u32) -> u32 {
        let inside = |p: u32| {
            self.mapped_span_at(p)
                .is_some_and(|si| (*self.span(si)).start != p)
        };
        u32::from(inside(first)) + u32::from(end < self.region_pages && inside(end))
    }

    /// Makes `page` the first page of a piece if it falls inside one (splitting it); true if
    /// it now starts a piece or holds none. False without a spare descriptor.
    ///
    /// # Safety
    /// The page lock is held and `st` is its state.
    unsafe fn split_at(&self, st: &mut PageState, page: u32) -> bool {
        let Some(si) = self.mapped_span_at(page) else {
            return true;
        };
        let s = self.span(si);
        if (*s).start == page {
            return true;
        }
        if st_spares(st) == 0 {
            return false;
        }
        let end = (*s).start + (*s).npages;
        let t = self.take_spare(st, page, end - page, 0);
        let ts = self.span(t);
        (*ts).kind = KIND_MAPPED;
        (*ts).prot = (*s).prot;
        (*s).npages = page - (*s).start;
        self.map_all(t);
        (*ts).owner.store(OWNER_MAPPED, Ordering::Release);
        true
    }

    /// Points the page map at `si` for every page of its run.
    ///
    /// # Safety
    /// The page lock is held and `si` covers pages inside the data area.
    unsafe fn map_all(&self, si: u32) {
        let s = self.span(si);
        for p in (*s).start..(*s).start + (*s).npages {
            self.pagemap(p).store(si, Ordering::Release);
        }
    }

    /// Calls `f(addr, len, prot)` for every served mapping piece of the heap, in address
    /// order (a restored heap's protections are applied this way).
    pub fn for_each_mapping(&self, mut f: impl FnMut(usize, usize, u8)) {
        let _g = self.lock_pages();
        let top = self.top_page.load(Ordering::Relaxed);
        let mut p = self.data_start_page;
        while p < top {
            // SAFETY: the page lock is held.
            match unsafe { self.mapped_span_at(p) } {
                Some(si) => {
                    let s = self.span(si);
                    // SAFETY: as above.
                    let (start, n, prot) = unsafe { ((*s).start, (*s).npages, (*s).prot) };
                    f(self.page_addr(start).addr(), n as usize * PAGE_SIZE, prot);
                    p = start + n;
                }
                None => p += 1,
            }
        }
    }
}

/// Spare descriptors on hand.
fn st_spares(st: &PageState) -> u32 {
    st.spare_count()
}
