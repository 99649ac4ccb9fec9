//! The synchronous path: each op is one `preadv`/`pwritev` system call (more if it comes back
//! short or interrupted). Used when io_uring is refused; same semantics as [`super::Ring`]
//! except that the ops run one after the other and the first failure stops the batch at once
//! (nothing is in flight behind it).

use std::os::fd::{AsRawFd, BorrowedFd};

use super::{AsTransfer, Direction, IoError, ReadOp, Step, Transfer, WriteOp};

/// Reads every op of the batch; returns when all are complete or one failed.
pub fn read_at(fd: BorrowedFd<'_>, ops: &mut [ReadOp<'_>]) -> Result<(), IoError> {
    run(fd, Direction::Read, ops)
}

/// Writes every op of the batch; returns when all are complete or one failed.
pub fn write_at(fd: BorrowedFd<'_>, ops: &mut [WriteOp<'_>]) -> Result<(), IoError> {
    run(fd, Direction::Write, ops)
}

/// Starts writing back the dirty pages of the whole file without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that a later `fdatasync` has less to do. It
/// makes nothing durable.
pub fn start_writeback(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: sync_file_range takes no pointers; a bad descriptor is reported as EBADF.
    let res = unsafe { libc::sync_file_range(fd.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if res == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn run<T: AsTransfer>(fd: BorrowedFd<'_>, dir: Direction, ops: &mut [T]) -> Result<(), IoError> {
    for op in ops.iter_mut() {
        let t = op.transfer();
        t.start(dir)?;
        // Each pass either moves at least one byte, retries a bounded number of times
        // (`RETRIES_MAX`) or fails, so the loop ends after at most len + RETRIES_MAX passes.
        while !t.is_done() {
            match t.complete(dir, transfer_once(fd, dir, t)) {
                Step::Done | Step::Again => {}
                Step::Failed(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// One `preadv`/`pwritev` of the op's remaining segments: `Ok(bytes)` or `Err(errno)`.
fn transfer_once(fd: BorrowedFd<'_>, dir: Direction, t: &Transfer) -> Result<usize, i32> {
    let iov = t.pending();
    let count = libc::c_int::try_from(iov.len()).expect("pending() holds at most UIO_MAXIOV");
    let offset = t.position_off_t();
    let res = match dir {
        // SAFETY: `iov` describes `count` segments of buffers that the `ReadOp` borrows mutably
        // for the whole call (so they are valid for writes of their length and nobody else
        // touches them), and the call is synchronous: the kernel is done with them on return.
        Direction::Read => unsafe { libc::preadv(fd.as_raw_fd(), iov.as_ptr(), count, offset) },
        // SAFETY: as above, with the `WriteOp` holding shared borrows of buffers that the
        // kernel only reads.
        Direction::Write => unsafe { libc::pwritev(fd.as_raw_fd(), iov.as_ptr(), count, offset) },
    };
    match usize::try_from(res) {
        Ok(n) => Ok(n),
        Err(_) => Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{fill, pages, tempfile};
    use super::*;
    use crate::PAGE_SIZE;
    use std::os::fd::AsFd;

    #[test]
    fn vectored_round_trip_and_end_of_file() {
        let file = tempfile();
        file.set_len(4 * PAGE_SIZE as u64)
            .expect("sizing the scratch file");
        let mut src = pages(3);
        for (i, p) in src.iter_mut().enumerate() {
            fill(&mut p.0, i as u64);
        }
        // Write page 0 and 2 of `src` to file pages 1..3 as one vectored write.
        let mut w = WriteOp::new(PAGE_SIZE as u64);
        w.push(&src[0].0);
        w.push(&src[2].0);
        assert_eq!(w.segments(), 2);
        write_at(file.as_fd(), &mut [w]).expect("vectored write");

        let mut dst = pages(2);
        {
            let mut r = ReadOp::new(PAGE_SIZE as u64);
            for p in dst.iter_mut() {
                r.push(&mut p.0);
            }
            read_at(file.as_fd(), &mut [r]).expect("read back");
        }
        assert!(dst[0].0 == src[0].0);
        assert!(dst[1].0 == src[2].0);

        // Reading past the end of the file is a short transfer, not a silent success.
        let mut tail = pages(2);
        let mut r = ReadOp::new(3 * PAGE_SIZE as u64);
        for p in tail.iter_mut() {
            r.push(&mut p.0);
        }
        let err = read_at(file.as_fd(), &mut [r]).expect_err("read past end of file");
        assert!(matches!(err, IoError::Short { done, .. } if done == PAGE_SIZE));
    }

    #[test]
    fn errno_is_reported_with_the_offset() {
        let file = tempfile();
        let ro = std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .expect("reopening the scratch file read-only");
        let src = pages(1);
        let mut w = WriteOp::new(8 * PAGE_SIZE as u64);
        w.push(&src[0].0);
        let err = write_at(ro.as_fd(), &mut [w]).expect_err("write to a read-only fd");
        assert_eq!(err.errno(), Some(libc::EBADF));
        assert_eq!(err.offset(), Some(8 * PAGE_SIZE as u64));
    }
}
