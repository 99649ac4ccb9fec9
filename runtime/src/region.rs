//! The virtual regions lego manages: reserving them, asking which pages are present, and
//! dropping pages.
//!
//! A region is reserved once with `MAP_NORESERVE` (address space only: nothing is committed
//! until touched) and never unmapped, so pointers into it stay valid for the life of the
//! process. Transparent huge pages are disabled on it: lego moves memory in 4 KiB pages, and a
//! 2 MiB page would make one fault resident 512 pages at once.
//!
//! Every memory-map call lego makes goes through the raw system calls here ([`sys_mmap`] and
//! its siblings), never through libc's `mmap`, `munmap`, `mremap`, `madvise` or `mprotect`:
//! with `LEGO_MMAP=1` the preload library exports those names itself, and a call from lego's
//! own code would land in its own interposer (a discard that falls back to `MADV_DONTNEED`
//! would discard again, forever).

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
        let ptr = unsafe {
            sys_mmap(
                hint as usize,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        let ptr = match ptr {
            Ok(p) => p as *mut libc::c_void,
            Err(errno) => {
                let source = std::io::Error::from_raw_os_error(errno);
                if errno == libc::EEXIST {
                    return Err(RegionError::Taken {
                        at: at.unwrap_or(0),
                        len,
                    });
                }
                return Err(RegionError::Reserve { len, at, source });
            }
        };
        let base = ptr as usize;
        if let Some(want) = at {
            if base != want {
                // Old kernels ignore MAP_FIXED_NOREPLACE and treat the address as a hint.
                // SAFETY: `ptr` is the mapping just created, `len` long, that nobody uses yet.
                let _ = unsafe { sys_munmap(base, len) };
                return Err(RegionError::Taken { at: want, len });
            }
        }
        // SAFETY: advice on the mapping just created; failure only means THP stays as it was.
        let _ = unsafe { sys_madvise(base, len, libc::MADV_NOHUGEPAGE) };
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
    let _ = unsafe { sys_madvise(addr, len, libc::MADV_DONTNEED) };
}

/// The result of a raw memory-map system call: its value, or the errno. glibc's `syscall`
/// returns -1 and sets `errno` on failure; every other value is the call's result (user
/// addresses are below 2^47, so never negative).
fn syscall_result(ret: libc::c_long) -> Result<usize, i32> {
    if ret == -1 {
        // SAFETY: `__errno_location` returns this thread's errno slot, always valid.
        return Err(unsafe { *libc::__errno_location() });
    }
    usize::try_from(ret).map_err(|_| libc::EOVERFLOW)
}

/// The kernel's `mmap`, bypassing any interposed `mmap` symbol.
///
/// # Safety
/// As for `mmap(2)`: a `MAP_FIXED` mapping replaces whatever was at `addr`, which nothing of
/// the process may still use.
pub unsafe fn sys_mmap(
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    offset: i64,
) -> Result<usize, i32> {
    // SAFETY: the caller upholds mmap(2)'s contract; the arguments are passed as the kernel
    // reads them (six register-sized values).
    syscall_result(unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, offset) })
}

/// The kernel's `munmap`.
///
/// # Safety
/// Nothing of the process uses `[addr, addr+len)` any more.
pub unsafe fn sys_munmap(addr: usize, len: usize) -> Result<(), i32> {
    // SAFETY: the caller gives the range up.
    syscall_result(unsafe { libc::syscall(libc::SYS_munmap, addr, len) }).map(|_| ())
}

/// The kernel's `mremap`.
///
/// # Safety
/// As for `mremap(2)`: the old range is the caller's, and a moved mapping is used at its new
/// address only.
pub unsafe fn sys_mremap(
    old: usize,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new_addr: usize,
) -> Result<usize, i32> {
    // SAFETY: the caller upholds mremap(2)'s contract.
    syscall_result(unsafe {
        libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr)
    })
}

/// The kernel's `madvise`.
///
/// # Safety
/// As for `madvise(2)`: advice that drops content (`MADV_DONTNEED`, `MADV_FREE`, ...) is given
/// only for memory whose content nobody needs.
pub unsafe fn sys_madvise(addr: usize, len: usize, advice: i32) -> Result<(), i32> {
    // SAFETY: the caller upholds madvise(2)'s contract.
    syscall_result(unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) }).map(|_| ())
}

/// The kernel's `mprotect`.
///
/// # Safety
/// No live Rust reference into the range relies on a protection this call takes away.
pub unsafe fn sys_mprotect(addr: usize, len: usize, prot: i32) -> Result<(), i32> {
    // SAFETY: the caller upholds mprotect(2)'s contract.
    syscall_result(unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot) }).map(|_| ())
}

/// Reads the page at `addr` of this process through `/proc/self/mem`, which ignores the
/// page's protection: the way to copy a resident `PROT_NONE` page (a served mapping's guard)
/// without a `SIGSEGV`. The page must be present: a missing one would fault into lego's own
/// handlers from the kernel's side.
pub fn read_own_memory(addr: usize, out: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/mem")?;
    f.read_exact_at(out, addr as u64)
}
