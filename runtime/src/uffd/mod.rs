//! The kernel interface of lego's fault path: creating a userfaultfd, probing its features,
//! registering ranges, resolving faults (`COPY`, `ZEROPAGE`, `POISON`, `WAKE`), moving pages
//! out (`MOVE`), write-protecting, and scanning for written pages (`PAGEMAP_SCAN`).
//!
//! This module knows nothing of caches or stores: it turns kernel calls into typed results.
//! It uses the `userfaultfd` crate for registration and event decoding, and [`sys`] for what
//! that crate lacks (asynchronous write-protect, `PAGEMAP_SCAN`, `COPY_MODE_WP`, `POISON`,
//! `MOVE`, the `/dev/userfaultfd` route). It must never allocate on the fault path beyond the
//! event buffer the caller owns.

pub mod sys;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use thiserror::Error;
use userfaultfd::{Event, EventBuffer, RegisterMode, Uffd};

/// Errors of the kernel interface.
#[derive(Debug, Error)]
pub enum UffdError {
    #[error(
        "cannot create a userfaultfd that serves kernel-mode faults ({errno}): run as root, grant \
         the program CAP_SYS_PTRACE, set vm.unprivileged_userfaultfd=1, or give this user \
         read-write access to /dev/userfaultfd"
    )]
    Permission { errno: Errno },
    #[error("this kernel has no userfaultfd ({errno}): lego needs Linux 5.7 or newer built with CONFIG_USERFAULTFD")]
    Unsupported { errno: Errno },
    #[error("the userfaultfd API handshake failed ({errno}) asking for features {features:#x}")]
    Api { errno: Errno, features: u64 },
    #[error("this kernel lacks userfaultfd features {missing:#x} that lego needs ({what})")]
    MissingFeatures { missing: u64, what: &'static str },
    #[error("registering {len} bytes at {addr:#x} with userfaultfd failed: {source}")]
    Register {
        addr: usize,
        len: usize,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("userfaultfd {op} of {len} bytes at {addr:#x} failed ({errno})")]
    Ioctl {
        op: &'static str,
        addr: usize,
        len: usize,
        errno: Errno,
    },
    #[error("reading userfaultfd events failed: {0}")]
    Read(#[source] userfaultfd::Error),
    #[error("cannot open /proc/self/pagemap for PAGEMAP_SCAN: {0}")]
    Pagemap(#[source] std::io::Error),
}

/// Features offered by the running kernel, as a bit set of `UFFD_FEATURE_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features(pub u64);

impl Features {
    pub fn has(self, bits: u64) -> bool {
        self.0 & bits == bits
    }
}

/// A partial `COPY` or `MOVE`: how many bytes went through before the kernel said `errno`.
#[derive(Debug, Clone, Copy)]
pub struct Partial {
    pub done: usize,
    pub errno: Errno,
}

/// One userfaultfd with the features it was opened with.
pub struct Userfault {
    uffd: Uffd,
    features: Features,
}

/// How many times an ioctl is retried when the kernel answers `EAGAIN` (the address space
/// was changing under it); each retry is immediate.
const EAGAIN_RETRIES_MAX: u32 = 64;

impl Userfault {
    /// Opens a userfaultfd that serves kernel-mode faults too (never `UFFD_USER_MODE_ONLY`),
    /// non-blocking and close-on-exec, and performs the API handshake asking for `features`.
    /// Tries `/dev/userfaultfd` first (which needs no capability, only access to the device),
    /// then the system call (which needs `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd=1`).
    pub fn open(features: u64) -> Result<Userfault, UffdError> {
        let fd = open_raw()?;
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `fd` is a fresh userfaultfd and `api` is a live `uffdio_api`.
        unsafe { sys::ioctl(fd.as_raw_fd(), sys::UFFDIO_API, &mut api) }
            .map_err(|errno| UffdError::Api { errno, features })?;
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        // SAFETY: `raw` is an open userfaultfd whose ownership moves into the `Uffd`.
        let uffd = unsafe { Uffd::from_raw_fd(raw) };
        // The handshake answers with every feature the kernel supports, not the ones this
        // descriptor has: it has those asked for.
        Ok(Userfault {
            uffd,
            features: Features(features),
        })
    }

    /// Asks the kernel which features it offers, on a throwaway userfaultfd.
    pub fn probe() -> Result<Features, UffdError> {
        let fd = open_raw()?;
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: `fd` is a fresh userfaultfd and `api` is a live `uffdio_api`.
        unsafe { sys::ioctl(fd.as_raw_fd(), sys::UFFDIO_API, &mut api) }
            .map_err(|errno| UffdError::Api { errno, features: 0 })?;
        Ok(Features(api.features))
    }

    /// The features this descriptor was opened with (those asked for and granted).
    pub fn features(&self) -> Features {
        self.features
    }

    /// The userfaultfd of a forked child's copy of the registered ranges, as the `FORK` event
    /// gave it (or as it was passed on to the child): the kernel made it with its parent's
    /// features and registrations, so no handshake is done again.
    pub fn adopt(fd: OwnedFd, features: Features) -> Userfault {
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        // SAFETY: `raw` is an open userfaultfd whose ownership moves into the `Uffd`.
        let uffd = unsafe { Uffd::from_raw_fd(raw) };
        Userfault { uffd, features }
    }

    /// Gives the descriptor up (closing nothing): for passing it to another process.
    pub fn into_fd(self) -> OwnedFd {
        uffd_into_fd(self.uffd)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    /// Registers `[addr, addr+len)` for missing faults, and for write-protection if `wp`.
    pub fn register(&self, addr: usize, len: usize, wp: bool) -> Result<(), UffdError> {
        let mut mode = RegisterMode::MISSING;
        if wp {
            mode |= RegisterMode::WRITE_PROTECT;
        }
        self.uffd
            .register_with_mode(addr as *mut libc::c_void, len, mode)
            .map(|_| ())
            .map_err(|source| UffdError::Register { addr, len, source })
    }

    /// Installs `len` bytes copied from `src` at the missing range `dst`, write-protected if
    /// `wp`, and wakes the threads waiting on it if `wake`.
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes; `dst` must lie in a range registered with this
    /// userfaultfd. Both must be page-aligned and `len` a multiple of the page size.
    pub unsafe fn copy(
        &self,
        dst: usize,
        src: *const u8,
        len: usize,
        wp: bool,
        wake: bool,
    ) -> Result<(), Partial> {
        let mut done = 0;
        let mut retries = 0;
        while done < len {
            let mut arg = sys::UffdioCopy {
                dst: (dst + done) as u64,
                // SAFETY: `done < len` and `src` is readable for `len` bytes.
                src: unsafe { src.add(done) } as u64,
                len: (len - done) as u64,
                mode: if wp { sys::UFFDIO_COPY_MODE_WP } else { 0 }
                    | if wake {
                        0
                    } else {
                        sys::UFFDIO_COPY_MODE_DONTWAKE
                    },
                copy: 0,
            };
            // SAFETY: `arg` is a live `uffdio_copy`; the caller vouches for the addresses.
            match unsafe { sys::ioctl(self.raw_fd(), sys::UFFDIO_COPY, &mut arg) } {
                Ok(_) => return Ok(()),
                Err(errno) => {
                    done += sys::kernel_len(arg.copy);
                    if errno == Errno::EAGAIN && retries < EAGAIN_RETRIES_MAX {
                        retries += 1;
                        continue;
                    }
                    return Err(Partial { done, errno });
                }
            }
        }
        Ok(())
    }

    /// Wakes the threads waiting on faults in `[addr, addr+len)` without resolving them; they
    /// retry the access and fault again if the page is still missing.
    pub fn wake(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        self.uffd
            .wake(addr as *mut libc::c_void, len)
            .map_err(|_| UffdError::Ioctl {
                op: "WAKE",
                addr,
                len,
                errno: Errno::last(),
            })
    }

    /// Marks `[addr, addr+len)` as poisoned and wakes its waiters: any access raises `SIGBUS`.
    pub fn poison(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        let mut arg = sys::UffdioPoison {
            range: sys::UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: 0,
            updated: 0,
        };
        // SAFETY: `arg` is a live `uffdio_poison`; poisoning only affects missing ptes.
        unsafe { sys::ioctl(self.raw_fd(), sys::UFFDIO_POISON, &mut arg) }
            .map(|_| ())
            .map_err(|errno| UffdError::Ioctl {
                op: "POISON",
                addr,
                len,
                errno,
            })
    }

    /// Write-protects (`protect`) or unprotects `[addr, addr+len)`.
    pub fn write_protect(&self, addr: usize, len: usize, protect: bool) -> Result<(), UffdError> {
        let mut arg = sys::UffdioWriteprotect {
            range: sys::UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: if protect {
                sys::UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: `arg` is a live `uffdio_writeprotect`.
        unsafe { sys::ioctl(self.raw_fd(), sys::UFFDIO_WRITEPROTECT, &mut arg) }
            .map(|_| ())
            .map_err(|errno| UffdError::Ioctl {
                op: "WRITEPROTECT",
                addr,
                len,
                errno,
            })
    }

    /// Atomically moves the present pages of `[src, src+len)` to `dst`, which must be an empty
    /// range registered with this userfaultfd. Holes in the source are skipped (they stay holes
    /// at `dst`). A page that is shared with another process (after `fork`) makes the kernel
    /// stop with `EBUSY`; `Partial::done` then says how far it got.
    ///
    /// # Safety
    /// `src` must be memory of this process whose pages the caller may take away (no
    /// reference to them is live, and whoever touches them next faults and is served by the
    /// caller's protocol); `dst` must be an empty range registered with this userfaultfd
    /// that nothing else uses.
    pub unsafe fn move_pages(&self, dst: usize, src: usize, len: usize) -> Result<(), Partial> {
        let mut done = 0;
        let mut retries = 0;
        while done < len {
            let mut arg = sys::UffdioMove {
                dst: (dst + done) as u64,
                src: (src + done) as u64,
                len: (len - done) as u64,
                mode: sys::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES,
                moved: 0,
            };
            // SAFETY: `arg` is a live `uffdio_move`; MOVE only remaps pages of this process,
            // which the caller may take from `src` and put at `dst`.
            match unsafe { sys::ioctl(self.raw_fd(), sys::UFFDIO_MOVE, &mut arg) } {
                Ok(_) => return Ok(()),
                Err(errno) => {
                    done += sys::kernel_len(arg.moved);
                    if errno == Errno::EAGAIN && retries < EAGAIN_RETRIES_MAX {
                        retries += 1;
                        continue;
                    }
                    return Err(Partial { done, errno });
                }
            }
        }
        Ok(())
    }

    /// Reads every event that is ready without blocking (the fd is non-blocking).
    pub fn read_ready(&self, buf: &mut EventBuffer, out: &mut Vec<Event>) -> Result<(), UffdError> {
        let events = self.uffd.read_events(buf).map_err(UffdError::Read)?;
        for event in events {
            out.push(event.map_err(UffdError::Read)?);
        }
        Ok(())
    }

    /// Blocks until the userfaultfd has an event to read, `kick` (an eventfd) is signalled,
    /// or `timeout_ms` passes. Returns true if something is ready; drains `kick`.
    pub fn wait_readable(&self, kick: &Kick, timeout_ms: i32) -> bool {
        let (ready, kicked) = self.poll_with(kick, timeout_ms);
        if kicked {
            kick.drain();
        }
        ready
    }

    /// Like [`Userfault::wait_readable`], but says whether `kick` was signalled (and drains
    /// it then), whatever the userfaultfd has.
    pub fn wait_or_kick(&self, kick: &Kick, timeout_ms: i32) -> bool {
        let (_, kicked) = self.poll_with(kick, timeout_ms);
        kicked && kick.take()
    }

    /// `poll` on this userfaultfd and `kick` for input: (anything ready, `kick` readable).
    fn poll_with(&self, kick: &Kick, timeout_ms: i32) -> (bool, bool) {
        let mut pfds = [
            libc::pollfd {
                fd: self.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: kick.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `pfds` is an array of two live pollfds.
        let ret = unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout_ms) };
        (ret > 0, ret > 0 && pfds[1].revents & libc::POLLIN != 0)
    }
}

/// The descriptor of a crate `Uffd` (a `FORK` event's, for one), as an `OwnedFd`. Not through
/// the crate's `IntoRawFd`: in `userfaultfd` 0.9 it returns the number and then drops the
/// `Uffd`, whose `Drop` closes it.
pub fn uffd_into_fd(uffd: Uffd) -> OwnedFd {
    let raw = uffd.as_raw_fd();
    std::mem::forget(uffd);
    // SAFETY: `raw` was owned by the `Uffd`, which is forgotten (never closes it), so the
    // `OwnedFd` is its only owner.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// An eventfd that wakes the fault handlers from their `poll` when another thread has read
/// fault events on their behalf.
pub struct Kick {
    fd: OwnedFd,
}

impl Kick {
    pub fn new() -> std::io::Result<Kick> {
        // SAFETY: eventfd takes two integers and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: eventfd returned a new fd that nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Kick { fd })
    }

    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Whether the kick was signalled since it was last drained; drains it.
    pub fn take(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        n == 8 && v > 0
    }

    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// Opens a userfaultfd: `/dev/userfaultfd` first, then the system call.
fn open_raw() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let dev_errno = match File::options()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => {
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags as the third argument by value.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), sys::USERFAULTFD_IOC_NEW, flags) };
            if fd >= 0 {
                // SAFETY: the ioctl returned a new fd that nobody else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            Errno::last()
        }
        Err(e) => Errno::from_raw(e.raw_os_error().unwrap_or(libc::ENOENT)),
    };
    match sys::userfaultfd_syscall(flags) {
        // SAFETY: the system call returned a new fd that nobody else owns.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(Errno::EPERM) | Err(Errno::EACCES) => Err(UffdError::Permission {
            errno: Errno::EPERM,
        }),
        Err(Errno::ENOSYS) if dev_errno == Errno::ENOENT => Err(UffdError::Unsupported {
            errno: Errno::ENOSYS,
        }),
        Err(errno) => Err(UffdError::Permission { errno }),
    }
}

/// `PAGEMAP_SCAN` over this process's own page tables (Linux 6.7+).
pub struct PagemapScanner {
    pagemap: File,
}

/// Most runs one `PAGEMAP_SCAN` call reports; a longer answer is fetched in more calls.
pub const SCAN_REGIONS_MAX: usize = 256;

impl PagemapScanner {
    pub fn open() -> Result<PagemapScanner, UffdError> {
        File::open("/proc/self/pagemap")
            .map(|pagemap| PagemapScanner { pagemap })
            .map_err(UffdError::Pagemap)
    }

    /// Finds the pages of `[start, end)` written since they were last write-protected and
    /// write-protects them again, atomically per page. Calls `found(first, last_excl)` per run.
    /// Requires a range registered for WP on a userfaultfd with `UFFD_FEATURE_WP_ASYNC`.
    pub fn take_written(
        &self,
        start: usize,
        end: usize,
        found: impl FnMut(usize, usize),
    ) -> Result<(), UffdError> {
        self.scan_written(start, end, true, found)
    }

    /// Like [`PagemapScanner::take_written`] but only reports: the pages stay writable (it
    /// counts dirty pages without making their next write fault).
    pub fn find_written(
        &self,
        start: usize,
        end: usize,
        found: impl FnMut(usize, usize),
    ) -> Result<(), UffdError> {
        self.scan_written(start, end, false, found)
    }

    fn scan_written(
        &self,
        start: usize,
        end: usize,
        protect: bool,
        mut found: impl FnMut(usize, usize),
    ) -> Result<(), UffdError> {
        let mut regions = [sys::PageRegion::default(); SCAN_REGIONS_MAX];
        let mut from = start;
        while from < end {
            let mut arg = sys::PmScanArg {
                size: std::mem::size_of::<sys::PmScanArg>() as u64,
                flags: if protect {
                    sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC
                } else {
                    sys::PM_SCAN_CHECK_WPASYNC
                },
                start: from as u64,
                end: end as u64,
                vec: regions.as_mut_ptr() as u64,
                vec_len: SCAN_REGIONS_MAX as u64,
                category_mask: sys::PAGE_IS_WRITTEN,
                return_mask: sys::PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: `arg` is a live `pm_scan_arg` whose `vec` points at `regions`, which has
            // room for `vec_len` entries and outlives the call.
            let n = unsafe { sys::ioctl(self.pagemap.as_raw_fd(), sys::PAGEMAP_SCAN, &mut arg) }
                .map_err(|errno| UffdError::Ioctl {
                    op: "PAGEMAP_SCAN",
                    addr: from,
                    len: end - from,
                    errno,
                })?;
            let n = usize::try_from(n).unwrap_or(0).min(SCAN_REGIONS_MAX);
            for r in &regions[..n] {
                found(r.start as usize, r.end as usize);
            }
            let walked = arg.walk_end as usize;
            if walked <= from {
                break;
            }
            from = walked;
        }
        Ok(())
    }
}
