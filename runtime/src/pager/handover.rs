//! Handing a forked child its userfaultfd: a `SOCK_SEQPACKET` socket pair made before the fork
//! (both ends close-on-exec). The child says hello when its runtime is about to start, the
//! parent's `lego-fork` answers with the child's userfaultfd (`SCM_RIGHTS`) and the pages it
//! served the child meanwhile, and the child says it is up once its handlers run.
//!
//! Messages, one per datagram: the child's are one byte (`H` hello, `U` up); the parent's are a
//! tag byte, seven bytes of padding and up to [`PAGES_PER_MESSAGE_MAX`] page indices
//! (little-endian `u64`); the first carries the descriptor; tag `F` ends the list, `M` says more
//! follow. Every wait is bounded.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use super::PagerError;

/// Most page indices one parent message carries.
pub const PAGES_PER_MESSAGE_MAX: usize = 512;
/// Bytes before the page indices in a parent message.
const HEADER_BYTES: usize = 8;
/// Longest a child waits for its parent's answer, in milliseconds.
const ANSWER_WAIT_MS_MAX: u64 = 30_000;

const HELLO: u8 = b'H';
const UP: u8 = b'U';
const LAST: u8 = b'F';
const MORE: u8 = b'M';

/// The parent's end (used by `lego-fork`).
pub(super) struct ParentEnd {
    sock: OwnedFd,
}

/// The child's end (used by the child's `fork_child` handler).
pub(super) struct ChildEnd {
    sock: OwnedFd,
}

/// What the child receives.
pub(super) struct Received {
    pub(super) uffd: OwnedFd,
    /// Pages the parent installed in the child before the handover.
    pub(super) installed: Vec<u64>,
}

/// What woke the parent's wait.
pub(super) enum Ready {
    /// The child's userfaultfd has events.
    Child,
    /// The child asked for its userfaultfd.
    Hello,
    /// The child is gone (exited, or exec'd: its end closed).
    Gone,
    Nothing,
}

/// A connected pair: `(parent's end, child's end)`.
pub(super) fn pair() -> std::io::Result<(ParentEnd, ChildEnd)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    Ok((ParentEnd { sock: a }, ChildEnd { sock: b }))
}

fn handover_error(what: &str, source: std::io::Error) -> PagerError {
    PagerError::Thread {
        name: format!("the forked child's handover ({what})"),
        source,
    }
}

/// `poll` on `fds` for input; the revents, or none on timeout.
fn poll_in(fds: &[RawFd], timeout_ms: i32) -> Vec<i16> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let nfds = libc::nfds_t::try_from(pfds.len()).expect("a few descriptors");
    // SAFETY: `pfds` is a live array of `nfds` pollfds.
    let ret = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, timeout_ms) };
    if ret <= 0 {
        return vec![0; fds.len()];
    }
    pfds.iter().map(|p| p.revents).collect()
}

/// Reads one datagram of up to `buf.len()` bytes without waiting: its length, 0 at EOF.
fn recv_now(sock: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, None, MsgFlags::MSG_DONTWAIT)
        .map_err(std::io::Error::from)?;
    Ok(msg.bytes)
}

fn send_byte(sock: &OwnedFd, byte: u8) -> std::io::Result<()> {
    let iov = [IoSlice::new(std::slice::from_ref(&byte))];
    sendmsg::<()>(sock.as_raw_fd(), &iov, &[], MsgFlags::MSG_NOSIGNAL, None)
        .map(|_| ())
        .map_err(std::io::Error::from)
}

impl ParentEnd {
    /// Waits up to `timeout_ms` for the child's userfaultfd or the child's hello.
    pub(super) fn wait(&self, child_uffd: RawFd, timeout_ms: i32) -> Ready {
        let revents = poll_in(&[self.sock.as_raw_fd(), child_uffd], timeout_ms);
        if revents[0] != 0 {
            let mut b = [0u8; 1];
            return match recv_now(&self.sock, &mut b) {
                Ok(1) if b[0] == HELLO => Ready::Hello,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ready::Nothing,
                _ => Ready::Gone,
            };
        }
        if revents[1] != 0 {
            return Ready::Child;
        }
        Ready::Nothing
    }

    /// Sends the child its userfaultfd and the pages installed in it so far.
    pub(super) fn send(&self, uffd: OwnedFd, installed: &[u64]) -> std::io::Result<()> {
        let mut chunks: Vec<&[u64]> = installed.chunks(PAGES_PER_MESSAGE_MAX).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut msg = vec![0u8; HEADER_BYTES + chunk.len() * 8];
            msg[0] = if i == last { LAST } else { MORE };
            for (j, p) in chunk.iter().enumerate() {
                msg[HEADER_BYTES + j * 8..HEADER_BYTES + (j + 1) * 8]
                    .copy_from_slice(&p.to_le_bytes());
            }
            let iov = [IoSlice::new(&msg)];
            let fds = [uffd.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let cmsgs: &[ControlMessage<'_>] = if i == 0 { &cmsg } else { &[] };
            sendmsg::<()>(
                self.sock.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)?;
        }
        Ok(())
    }

    /// Waits up to `timeout` until the child says it is up or is gone.
    pub(super) fn wait_up(&self, timeout: Duration) {
        let started = Instant::now();
        while started.elapsed() < timeout {
            let revents = poll_in(&[self.sock.as_raw_fd()], 100);
            if revents[0] == 0 {
                continue;
            }
            let mut b = [0u8; 1];
            match recv_now(&self.sock, &mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                // `U`, EOF or an error: either way the child no longer needs the parent.
                _ => return,
            }
        }
        log::warn!(
            "a forked child did not say it is up within {} ms",
            timeout.as_millis()
        );
    }
}

impl ChildEnd {
    /// Says hello and receives the child's userfaultfd and the pages installed in it.
    pub(super) fn receive(&self) -> Result<Received, PagerError> {
        send_byte(&self.sock, HELLO).map_err(|e| handover_error("hello", e))?;
        let started = Instant::now();
        let mut uffd: Option<OwnedFd> = None;
        let mut installed = Vec::new();
        let mut buf = vec![0u8; HEADER_BYTES + PAGES_PER_MESSAGE_MAX * 8];
        loop {
            if started.elapsed() > Duration::from_millis(ANSWER_WAIT_MS_MAX) {
                return Err(handover_error(
                    "the parent's answer",
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
            if poll_in(&[self.sock.as_raw_fd()], 100)[0] == 0 {
                continue;
            }
            let mut space = nix::cmsg_space!([RawFd; 1]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let msg = match msg {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => continue,
                Err(e) => return Err(handover_error("the parent's answer", e.into())),
            };
            let bytes = msg.bytes;
            for c in msg
                .cmsgs()
                .map_err(|e| handover_error("its descriptor", e.into()))?
            {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for fd in fds {
                        // SAFETY: the kernel just installed `fd` in this process for us.
                        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                        uffd.get_or_insert(fd);
                    }
                }
            }
            if bytes < HEADER_BYTES {
                return Err(handover_error(
                    "the parent's answer",
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                ));
            }
            for p in buf[HEADER_BYTES..bytes].chunks_exact(8) {
                installed.push(u64::from_le_bytes(p.try_into().expect("8 bytes")));
            }
            if buf[0] == LAST {
                break;
            }
        }
        let uffd = uffd.ok_or_else(|| {
            handover_error(
                "its descriptor",
                std::io::Error::other("the parent's answer carried no userfaultfd"),
            )
        })?;
        Ok(Received { uffd, installed })
    }

    /// Says the child's runtime is up: the parent closes its copy of the userfaultfd.
    pub(super) fn say_up(&self) {
        let _ = send_byte(&self.sock, UP);
    }
}
