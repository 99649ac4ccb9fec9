//! Raw userfaultfd and `PAGEMAP_SCAN` definitions that neither the `libc` crate nor the
//! `userfaultfd` crate provide, and the few `ioctl` calls that use them.
//!
//! Everything here is copied from the kernel's uapi headers (`include/uapi/linux/userfaultfd.h`
//! and `include/uapi/linux/fs.h` of Linux 6.8+); Debian 12's headers (6.1) lack most of it.
//! This is the only place in lego that issues userfaultfd ioctls by number: the rest of the
//! runtime goes through the typed wrapper in [`super`]. Every function returns the raw `errno`
//! on failure so that the caller can tell `EEXIST`, `EAGAIN` and `EBUSY` apart, which the
//! `userfaultfd` crate's wrappers fold together.

use std::os::fd::RawFd;

use nix::errno::Errno;

const UFFDIO: u32 = 0xAA;

/// `_IOC(dir, type, nr, size)` from `asm-generic/ioctl.h`.
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> libc::c_ulong {
    // The size field is 14 bits wide; every struct here is far smaller.
    assert!(size < (1 << 14));
    ((dir << 30) | ((size as u32) << 16) | (ty << 8) | nr) as libc::c_ulong
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const fn iowr(ty: u32, nr: u32, size: usize) -> libc::c_ulong {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size)
}

/// The API version every userfaultfd speaks.
pub const UFFD_API: u64 = 0xAA;
/// Flag of `userfaultfd(2)`: only faults from user mode are reported. lego never sets it,
/// because the kernel itself touches heap pages (`read(2)` into a heap buffer).
pub const UFFD_USER_MODE_ONLY: i32 = 1;
/// `ioctl` on `/dev/userfaultfd` that returns a new userfaultfd (Linux 6.1+).
pub const USERFAULTFD_IOC_NEW: libc::c_ulong = ioc(0, UFFDIO, 0x00, 0);

pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioPoison {
    pub range: UffdioRange,
    pub mode: u64,
    pub updated: i64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioMove {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub moved: i64,
}

pub const UFFDIO_API: libc::c_ulong = iowr(UFFDIO, 0x3F, std::mem::size_of::<UffdioApi>());
pub const UFFDIO_REGISTER: libc::c_ulong =
    iowr(UFFDIO, 0x00, std::mem::size_of::<UffdioRegister>());
pub const UFFDIO_WAKE: libc::c_ulong =
    ioc(IOC_READ, UFFDIO, 0x02, std::mem::size_of::<UffdioRange>());
pub const UFFDIO_COPY: libc::c_ulong = iowr(UFFDIO, 0x03, std::mem::size_of::<UffdioCopy>());
pub const UFFDIO_MOVE: libc::c_ulong = iowr(UFFDIO, 0x05, std::mem::size_of::<UffdioMove>());
pub const UFFDIO_WRITEPROTECT: libc::c_ulong =
    iowr(UFFDIO, 0x06, std::mem::size_of::<UffdioWriteprotect>());
pub const UFFDIO_POISON: libc::c_ulong = iowr(UFFDIO, 0x08, std::mem::size_of::<UffdioPoison>());

/// `struct pm_scan_arg` of `PAGEMAP_SCAN` (Linux 6.7+).
#[repr(C)]
#[derive(Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// `struct page_region`: one run of pages with the same categories.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

pub const PAGEMAP_SCAN: libc::c_ulong = iowr(b'f' as u32, 16, std::mem::size_of::<PmScanArg>());
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

// The kernel checks these sizes; a mismatch would make every ioctl fail with EINVAL.
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioMove>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioPoison>() == 32);
const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);

/// Issues `ioctl(fd, request, arg)` and maps `-1` to the `errno`.
///
/// # Safety
/// `arg` must point to a live value of the exact type that `request` expects, and every
/// address inside it must satisfy that request's own contract.
pub unsafe fn ioctl<T>(fd: RawFd, request: libc::c_ulong, arg: *mut T) -> Result<i64, Errno> {
    // SAFETY: the caller guarantees that `arg` matches `request` (see the function's contract).
    let ret = unsafe { libc::ioctl(fd, request, arg) };
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(i64::from(ret))
    }
}

/// `userfaultfd(2)` through the raw system call (glibc 2.36 has no wrapper).
pub fn userfaultfd_syscall(flags: i32) -> Result<RawFd, Errno> {
    // SAFETY: the system call takes one integer argument and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::c_long::from(flags)) };
    if ret < 0 {
        return Err(Errno::last());
    }
    RawFd::try_from(ret).map_err(|_| Errno::EOVERFLOW)
}

/// Converts a byte count reported by the kernel (never negative on success) to `usize`.
pub fn kernel_len(value: i64) -> usize {
    usize::try_from(value).unwrap_or(0)
}
