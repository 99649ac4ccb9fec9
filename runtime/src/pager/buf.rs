//! A page-aligned buffer that pages are read into before they are installed (the handlers'
//! fetch buffers, `fork`'s, the log writer's read-back buffer).
//!
//! Rules: a buffer is mapped when the thread that uses it starts (never on a fault, a fork
//! or an epoch), so that running out of address space stops the start, not the program; it
//! is used by one thread at a time.

use crate::region::Region;
use crate::PAGE_SIZE;

/// A page-aligned buffer for fetched pages (O_DIRECT needs the alignment).
pub(super) struct PageBuf {
    region: Region,
}

impl PageBuf {
    /// Maps a buffer of `pages` pages. Buffers are made when the thread that uses them is
    /// started (never on a fault, a fork or an epoch), so that running out of address space
    /// stops the start, not the program.
    pub(super) fn new(pages: usize) -> std::io::Result<PageBuf> {
        let region = Region::reserve(pages * PAGE_SIZE, None)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(PageBuf { region })
    }

    pub(super) fn addr(&self, i: usize) -> usize {
        self.region.base + i * PAGE_SIZE
    }

    /// Mutable page-sized slices for the first `n` pages.
    pub(super) fn pages_mut(&mut self, n: usize) -> Vec<&mut [u8]> {
        assert!(n * PAGE_SIZE <= self.region.len);
        // SAFETY: the region is a private mapping owned by this buffer, `n` pages long at
        // least, and the slices returned are disjoint and borrow `self` mutably.
        let all =
            unsafe { std::slice::from_raw_parts_mut(self.region.base as *mut u8, n * PAGE_SIZE) };
        all.chunks_mut(PAGE_SIZE).collect()
    }

    pub(super) fn page(&self, i: usize) -> &[u8] {
        assert!((i + 1) * PAGE_SIZE <= self.region.len);
        // SAFETY: page `i` lies inside this buffer's private mapping.
        unsafe { std::slice::from_raw_parts(self.addr(i) as *const u8, PAGE_SIZE) }
    }
}

#[cfg(test)]
mod tests {
    use super::PageBuf;

    /// A buffer that cannot be mapped is an error for the thread being started, not a panic
    /// (which used to happen on the program's own thread inside `fork()` and at every epoch).
    #[test]
    fn a_buffer_that_cannot_be_mapped_is_an_error() {
        let pages = usize::MAX / crate::PAGE_SIZE;
        let err = PageBuf::new(pages)
            .err()
            .expect("no address space is that large");
        assert!(!err.to_string().is_empty());
        let mut buf = PageBuf::new(4).expect("four pages map");
        assert_eq!(buf.pages_mut(4).len(), 4);
        assert!(buf.page(3).iter().all(|&b| b == 0));
    }
}
