//! [`SegmentRing`]: the staged-write io_uring engine, behind the log directory
//! (`log::segment::LogDir`), built on the core in `ring.rs`. It copies what the writer appends into a few large, 4 KiB-aligned staging buffers registered with the ring,
//! writes each buffer with `IORING_OP_WRITE_FIXED` as soon as it is full (so several writes
//! are in flight while the writer encodes the next pages), and makes a segment durable with
//! `IORING_OP_FSYNC` (`DATASYNC`).
//!
//! Rules:
//! - io_uring does not order a write before an fsync submitted with it, so a sync first waits
//!   for every write already in flight, then submits the last partly filled buffer *linked* to
//!   the fsync (one `io_uring_enter` for both). A linked chain that breaks (the write fails or
//!   comes back short, and the kernel cancels the fsync with `ECANCELED`) never counts as a
//!   sync: a failed write fails the sync, a short one is finished and the fsync is repeated.
//! - A staging buffer is never touched while the kernel may read it, and the buffers outlive
//!   the ring (the ring is dropped first, and a ring whose I/O cannot be awaited leaks them).
//! - Every write is awaited, and its error reported, at the latest by the next call that needs
//!   its buffer, by [`SegmentRing::flush`], [`SegmentRing::sync`] and [`SegmentRing::finish`].
//!   After a failed write or fsync the segment's contents are unknown: every later write or
//!   sync of it fails until [`SegmentRing::start`] begins the next segment.
//! - With `O_DIRECT` every write must start and end on a [`DIRECT_ALIGN_BYTES`] boundary (the
//!   log format guarantees it); anything else is refused, never written torn.
//! - Nothing here allocates through C: the staging buffers come from Rust's allocator.
//! - At start the ring must offer `IORING_OP_WRITE`, `IORING_OP_WRITE_FIXED` and
//!   `IORING_OP_FSYNC`; otherwise [`SegmentRing::new`] fails ([`IoError::Unsupported`] or
//!   [`IoError::Probe`]) and the log directory writes with `pwritev` and `fdatasync`
//!   instead, with one warning saying why, exactly as when io_uring is refused.
//!
//! The `unsafe` of the log's data path (raw buffers handed to the kernel) lives here.

use std::alloc::Layout;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use io_uring::{opcode, squeue, types, IoUring};

use super::ring::{self, Op, OP_FSYNC, OP_WRITE, OP_WRITE_FIXED};
use super::{IoError, DIRECT_ALIGN_BYTES, RETRIES_MAX};

/// Staging buffers of one ring: up to this many writes are in flight at once.
pub const STAGING_BUFFERS: usize = 4;

/// Bytes of one staging buffer, and so of the largest single write.
pub const STAGING_BUFFER_BYTES: usize = 1 << 20;

/// Submission-queue entries of the ring: every staging buffer's write and one fsync fit.
pub const SEGMENT_RING_ENTRIES: u32 = 8;

/// Times a sync submits its fsync before giving up (a short write in the linked chain, or
/// `EINTR`, makes it try again).
pub const SYNC_ATTEMPTS_MAX: u32 = 8;

const _: () = assert!(STAGING_BUFFERS < SEGMENT_RING_ENTRIES as usize);
const _: () = assert!(STAGING_BUFFER_BYTES & (DIRECT_ALIGN_BYTES - 1) == 0);
const _: () = assert!(STAGING_BUFFER_BYTES <= u32::MAX as usize);
const _: () = assert!(STAGING_BUFFERS <= u16::MAX as usize);

/// `user_data` of the fsync; a write's `user_data` is its buffer's index.
const FSYNC_SLOT: usize = STAGING_BUFFERS;

/// What the ring submits. `IORING_OP_NOP` (tests only) is as old as io_uring itself; linked
/// SQEs (`IOSQE_IO_LINK`, Linux 5.3) come with `IORING_OP_WRITE` (5.6).
const STAGED_OPS: [Op; 3] = [OP_WRITE, OP_WRITE_FIXED, OP_FSYNC];

/// What a staging buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    /// Being filled with bytes for the file range starting at `offset`.
    Filling {
        offset: u64,
        len: usize,
    },
    /// Handed to the kernel: `done` bytes of `len` are written.
    InFlight {
        offset: u64,
        len: usize,
        done: usize,
        retries: u32,
    },
}

/// The staging buffers: one 4 KiB-aligned allocation of `STAGING_BUFFERS` buffers.
struct Staging {
    ptr: NonNull<u8>,
    layout: Layout,
    /// Set when the kernel may still read the buffers: they are then never freed.
    leak: bool,
}

impl Staging {
    fn new() -> Staging {
        let layout =
            Layout::from_size_align(STAGING_BUFFERS * STAGING_BUFFER_BYTES, DIRECT_ALIGN_BYTES)
                .expect("the staging size is a small multiple of its power-of-two alignment");
        // SAFETY: the layout has a non-zero size (checked at compile time through the
        // constants above being non-zero).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Staging {
            ptr,
            layout,
            leak: false,
        }
    }

    /// Start of buffer `i`.
    fn buffer(&self, i: usize) -> *mut u8 {
        debug_assert!(i < STAGING_BUFFERS);
        self.ptr.as_ptr().wrapping_add(i * STAGING_BUFFER_BYTES)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        // SAFETY: `ptr` came from `alloc_zeroed` with this very layout and is freed only here.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: `Staging` is plain memory owned by one `SegmentRing`; nothing in it is tied to a
// thread.
unsafe impl Send for Staging {}

/// A failure to inject instead of a real I/O result (tests only).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The write is submitted for half its length (whole blocks when it has more than one),
    /// so the kernel really comes back short.
    Short,
    /// The I/O is replaced by a no-op that reports this errno.
    Errno(i32),
    /// The write goes to fd -1: the kernel fails it with `EBADF` and cancels what is linked
    /// to it (`ECANCELED`).
    BadFd,
}

/// Which I/O a [`Fault`] hits: the `nth` write or fsync (counting from 0) of the ring's life,
/// not counting the rest of a short write.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAt {
    Write(usize),
    Fsync(usize),
}

/// One io_uring with registered staging buffers, writing one segment file at a time.
pub struct SegmentRing {
    // Declared before `staging` so it is dropped first: the kernel unregisters the buffers
    // when the ring closes, and only then may their memory go.
    uring: IoUring,
    staging: Staging,
    registered: bool,
    direct: bool,
    path: PathBuf,
    open: bool,
    slots: [Slot; STAGING_BUFFERS],
    /// The buffer being filled, if any.
    filling: Option<usize>,
    /// The buffer the next fill takes (buffers are used round-robin, oldest write first).
    next: usize,
    /// SQEs pushed whose CQE has not been reaped (writes and the fsync).
    in_flight: usize,
    /// Result of the last fsync, once reaped.
    fsync_result: Option<i32>,
    /// Times the rest of a short or interrupted write was submitted again.
    resubmits: u64,
    /// The first failure not yet reported to a caller.
    failure: Option<IoError>,
    /// Whether the current segment had a failure (reported or not).
    broken: bool,
    #[cfg(test)]
    writes_pushed: usize,
    #[cfg(test)]
    fsyncs_pushed: usize,
    #[cfg(test)]
    faults: Vec<(FaultAt, Fault)>,
    #[cfg(test)]
    injected: [Option<i32>; STAGING_BUFFERS + 1],
}

impl SegmentRing {
    /// Creates the ring, checks that the kernel offers the operations it submits and registers
    /// its staging buffers. [`IoError::Refused`] means the kernel or a sandbox does not allow
    /// io_uring, [`IoError::Unsupported`] or [`IoError::Probe`] that it lacks an operation;
    /// the caller falls back to `pwritev`. A ring whose buffers cannot be registered
    /// (`RLIMIT_MEMLOCK`) uses plain writes from the same buffers.
    pub fn new() -> Result<SegmentRing, IoError> {
        let uring = ring::create(SEGMENT_RING_ENTRIES)?;
        ring::require(&uring, &STAGED_OPS)?;
        let staging = Staging::new();
        let iovecs: [libc::iovec; STAGING_BUFFERS] = std::array::from_fn(|i| libc::iovec {
            iov_base: staging.buffer(i).cast(),
            iov_len: STAGING_BUFFER_BYTES,
        });
        // SAFETY: each iovec is one staging buffer, valid for `STAGING_BUFFER_BYTES` bytes and
        // alive for as long as the ring (the ring is dropped before `staging`, see the field
        // order, and `Drop` leaks the buffers if the ring's I/O cannot be awaited).
        let registered = match unsafe { uring.submitter().register_buffers(&iovecs) } {
            Ok(()) => true,
            Err(e) => {
                log::info!(
                    "registering the log's {STAGING_BUFFERS} staging buffers of \
                     {STAGING_BUFFER_BYTES} bytes with io_uring failed ({e}); writing them \
                     unregistered (raise RLIMIT_MEMLOCK to register them)"
                );
                false
            }
        };
        Ok(SegmentRing {
            uring,
            staging,
            registered,
            direct: false,
            path: PathBuf::new(),
            open: false,
            slots: [Slot::Free; STAGING_BUFFERS],
            filling: None,
            next: 0,
            in_flight: 0,
            fsync_result: None,
            resubmits: 0,
            failure: None,
            broken: false,
            #[cfg(test)]
            writes_pushed: 0,
            #[cfg(test)]
            fsyncs_pushed: 0,
            #[cfg(test)]
            faults: Vec::new(),
            #[cfg(test)]
            injected: [None; STAGING_BUFFERS + 1],
        })
    }

    /// Whether the staging buffers are registered (`WRITE_FIXED`) or written plainly.
    pub fn registered(&self) -> bool {
        self.registered
    }

    /// Makes `path` (opened with `O_DIRECT` when `direct`) the file that the next writes go
    /// to. The previous one must have been finished.
    pub fn start(&mut self, path: &Path, direct: bool) {
        debug_assert!(self.in_flight == 0 && self.filling.is_none());
        self.path = path.to_path_buf();
        self.direct = direct;
        self.open = true;
        self.broken = false;
        self.failure = None;
    }

    /// Queues `pieces`, one after the other, for bytes `offset..` of the file. Returns once
    /// they are copied into staging buffers; full buffers are already being written. An error
    /// may be that of an earlier write whose buffer this call needed.
    pub fn write(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: u64,
        pieces: &[&[u8]],
    ) -> Result<(), IoError> {
        self.usable()?;
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        // A power of two (checked at compile time), so a mask tests the alignment.
        let mask = DIRECT_ALIGN_BYTES - 1;
        if self.direct && (offset & mask as u64 != 0 || len & mask != 0) {
            return Err(IoError::Unaligned {
                path: self.path.clone(),
                offset,
                len,
            });
        }
        // A buffer holds one contiguous file range.
        if let Some(i) = self.filling {
            if let Slot::Filling { offset: at, len } = self.slots[i] {
                if at + len as u64 != offset {
                    self.submit_filling(fd, false)?;
                }
            }
        }
        let mut at = offset;
        for piece in pieces {
            let mut rest: &[u8] = piece;
            while !rest.is_empty() {
                let i = match self.filling {
                    Some(i) => i,
                    None => self.take_buffer(fd, at)?,
                };
                let Slot::Filling { offset: start, len } = self.slots[i] else {
                    unreachable!("the filling buffer is in the Filling state");
                };
                let n = rest.len().min(STAGING_BUFFER_BYTES - len);
                // SAFETY: buffer `i` is `Filling`, so the kernel does not use it; `len + n`
                // is at most `STAGING_BUFFER_BYTES`, so the copy stays inside the buffer; the
                // source is a live slice that cannot overlap memory we own exclusively.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        rest.as_ptr(),
                        self.staging.buffer(i).add(len),
                        n,
                    );
                }
                self.slots[i] = Slot::Filling {
                    offset: start,
                    len: len + n,
                };
                rest = &rest[n..];
                at += n as u64;
                if len + n == STAGING_BUFFER_BYTES {
                    self.submit_filling(fd, false)?;
                }
            }
        }
        Ok(())
    }

    /// Writes everything queued and waits until the kernel has all of it (no fdatasync).
    pub fn flush(&mut self, fd: BorrowedFd<'_>) -> Result<(), IoError> {
        self.usable()?;
        if self.filling.is_some() {
            self.submit_filling(fd, false)?;
        }
        self.wait_all(Some(fd))
    }

    /// Writes everything queued and makes it durable: waits for every write in flight, then
    /// submits the last buffer linked to an fdatasync and waits for both.
    pub fn sync(&mut self, fd: BorrowedFd<'_>) -> Result<(), IoError> {
        self.usable()?;
        self.wait_all(Some(fd))?;
        for _ in 0..SYNC_ATTEMPTS_MAX {
            self.fsync_result = None;
            let resubmits = self.resubmits;
            if self.filling.is_some() {
                self.submit_filling(fd, true)?;
            }
            self.push_fsync(fd)?;
            self.wait_all(Some(fd))?;
            let res = self
                .fsync_result
                .take()
                .expect("wait_all reaps the fsync's completion");
            let rewritten = self.resubmits != resubmits;
            match -res {
                // Part of a chained write was written after the fsync had started (or the
                // fsync was cancelled because of it): sync again now that all of it is there.
                0 | libc::ECANCELED if rewritten => continue,
                0 => return Ok(()),
                libc::EINTR | libc::EAGAIN => continue,
                errno => return Err(self.fail_sync(errno)),
            }
        }
        Err(self.fail_sync(libc::EINTR))
    }

    /// Waits for every write of the current file, reports the first failure not reported
    /// yet, and leaves the ring ready for [`SegmentRing::start`]. What was queued but not
    /// submitted is written first.
    pub fn finish(&mut self, fd: BorrowedFd<'_>) -> Result<(), IoError> {
        let mut result = Ok(());
        if self.filling.is_some() {
            if self.broken {
                // Nothing of a broken segment is written any more.
                self.discard_filling();
            } else if let Err(e) = self.submit_filling(fd, false) {
                result = Err(e);
            }
        }
        let waited = self.wait_all(Some(fd));
        self.open = false;
        result.and(waited)
    }

    /// The error a write or sync of a segment with a failure gets.
    fn usable(&mut self) -> Result<(), IoError> {
        if !self.open {
            return Err(IoError::NoFile);
        }
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        if self.broken {
            return Err(IoError::FileFailed {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    fn discard_filling(&mut self) {
        if let Some(i) = self.filling.take() {
            self.slots[i] = Slot::Free;
        }
    }

    /// Takes the next buffer for the range starting at `offset`, waiting for its write.
    fn take_buffer(&mut self, fd: BorrowedFd<'_>, offset: u64) -> Result<usize, IoError> {
        let i = self.next;
        while matches!(self.slots[i], Slot::InFlight { .. }) {
            self.wait_one(Some(fd))?;
        }
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        self.slots[i] = Slot::Filling { offset, len: 0 };
        self.filling = Some(i);
        self.next = (i + 1) % STAGING_BUFFERS;
        Ok(i)
    }

    /// Hands the filling buffer to the kernel (linked to the next SQE when `link`).
    fn submit_filling(&mut self, fd: BorrowedFd<'_>, link: bool) -> Result<(), IoError> {
        let i = self.filling.take().expect("a buffer is being filled");
        let Slot::Filling { offset, len } = self.slots[i] else {
            unreachable!("the filling buffer is in the Filling state");
        };
        self.slots[i] = Slot::InFlight {
            offset,
            len,
            done: 0,
            retries: 0,
        };
        self.push_write(fd, i, link, true)?;
        if !link {
            self.enter(0)?;
        }
        Ok(())
    }

    /// Pushes the SQE writing the rest of buffer `i`.
    fn push_write(
        &mut self,
        fd: BorrowedFd<'_>,
        i: usize,
        link: bool,
        first: bool,
    ) -> Result<(), IoError> {
        let Slot::InFlight {
            offset, len, done, ..
        } = self.slots[i]
        else {
            unreachable!("only a buffer in flight is written");
        };
        #[allow(unused_mut)]
        let mut raw_fd = fd.as_raw_fd();
        #[allow(unused_mut)]
        let mut bytes = len - done;
        #[allow(unused_mut)]
        let mut nop = false;
        #[cfg(test)]
        if first {
            let nth = self.writes_pushed;
            self.writes_pushed += 1;
            match self.take_fault(FaultAt::Write(nth)) {
                Some(Fault::Short) => {
                    bytes = if bytes > DIRECT_ALIGN_BYTES {
                        (bytes / 2 / DIRECT_ALIGN_BYTES).max(1) * DIRECT_ALIGN_BYTES
                    } else {
                        bytes / 2
                    };
                }
                Some(Fault::Errno(errno)) => {
                    self.injected[i] = Some(errno);
                    nop = true;
                }
                Some(Fault::BadFd) => raw_fd = -1,
                None => {}
            }
        }
        #[cfg(not(test))]
        let _ = first;
        let data = self.staging.buffer(i).wrapping_add(done).cast_const();
        let len_u32 = u32::try_from(bytes).expect("a write is at most one staging buffer");
        let index = u16::try_from(i).expect("STAGING_BUFFERS fits in u16");
        let file_offset = offset + done as u64;
        let entry = if nop {
            opcode::Nop::new().build()
        } else if self.registered {
            opcode::WriteFixed::new(types::Fd(raw_fd), data, len_u32, index)
                .offset(file_offset)
                .build()
        } else {
            opcode::Write::new(types::Fd(raw_fd), data, len_u32)
                .offset(file_offset)
                .build()
        };
        let flags = if link {
            squeue::Flags::IO_LINK
        } else {
            squeue::Flags::empty()
        };
        self.push(entry.flags(flags).user_data(i as u64))
    }

    fn push_fsync(&mut self, fd: BorrowedFd<'_>) -> Result<(), IoError> {
        #[allow(unused_mut)]
        let mut entry = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        #[cfg(test)]
        {
            let nth = self.fsyncs_pushed;
            self.fsyncs_pushed += 1;
            if let Some(Fault::Errno(errno)) = self.take_fault(FaultAt::Fsync(nth)) {
                self.injected[FSYNC_SLOT] = Some(errno);
                entry = opcode::Nop::new().build();
            }
        }
        self.push(entry.user_data(FSYNC_SLOT as u64))?;
        self.enter(0)
    }

    fn push(&mut self, entry: squeue::Entry) -> Result<(), IoError> {
        // SAFETY: a write SQE points into a staging buffer that stays `InFlight` (untouched by
        // us, and alive: see the field order and `Drop`) until its CQE is reaped; an fsync or
        // no-op SQE points at no memory. The queue has room: at most `STAGING_BUFFERS` writes
        // and one fsync are ever pushed and not yet reaped, fewer than its entries.
        let pushed = unsafe { self.uring.submission().push(&entry) };
        pushed.expect("the submission queue has room for every buffer and the fsync");
        self.in_flight += 1;
        Ok(())
    }

    /// Submits what is queued and waits for `want` completions (0: do not wait), with the
    /// shared bound on transient failures.
    fn enter(&mut self, want: usize) -> Result<(), IoError> {
        ring::submit_and_wait(&mut self.uring, want).map_err(|source| IoError::Submit { source })
    }

    /// Waits until nothing is in flight; returns the first failure not yet reported.
    fn wait_all(&mut self, fd: Option<BorrowedFd<'_>>) -> Result<(), IoError> {
        while self.in_flight > 0 {
            if let Err(e) = self.wait_one(fd) {
                // Waiting itself failed: nothing more can be learnt from this ring.
                self.broken = true;
                return Err(e);
            }
        }
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for at least one completion and folds every completion there is into the state.
    /// A write that failed is recorded in `failure`; one that came back short is resubmitted
    /// (when `fd` is given and the segment has no failure).
    fn wait_one(&mut self, fd: Option<BorrowedFd<'_>>) -> Result<(), IoError> {
        debug_assert!(self.in_flight > 0);
        self.enter(1)?;
        let mut done = [(0u64, 0i32); SEGMENT_RING_ENTRIES as usize * 2];
        let mut n = 0;
        for cqe in self.uring.completion() {
            done[n] = (cqe.user_data(), cqe.result());
            n += 1;
            if n == done.len() {
                break;
            }
        }
        for &(user_data, res) in &done[..n] {
            self.in_flight -= 1;
            let slot = usize::try_from(user_data).expect("user_data holds a slot index");
            #[cfg(test)]
            let res = self.injected[slot].take().map_or(res, |errno| -errno);
            if slot == FSYNC_SLOT {
                self.fsync_result = Some(res);
            } else {
                self.complete_write(fd, slot, res)?;
            }
        }
        Ok(())
    }

    fn complete_write(
        &mut self,
        fd: Option<BorrowedFd<'_>>,
        i: usize,
        res: i32,
    ) -> Result<(), IoError> {
        let Slot::InFlight {
            offset,
            len,
            done,
            retries,
        } = self.slots[i]
        else {
            unreachable!("a write completion belongs to a buffer in flight");
        };
        self.slots[i] = Slot::Free;
        let failure = match usize::try_from(res) {
            Ok(0) => Some(IoError::FileNoProgress {
                path: self.path.clone(),
                offset,
                len,
                done,
            }),
            Ok(n) => {
                let done = (done + n).min(len);
                if done == len {
                    return Ok(());
                }
                self.slots[i] = Slot::InFlight {
                    offset,
                    len,
                    done,
                    retries: 0,
                };
                None
            }
            Err(_) if matches!(-res, libc::EINTR | libc::EAGAIN) && retries < RETRIES_MAX => {
                self.slots[i] = Slot::InFlight {
                    offset,
                    len,
                    done,
                    retries: retries + 1,
                };
                None
            }
            Err(_) => Some(IoError::FileWrite {
                path: self.path.clone(),
                offset,
                len,
                done,
                source: std::io::Error::from_raw_os_error(-res),
            }),
        };
        if let Some(e) = failure {
            self.broken = true;
            self.failure.get_or_insert(e);
            return Ok(());
        }
        // The rest of the write goes out again, unless the segment is already lost (or there
        // is no fd: dropping), in which case it is abandoned.
        match fd {
            Some(fd) if !self.broken => {
                self.resubmits += 1;
                self.push_write(fd, i, false, false)?;
                self.enter(0)
            }
            _ => {
                self.slots[i] = Slot::Free;
                self.broken = true;
                Ok(())
            }
        }
    }

    fn fail_sync(&mut self, errno: i32) -> IoError {
        self.broken = true;
        IoError::FileSync {
            path: self.path.clone(),
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    #[cfg(test)]
    pub fn inject(&mut self, at: FaultAt, fault: Fault) {
        self.faults.push((at, fault));
    }

    #[cfg(test)]
    fn take_fault(&mut self, at: FaultAt) -> Option<Fault> {
        let i = self.faults.iter().position(|(a, _)| *a == at)?;
        Some(self.faults.remove(i).1)
    }
}

impl Drop for SegmentRing {
    fn drop(&mut self) {
        // The owner finishes the file first; this only covers I/O still in flight after a
        // failure, whose buffers must outlive it.
        #[cfg(test)]
        if !std::thread::panicking() {
            assert!(
                self.faults.is_empty(),
                "injected faults that never hit: {:?}",
                self.faults
            );
        }
        self.discard_filling();
        if self.in_flight > 0 {
            if let Err(e) = self.wait_all(None) {
                log::error!(
                    "waiting for the log's io_uring writes to {} failed ({e}); leaking its \
                     staging buffers so the kernel cannot read freed memory",
                    self.path.display()
                );
                self.staging.leak = true;
            }
        }
    }
}

#[cfg(test)]
mod tests;
