//! The page table's per-page arrays: one zero-filled array per field in a mapping of its own,
//! reserved with `MAP_NORESERVE` for every page of the heap and committed by the kernel a page
//! at a time where it is first written. The table of a 4 TiB heap (1 Gi pages, 6 GiB of
//! states and checksums) then costs memory in proportion to the part of the heap in use, and
//! nothing of it comes from a heap lego manages.
//!
//! Reading an entry never written maps the kernel's shared zero page (no memory is counted);
//! transparent huge pages are off on the mapping (see `region`), so writing one entry commits
//! 4 KiB, not 2 MiB. The mapping is the one system call the cache makes, at start.

use std::ops::{Deref, DerefMut};

use crate::region::{Region, RegionError};

/// Element types whose all-zero bytes are a valid value (the mapping starts zeroed).
pub trait Zeroed: Copy {}
impl Zeroed for u16 {}
impl Zeroed for u32 {}
impl Zeroed for u64 {}

/// `len` elements of `T`, all zero at first, that cost memory only where written.
pub struct ZeroArray<T: Zeroed> {
    ptr: *mut T,
    len: usize,
    region: Region,
}

// SAFETY: the array owns its mapping exclusively, like a `Vec<T>` owns its buffer; `T` is a
// plain integer type, so moving or sharing the array across threads is as safe as a `Vec`'s.
unsafe impl<T: Zeroed + Send> Send for ZeroArray<T> {}
// SAFETY: as above; shared access only reads.
unsafe impl<T: Zeroed + Sync> Sync for ZeroArray<T> {}

impl<T: Zeroed> ZeroArray<T> {
    /// Reserves an array of `len` zeros.
    pub fn new(len: usize) -> Result<ZeroArray<T>, RegionError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(RegionError::Reserve {
                len: usize::MAX,
                at: None,
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            })?;
        // A zero-length mapping is refused by mmap; reserve one page for an empty array.
        let region = Region::reserve(bytes.max(1), None)?;
        Ok(ZeroArray {
            ptr: region.base as *mut T,
            len,
            region,
        })
    }
}

impl<T: Zeroed> Deref for ZeroArray<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: the mapping is page-aligned (so aligned for `T`), readable for `len`
        // elements, zero-initialised (a valid `T`), and owned by `self` for its lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T: Zeroed> DerefMut for ZeroArray<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Zeroed> Drop for ZeroArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping was created for this array alone and no reference into it
        // outlives `self`. A failure only leaks address space.
        let _ = unsafe { crate::region::sys_munmap(self.region.base, self.region.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident bytes of this process's mappings that overlap `[base, base+len)`, from
    /// `/proc/self/smaps`.
    fn rss_of(base: usize, len: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps is readable");
        let mut inside = false;
        let mut total = 0;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = lo < base + len && hi > base;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(kib) = line.strip_prefix("Rss:") {
                    let kib: u64 = kib
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse()
                        .expect("kB");
                    total += kib * 1024;
                }
            }
        }
        total
    }

    #[test]
    fn starts_zero_and_keeps_what_is_written() {
        let mut a = ZeroArray::<u32>::new(10_000).expect("reserve");
        assert_eq!(a.len(), 10_000);
        assert!(a.iter().all(|&v| v == 0));
        a[9_999] = 7;
        a[0] = 3;
        assert_eq!((a[0], a[1], a[9_999]), (3, 0, 7));
        let empty = ZeroArray::<u16>::new(0).expect("reserve");
        assert!(empty.is_empty());
    }

    /// An array for every page of a 4 TiB heap costs only the pages written.
    #[test]
    fn only_written_pages_cost_memory() {
        let pages = 1usize << 30;
        let mut a = ZeroArray::<u32>::new(pages).expect("4 GiB of address space");
        for i in (0..pages).step_by(pages / 64) {
            a[i] = 1;
        }
        // Reading untouched entries maps the zero page, which is not counted.
        assert_eq!(a[pages - 1], 0);
        let rss = rss_of(a.ptr as usize, pages * 4);
        assert!(
            rss <= 64 * 4096 * 2,
            "{rss} bytes resident for 64 entries written"
        );
    }
}
