//! The io_uring core shared by both engines of this module, and [`Ring`], the batched
//! engine of the page stores.
//!
//! The core ([`create`], [`require`], [`submit_and_wait`], [`is_transient`]) sets a ring up
//! (refusal told apart from other failures), checks at start that the kernel offers every
//! operation an engine submits (a missing one is [`IoError::Unsupported`], so the caller takes
//! the same synchronous fallback as for a refused io_uring), and enters the kernel with one
//! bound on transient failures ([`ENTER_RETRIES_MAX`]). [`super::staged`] builds on it too.
//!
//! [`Ring`] is one io_uring instance used synchronously. A call queues SQEs for its ops,
//! submits them and waits for every CQE before it returns, so the buffers borrowed by the ops
//! outlive every I/O the kernel performs on them. That is the whole safety argument, and it
//! leads to the one rule here: never return while an SQE of this call may still be executing.

use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{opcode, squeue, types, EnterFlags, IoUring, Probe};

use super::{
    clamp_u32, AsTransfer, Direction, IoError, ReadOp, Step, Transfer, WriteOp, BATCH_IOS_MAX,
    ENTER_RETRIES_MAX, TRANSFER_BYTES_MAX,
};

/// How long a caller watches the completion queue before it sleeps for its I/O.
const SPIN_WAIT: std::time::Duration = std::time::Duration::from_micros(150);

/// One io_uring operation an engine submits: its opcode, its name in the kernel's uapi and the
/// first Linux release that has it (for the message when it is missing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Op {
    pub code: u8,
    pub name: &'static str,
    pub since: &'static str,
}

pub(super) const OP_READ: Op = Op {
    code: opcode::Read::CODE,
    name: "IORING_OP_READ",
    since: "5.6",
};
pub(super) const OP_WRITE: Op = Op {
    code: opcode::Write::CODE,
    name: "IORING_OP_WRITE",
    since: "5.6",
};
pub(super) const OP_READV: Op = Op {
    code: opcode::Readv::CODE,
    name: "IORING_OP_READV",
    since: "5.1",
};
pub(super) const OP_WRITEV: Op = Op {
    code: opcode::Writev::CODE,
    name: "IORING_OP_WRITEV",
    since: "5.1",
};
pub(super) const OP_WRITE_FIXED: Op = Op {
    code: opcode::WriteFixed::CODE,
    name: "IORING_OP_WRITE_FIXED",
    since: "5.1",
};
pub(super) const OP_FSYNC: Op = Op {
    code: opcode::Fsync::CODE,
    name: "IORING_OP_FSYNC",
    since: "5.1",
};

/// What [`Ring`] submits: plain reads and writes for one segment, vectored ones otherwise.
const RING_OPS: [Op; 4] = [OP_READ, OP_WRITE, OP_READV, OP_WRITEV];

/// Creates an io_uring with `entries` submission-queue entries. `ENOSYS`, `EPERM` and
/// `EACCES` mean io_uring is not allowed here ([`IoError::Refused`]); anything else is
/// [`IoError::Setup`].
pub(super) fn create(entries: u32) -> Result<IoUring, IoError> {
    // MADV_DONTFORK on the ring's memory: a child forked by the program must not share (and
    // corrupt) the parent's queues; touching them in the child faults instead.
    IoUring::builder()
        .dontfork()
        .build(entries)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ENOSYS | libc::EPERM | libc::EACCES) => IoError::Refused { source },
            _ => IoError::Setup { entries, source },
        })
}

/// Checks that `uring` offers every operation in `needed` (`IORING_REGISTER_PROBE`); the first
/// one missing is [`IoError::Unsupported`]. A kernel too old to be probed (before 5.6) also
/// lacks `IORING_OP_READ`/`WRITE`, so that is [`IoError::Probe`], which callers treat alike.
pub(super) fn require(uring: &IoUring, needed: &[Op]) -> Result<(), IoError> {
    let mut probe = Probe::new();
    uring
        .submitter()
        .register_probe(&mut probe)
        .map_err(|source| IoError::Probe { source })?;
    match needed.iter().find(|op| !probe.is_supported(op.code)) {
        Some(op) => Err(IoError::Unsupported {
            opcode: op.name,
            since: op.since,
        }),
        None => Ok(()),
    }
}

/// Whether an `io_uring_enter` failure is worth retrying: a signal, or a momentary lack of
/// kernel resources or completion-queue room (the caller reaps completions before retrying).
pub(super) fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ENOMEM)
    )
}

/// Submits what is queued and waits for `want` completions (0: do not wait), retrying a
/// transient failure up to [`ENTER_RETRIES_MAX`] times in a row. A retry that finds
/// completions already posted returns, so the caller can reap them and make room.
pub(super) fn submit_and_wait(uring: &mut IoUring, want: usize) -> std::io::Result<()> {
    let mut failures = 0;
    loop {
        match uring.submit_and_wait(want) {
            Ok(_) => return Ok(()),
            Err(e) if is_transient(&e) && failures < ENTER_RETRIES_MAX => {
                failures += 1;
                if want > 0 && !uring.completion().is_empty() {
                    return Ok(());
                }
                if e.raw_os_error() != Some(libc::EINTR) {
                    std::thread::yield_now();
                }
            }
            Err(source) => return Err(source),
        }
    }
}

/// One io_uring, driven by one thread at a time (`&mut self`).
pub struct Ring {
    uring: IoUring,
    entries: u32,
    // Set when a call had to give up with SQEs still queued but never consumed by the kernel:
    // those point at buffers whose borrows have ended, so the ring must never be entered again.
    // The next call replaces it with a fresh one.
    retired: bool,
}

impl Ring {
    /// Creates a ring with `entries` submission-queue entries and checks that the kernel
    /// offers the reads and writes it submits. A kernel or sandbox that does not allow
    /// io_uring gives [`IoError::Refused`], a kernel without one of the operations
    /// [`IoError::Unsupported`] or [`IoError::Probe`]: in every case the caller falls back to
    /// [`super::sync`].
    pub fn new(entries: u32) -> Result<Ring, IoError> {
        let uring = create(entries)?;
        require(&uring, &RING_OPS)?;
        Ok(Ring {
            uring,
            entries,
            retired: false,
        })
    }

    /// Submission-queue entries of this ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Reads every op of the batch from `fd`.
    pub fn read_at(&mut self, fd: BorrowedFd<'_>, ops: &mut [ReadOp<'_>]) -> Result<(), IoError> {
        self.run(fd, Direction::Read, ops)
    }

    /// Writes every op of the batch to `fd`.
    pub fn write_at(&mut self, fd: BorrowedFd<'_>, ops: &mut [WriteOp<'_>]) -> Result<(), IoError> {
        self.run(fd, Direction::Write, ops)
    }

    /// Runs the batch to completion. It is one function of about a hundred lines on purpose:
    /// its safety argument (never return while an SQE of this call may still execute) is
    /// checked by reading every exit of the one loop, which splitting would scatter.
    fn run<T: AsTransfer>(
        &mut self,
        fd: BorrowedFd<'_>,
        dir: Direction,
        ops: &mut [T],
    ) -> Result<(), IoError> {
        if self.retired {
            self.uring = create(self.entries)?;
            self.retired = false;
        }
        for op in ops.iter_mut() {
            op.transfer().start(dir)?;
        }
        let sq_entries = usize::try_from(self.uring.params().sq_entries()).unwrap_or(usize::MAX);
        let in_flight_max = BATCH_IOS_MAX.min(sq_entries);
        // Ops not yet handed out, in order, then ops to resubmit after a partial transfer.
        let mut next = 0usize;
        let mut again: Vec<usize> = Vec::new();
        let mut in_flight = 0usize;
        let mut failure: Option<IoError> = None;
        let mut enter_failures = 0u32;
        loop {
            if failure.is_none() {
                let mut sq = self.uring.submission();
                while in_flight < in_flight_max {
                    let index = if let Some(i) = again.pop() {
                        i
                    } else if next < ops.len() {
                        next += 1;
                        if ops[next - 1].transfer().is_done() {
                            continue; // empty op: nothing to do
                        }
                        next - 1
                    } else {
                        break;
                    };
                    let entry = sqe(fd, dir, ops[index].transfer(), index);
                    // SAFETY: the entry points at the op's pending segments (a buffer for a
                    // plain read/write, the op's iovec array for a vectored one). The buffers
                    // are borrowed by the op for longer than this call, and the iovec array is
                    // not touched until this SQE's CQE is reaped (an op has at most one SQE in
                    // flight). This call does not return before every pushed SQE has
                    // completed or provably never reached the kernel (see `retire`).
                    if unsafe { sq.push(&entry) }.is_err() {
                        again.push(index);
                        break;
                    }
                    in_flight += 1;
                }
            }
            if in_flight == 0 {
                break;
            }
            // Even when draining after a failure, queued SQEs are still submitted: their
            // buffers are alive, and an SQE left queued would never complete.
            let entered = if self.retired {
                self.wait_only()
            } else {
                self.submit_and_spin()
            };
            match entered {
                Ok(_) => enter_failures = 0,
                Err(e) if is_transient(&e) && enter_failures < ENTER_RETRIES_MAX => {
                    enter_failures += 1;
                    if e.raw_os_error() != Some(libc::EINTR) {
                        std::thread::yield_now();
                    }
                }
                Err(source) => {
                    if !self.retired {
                        in_flight -= self.retire();
                    } else {
                        // Waiting itself fails while the kernel still owns buffers of this
                        // call: returning would let it write into memory we no longer own.
                        log::error!(
                            "io_uring: waiting for {in_flight} in-flight I/Os failed ({source}); \
                             aborting to protect memory"
                        );
                        std::process::abort();
                    }
                    failure.get_or_insert(IoError::Submit { source });
                }
            }
            for cqe in self.uring.completion() {
                in_flight -= 1;
                let index = usize::try_from(cqe.user_data())
                    .expect("user_data holds an op index of this call");
                let res = cqe.result();
                let result = usize::try_from(res).map_err(|_| res.saturating_neg());
                if failure.is_some() {
                    continue; // draining: the batch has already failed
                }
                match ops[index].transfer().complete(dir, result) {
                    Step::Done => {}
                    Step::Again => again.push(index),
                    Step::Failed(e) => failure = Some(e),
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => {
                debug_assert!(ops.iter_mut().all(|op| op.transfer().is_done()));
                Ok(())
            }
        }
    }

    /// Submits what is queued and waits for at least one completion: first by watching the
    /// completion queue for up to [`SPIN_WAIT`] (a page read from a fast device completes
    /// within it, and sleeping then being woken costs about as much again on a virtual
    /// machine), then by sleeping in the kernel.
    fn submit_and_spin(&mut self) -> std::io::Result<usize> {
        let submitted = self.uring.submit()?;
        let start = std::time::Instant::now();
        loop {
            if !self.uring.completion().is_empty() {
                return Ok(submitted);
            }
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            if start.elapsed() >= SPIN_WAIT {
                return self.uring.submit_and_wait(1);
            }
        }
    }

    /// Waits for at least one completion without submitting anything queued.
    fn wait_only(&self) -> std::io::Result<usize> {
        // SAFETY: `to_submit` is 0, so no queued SQE is handed to the kernel; GETEVENTS with
        // `min_complete` 1 only blocks until a CQE is posted; no argument struct is passed.
        unsafe {
            self.uring
                .submitter()
                .enter::<libc::sigset_t>(0, 1, EnterFlags::GETEVENTS.bits(), None)
        }
    }

    /// Marks the ring unusable and returns how many SQEs of this call are still queued but
    /// were never consumed by the kernel: they will never run (nobody enters this ring with
    /// them again), so they need no completion.
    fn retire(&mut self) -> usize {
        self.retired = true;
        self.uring.submission().len()
    }
}

/// The SQE for the op's remaining bytes: a plain read/write when they are one segment, a
/// vectored one otherwise.
fn sqe(fd: BorrowedFd<'_>, dir: Direction, t: &Transfer, index: usize) -> squeue::Entry {
    let fd = types::Fd(fd.as_raw_fd());
    let iov = t.pending();
    let offset = t.position();
    let entry = match (dir, iov) {
        (Direction::Read, [seg]) => opcode::Read::new(
            fd,
            seg.iov_base.cast(),
            clamp_u32(seg.iov_len.min(TRANSFER_BYTES_MAX)),
        )
        .offset(offset)
        .build(),
        (Direction::Write, [seg]) => opcode::Write::new(
            fd,
            seg.iov_base.cast_const().cast(),
            clamp_u32(seg.iov_len.min(TRANSFER_BYTES_MAX)),
        )
        .offset(offset)
        .build(),
        (Direction::Read, _) => opcode::Readv::new(fd, iov.as_ptr(), clamp_u32(iov.len()))
            .offset(offset)
            .build(),
        (Direction::Write, _) => opcode::Writev::new(fd, iov.as_ptr(), clamp_u32(iov.len()))
            .offset(offset)
            .build(),
    };
    entry.user_data(u64::try_from(index).expect("an op index fits in u64"))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{fill, pages, tempfile};
    use super::super::RING_ENTRIES;
    use super::*;
    use crate::PAGE_SIZE;
    use std::os::fd::AsFd;

    fn ring() -> Ring {
        Ring::new(RING_ENTRIES).expect("io_uring must be available on the test machine")
    }

    #[test]
    fn batch_larger_than_the_ring_round_trips() {
        let file = tempfile();
        let n = 3 * RING_ENTRIES as usize + 5;
        let mut src = pages(n);
        for (i, p) in src.iter_mut().enumerate() {
            fill(&mut p.0, i as u64);
        }
        let mut ring = ring();
        // Every page its own op, written in reverse file order so no two ops are adjacent
        // in memory and file at once.
        let mut writes: Vec<WriteOp<'_>> = src
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut w = WriteOp::new(((n - 1 - i) * PAGE_SIZE) as u64);
                w.push(&p.0);
                w
            })
            .collect();
        ring.write_at(file.as_fd(), &mut writes)
            .expect("batched writes");
        drop(writes);

        let mut dst = pages(n);
        {
            // One vectored read over the whole file into pages pushed in reverse order.
            let mut r = ReadOp::new(0);
            for p in dst.iter_mut().rev() {
                r.push(&mut p.0);
            }
            assert!(r.segments() > 1);
            ring.read_at(file.as_fd(), &mut [r]).expect("vectored read");
        }
        for i in 0..n {
            assert!(dst[i].0 == src[i].0, "page {i} differs");
        }
    }

    #[test]
    fn short_read_at_end_of_file_is_reported() {
        let file = tempfile();
        file.set_len(PAGE_SIZE as u64 + 100)
            .expect("sizing the scratch file");
        let mut dst = pages(2);
        let mut r = ReadOp::new(0);
        for p in dst.iter_mut() {
            r.push(&mut p.0);
        }
        let err = ring()
            .read_at(file.as_fd(), &mut [r])
            .expect_err("read past the end");
        assert!(matches!(err, IoError::Short { done, .. } if done == PAGE_SIZE + 100));
    }

    #[test]
    fn errno_fails_the_batch_after_draining() {
        let file = tempfile();
        let ro = std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .expect("reopening the scratch file read-only");
        let src = pages(8);
        let mut writes: Vec<WriteOp<'_>> = src
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut w = WriteOp::new((2 * i * PAGE_SIZE) as u64);
                w.push(&p.0);
                w
            })
            .collect();
        let mut ring = ring();
        let err = ring
            .write_at(ro.as_fd(), &mut writes)
            .expect_err("writes to a read-only fd");
        assert_eq!(err.errno(), Some(libc::EBADF));
        // The ring stays usable after a failed batch.
        ring.write_at(file.as_fd(), &mut writes)
            .expect("writes after a failure");
    }

    #[test]
    fn a_missing_operation_is_unsupported_and_named() {
        let uring = create(RING_ENTRIES).expect("io_uring must be available on the test machine");
        require(&uring, &RING_OPS).expect("the test kernel offers the page store's operations");
        // No kernel has an opcode this high (the table ends in the sixties in Linux 6.x).
        let missing = Op {
            code: u8::MAX,
            name: "IORING_OP_FROM_THE_FUTURE",
            since: "99.0",
        };
        let err = require(&uring, &[OP_READ, missing, OP_WRITE]).expect_err("a missing opcode");
        assert!(
            matches!(
                err,
                IoError::Unsupported {
                    opcode: "IORING_OP_FROM_THE_FUTURE",
                    since: "99.0"
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("IORING_OP_FROM_THE_FUTURE") && text.contains("99.0"),
            "{text}"
        );
    }

    #[test]
    fn empty_batches_and_ops_are_fine() {
        let file = tempfile();
        let mut ring = ring();
        ring.read_at(file.as_fd(), &mut []).expect("empty batch");
        ring.write_at(file.as_fd(), &mut [WriteOp::new(0)])
            .expect("empty op");
    }
}
