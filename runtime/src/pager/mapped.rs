//! The pager's side of served anonymous mappings (`LEGO_MMAP=1`): protection changes, which
//! pin pages that are not read-write, and the `MAPPED` mark the statistics count by.
//!
//! Rules: a protection change happens with the `events` lock held for writing, so no install
//! and no discard is in flight while the kernel splits the VMA and the table's `PINNED` flags
//! follow it; the evictor never picks a pinned page (`UFFDIO_MOVE` refuses pages that are not
//! in a writable VMA), and no fault run crosses one (a run is installed into one VMA). Like
//! [`Runtime::discard`] these run on the program's threads: nothing here allocates or logs.

use super::Runtime;
use crate::cache::{MAPPED, PINNED};

/// `PROT_READ | PROT_WRITE`: the one protection whose pages can be evicted.
const PROT_RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

impl Runtime {
    /// `mprotect(addr, len, prot)` on a range of the region (page-aligned): the kernel's
    /// call, then the range's pages pinned unless `prot` is read-write (unpinned if it is).
    /// Returns the kernel's errno on failure (the table is then unchanged).
    pub fn protect(&self, addr: usize, len: usize, prot: i32) -> Result<(), i32> {
        let sh = &self.shared;
        let _w = sh.kernel.applying_events();
        // SAFETY: the caller (the shim) applies the program's own `mprotect` to memory the
        // program owns; lego's threads only ever reach region pages through the kernel's
        // userfaultfd calls, which ignore the protection, or after checking `PINNED`.
        unsafe { crate::region::sys_mprotect(addr, len, prot) }?;
        self.set_flag_range(addr, len, PINNED, prot != PROT_RW);
        Ok(())
    }

    /// Gives back `[addr, addr+len)` of a served mapping whose pages are not read-write
    /// (`madvise(MADV_DONTNEED)` on a guard or a read-only range): [`Runtime::discard`]
    /// would try to move every page out, which the kernel refuses for such pages; here the
    /// table forgets them and the kernel drops them (its `REMOVE` event then finds nothing
    /// left to forget).
    pub fn discard_pinned(&self, addr: usize, len: usize) {
        let sh = &self.shared;
        {
            let _w = sh.kernel.applying_events();
            super::discard::forget_range(sh, addr, addr.saturating_add(len));
        }
        // SAFETY: the program gave the range back; it reads as zeros from now on.
        unsafe { crate::region::drop_pages(addr, len) };
    }

    /// Marks `[addr, addr+len)` as a served mapping's pages (or not), for the statistics.
    pub fn mark_mapped(&self, addr: usize, len: usize, on: bool) {
        self.set_flag_range(addr, len, MAPPED, on);
    }

    fn set_flag_range(&self, addr: usize, len: usize, flag: u16, on: bool) {
        let sh = &self.shared;
        let region = &sh.kernel.region;
        let start = addr.max(region.base);
        let end = addr.saturating_add(len).min(region.end());
        if start >= end {
            return;
        }
        let mut t = sh.cache.lock();
        for p in sh.page_of(start)..(sh.page_of(end - 1) + 1).min(t.pages()) {
            t.set_flag(p, flag, on);
        }
    }
}
