//! The virtual regions lego manages: reserving them, asking which pages are present, and
//! dropping pages.
//!
//! A region is reserved once with `MAP_NORESERVE` (address space only: nothing is committed
//! until touched) and never unmapped, so pointers into it stay valid for the life of the
//! process. Transparent huge pages are disabled on it: lego moves memory in 4 KiB pages, and a
//! 2 MiB page would make one fault resident 512 pages at once.

use thiserror::Error;

use crate::PAGE_SIZE;

#[derive(Debug, Error)]
pub enum RegionError {
    #[error("cannot reserve {len} bytes of address space{}: {source}", at.map(|a| format!(" at {a:#x}")).unwrap_or_default())]
    Reserve {
        len: usize,
        at: Option<usize>,
        #[source]
        source: std::io::Error,
    },
    #[error("the address range {at:#x}..{end:#x} is already in use by another mapping", end = at + len)]
    Taken { at: usize, len: usize },
}

/// One reserved region `[base, base+len)`, page-aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub base: usize,
    pub len: usize,
}

impl Region {
    /// Reserves `len` bytes (rounded up to pages) of private anonymous memory, at `at` exactly
    /// when given (refusing to replace an existing mapping).
    pub fn reserve(len: usize, at: Option<usize>) -> Result<Region, RegionError> {
        let len = len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if at.is_some() {
            flags |= libc::MAP_FIXED_NOREPLACE;
        }
        let hint = at.unwrap_or(0) as *mut libc::c_void;
        // SAFETY: an anonymous mapping with no fd; MAP_FIXED_NOREPLACE never replaces an
        // existing mapping, so no memory of the program can be clobbered.
        let ptr =
            unsafe { libc::mmap(hint, len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        if ptr == libc::MAP_FAILED {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::EEXIST) {
                return Err(RegionError::Taken {
                    at: at.unwrap_or(0),
                    len,
                });
            }
            return Err(RegionError::Reserve { len, at, source });
        }
        let base = ptr as usize;
        if let Some(want) = at {
            if base != want {
                // Old kernels ignore MAP_FIXED_NOREPLACE and treat the address as a hint.
                // SAFETY: `ptr` is the mapping just created, `len` long, that nobody uses yet.
                unsafe { libc::munmap(ptr, len) };
                return Err(RegionError::Taken { at: want, len });
            }
        }
        // SAFETY: advice on the mapping just created; failure only means THP stays as it was.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        Ok(Region { base, len })
    }

    pub fn end(&self) -> usize {
        self.base + self.len
    }

    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.base && addr < self.end()
    }

    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }
}

/// Calls `present(page_index)` for each page of `[base, base+len)` that is in memory now.
/// Pages are examined in chunks so that the residency vector stays on the stack.
pub fn for_each_present_page(base: usize, len: usize, mut present: impl FnMut(usize)) {
    const CHUNK_PAGES: usize = 4096;
    let mut vec = [0u8; CHUNK_PAGES];
    let pages = len / PAGE_SIZE;
    let mut first = 0;
    while first < pages {
        let n = (pages - first).min(CHUNK_PAGES);
        // SAFETY: the range lies inside a mapping of this process and `vec` holds `n` bytes.
        let ret = unsafe {
            libc::mincore(
                (base + first * PAGE_SIZE) as *mut libc::c_void,
                n * PAGE_SIZE,
                vec.as_mut_ptr(),
            )
        };
        if ret == 0 {
            for (i, v) in vec[..n].iter().enumerate() {
                if v & 1 != 0 {
                    present(first + i);
                }
            }
        }
        first += n;
    }
}

/// Whether the page at `addr` (page-aligned, inside a mapping of this process) is present in
/// memory. Asking never faults the page in.
pub fn page_present(addr: usize) -> bool {
    let mut v = 0u8;
    // SAFETY: one page of a mapping of this process; `v` holds the one result byte.
    let ret = unsafe { libc::mincore(addr as *mut libc::c_void, PAGE_SIZE, &mut v) };
    ret == 0 && v & 1 != 0
}

/// Drops the pages of `[addr, addr+len)`: they read as zero afterwards.
///
/// # Safety
/// The range must be private anonymous memory of this process whose content nobody needs
/// any more: no live Rust reference points into it, and no thread relies on what it holds.
pub unsafe fn drop_pages(addr: usize, len: usize) {
    // SAFETY: MADV_DONTNEED on private anonymous memory only discards content; the caller
    // guarantees that nothing needs the content of the range.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
}
