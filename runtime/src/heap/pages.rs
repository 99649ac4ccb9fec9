//! The page heap: runs of pages for slabs and large allocations, under one lock.
//!
//! Free runs sit in size buckets (exact up to [`FREE_EXACT_PAGES_MAX`] pages, then four per
//! power of two) with a bitmap of non-empty buckets; a request takes the first fitting run and
//! splits off the rest. When nothing fits, pages come from the bump pointer (`top`), and pages
//! above `top` have never been touched. Each free run knows whether all its pages read as
//! zero (`fresh`: never handed out, or given back); freed runs merge with free neighbours of
//! the same kind. Dirty free runs are kept for reuse up to the retain budget; past it the
//! largest ones (of at least [`DISCARD_MIN_BYTES`]) are given back through the discard callback
//! — outside the lock, while they sit in no bucket ("limbo") so no one can be handed pages that
//! are about to be zeroed under them — and become fresh.
//!
//! Descriptors come from a spare pool refilled a page at a time from `top`, each new page
//! listed in the span directory; descriptor pages are never freed (at most one descriptor per
//! page of the region can ever be live).

use std::sync::atomic::Ordering;

use super::span::{Span, KIND_FREE, KIND_LARGE, KIND_LIMBO, KIND_UNUSED, OWNER_LARGE, OWNER_NONE};
use super::{DiscardFn, Heap, DISCARD_MIN_BYTES, RETAIN_LIVE_DIVISOR};
use crate::PAGE_SIZE;

/// Free buckets: 16 exact ones, then 4 per power of two up to 2^32 pages (any `u32` run, so
/// every run of the largest region has one), as many as the `u128` bitmap has bits.
pub(crate) const FREE_BUCKETS: usize = 128;
/// Free runs up to this many pages have a bucket of their own size (a power of two).
const FREE_EXACT_PAGES_MAX: u32 = 16;
/// Runs examined in the one bucket whose runs may be too short, before moving up a bucket.
const FREE_SCAN_MAX: usize = 16;
const DISCARD_MIN_PAGES: u32 = (DISCARD_MIN_BYTES / PAGE_SIZE) as u32;
const SPANS_PER_PAGE: u32 = super::SPANS_PER_PAGE as u32;
/// New descriptors one run allocation may need: the split-off prefix and suffix of a free run,
/// or the run taken from top and the alignment gap before it.
const SPANS_PER_ALLOC_MAX: u32 = 2;
/// Most dirty runs one purge gives back (each is one call of the discard callback).
const PURGE_RUNS_MAX: usize = 8;

const _: () = assert!(FREE_EXACT_PAGES_MAX.is_power_of_two());
const _: () = assert!(bucket_of(u32::MAX) < FREE_BUCKETS);
const _: () = assert!(FREE_BUCKETS <= u128::BITS as usize);
const _: () = assert!(super::REGION_PAGES_MAX <= u32::MAX as usize);

/// The page heap's state, in the header; guarded by `Heap::pages_lock`. All-zero is empty.
#[repr(C)]
pub(crate) struct PageState {
    /// Bit `b` set iff `buckets[b]` is non-empty.
    nonempty: u128,
    buckets: [u32; FREE_BUCKETS],
    /// Spare descriptors, linked through `next`.
    spare: u32,
    spare_count: u32,
    /// Slots of the span directory in use: descriptor pages taken so far.
    span_pages: u32,
    /// Pages of the free runs in the buckets that are not fresh (may hold old data).
    pub(super) dirty_free_pages: u64,
}

impl PageState {
    /// Spare descriptors on hand.
    pub(super) fn spare_count(&self) -> u32 {
        self.spare_count
    }
}

/// Dirty free runs taken out of the buckets to be given back outside the lock (see
/// [`Heap::release_run`]).
pub(crate) struct Purge {
    runs: [u32; PURGE_RUNS_MAX],
    count: usize,
}

const fn bucket_of(npages: u32) -> usize {
    if npages <= FREE_EXACT_PAGES_MAX {
        npages as usize - 1
    } else {
        let lg = 31 - npages.leading_zeros();
        let sub = (npages >> (lg - 2)) & 3;
        (FREE_EXACT_PAGES_MAX + (lg - FREE_EXACT_PAGES_MAX.trailing_zeros()) * 4 + sub) as usize
    }
}

impl Heap {
    /// Takes a run of `npages` pages starting on a multiple of `align_pages` pages. The run's
    /// descriptor comes back with `start`, `npages` and `fresh` set, owned by no one and in
    /// no list; the caller sets `kind`, the page map and the owner.
    ///
    /// # Safety
    /// The page lock is held and `st` is its state.
    pub(super) unsafe fn alloc_run(
        &self,
        st: &mut PageState,
        npages: u32,
        align_pages: u32,
    ) -> Option<u32> {
        debug_assert!(npages >= 1 && align_pages.is_power_of_two());
        // Best effort: a full region may still have free runs that need no new descriptor.
        self.ensure_spares(st, SPANS_PER_ALLOC_MAX);
        let need = npages.checked_add(align_pages - 1)?;
        let si = self.find_free(st, need);
        if si != 0 {
            let s = self.span(si);
            let start = u64::from((*s).start);
            let end = start + u64::from((*s).npages);
            let at = start.next_multiple_of(u64::from(align_pages));
            let prefix = (at - start) as u32;
            let suffix = (end - at - u64::from(npages)) as u32;
            if st.spare_count < u32::from(prefix > 0) + u32::from(suffix > 0) {
                return None;
            }
            self.remove_free(st, si);
            let fresh = (*s).fresh;
            if prefix > 0 {
                let p = self.take_spare(st, start as u32, prefix, fresh);
                self.insert_free(st, p);
            }
            if suffix > 0 {
                let q = self.take_spare(st, at as u32 + npages, suffix, fresh);
                self.insert_free(st, q);
            }
            (*s).start = at as u32;
            (*s).npages = npages;
            (*s).kind = KIND_UNUSED;
            return Some(si);
        }
        let top = self.top_page.load(Ordering::Relaxed);
        let at = u64::from(top).next_multiple_of(u64::from(align_pages));
        if at + u64::from(npages) > u64::from(self.region_pages) {
            return None;
        }
        let at = at as u32;
        if st.spare_count < 1 + u32::from(at > top) {
            return None;
        }
        if at > top {
            let gap = self.take_spare(st, top, at - top, 1);
            self.insert_free(st, gap);
        }
        self.top_page.store(at + npages, Ordering::Release);
        Some(self.take_spare(st, at, npages, 1))
    }

    /// Returns run `si` (owned by no one, in no list) to the free buckets, merging it with the
    /// free neighbours that are as fresh as it is (a dirty run never makes a fresh one dirty).
    ///
    /// Freed dirty runs stay dirty, for reuse at no cost, until the dirty free pages exceed the
    /// retain budget ([`Heap::set_retain_bytes`]); then the largest dirty runs of at least
    /// [`DISCARD_MIN_BYTES`] are taken out ("limbo": in no bucket, so no one can be handed
    /// pages that are about to be zeroed under them) and returned as a [`Purge`], which the
    /// caller passes to [`Heap::finish_purge`] once every heap lock is released.
    ///
    /// # Safety
    /// The page lock is held and `st` is its state.
    pub(super) unsafe fn release_run(
        &self,
        st: &mut PageState,
        si: u32,
        fresh: bool,
    ) -> Option<Purge> {
        let s = self.span(si);
        let mut start = (*s).start;
        let mut end = start + (*s).npages;
        let same = |f: u8| (f != 0) == fresh;
        if start > self.data_start_page {
            if let Some(l) = self.free_run_at(start - 1) {
                let ls = self.span(l);
                if (*ls).start + (*ls).npages == start && same((*ls).fresh) {
                    self.remove_free(st, l);
                    start = (*ls).start;
                    self.put_spare(st, l);
                }
            }
        }
        if end < self.top_page.load(Ordering::Relaxed) {
            if let Some(r) = self.free_run_at(end) {
                let rs = self.span(r);
                if (*rs).start == end && same((*rs).fresh) {
                    self.remove_free(st, r);
                    end += (*rs).npages;
                    self.put_spare(st, r);
                }
            }
        }
        (*s).start = start;
        (*s).npages = end - start;
        (*s).owner.store(OWNER_NONE, Ordering::Release);
        (*s).fresh = u8::from(fresh);
        self.insert_free(st, si);
        if fresh || st.dirty_free_pages <= self.retain_budget_pages() {
            return None;
        }
        self.take_purge(st)
    }

    /// Dirty free pages the heap keeps (see [`Heap::set_retain_bytes`] and
    /// [`Heap::set_retain_max_bytes`]).
    fn retain_budget_pages(&self) -> u64 {
        let fixed = u64::from(self.retain_pages.load(Ordering::Relaxed));
        let max = u64::from(self.retain_max_pages.load(Ordering::Relaxed));
        let live = self.large_bytes.load(Ordering::Relaxed) / PAGE_SIZE as u64;
        fixed.max((live / RETAIN_LIVE_DIVISOR).min(max))
    }

    /// Takes the largest dirty free runs (at least [`DISCARD_MIN_PAGES`] each, at most
    /// [`PURGE_RUNS_MAX`]) out of the buckets until the dirty free pages are down to half the
    /// retain budget.
    ///
    /// # Safety
    /// The page lock is held and `st` is its state.
    unsafe fn take_purge(&self, st: &mut PageState) -> Option<Purge> {
        let target = self.retain_budget_pages() / 2;
        let mut purge = Purge {
            runs: [0; PURGE_RUNS_MAX],
            count: 0,
        };
        let mut b = FREE_BUCKETS;
        while b > bucket_of(DISCARD_MIN_PAGES) && purge.count < PURGE_RUNS_MAX {
            b -= 1;
            if st.nonempty & (1 << b) == 0 {
                continue;
            }
            let mut si = st.buckets[b];
            let mut scanned = 0;
            while si != 0
                && scanned < FREE_SCAN_MAX
                && purge.count < PURGE_RUNS_MAX
                && st.dirty_free_pages > target
            {
                let s = self.span(si);
                let next = (*s).next;
                if (*s).fresh == 0 && (*s).npages >= DISCARD_MIN_PAGES {
                    self.remove_free(st, si);
                    (*s).kind = KIND_LIMBO;
                    purge.runs[purge.count] = si;
                    purge.count += 1;
                }
                si = next;
                scanned += 1;
            }
            if st.dirty_free_pages <= target {
                break;
            }
        }
        (purge.count > 0).then_some(purge)
    }

    /// Gives back the runs of a purge, then files them as fresh free runs. Call with no heap
    /// lock held: the callback may take its own locks or allocate from another heap.
    pub(super) fn finish_purge(&self, purge: Purge, discard: DiscardFn) {
        for &si in &purge.runs[..purge.count] {
            // SAFETY: a limbo run belongs to this call alone (in no bucket, owned by no one),
            // so its extent cannot change.
            let (start, npages) = unsafe { ((*self.span(si)).start, (*self.span(si)).npages) };
            discard(self.page_addr(start), npages as usize * PAGE_SIZE);
        }
        let mut g = self.lock_pages();
        for &si in &purge.runs[..purge.count] {
            // SAFETY: the page lock is held; the run is still this call's alone.
            let again = unsafe { self.release_run(g.state(), si, true) };
            debug_assert!(again.is_none());
        }
    }

    /// Returns run `si` to the page heap (see [`Heap::release_run`]).
    pub(super) fn give_back(&self, si: u32, fresh: bool, discard: DiscardFn) {
        let mut g = self.lock_pages();
        // SAFETY: the page lock is held; the caller passes a run it took out of use.
        let purge = unsafe { self.release_run(g.state(), si, fresh) };
        drop(g);
        if let Some(purge) = purge {
            self.finish_purge(purge, discard);
        }
    }

    /// Takes `size` bytes (rounded up to pages) as one run aligned to `align_pages` pages.
    /// Returns the address (null if the heap is full) and whether the memory reads as zero.
    pub(super) fn alloc_large(&self, size: usize, align_pages: usize) -> (*mut u8, bool) {
        if size > self.region_len as usize || align_pages > self.region_pages as usize {
            return (std::ptr::null_mut(), false);
        }
        let npages = size.div_ceil(PAGE_SIZE) as u32;
        let mut g = self.lock_pages();
        let st = g.state();
        // SAFETY: the page lock is held.
        unsafe {
            let Some(si) = self.alloc_run(st, npages, align_pages as u32) else {
                return (std::ptr::null_mut(), false);
            };
            let s = self.span(si);
            (*s).kind = KIND_LARGE;
            self.map_ends(si);
            (*s).owner.store(OWNER_LARGE, Ordering::Release);
            let bytes = self.large_bytes.load(Ordering::Relaxed);
            self.large_bytes.store(
                bytes + u64::from(npages) * PAGE_SIZE as u64,
                Ordering::Relaxed,
            );
            (self.page_addr((*s).start), (*s).fresh != 0)
        }
    }

    /// Frees the large allocation at `ptr` (page `page`, descriptor `si` per the page map);
    /// false if it is not one.
    pub(super) fn free_large(&self, ptr: *mut u8, page: u32, si: u32, discard: DiscardFn) -> bool {
        let mut g = self.lock_pages();
        // SAFETY: the page lock is held; `live_large` checks `si` before anything is changed.
        let limbo = unsafe {
            if !self.live_large(ptr, page, si) {
                return false;
            }
            let s = self.span(si);
            let bytes = self.large_bytes.load(Ordering::Relaxed);
            self.large_bytes.store(
                bytes - u64::from((*s).npages) * PAGE_SIZE as u64,
                Ordering::Relaxed,
            );
            self.release_run(g.state(), si, false)
        };
        drop(g);
        if let Some(purge) = limbo {
            self.finish_purge(purge, discard);
        }
        true
    }

    /// Resizes the large allocation at `ptr` (of `pages` pages) to hold `size` bytes without
    /// moving it: shrinking gives the tail back, growing takes the free run or the untouched
    /// space right after it. False if it cannot (the caller then moves it).
    pub(super) fn resize_large_in_place(
        &self,
        ptr: *mut u8,
        pages: usize,
        size: usize,
        discard: DiscardFn,
    ) -> bool {
        if size > self.region_len as usize {
            return false;
        }
        let new_pages = size.div_ceil(PAGE_SIZE) as u32;
        let Some((page, si)) = self.route(ptr) else {
            return false;
        };
        let mut g = self.lock_pages();
        let st = g.state();
        // SAFETY: the page lock is held; `live_large` checks `si` before anything is changed.
        unsafe {
            let s = self.span(si);
            if !self.live_large(ptr, page, si) || (*s).npages as usize != pages {
                return false;
            }
            let old = (*s).npages;
            if new_pages == old {
                return true;
            }
            if new_pages < old {
                self.ensure_spares(st, 1);
                if st.spare_count == 0 {
                    // Keeping the longer run is still a valid answer.
                    return true;
                }
                let tail = self.take_spare(st, (*s).start + new_pages, old - new_pages, 0);
                (*s).npages = new_pages;
                self.map_ends(si);
                self.sub_large_pages(old - new_pages);
                let purge = self.release_run(st, tail, false);
                drop(g);
                if let Some(purge) = purge {
                    self.finish_purge(purge, discard);
                }
                return true;
            }
            let extra = new_pages - old;
            let end = (*s).start + old;
            let top = self.top_page.load(Ordering::Relaxed);
            if end == top {
                if u64::from(top) + u64::from(extra) > u64::from(self.region_pages) {
                    return false;
                }
                self.top_page.store(top + extra, Ordering::Release);
            } else if let Some(r) = self.free_run_at(end) {
                let rs = self.span(r);
                if (*rs).start != end || (*rs).npages < extra {
                    return false;
                }
                self.remove_free(st, r);
                if (*rs).npages == extra {
                    self.put_spare(st, r);
                } else {
                    (*rs).start += extra;
                    (*rs).npages -= extra;
                    self.insert_free(st, r);
                }
            } else {
                return false;
            }
            (*s).npages = new_pages;
            self.map_ends(si);
            let bytes = self.large_bytes.load(Ordering::Relaxed);
            self.large_bytes.store(
                bytes + u64::from(extra) * PAGE_SIZE as u64,
                Ordering::Relaxed,
            );
            true
        }
    }

    /// Whether `si` is the live large allocation starting at `ptr` (on page `page`).
    ///
    /// # Safety
    /// The page lock is held.
    pub(super) unsafe fn live_large(&self, ptr: *mut u8, page: u32, si: u32) -> bool {
        let s = self.span(si);
        (*s).owner.load(Ordering::Relaxed) == OWNER_LARGE
            && (*s).kind == KIND_LARGE
            && (*s).start == page
            && ptr == self.page_addr(page)
    }

    /// # Safety
    /// The page lock is held.
    unsafe fn sub_large_pages(&self, pages: u32) {
        let bytes = self.large_bytes.load(Ordering::Relaxed);
        self.large_bytes.store(
            bytes - u64::from(pages) * PAGE_SIZE as u64,
            Ordering::Relaxed,
        );
    }

    /// The free run holding `page`, if the page map names one.
    ///
    /// # Safety
    /// The page lock is held (it guards `kind`, `start` and `npages` of every descriptor
    /// that is not a slab, and a slab's never change while it is one).
    pub(super) unsafe fn free_run_at(&self, page: u32) -> Option<u32> {
        let si = self.pagemap(page).load(Ordering::Relaxed);
        if si == 0 {
            return None;
        }
        let s = self.span(si);
        ((*s).kind == KIND_FREE && page >= (*s).start && page - (*s).start < (*s).npages)
            .then_some(si)
    }

    /// Points the page map at `si` for the first and last page of its run: enough for large
    /// allocations (freed by their first page) and free runs (found by their neighbours).
    ///
    /// # Safety
    /// The page lock is held and `si` covers pages inside the data area.
    pub(super) unsafe fn map_ends(&self, si: u32) {
        let s = self.span(si);
        self.pagemap((*s).start).store(si, Ordering::Release);
        self.pagemap((*s).start + (*s).npages - 1)
            .store(si, Ordering::Release);
    }

    /// A run in the buckets with at least `need` pages, or 0: the first dirty one among the
    /// first [`FREE_SCAN_MAX`] runs of the fitting buckets (reusing it faults nothing in),
    /// else the first fitting one.
    ///
    /// # Safety
    /// The page lock is held and `st` is its state.
    unsafe fn find_free(&self, st: &PageState, need: u32) -> u32 {
        let b = bucket_of(need);
        let mut fresh_fit = 0;
        let mut scanned = 0;
        let mut buckets = st.nonempty & (!0u128 << b);
        while buckets != 0 && scanned < FREE_SCAN_MAX {
            let at = buckets.trailing_zeros() as usize;
            buckets &= buckets - 1;
            let mut si = st.buckets[at];
            while si != 0 && scanned < FREE_SCAN_MAX {
                let s = self.span(si);
                if (*s).npages >= need {
                    if (*s).fresh == 0 {
                        return si;
                    }
                    if fresh_fit == 0 {
                        fresh_fit = si;
                    }
                }
                si = (*s).next;
                scanned += 1;
            }
        }
        if fresh_fit != 0 {
            return fresh_fit;
        }
        // Every run in a higher bucket is longer than `need`.
        let higher = st.nonempty & (!0u128 << (b + 1));
        if higher == 0 {
            0
        } else {
            st.buckets[higher.trailing_zeros() as usize]
        }
    }

    /// # Safety
    /// The page lock is held, `st` is its state, `si` is a run in no list.
    pub(super) unsafe fn insert_free(&self, st: &mut PageState, si: u32) {
        let s = self.span(si);
        (*s).kind = KIND_FREE;
        let b = bucket_of((*s).npages);
        let head = st.buckets[b];
        (*s).prev = 0;
        (*s).next = head;
        if head != 0 {
            (*self.span(head)).prev = si;
        }
        st.buckets[b] = si;
        st.nonempty |= 1 << b;
        if (*s).fresh == 0 {
            st.dirty_free_pages += u64::from((*s).npages);
        }
        self.map_ends(si);
    }

    /// # Safety
    /// The page lock is held, `st` is its state, `si` is a free run in its bucket.
    pub(super) unsafe fn remove_free(&self, st: &mut PageState, si: u32) {
        let s = self.span(si);
        debug_assert_eq!((*s).kind, KIND_FREE);
        let b = bucket_of((*s).npages);
        let (prev, next) = ((*s).prev, (*s).next);
        if prev != 0 {
            (*self.span(prev)).next = next;
        } else {
            st.buckets[b] = next;
        }
        if next != 0 {
            (*self.span(next)).prev = prev;
        }
        if st.buckets[b] == 0 {
            st.nonempty &= !(1 << b);
        }
        (*s).next = 0;
        (*s).prev = 0;
        (*s).kind = KIND_UNUSED;
        if (*s).fresh == 0 {
            st.dirty_free_pages -= u64::from((*s).npages);
        }
    }

    /// Refills the spare descriptors to at least `count` from `top`; false if the region is
    /// full.
    ///
    /// # Safety
    /// The page lock is held and `st` is its state.
    pub(super) unsafe fn ensure_spares(&self, st: &mut PageState, count: u32) -> bool {
        while st.spare_count < count {
            let top = self.top_page.load(Ordering::Relaxed);
            let slot = st.span_pages;
            if top >= self.region_pages || slot >= self.span_dir_slots {
                return false;
            }
            self.top_page.store(top + 1, Ordering::Release);
            // The slot is filled before any descriptor of its page is handed out (see
            // `Heap::span_dir`).
            self.span_dir(slot as usize).store(top, Ordering::Relaxed);
            st.span_pages = slot + 1;
            // Filled high to low so the pool hands them out in address order; descriptor 0
            // (the first of the first page) stays unused, as 0 means none.
            let first = u32::from(slot == 0);
            for i in (first..SPANS_PER_PAGE).rev() {
                self.put_spare(st, slot * SPANS_PER_PAGE + i);
            }
        }
        true
    }

    /// A spare descriptor set up as the run `[start, start+npages)`, owned by no one.
    ///
    /// # Safety
    /// The page lock is held, `st` is its state, and a spare exists.
    pub(super) unsafe fn take_spare(
        &self,
        st: &mut PageState,
        start: u32,
        npages: u32,
        fresh: u8,
    ) -> u32 {
        let si = st.spare;
        assert!(
            si != 0,
            "page heap ran out of spare descriptors it had counted"
        );
        let s: *mut Span = self.span(si);
        st.spare = (*s).next;
        st.spare_count -= 1;
        (*s).owner.store(OWNER_NONE, Ordering::Relaxed);
        (*s).start = start;
        (*s).npages = npages;
        (*s).next = 0;
        (*s).prev = 0;
        (*s).kind = KIND_UNUSED;
        (*s).class = 0;
        (*s).fresh = fresh;
        (*s).prot = 0;
        (*s).used = 0;
        (*s).capacity = 0;
        (*s).bump = 0;
        (*s).free_head = 0;
        (*s).clear_all_live();
        si
    }

    /// # Safety
    /// The page lock is held, `st` is its state, `si` is a descriptor in no list.
    pub(super) unsafe fn put_spare(&self, st: &mut PageState, si: u32) {
        let s = self.span(si);
        (*s).owner.store(OWNER_NONE, Ordering::Relaxed);
        (*s).kind = KIND_UNUSED;
        (*s).next = st.spare;
        st.spare = si;
        st.spare_count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_exact_when_small() {
        for n in 1..=FREE_EXACT_PAGES_MAX {
            assert_eq!(bucket_of(n), n as usize - 1);
        }
        let mut last = 0;
        for n in 1..(1u32 << 20) {
            let b = bucket_of(n);
            assert!(b >= last && b < FREE_BUCKETS, "{n} pages");
            last = b;
        }
    }
}
