//! [`MemcachedStore`]: pages in the memory of a pool of memcached servers
//! (`LEGO_BACKEND=memcached://HOST:PORT[,HOST:PORT...]`), spoken to with the meta protocol
//! ([`protocol`]). This is the first part of the pool: pages are sharded over the servers by
//! page number, one copy each (replication and failover come next).
//!
//! - Keys name the heap (a random id per run) and the page: `lego:HEAPID:PAGE` in hex.
//! - A value is the page's CRC32C and version (little-endian `u32`s) and then the page, so a
//!   stale or damaged value is detected on fetch and never served ([`VALUE_HEADER_BYTES`]).
//! - A batch is one pipeline per server: every request quiet, then `mn`, whose `MN` ends the
//!   replies (a miss or a stored set sends nothing).
//! - A pool, not a cache: at open every server's `stats settings` must say `evictions off`
//!   (memcached started with `-M`); a server that may evict is refused with one line.
//! - Connections: a few per server, kept in a small pool; every connect, read and write is
//!   bounded by [`IO_TIMEOUT_MS`]; a connection that failed is dropped and a new one is made
//!   on the next call. A failure of a server is `Transient` for its pages.
//! - Nothing listens: lego only connects.

pub mod protocol;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use protocol::{ProtocolError, Reply};

use super::{
    discard_range, refuse_bad_reads, refuse_bad_writes, FailureKind, Outcome, PageRead, PageStore,
    PageWrite, StoreError, StoreOp, PAGE_BYTES,
};
use crate::PAGE_SIZE;

/// Bytes before the page in a value: its CRC32C and its version.
pub const VALUE_HEADER_BYTES: usize = 8;
/// Bytes of one value.
pub const VALUE_BYTES: usize = VALUE_HEADER_BYTES + PAGE_SIZE;
/// Bound on every connect, read and write to a server, in milliseconds.
pub const IO_TIMEOUT_MS: u64 = 2000;
/// Idle connections kept per server.
pub const CONNECTIONS_PER_SERVER_MAX: usize = 4;
/// Requests of one pipeline (a discard of a large range is sent in pipelines this long).
pub const PIPELINE_REQUESTS_MAX: usize = 1024;
/// Bytes read from a server at once.
const READ_CHUNK_BYTES: usize = 64 * 1024;

const _: () = assert!(VALUE_BYTES <= protocol::VALUE_BYTES_MAX);

/// One server of the pool.
struct Server {
    addr: SocketAddr,
    /// `HOST:PORT` as the user wrote it.
    name: String,
    idle: Mutex<Vec<TcpStream>>,
}

impl Server {
    fn connect(&self) -> std::io::Result<TcpStream> {
        let timeout = Duration::from_millis(IO_TIMEOUT_MS);
        let stream = TcpStream::connect_timeout(&self.addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// An idle connection, or a new one.
    fn take(&self) -> std::io::Result<TcpStream> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(stream) => Ok(stream),
            None => self.connect(),
        }
    }

    /// Gives a connection whose pipeline ended cleanly back to the pool.
    fn give_back(&self, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < CONNECTIONS_PER_SERVER_MAX {
            idle.push(stream);
        }
    }

    /// Sends `request` (a pipeline ending in `mn`) and hands every reply up to `MN` to
    /// `on_reply`. The connection goes back to the pool only if the pipeline ended cleanly.
    fn pipeline(
        &self,
        request: &[u8],
        mut on_reply: impl FnMut(Reply<'_>),
    ) -> Result<(), ServerError> {
        let mut stream = self.take().map_err(ServerError::Io)?;
        stream.write_all(request).map_err(ServerError::Io)?;
        let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
        let mut start = 0;
        loop {
            // Parse what is there, then read more.
            loop {
                match protocol::parse(&buf[start..]).map_err(ServerError::Protocol)? {
                    Some((Reply::End, taken)) => {
                        start += taken;
                        if start == buf.len() {
                            self.give_back(stream);
                        }
                        return Ok(());
                    }
                    Some((reply, taken)) => {
                        on_reply(reply);
                        start += taken;
                    }
                    None => break,
                }
            }
            buf.drain(..start);
            start = 0;
            let len = buf.len();
            buf.resize(len + READ_CHUNK_BYTES, 0);
            let n = stream.read(&mut buf[len..]).map_err(ServerError::Io)?;
            buf.truncate(len + n);
            if n == 0 {
                return Err(ServerError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Sends one text command and reads lines until `last` says it is over.
    fn command(&self, command: &str, last: impl Fn(&str) -> bool) -> std::io::Result<Vec<String>> {
        let mut stream = self.connect()?;
        stream.write_all(command.as_bytes())?;
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if text.ends_with("\r\n") && lines.last().is_some_and(|l| last(l)) {
                return Ok(lines);
            }
            if text.len() > 1 << 20 {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
        }
    }
}

/// Why a server's part of a batch failed.
#[derive(Debug, thiserror::Error)]
enum ServerError {
    #[error("talking to the server failed")]
    Io(#[source] std::io::Error),
    #[error(transparent)]
    Protocol(ProtocolError),
}

impl ServerError {
    fn kind(&self) -> FailureKind {
        match self {
            ServerError::Io(_) => FailureKind::Transient,
            ServerError::Protocol(e) if e.is_transient() => FailureKind::Transient,
            ServerError::Protocol(_) => FailureKind::Refused,
        }
    }
}

/// The pages of a heap on a pool of memcached servers.
pub struct MemcachedStore {
    servers: Vec<Server>,
    heap_id: u64,
    pages: u64,
    /// `memcached://` and the servers, as errors and `describe` name the store.
    name: String,
}

impl MemcachedStore {
    /// Connects to every server of `servers` (`HOST:PORT`), checks that none may evict, and
    /// makes a store for a heap of `heap_bytes`.
    pub fn open(servers: &[String], heap_bytes: u64) -> Result<MemcachedStore, StoreError> {
        let name = format!("memcached://{}", servers.join(","));
        let open_error =
            |what: String, source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
                backend: name.clone(),
                what,
                source,
            };
        let mut pool = Vec::with_capacity(servers.len());
        for s in servers {
            let addr = s
                .to_socket_addrs()
                .map_err(|e| open_error(format!("resolving the server {s}"), Box::new(e)))?
                .next()
                .ok_or_else(|| {
                    open_error(
                        format!("resolving the server {s}"),
                        "it has no address".into(),
                    )
                })?;
            let server = Server {
                addr,
                name: s.clone(),
                idle: Mutex::new(Vec::new()),
            };
            let settings = server
                .command("stats settings\r\n", |l| l == "END" || l.ends_with("ERROR"))
                .map_err(|e| open_error(format!("connecting to the server {s}"), Box::new(e)))?;
            let evictions = settings
                .iter()
                .find_map(|l| l.strip_prefix("STAT evictions "))
                .unwrap_or("on");
            if evictions != "off" {
                return Err(open_error(
                    format!("using the server {s} as a pool"),
                    "it may evict pages (memcached started without -M): start it with -M, so \
                     that a full server refuses new pages instead of dropping old ones"
                        .into(),
                ));
            }
            pool.push(server);
        }
        if pool.is_empty() {
            return Err(open_error(
                "opening the pool".into(),
                "no server is named".into(),
            ));
        }
        let pages = heap_bytes.div_ceil(PAGE_BYTES);
        Ok(MemcachedStore {
            servers: pool,
            heap_id: random_heap_id(),
            pages,
            name,
        })
    }

    fn key(&self, page: u64) -> String {
        format!("lego:{:016x}:{page:x}", self.heap_id)
    }

    /// The server that holds `page`.
    fn shard(&self, page: u64) -> usize {
        // Runs of 16 pages stay together (one server serves a read-ahead window's pieces).
        let n = u64::try_from(self.servers.len()).expect("a pool of a few servers");
        usize::try_from((page / 16) % n).expect("below the server count")
    }

    fn server_error(&self, server: usize, op: StoreOp, page: u64, e: ServerError) -> StoreError {
        StoreError::Io {
            backend: format!("{} (server {})", self.name, self.servers[server].name),
            op,
            page,
            kind: e.kind(),
            source: Box::new(e),
        }
    }

    /// Positions of the batch's pending pages, by server.
    fn by_server(&self, pages: impl Iterator<Item = Option<u64>>) -> Vec<Vec<usize>> {
        let mut shards = vec![Vec::new(); self.servers.len()];
        for (i, page) in pages.enumerate() {
            if let Some(page) = page {
                shards[self.shard(page)].push(i);
            }
        }
        shards
    }
}

/// A random id for this run's keys (std's per-process hash keys, seeded from the OS).
fn random_heap_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// The value stored for a page.
fn encode_value(out: &mut Vec<u8>, crc: u32, version: u32, page: &[u8]) {
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(page);
}

impl PageStore for MemcachedStore {
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        let mut first_error = refuse_bad_reads(&self.name, self.pages, batch.iter_mut());
        let shards = self.by_server(
            batch
                .iter()
                .map(|r| (r.outcome == Outcome::Pending).then_some(r.page)),
        );
        for (server, positions) in shards.iter().enumerate() {
            if positions.is_empty() {
                continue;
            }
            let mut request = Vec::with_capacity(positions.len() * 48);
            for (k, &i) in positions.iter().enumerate() {
                protocol::get(&mut request, &self.key(batch[i].page), k as u32);
            }
            protocol::noop(&mut request);
            let mut values: Vec<Option<(u32, u32, bool)>> = vec![None; positions.len()];
            let result = self.servers[server].pipeline(&request, |reply| {
                if let Reply::Value { opaque, data } = reply {
                    let k = opaque as usize;
                    if let (Some(slot), Some(&i)) = (values.get_mut(k), positions.get(k)) {
                        if data.len() == VALUE_BYTES {
                            let crc = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes"));
                            let version =
                                u32::from_le_bytes(data[4..8].try_into().expect("4 bytes"));
                            batch[i].buf.copy_from_slice(&data[VALUE_HEADER_BYTES..]);
                            *slot = Some((crc, version, true));
                        } else {
                            *slot = Some((0, 0, false));
                        }
                    }
                }
            });
            if let Err(e) = result {
                let kind = e.kind();
                for &i in positions {
                    batch[i].outcome = Outcome::Failed(kind);
                }
                first_error.get_or_insert(self.server_error(
                    server,
                    StoreOp::Fetch,
                    batch[positions[0]].page,
                    e,
                ));
                continue;
            }
            for (k, &i) in positions.iter().enumerate() {
                let r = &mut batch[i];
                let (found_crc, found_version) = match values[k] {
                    Some((crc, version, true)) => (crc, version),
                    // A value of the wrong size: not one lego wrote.
                    Some((_, _, false)) => (!r.crc, 0),
                    // Never stored (or discarded): zeros, as in every store.
                    None => {
                        r.buf.fill(0);
                        (crc32c::crc32c(r.buf), r.version)
                    }
                };
                let actual = crc32c::crc32c(r.buf);
                if found_crc == r.crc && found_version == r.version && actual == r.crc {
                    r.outcome = Outcome::Done;
                } else {
                    r.outcome = Outcome::Failed(FailureKind::Lost);
                    first_error.get_or_insert(StoreError::Mismatch {
                        backend: self.name.clone(),
                        page: r.page,
                        found: actual,
                        expected: r.crc,
                        version: r.version,
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
        let mut first_error = refuse_bad_writes(&self.name, self.pages, batch);
        let shards = self.by_server(
            batch
                .iter()
                .map(|w| (w.outcome == Outcome::Pending).then_some(w.page)),
        );
        let mut value = Vec::with_capacity(VALUE_BYTES);
        for (server, positions) in shards.iter().enumerate() {
            if positions.is_empty() {
                continue;
            }
            let mut request = Vec::with_capacity(positions.len() * (VALUE_BYTES + 48));
            for (k, &i) in positions.iter().enumerate() {
                let w = &batch[i];
                value.clear();
                encode_value(&mut value, w.crc, w.version, w.buf);
                protocol::set(&mut request, &self.key(w.page), &value, k as u32);
            }
            protocol::noop(&mut request);
            let mut not_stored: Vec<usize> = Vec::new();
            let result = self.servers[server].pipeline(&request, |reply| {
                if let Reply::NotDone {
                    opaque: Some(opaque),
                } = reply
                {
                    not_stored.push(opaque as usize);
                }
            });
            match result {
                Ok(()) => {
                    for (k, &i) in positions.iter().enumerate() {
                        batch[i].outcome = if not_stored.contains(&k) {
                            Outcome::Failed(FailureKind::Transient)
                        } else {
                            Outcome::Done
                        };
                    }
                    if let Some(&k) = not_stored.first() {
                        first_error.get_or_insert(StoreError::Io {
                            backend: self.name.clone(),
                            op: StoreOp::Store,
                            page: batch[positions[k]].page,
                            kind: FailureKind::Transient,
                            source: "the server did not store it".into(),
                        });
                    }
                }
                // Which sets went through is unknown: every page of the server failed.
                Err(e) => {
                    let kind = e.kind();
                    for &i in positions {
                        batch[i].outcome = Outcome::Failed(kind);
                    }
                    first_error.get_or_insert(self.server_error(
                        server,
                        StoreOp::Store,
                        batch[positions[0]].page,
                        e,
                    ));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
        let Some(range) = discard_range(&self.name, first, count, self.pages)? else {
            return Ok(());
        };
        let end = range.end;
        let mut at = first;
        let mut first_error = None;
        while at < end {
            let stop = end.min(at + PIPELINE_REQUESTS_MAX as u64);
            let mut requests: Vec<Vec<u8>> = vec![Vec::new(); self.servers.len()];
            for page in at..stop {
                let request = &mut requests[self.shard(page)];
                protocol::delete(request, &self.key(page), 0);
            }
            for (server, mut request) in requests.into_iter().enumerate() {
                if request.is_empty() {
                    continue;
                }
                protocol::noop(&mut request);
                if let Err(e) = self.servers[server].pipeline(&request, |_| {}) {
                    first_error.get_or_insert(self.server_error(server, StoreOp::Discard, at, e));
                }
            }
            at = stop;
        }
        first_error.map_or(Ok(()), Err)
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} servers, one copy each)",
            self.name,
            self.servers.len()
        )
    }
}

#[cfg(test)]
pub(crate) mod test_server;
