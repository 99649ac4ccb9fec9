//! [`Connection`]s to one memcached server: a few kept open, every connect, read and write
//! bounded by the pool's timeout, a pipeline sent and its replies read up to `MN`, the text
//! commands (`stats`, `stats settings`) the pool reads at start and when it probes, and long
//! text replies read line by line (`lru_crawler metadump all`, for garbage collection).
//!
//! Rules: a connection whose pipeline did not end cleanly is dropped (its stream may hold
//! replies of a request nobody waits for); a new one is made on the next call. Buffers come
//! from Rust's allocator (the internal heap in the preload library), and their resident bytes
//! are part of lego's stated overhead, multiplied by the pool's servers: a reply buffer is
//! held only while replies are read (a pipeline sent ahead waits in its socket without one),
//! and at most [`SPARE_REPLY_BUFFERS_MAX`] of [`REPLY_BUFFER_BYTES`] each are kept per server
//! (one that grew for a long reply is shrunk back first).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::ops::ControlFlow;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::protocol::{self, ProtocolError, Reply};
use crate::store::FailureKind;

/// Idle connections kept per server.
pub const CONNECTIONS_PER_SERVER_MAX: usize = 4;
/// Least room a read of a server's replies is given, in bytes.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// A reply buffer, in bytes (a read fills as much of it as has arrived; replies are parsed as
/// they come, so a pipeline of any length is read through one buffer this size, grown only
/// for a single reply longer than the room left). Kept buffers are shrunk back to this.
pub const REPLY_BUFFER_BYTES: usize = 128 * 1024;
/// Reply buffers kept per server for the next pipeline (about one per reader that reads from
/// the server at once: the fault handlers); more are freed when given back.
pub const SPARE_REPLY_BUFFERS_MAX: usize = 2;
const _: () = assert!(READ_CHUNK_BYTES <= REPLY_BUFFER_BYTES);
/// Longest text reply (`stats`) read, in bytes.
const TEXT_REPLY_BYTES_MAX: usize = 1 << 20;

/// A pipeline sent by [`Connection::send`] whose replies are still to be read: its own
/// connection, and the reply buffer that goes back to the pool with it. Dropped unread, it
/// closes the connection (the server's replies die with it).
pub struct Sent {
    stream: TcpStream,
    /// An idle connection was used (it may have been closed by the server meanwhile).
    reused: bool,
}

/// How a reply read by [`Connection::text_lines`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinesEnd {
    /// With `END`: every line was read.
    End,
    /// The caller asked to stop.
    Stopped,
    /// The deadline passed first.
    Deadline,
}

/// Where one server is, and its idle connections.
pub struct Connection {
    addr: SocketAddr,
    /// `HOST:PORT` as the user wrote it.
    pub name: String,
    timeout: Duration,
    /// Idle connections.
    idle: Mutex<Vec<TcpStream>>,
    /// Reply buffers kept for the next pipeline (so that one neither allocates nor
    /// zero-fills a buffer), at most [`SPARE_REPLY_BUFFERS_MAX`], each of
    /// [`REPLY_BUFFER_BYTES`].
    spare: Mutex<Vec<Vec<u8>>>,
}

/// Why talking to a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("resolving the server's name failed")]
    Resolve(#[source] std::io::Error),
    #[error("talking to the server failed")]
    Io(#[source] std::io::Error),
    #[error(transparent)]
    Protocol(ProtocolError),
}

impl ServerError {
    pub fn kind(&self) -> FailureKind {
        match self {
            ServerError::Resolve(_) | ServerError::Io(_) => FailureKind::Transient,
            ServerError::Protocol(e) if e.is_transient() => FailureKind::Transient,
            ServerError::Protocol(_) => FailureKind::Refused,
        }
    }
}

impl Connection {
    /// Resolves `name` (`HOST:PORT`); connects only when first used.
    pub fn new(name: &str, timeout_ms: u64) -> Result<Connection, ServerError> {
        let addr = name
            .to_socket_addrs()
            .map_err(ServerError::Resolve)?
            .next()
            .ok_or_else(|| {
                ServerError::Resolve(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the name has no address",
                ))
            })?;
        Ok(Connection {
            addr,
            name: name.to_owned(),
            timeout: Duration::from_millis(timeout_ms),
            idle: Mutex::new(Vec::new()),
            spare: Mutex::new(Vec::new()),
        })
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&self.addr, self.timeout)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// An idle connection (`true`: reused), or a new one.
    fn take(&self) -> std::io::Result<(TcpStream, bool)> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(stream) => Ok((stream, true)),
            None => Ok((self.connect()?, false)),
        }
    }

    /// Gives a connection whose pipeline ended cleanly back to the pool.
    fn give_back(&self, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < CONNECTIONS_PER_SERVER_MAX {
            idle.push(stream);
        }
    }

    /// A kept reply buffer, or a new one of [`REPLY_BUFFER_BYTES`].
    fn take_buffer(&self) -> Vec<u8> {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        spare.unwrap_or_else(|| vec![0u8; REPLY_BUFFER_BYTES])
    }

    /// Keeps `buf` for the next pipeline, shrunk back to [`REPLY_BUFFER_BYTES`] if a long
    /// reply grew it, unless [`SPARE_REPLY_BUFFERS_MAX`] are kept already.
    fn give_back_buffer(&self, mut buf: Vec<u8>) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARE_REPLY_BUFFERS_MAX {
            buf.truncate(REPLY_BUFFER_BYTES);
            buf.shrink_to(REPLY_BUFFER_BYTES);
            spare.push(buf);
        }
    }

    /// Bytes of the reply buffers kept (for tests of the bound).
    pub fn spare_buffer_bytes(&self) -> usize {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        spare.iter().map(Vec::capacity).sum()
    }

    /// Drops every idle connection (after the server was down: they are likely dead).
    pub fn forget_idle(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.spare.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Sends `request` (a pipeline ending in `mn`) and hands every reply up to `MN` to
    /// `on_reply`. Returns the bytes read. The connection goes back to the pool only if the
    /// pipeline ended cleanly.
    pub fn pipeline(
        &self,
        request: &[u8],
        on_reply: impl FnMut(Reply<'_>),
    ) -> Result<u64, ServerError> {
        let sent = self.send(request)?;
        self.receive(sent, request, on_reply)
    }

    /// The first half of [`Connection::pipeline`]: sends `request` on a connection of its
    /// own and returns it, so that the server answers while the caller does other work. The
    /// replies wait in the socket until [`Connection::receive`].
    pub fn send(&self, request: &[u8]) -> Result<Sent, ServerError> {
        let (mut stream, reused) = self.take().map_err(ServerError::Io)?;
        match stream.write_all(request) {
            Ok(()) => Ok(Sent { stream, reused }),
            // An idle connection the server (or a middlebox) closed meanwhile: that is not
            // the server failing. Once more on a new connection.
            Err(e) if reused => {
                log::debug!(
                    "{}: an idle connection failed ({e}); trying a new one",
                    self.name
                );
                let mut stream = self.connect().map_err(ServerError::Io)?;
                stream.write_all(request).map_err(ServerError::Io)?;
                Ok(Sent {
                    stream,
                    reused: false,
                })
            }
            Err(e) => Err(ServerError::Io(e)),
        }
    }

    /// The second half of [`Connection::pipeline`]: reads the replies to `request`, which
    /// `sent` carried, handing each up to `MN` to `on_reply`. Returns the bytes read.
    pub fn receive(
        &self,
        sent: Sent,
        request: &[u8],
        mut on_reply: impl FnMut(Reply<'_>),
    ) -> Result<u64, ServerError> {
        let reused = sent.reused;
        let mut buf = self.take_buffer();
        let result = self.receive_retrying(sent, reused, request, &mut buf, &mut on_reply);
        self.give_back_buffer(buf);
        result
    }

    /// [`Connection::receive`] with the reply buffer `buf`.
    fn receive_retrying(
        &self,
        sent: Sent,
        reused: bool,
        request: &[u8],
        buf: &mut Vec<u8>,
        on_reply: &mut impl FnMut(Reply<'_>),
    ) -> Result<u64, ServerError> {
        match self.receive_on(sent, buf, on_reply) {
            // An idle connection the server closed meanwhile fails before any reply: once
            // more on a new connection.
            Err((e, 0)) if reused => {
                log::debug!(
                    "{}: an idle connection failed ({e}); trying a new one",
                    self.name
                );
                let mut stream = self.connect().map_err(ServerError::Io)?;
                stream.write_all(request).map_err(ServerError::Io)?;
                let fresh = Sent {
                    stream,
                    reused: false,
                };
                self.receive_on(fresh, buf, on_reply).map_err(|(e, _)| e)
            }
            Err((e, _)) => Err(e),
            Ok(n) => Ok(n),
        }
    }

    /// Reads the replies of a sent pipeline; an error comes with the bytes received.
    fn receive_on(
        &self,
        Sent { mut stream, .. }: Sent,
        buf: &mut Vec<u8>,
        on_reply: &mut impl FnMut(Reply<'_>),
    ) -> Result<u64, (ServerError, u64)> {
        // Replies are parsed from buf[start..end]; what is left of a partial reply moves to
        // the front when the space behind it runs short.
        let (mut start, mut end) = (0, 0);
        let mut received = 0u64;
        loop {
            loop {
                match protocol::parse(&buf[start..end])
                    .map_err(|e| (ServerError::Protocol(e), received))?
                {
                    Some((Reply::End, taken)) => {
                        start += taken;
                        if start == end {
                            self.give_back(stream);
                        }
                        return Ok(received);
                    }
                    Some((reply, taken)) => {
                        on_reply(reply);
                        start += taken;
                    }
                    None => break,
                }
            }
            if buf.len() - end < READ_CHUNK_BYTES {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                if buf.len() - end < READ_CHUNK_BYTES {
                    // A reply longer than the buffer (bounded by the protocol's limits).
                    buf.resize(end + READ_CHUNK_BYTES, 0);
                }
            }
            let n = stream
                .read(&mut buf[end..])
                .map_err(|e| (ServerError::Io(e), received))?;
            if n == 0 {
                return Err((
                    ServerError::Io(std::io::ErrorKind::UnexpectedEof.into()),
                    received,
                ));
            }
            end += n;
            received += n as u64;
        }
    }

    /// Sends one text command (`stats`, `stats settings`) on a connection of its own and
    /// returns the `STAT NAME VALUE` pairs up to `END`.
    pub fn stats(&self, command: &str) -> Result<Vec<(String, String)>, ServerError> {
        let io = |e: std::io::Error| ServerError::Io(e);
        let mut stream = self.connect().map_err(io)?;
        stream
            .write_all(format!("{command}\r\n").as_bytes())
            .map_err(io)?;
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).map_err(io)?;
            if n == 0 {
                return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if text.ends_with("END\r\n") || text.ends_with("ERROR\r\n") {
                break;
            }
            if text.len() > TEXT_REPLY_BYTES_MAX {
                return Err(ServerError::Protocol(ProtocolError::LineTooLong));
            }
        }
        let mut pairs = Vec::new();
        for line in text.lines() {
            if let Some(stat) = line.strip_prefix("STAT ") {
                let (name, value) = stat.split_once(' ').unwrap_or((stat, ""));
                pairs.push((name.to_owned(), value.to_owned()));
            } else if line.ends_with("ERROR") {
                return Err(ServerError::Protocol(ProtocolError::Client {
                    line: line.to_owned(),
                }));
            }
        }
        Ok(pairs)
    }
}

impl Connection {
    /// Sends one text command whose reply is lines up to `END` (`lru_crawler metadump all`)
    /// on a connection of its own, and hands every line before `END` to `on_line` (without
    /// its line end: `\n` or `\r\n`) as it arrives, so a reply of any length is read in
    /// bounded memory. Reading stops when `on_line` breaks, or at `deadline`; each read is
    /// bounded by the timeout too. The connection is closed after (the server stops a dump
    /// whose client went away). A line `ERROR`, `CLIENT_ERROR ...`, `SERVER_ERROR ...` or
    /// `BUSY ...` is an error; a line longer than [`protocol::LINE_BYTES_MAX`] is too.
    pub fn text_lines(
        &self,
        command: &str,
        deadline: Instant,
        mut on_line: impl FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<LinesEnd, ServerError> {
        let io = |e: std::io::Error| ServerError::Io(e);
        let mut stream = self.connect().map_err(io)?;
        stream
            .write_all(format!("{command}\r\n").as_bytes())
            .map_err(io)?;
        let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
        let mut start = 0;
        loop {
            while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
                let mut line = &buf[start..start + nl];
                start += nl + 1;
                if let Some(l) = line.strip_suffix(b"\r") {
                    line = l;
                }
                if line.len() > protocol::LINE_BYTES_MAX {
                    return Err(ServerError::Protocol(ProtocolError::LineTooLong));
                }
                if line == b"END" {
                    return Ok(LinesEnd::End);
                }
                if let Some(e) = error_line(line) {
                    return Err(ServerError::Protocol(e));
                }
                if on_line(line).is_break() {
                    return Ok(LinesEnd::Stopped);
                }
            }
            buf.drain(..start);
            start = 0;
            if buf.len() > protocol::LINE_BYTES_MAX {
                return Err(ServerError::Protocol(ProtocolError::LineTooLong));
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Ok(LinesEnd::Deadline);
            };
            // A zero timeout means none to the socket: at least a millisecond.
            let wait = left.min(self.timeout).max(Duration::from_millis(1));
            stream.set_read_timeout(Some(wait)).map_err(io)?;
            let len = buf.len();
            buf.resize(len + READ_CHUNK_BYTES, 0);
            let n = match stream.read(&mut buf[len..]) {
                Ok(n) => n,
                Err(e) if is_timeout(&e) && Instant::now() >= deadline => {
                    return Ok(LinesEnd::Deadline)
                }
                Err(e) => return Err(io(e)),
            };
            buf.truncate(len + n);
            if n == 0 {
                return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// The error a text reply's line reports, if it is one.
fn error_line(line: &[u8]) -> Option<ProtocolError> {
    let text = || String::from_utf8_lossy(line).into_owned();
    if line == b"ERROR" || line.starts_with(b"CLIENT_ERROR") {
        Some(ProtocolError::Client { line: text() })
    } else if line.starts_with(b"SERVER_ERROR") {
        Some(ProtocolError::Server { line: text() })
    } else if line.starts_with(b"BUSY") {
        Some(ProtocolError::Busy { line: text() })
    } else {
        None
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// The value of `name` among `stats` pairs.
pub fn stat<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}
