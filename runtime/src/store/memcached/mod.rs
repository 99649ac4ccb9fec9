//! [`MemcachedServer`]: the pages of a heap on one memcached server, spoken to with the meta
//! protocol ([`protocol`]) over a few connections ([`connection`]). The pool
//! (`store::pool`) shards and replicates pages over several of these.
//!
//! - Keys name the heap (a random id per run) and the page: `lego:HEAPID:PAGE` in hex.
//! - A value is the page's CRC32C and version (little-endian `u32`s) and then the page, so a
//!   stale or damaged value is detected on fetch and never served ([`VALUE_HEADER_BYTES`]).
//! - With a key (`LEGO_KEY_FILE`, [`MemcachedServer::sealed`]) a value is the version and then
//!   the page sealed by [`crate::seal::Sealer`], bound to the heap, the page and that version
//!   ([`SEALED_VALUE_BYTES`]): the plaintext's CRC32C never leaves the machine (it would let a
//!   server confirm a guess of a page). A value that does not open is a bad copy, like one
//!   whose checksum is wrong; the page opened is still checked against the caller's checksum.
//! - A batch is one pipeline: every request quiet, then `mn`, whose `MN` ends the replies (a
//!   miss or a stored set sends nothing).
//! - A pool, not a cache: at open the server's `stats settings` must say `evictions off`
//!   (memcached started with `-M`); a server that may evict is refused with one line.
//! - A failure of the server (a timeout, a refused connection, `SERVER_ERROR out of memory`)
//!   is `Transient` for its pages: another server, or a later try, may take them.
//! - Leases ([`lease`]): opening takes the heap's lease on the server (`lego:HEAPID:lease`,
//!   with a time to live), before any page is stored; the pool renews it; a normal exit
//!   releases it ([`PageStore::at_exit`]). Garbage collection ([`gc`]) frees the pages of
//!   heaps without a lease: dead processes'.
//! - Parity values of an erasure-coded pool ([`crate::store::parity`], keys
//!   `lego:HEAPID:sSTRIPE:P`) go in the same pipeline as pages ([`MemcachedServer::exchange`],
//!   [`MemcachedServer::store_with_parity`]); a sealed server seals them too
//!   ([`parity::encode_sealed`]), bound to the stripe, the slot and the data values covered.
//! - Nothing listens: lego only connects.

pub mod claim;
pub mod connection;
pub mod dump;
pub mod gc;
pub mod keys;
pub mod lease;
pub mod protocol;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connection::{stat, Connection, Sent, ServerError};
use gc::{DumpLimits, GcError, GcReport};
use lease::{LeaseError, Renewal, LEASE_TTL_S};
use protocol::Reply;

use super::parity::{self, ParityKey, ParityRead, ParityWrite};
use super::{
    discard_range, refuse_bad_reads, refuse_bad_writes, FailureKind, Outcome, PageRead, PageStore,
    PageWant, PageWrite, StoreError, StoreOp, PAGE_BYTES,
};
use crate::seal::{SealedAs, Sealer, SEALED_OVERHEAD_BYTES};
use crate::PAGE_SIZE;

/// Bytes before the page in a value: its CRC32C and its version.
pub const VALUE_HEADER_BYTES: usize = 8;
/// Bytes of one value.
pub const VALUE_BYTES: usize = VALUE_HEADER_BYTES + PAGE_SIZE;
/// Bytes before the sealed page in a sealed value: its version.
pub const SEALED_HEADER_BYTES: usize = 4;
/// Bytes of one sealed value: the version, then nonce, ciphertext and tag.
pub const SEALED_VALUE_BYTES: usize = SEALED_HEADER_BYTES + SEALED_OVERHEAD_BYTES + PAGE_SIZE;
/// Requests of one pipeline (a discard of a large range is sent in pipelines this long).
pub const PIPELINE_REQUESTS_MAX: usize = 1024;

/// Pipelines sent ahead of the fetch that reads their replies ([`PageStore::read_ahead`]),
/// at most, per server (a few per fault handler; the oldest is dropped for a new one).
const AHEAD_PIPELINES_MAX: usize = 4;
/// Oldest a pipeline sent ahead may be and still serve a fetch, in milliseconds (one that is
/// older was not wanted after all: it is dropped unread).
const AHEAD_AGE_MS_MAX: u64 = 1000;

const _: () = assert!(VALUE_BYTES <= protocol::VALUE_BYTES_MAX);
const _: () = assert!(SEALED_VALUE_BYTES <= protocol::VALUE_BYTES_MAX);
// The two formats are told apart by their length alone: a value of one never passes as the
// other.
const _: () = assert!(SEALED_VALUE_BYTES != VALUE_BYTES);

/// What a server says about itself (`stats`), read at open and whenever the pool probes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    /// The server process (`pid`) and how long it has run (`uptime`, seconds): a restarted
    /// server has another pid or a smaller uptime, and has lost every value.
    pub pid: u64,
    pub uptime_s: u64,
    /// Memory it may use for values (`limit_maxbytes`) and uses (`bytes`).
    pub limit_bytes: u64,
    pub used_bytes: u64,
    /// `version`.
    pub version: String,
}

/// Counters of one server's traffic.
#[derive(Debug, Default)]
pub struct Traffic {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Pipelines sent ahead ([`PageStore::read_ahead`]), and those a fetch read.
    pub ahead_sent: AtomicU64,
    pub ahead_used: AtomicU64,
    /// Values that did not open (changed, swapped, stale or sealed under another key), and
    /// pages that could not be sealed.
    pub seal_failures: AtomicU64,
    /// Pipelines sent (each ends with `mn`).
    pub pipelines: AtomicU64,
    /// Bytes of parity values sent and received.
    pub parity_bytes: AtomicU64,
}

/// The pages of a heap on one memcached server.
pub struct MemcachedServer {
    conn: Connection,
    heap_id: u64,
    pages: u64,
    /// `memcached://HOST:PORT`, as errors and `describe` name the store.
    name: String,
    pub traffic: Traffic,
    /// Pipelines of gets sent ahead, oldest first, each waiting for the fetch of exactly its
    /// pages and versions.
    ahead: Mutex<VecDeque<Ahead>>,
    /// Seals every value sent and opens every value fetched, when the pool has a key.
    sealer: Option<Arc<Sealer>>,
}

/// A pipeline of gets sent by [`PageStore::read_ahead`] whose replies wait in its socket.
struct Ahead {
    /// The pages asked for, in request order, with the versions the read-ahead named.
    pages: Vec<(u64, u32)>,
    request: Vec<u8>,
    sent: Sent,
    at: Instant,
}

impl MemcachedServer {
    /// Connects to `server` (`HOST:PORT`), checks that it may not evict, takes the lease of
    /// heap `heap_id` there and makes a store of the heap (of `heap_bytes`) on it. Every
    /// connect, read and write is bounded by `timeout_ms`. A lease the server does not store
    /// now (it is full) is only a warning: the pool's renewals try again.
    pub fn open(
        server: &str,
        heap_id: u64,
        heap_bytes: u64,
        timeout_ms: u64,
    ) -> Result<MemcachedServer, StoreError> {
        let store = MemcachedServer::open_unleased(server, heap_id, heap_bytes, timeout_ms)?;
        if let Err(e) = lease::renew(&store.conn, heap_id, LEASE_TTL_S) {
            log::warn!("{}", crate::logging::error_chain(&e));
        }
        Ok(store)
    }

    /// [`MemcachedServer::open`] without touching the heap's lease: for a restore, whose
    /// lease is claimed ([`claim`]) and taken over apart from opening the servers.
    pub fn open_unleased(
        server: &str,
        heap_id: u64,
        heap_bytes: u64,
        timeout_ms: u64,
    ) -> Result<MemcachedServer, StoreError> {
        let name = format!("memcached://{server}");
        let open_error =
            |what: String, source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
                backend: name.clone(),
                what,
                source,
            };
        let conn = Connection::new(server, timeout_ms)
            .map_err(|e| open_error(format!("resolving the server {server}"), Box::new(e)))?;
        let settings = conn
            .stats("stats settings")
            .map_err(|e| open_error(format!("connecting to the server {server}"), Box::new(e)))?;
        if stat(&settings, "evictions") != Some("off") {
            return Err(open_error(
                format!("using the server {server} as a pool"),
                "it may evict pages (memcached started without -M): start it with -M, so that \
                 a full server refuses new pages instead of dropping old ones"
                    .into(),
            ));
        }
        Ok(MemcachedServer {
            conn,
            heap_id,
            pages: heap_bytes.div_ceil(PAGE_BYTES),
            name,
            traffic: Traffic::default(),
            ahead: Mutex::new(VecDeque::new()),
            sealer: None,
        })
    }

    /// This store with every value sealed by `sealer` (which must be for this heap): the
    /// sealed format of the module documentation.
    pub fn sealed(mut self, sealer: Arc<Sealer>) -> MemcachedServer {
        assert_eq!(sealer.heap_id(), self.heap_id, "a sealer for this heap");
        self.sealer = Some(sealer);
        self
    }

    /// Whether values are sealed.
    pub fn is_sealed(&self) -> bool {
        self.sealer.is_some()
    }

    /// The heap whose pages this store holds.
    pub fn heap_id(&self) -> u64 {
        self.heap_id
    }

    /// Renews the heap's lease on the server for [`LEASE_TTL_S`] (every
    /// [`lease::LEASE_RENEW_S`]). [`Renewal::Started`] after the first renewal means the lease
    /// had lapsed: a garbage collection may have deleted pages of this heap there, so treat
    /// the server's copies as gone (like a restarted server's).
    pub fn renew_lease(&self) -> Result<Renewal, LeaseError> {
        lease::renew(&self.conn, self.heap_id, LEASE_TTL_S)
    }

    /// Sets the lease of a heap seeded from a log: no time to live, marked seeded
    /// ([`lease::seed`]), so that no collection frees it before its restore.
    pub fn seed_lease(&self) -> Result<(), LeaseError> {
        lease::seed(&self.conn, self.heap_id)
    }

    /// Takes over a seeded heap's lease for this process ([`lease::take`]).
    pub fn take_over_lease(&self) -> Result<(), LeaseError> {
        lease::take(&self.conn, self.heap_id, LEASE_TTL_S)
    }

    /// Releases the heap's lease (at a normal exit); its pages stay until a collection.
    pub fn release_lease(&self) -> Result<(), LeaseError> {
        lease::release(&self.conn, self.heap_id)
    }

    /// Deletes the pages of orphaned heaps (no lease) on the server, never this heap's.
    pub fn collect_orphans(&self, limits: &DumpLimits) -> Result<GcReport, GcError> {
        gc::collect_orphans(&self.conn, &[self.heap_id], limits)
    }

    /// `HOST:PORT`.
    pub fn server(&self) -> &str {
        &self.conn.name
    }

    /// Asks the server how it is (`stats`).
    pub fn info(&self) -> Result<ServerInfo, StoreError> {
        let pairs = self
            .conn
            .stats("stats")
            .map_err(|e| self.error(StoreOp::Fetch, 0, e))?;
        let number = |n: &str| {
            stat(&pairs, n)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(ServerInfo {
            pid: number("pid"),
            uptime_s: number("uptime"),
            limit_bytes: number("limit_maxbytes"),
            used_bytes: number("bytes"),
            version: stat(&pairs, "version").unwrap_or("").to_owned(),
        })
    }

    /// Drops the idle connections (the server was down: they are likely dead).
    pub fn reconnect(&self) {
        self.conn.forget_idle();
        self.ahead.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn key(&self, page: u64) -> keys::PageKey {
        keys::PageKey::new(self.heap_id, page)
    }

    fn error(&self, op: StoreOp, page: u64, e: ServerError) -> StoreError {
        StoreError::Io {
            backend: self.name.clone(),
            op,
            page,
            kind: e.kind(),
            source: Box::new(e),
        }
    }

    /// The pipeline of gets of `pages` (opaque tokens 0, 1, ...), ended by `mn`.
    fn get_request(&self, pages: impl ExactSizeIterator<Item = u64>) -> Vec<u8> {
        let mut request = Vec::with_capacity(pages.len() * 48 + 8);
        for (k, page) in pages.enumerate() {
            protocol::get(&mut request, self.key(page).as_str(), k as u32);
        }
        protocol::noop(&mut request);
        request
    }

    /// The pipeline sent ahead for exactly `pages` (with their versions), if there is one
    /// young enough; drops those too old to be wanted.
    fn take_ahead(&self, pages: &[(u64, u32)]) -> Option<Ahead> {
        let mut ahead = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
        let max_age = Duration::from_millis(AHEAD_AGE_MS_MAX);
        ahead.retain(|a| a.at.elapsed() <= max_age);
        let at = ahead.iter().position(|a| a.pages == pages)?;
        ahead.remove(at)
    }

    /// Decides a page read from what came back for it: the header's (crc, version) and the
    /// CRC32C of the page as copied (`Some(None)`: a value that is not one lego wrote for
    /// it; `None`: no value, a page never stored, which reads as zeros).
    fn settle_read(
        &self,
        r: &mut PageRead<'_>,
        value: Option<Option<(u32, u32, u32)>>,
    ) -> Option<StoreError> {
        let (found_crc, found_version, actual) = match value {
            Some(Some(read)) => read,
            Some(None) => (!r.crc, 0, crc32c::crc32c(r.buf)),
            // Never stored (or discarded): zeros, as in every store.
            None => {
                r.buf.fill(0);
                let zeros = crc32c::crc32c(r.buf);
                (zeros, r.version, zeros)
            }
        };
        if found_crc == r.crc && found_version == r.version && actual == r.crc {
            r.outcome = Outcome::Done;
            None
        } else {
            Some(super::lost_read(&self.name, r, actual))
        }
    }

    fn parity_key(&self, key: ParityKey) -> keys::ParityKeyName {
        keys::ParityKeyName::new(self.heap_id, key.stripe, key.slot)
    }

    /// Reads `pages` and `parity` in one pipeline (per [`PIPELINE_REQUESTS_MAX`] requests):
    /// pages checked as by [`PageStore::fetch`]; a parity value is `Done` only whole, with its
    /// crc right (sealed: it opens) and exactly the cover asked for (another cover is an old
    /// copy: `Lost`; a sealed value that does not open is `Lost` and a seal failure).
    pub fn exchange(
        &self,
        pages: &mut [PageRead<'_>],
        parity: &mut [ParityRead<'_>],
    ) -> Result<(), StoreError> {
        if parity.is_empty() {
            // Pages alone: the fetch, which reads a pipeline sent ahead if there is one.
            return if pages.is_empty() {
                Ok(())
            } else {
                self.fetch(pages)
            };
        }
        if pages.len() + parity.len() > PIPELINE_REQUESTS_MAX {
            // Longer than one pipeline: the pages, then the parity in pipelines of its own.
            let first = self.fetch(pages);
            let mut rest = Ok(());
            for chunk in parity.chunks_mut(PIPELINE_REQUESTS_MAX) {
                if let Err(e) = self.exchange(&mut [], chunk) {
                    rest = rest.and(Err(e));
                }
            }
            return first.and(rest);
        }
        let mut first_error = refuse_bad_reads(&self.name, self.pages, pages.iter_mut());
        let positions: Vec<usize> = (0..pages.len())
            .filter(|&i| pages[i].outcome == Outcome::Pending)
            .collect();
        let n = positions.len();
        let mut request = Vec::with_capacity((n + parity.len()) * 48 + 8);
        for (k, &i) in positions.iter().enumerate() {
            protocol::get(&mut request, self.key(pages[i].page).as_str(), k as u32);
        }
        for (j, r) in parity.iter().enumerate() {
            protocol::get(
                &mut request,
                self.parity_key(r.key).as_str(),
                (n + j) as u32,
            );
        }
        protocol::noop(&mut request);
        let mut values: Vec<Option<Option<(u32, u32, u32)>>> = vec![None; n];
        let mut parity_found: Vec<Option<Result<(), parity::Unread>>> = vec![None; parity.len()];
        let traffic = &self.traffic;
        let sealer = self.sealer.as_deref();
        let result = self.pipeline(&request, |reply| {
            if let Reply::Value { opaque, data } = reply {
                let k = opaque as usize;
                if k < n {
                    let r = &mut pages[positions[k]];
                    values[k] = Some(read_value(sealer, traffic, r, data));
                } else if let (Some(slot), Some(r)) =
                    (parity_found.get_mut(k - n), parity.get_mut(k - n))
                {
                    traffic.parity_bytes.fetch_add(data.len() as u64, Relaxed);
                    let found = match sealer {
                        None => parity::decode(data, r),
                        Some(sealer) => parity::decode_sealed(sealer, data, r),
                    };
                    if found == Err(parity::Unread::Forged) {
                        traffic.seal_failures.fetch_add(1, Relaxed);
                    }
                    *slot = Some(found);
                }
            }
        });
        if let Err(e) = result {
            let kind = e.kind();
            for &i in &positions {
                pages[i].outcome = Outcome::Failed(kind);
            }
            for r in parity.iter_mut() {
                r.outcome = Outcome::Failed(kind);
            }
            let page = positions
                .first()
                .map_or(parity[0].key.stripe, |&i| pages[i].page);
            return Err(first_error.unwrap_or(self.error(StoreOp::Fetch, page, e)));
        }
        for (k, &i) in positions.iter().enumerate() {
            if let Some(e) = self.settle_read(&mut pages[i], values[k]) {
                first_error.get_or_insert(e);
            }
        }
        for (r, found) in parity.iter_mut().zip(parity_found) {
            if found == Some(Ok(())) {
                r.outcome = Outcome::Done;
            } else {
                r.outcome = Outcome::Failed(FailureKind::Lost);
                let why = match found {
                    None => "the parity value is missing",
                    Some(Err(parity::Unread::Old)) => "the parity value is an old one",
                    Some(Err(parity::Unread::Forged)) => {
                        "the parity value does not open (changed, swapped or under another key)"
                    }
                    _ => "the parity value is damaged",
                };
                first_error.get_or_insert(StoreError::Io {
                    backend: self.name.clone(),
                    op: StoreOp::Fetch,
                    page: r.key.stripe,
                    kind: FailureKind::Lost,
                    source: why.into(),
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Writes `pages` and `parity` in one pipeline (per [`PIPELINE_REQUESTS_MAX`] requests).
    pub fn store_with_parity(
        &self,
        pages: &mut [PageWrite<'_>],
        parity: &mut [ParityWrite<'_>],
    ) -> Result<(), StoreError> {
        if parity.is_empty() {
            return if pages.is_empty() {
                Ok(())
            } else {
                self.store(pages)
            };
        }
        if pages.len() + parity.len() > PIPELINE_REQUESTS_MAX {
            let first = if pages.is_empty() {
                Ok(())
            } else {
                self.store(pages)
            };
            let mut rest = Ok(());
            for chunk in parity.chunks_mut(PIPELINE_REQUESTS_MAX) {
                if let Err(e) = self.store_with_parity(&mut [], chunk) {
                    rest = rest.and(Err(e));
                }
            }
            return first.and(rest);
        }
        let mut first_error = refuse_bad_writes(&self.name, self.pages, pages);
        let positions: Vec<usize> = (0..pages.len())
            .filter(|&i| pages[i].outcome == Outcome::Pending)
            .collect();
        let n = positions.len();
        let mut request = Vec::with_capacity((n + parity.len()) * (SEALED_VALUE_BYTES + 256));
        // Whether every value was made (a sealer with no nonce left makes none).
        let mut made = true;
        for (k, &i) in positions.iter().enumerate() {
            let w = &pages[i];
            let key = self.key(w.page);
            match &self.sealer {
                None => {
                    let value: [&[u8]; 3] = [&w.crc.to_le_bytes(), &w.version.to_le_bytes(), w.buf];
                    protocol::set_parts(&mut request, key.as_str(), &value, k as u32);
                }
                Some(sealer) => {
                    made &= protocol::set_with(
                        &mut request,
                        key.as_str(),
                        SEALED_VALUE_BYTES,
                        k as u32,
                        |out| seal(sealer, w.page, w.version, w.crc, w.buf, out),
                    );
                }
            }
        }
        let before = request.len();
        for (j, w) in parity.iter().enumerate() {
            let len = match &self.sealer {
                None => parity::value_bytes(w.cover.len()),
                Some(_) => parity::sealed_value_bytes(w.cover.len()),
            };
            let key = self.parity_key(w.key);
            made &= protocol::set_with(&mut request, key.as_str(), len, (n + j) as u32, |out| {
                match &self.sealer {
                    None => {
                        parity::encode(w, out);
                        true
                    }
                    Some(sealer) => parity::encode_sealed(sealer, w, out),
                }
            });
        }
        if !made {
            // No nonce is left (2^64 seals): nothing is sent.
            self.traffic.seal_failures.fetch_add(1, Relaxed);
            for &i in &positions {
                pages[i].outcome = Outcome::Failed(FailureKind::Refused);
            }
            for w in parity.iter_mut() {
                w.outcome = Outcome::Failed(FailureKind::Refused);
            }
            return Err(first_error.unwrap_or(StoreError::Io {
                backend: self.name.clone(),
                op: StoreOp::Store,
                page: parity[0].key.stripe,
                kind: FailureKind::Refused,
                source: Box::new(crate::seal::SealError::NoncesUsed),
            }));
        }
        self.traffic
            .parity_bytes
            .fetch_add((request.len() - before) as u64, Relaxed);
        protocol::noop(&mut request);
        let mut not_stored: Vec<usize> = Vec::new();
        let result = self.pipeline(&request, |reply| {
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
                    pages[i].outcome = if not_stored.contains(&k) {
                        Outcome::Failed(FailureKind::Transient)
                    } else {
                        Outcome::Done
                    };
                }
                for (j, w) in parity.iter_mut().enumerate() {
                    w.outcome = if not_stored.contains(&(n + j)) {
                        Outcome::Failed(FailureKind::Transient)
                    } else {
                        Outcome::Done
                    };
                }
                if !not_stored.is_empty() {
                    first_error.get_or_insert(StoreError::Io {
                        backend: self.name.clone(),
                        op: StoreOp::Store,
                        page: positions
                            .first()
                            .map_or(parity[0].key.stripe, |&i| pages[i].page),
                        kind: FailureKind::Transient,
                        source: "the server did not store it".into(),
                    });
                }
            }
            Err(e) => {
                let kind = e.kind();
                for &i in &positions {
                    pages[i].outcome = Outcome::Failed(kind);
                }
                for w in parity.iter_mut() {
                    w.outcome = Outcome::Failed(kind);
                }
                let page = positions
                    .first()
                    .map_or(parity[0].key.stripe, |&i| pages[i].page);
                first_error.get_or_insert(self.error(StoreOp::Store, page, e));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Deletes parity values (best effort: one never stored is no error).
    pub fn delete_parity(&self, keys: &[ParityKey]) -> Result<(), StoreError> {
        let mut first_error = None;
        for chunk in keys.chunks(PIPELINE_REQUESTS_MAX) {
            let mut request = Vec::with_capacity(chunk.len() * 48);
            for &key in chunk {
                protocol::delete(&mut request, self.parity_key(key).as_str(), 0);
            }
            protocol::noop(&mut request);
            if let Err(e) = self.pipeline(&request, |_| {}) {
                first_error.get_or_insert(self.error(StoreOp::Discard, chunk[0].stripe, e));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn pipeline(&self, request: &[u8], on_reply: impl FnMut(Reply<'_>)) -> Result<(), ServerError> {
        self.traffic
            .bytes_sent
            .fetch_add(request.len() as u64, Relaxed);
        self.traffic.pipelines.fetch_add(1, Relaxed);
        let received = self.conn.pipeline(request, on_reply)?;
        self.traffic.bytes_received.fetch_add(received, Relaxed);
        Ok(())
    }
}

/// Reads a value that came back for `r` into its buffer, opening it first when the pool is
/// sealed: its (crc, version, CRC32C of the page as copied), or None for a value that is not
/// one of this page's (one that does not open counts as a seal failure).
fn read_value(
    sealer: Option<&Sealer>,
    traffic: &Traffic,
    r: &mut PageRead<'_>,
    data: &[u8],
) -> Option<(u32, u32, u32)> {
    match sealer {
        None => decode(data, r.buf),
        Some(sealer) => match open(sealer, r.page, r.version, r.crc, data, r.buf) {
            Ok(read) => Some(read),
            Err(Unopened::OtherVersion) => None,
            Err(Unopened::Forged) => {
                traffic.seal_failures.fetch_add(1, Relaxed);
                None
            }
        },
    }
}

/// Reads an unsealed value (`crc | version | page`) into `buf`: its (crc, version) and the
/// CRC32C of the page as copied; None for a value of the wrong size.
fn decode(data: &[u8], buf: &mut [u8]) -> Option<(u32, u32, u32)> {
    if data.len() != VALUE_BYTES {
        return None;
    }
    let crc = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes"));
    let version = u32::from_le_bytes(data[4..8].try_into().expect("4 bytes"));
    buf.copy_from_slice(&data[VALUE_HEADER_BYTES..]);
    Some((crc, version, crc32c::crc32c(buf)))
}

/// Appends the sealed value (`version | sealed page`) of `buf`, version `version` of `page`
/// whose CRC32C is `crc`, to `out`; false if no nonce is left (`protocol::set_with` then drops
/// what was appended).
fn seal(sealer: &Sealer, page: u64, version: u32, crc: u32, buf: &[u8], out: &mut Vec<u8>) -> bool {
    let what = SealedAs {
        page,
        version,
        crc,
        part: 0,
    };
    out.extend_from_slice(&version.to_le_bytes());
    sealer.seal_into(what, buf, out).is_ok()
}

/// Why a sealed value was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unopened {
    /// It says it is another version of the page (an older one, likely): not tried.
    OtherVersion,
    /// It is not a sealed value of this page and version under this key (changed, swapped,
    /// or not sealed at all).
    Forged,
}

/// Opens a sealed value (`version | sealed page`) of `page` into `buf`, expecting `version`
/// and content whose CRC32C is `crc`: (crc, version, crc). The seal binds that checksum, so a
/// value that opens holds exactly that content and is not checked again (one CRC32C pass per
/// page saved). On failure `buf` holds zeros, never a byte of the value.
fn open(
    sealer: &Sealer,
    page: u64,
    version: u32,
    crc: u32,
    data: &[u8],
    buf: &mut [u8],
) -> Result<(u32, u32, u32), Unopened> {
    if data.len() != SEALED_VALUE_BYTES {
        buf.fill(0);
        return Err(Unopened::Forged);
    }
    let found = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes"));
    if found != version {
        buf.fill(0);
        return Err(Unopened::OtherVersion);
    }
    let what = SealedAs {
        page,
        version,
        crc,
        part: 0,
    };
    sealer
        .open_into(what, &data[SEALED_HEADER_BYTES..], buf)
        .map_err(|_| Unopened::Forged)?;
    Ok((crc, version, crc))
}

/// A random id for this run's keys (std's per-process hash keys, seeded from the OS).
pub fn random_heap_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

impl PageStore for MemcachedServer {
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        let mut first_error = refuse_bad_reads(&self.name, self.pages, batch.iter_mut());
        let positions: Vec<usize> = (0..batch.len())
            .filter(|&i| batch[i].outcome == Outcome::Pending)
            .collect();
        for chunk in positions.chunks(PIPELINE_REQUESTS_MAX) {
            let wanted: Vec<(u64, u32)> = chunk
                .iter()
                .map(|&i| (batch[i].page, batch[i].version))
                .collect();
            // What came back for each request: the header's (crc, version) and the CRC32C of
            // the page as copied, or None for a value of the wrong size (not one lego wrote)
            // or one that does not open. The page is checked as it is copied (or opened),
            // while its bytes are still in the cache.
            let mut values: Vec<Option<Option<(u32, u32, u32)>>> = vec![None; chunk.len()];
            let sealer = self.sealer.as_deref();
            let traffic = &self.traffic;
            let on_reply = |reply: Reply<'_>| {
                if let Reply::Value { opaque, data } = reply {
                    let k = opaque as usize;
                    if let (Some(slot), Some(&i)) = (values.get_mut(k), chunk.get(k)) {
                        let r = &mut batch[i];
                        *slot = Some(read_value(sealer, traffic, r, data));
                    }
                }
            };
            // Sent ahead already: only its replies are read (checked below like any).
            let result = match self.take_ahead(&wanted) {
                Some(a) => {
                    self.traffic.ahead_used.fetch_add(1, Relaxed);
                    self.conn
                        .receive(a.sent, &a.request, on_reply)
                        .map(|received| {
                            self.traffic.bytes_received.fetch_add(received, Relaxed);
                        })
                }
                None => {
                    let request = self.get_request(wanted.iter().map(|&(page, _)| page));
                    self.pipeline(&request, on_reply)
                }
            };
            if let Err(e) = result {
                let kind = e.kind();
                for &i in chunk {
                    batch[i].outcome = Outcome::Failed(kind);
                }
                first_error.get_or_insert(self.error(StoreOp::Fetch, batch[chunk[0]].page, e));
                continue;
            }
            for (k, &i) in chunk.iter().enumerate() {
                if let Some(e) = self.settle_read(&mut batch[i], values[k]) {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Sends the gets of `pages` now, on a connection of their own; the fetch of exactly
    /// these pages and versions reads the replies. Best effort: a failure here is the fetch's
    /// to find (and count), so it is only logged.
    fn read_ahead(&self, pages: &[PageWant]) {
        if pages.is_empty()
            || pages.len() > PIPELINE_REQUESTS_MAX
            || pages.iter().any(|w| w.page >= self.pages)
        {
            return;
        }
        let request = self.get_request(pages.iter().map(|w| w.page));
        let sent = match self.conn.send(&request) {
            Ok(sent) => sent,
            Err(e) => {
                log::debug!("{}: reading ahead failed: {e}", self.name);
                return;
            }
        };
        self.traffic
            .bytes_sent
            .fetch_add(request.len() as u64, Relaxed);
        self.traffic.ahead_sent.fetch_add(1, Relaxed);
        let mut ahead = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
        if ahead.len() == AHEAD_PIPELINES_MAX {
            ahead.pop_front();
        }
        ahead.push_back(Ahead {
            pages: pages.iter().map(|w| (w.page, w.version)).collect(),
            request,
            sent,
            at: Instant::now(),
        });
    }

    fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
        let mut first_error = refuse_bad_writes(&self.name, self.pages, batch);
        let positions: Vec<usize> = (0..batch.len())
            .filter(|&i| batch[i].outcome == Outcome::Pending)
            .collect();
        for chunk in positions.chunks(PIPELINE_REQUESTS_MAX) {
            let mut request = Vec::with_capacity(chunk.len() * (SEALED_VALUE_BYTES + 48));
            let mut made = Vec::with_capacity(chunk.len());
            for (k, &i) in chunk.iter().enumerate() {
                let w = &batch[i];
                let key = self.key(w.page);
                match &self.sealer {
                    // The value: the page's CRC32C and version, then the page.
                    None => {
                        let value: [&[u8]; 3] =
                            [&w.crc.to_le_bytes(), &w.version.to_le_bytes(), w.buf];
                        protocol::set_parts(&mut request, key.as_str(), &value, k as u32);
                        made.push(true);
                    }
                    // The version, then the sealed page (no checksum of the plaintext).
                    Some(sealer) => {
                        let ok = protocol::set_with(
                            &mut request,
                            key.as_str(),
                            SEALED_VALUE_BYTES,
                            k as u32,
                            |out| seal(sealer, w.page, w.version, w.crc, w.buf, out),
                        );
                        made.push(ok);
                    }
                }
            }
            if made.iter().any(|&ok| !ok) {
                // No nonce is left (2^64 seals): nothing of this chunk is sent.
                self.traffic
                    .seal_failures
                    .fetch_add(made.iter().filter(|&&ok| !ok).count() as u64, Relaxed);
                for &i in chunk {
                    batch[i].outcome = Outcome::Failed(FailureKind::Refused);
                }
                first_error.get_or_insert(StoreError::Io {
                    backend: self.name.clone(),
                    op: StoreOp::Store,
                    page: batch[chunk[0]].page,
                    kind: FailureKind::Refused,
                    source: Box::new(crate::seal::SealError::NoncesUsed),
                });
                continue;
            }
            protocol::noop(&mut request);
            let mut not_stored: Vec<usize> = Vec::new();
            let result = self.pipeline(&request, |reply| {
                if let Reply::NotDone {
                    opaque: Some(opaque),
                } = reply
                {
                    not_stored.push(opaque as usize);
                }
            });
            match result {
                Ok(()) => {
                    for (k, &i) in chunk.iter().enumerate() {
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
                            page: batch[chunk[k]].page,
                            kind: FailureKind::Transient,
                            source: "the server did not store it".into(),
                        });
                    }
                }
                // Which sets went through is unknown: every page of the pipeline failed.
                Err(e) => {
                    let kind = e.kind();
                    for &i in chunk {
                        batch[i].outcome = Outcome::Failed(kind);
                    }
                    first_error.get_or_insert(self.error(StoreOp::Store, batch[chunk[0]].page, e));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
        let Some(range) = discard_range(&self.name, first, count, self.pages)? else {
            return Ok(());
        };
        let mut first_error = None;
        let mut at = range.start;
        while at < range.end {
            let stop = range.end.min(at + PIPELINE_REQUESTS_MAX as u64);
            if let Err(e) = self.delete(&(at..stop).collect::<Vec<u64>>()) {
                first_error.get_or_insert(e);
            }
            at = stop;
        }
        first_error.map_or(Ok(()), Err)
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    /// Releases the lease: the pages stay fetchable (late faults at exit) until a collection
    /// finds them without one.
    fn at_exit(&self) {
        if let Err(e) = self.release_lease() {
            log::warn!("{}", crate::logging::error_chain(&e));
        }
    }
}

impl MemcachedServer {
    /// Deletes the values of `pages` (best effort: a page never stored is no error).
    pub fn delete(&self, pages: &[u64]) -> Result<(), StoreError> {
        let mut first_error = None;
        for chunk in pages.chunks(PIPELINE_REQUESTS_MAX) {
            let mut request = Vec::with_capacity(chunk.len() * 40);
            for &page in chunk {
                protocol::delete(&mut request, self.key(page).as_str(), 0);
            }
            protocol::noop(&mut request);
            if let Err(e) = self.pipeline(&request, |_| {}) {
                first_error.get_or_insert(self.error(StoreOp::Discard, chunk[0], e));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
pub(crate) mod test_server;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::seal::{SealKey, KEY_BYTES};

    fn sealer() -> Sealer {
        Sealer::new(
            &SealKey::from_bytes([0x5a; KEY_BYTES]),
            0x00c0_ffee_0000_0009,
        )
    }

    fn sealed_value(s: &Sealer, page: u64, version: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        assert!(seal(s, page, version, crc32c::crc32c(data), data, &mut v));
        assert_eq!(v.len(), SEALED_VALUE_BYTES);
        v
    }

    proptest! {
        #![proptest_config(crate::fuzz_support::config(64))]

        /// A sealed value opens into its page for its page, version and the page's CRC32C
        /// only; with any bit flipped, cut or grown, or opened as another page, version or
        /// content, it is refused and the buffer holds zeros, never a byte of the value.
        #[test]
        fn fuzz_sealed_values_open_only_unchanged_and_for_their_page(
            seed: u64,
            page in 0u64..1 << 31,
            version in 1u32..u32::MAX,
            flip in 0usize..SEALED_VALUE_BYTES * 8,
            other_page in 0u64..1 << 31,
            other_crc: u32,
            cut in 1usize..SEALED_VALUE_BYTES,
        ) {
            let s = sealer();
            let mut data = vec![0u8; PAGE_SIZE];
            crate::io::test_support::fill(&mut data, seed);
            let value = sealed_value(&s, page, version, &data);
            let crc = crc32c::crc32c(&data);
            let mut buf = vec![0xeeu8; PAGE_SIZE];
            prop_assert_eq!(open(&s, page, version, crc, &value, &mut buf), Ok((crc, version, crc)));
            prop_assert_eq!(&buf, &data);

            let refused_as = |v: &[u8], p: u64, ver: u32, c: u32| {
                let mut buf = vec![0xeeu8; PAGE_SIZE];
                let r = open(&s, p, ver, c, v, &mut buf);
                (r.is_err(), buf.iter().all(|&b| b == 0))
            };
            let refused = |v: &[u8], p: u64, ver: u32| refused_as(v, p, ver, crc);
            if other_crc != crc {
                // The same page and version with other content (a version used twice).
                prop_assert_eq!(refused_as(&value, page, version, other_crc), (true, true));
            }
            let mut flipped = value.clone();
            flipped[flip / 8] ^= 1 << (flip % 8);
            // A flip in the version label names another version: refused without opening.
            let label = u32::from_le_bytes(flipped[0..4].try_into().expect("4 bytes"));
            prop_assert_eq!(refused(&flipped, page, version), (true, true));
            prop_assert_eq!(refused(&flipped, page, label), (true, true));
            prop_assert_eq!(refused(&value[..cut], page, version), (true, true));
            let mut grown = value.clone();
            grown.push(0);
            prop_assert_eq!(refused(&grown, page, version), (true, true));
            if other_page != page {
                prop_assert_eq!(refused(&value, other_page, version), (true, true));
            }
            let mut relabelled = value.clone();
            relabelled[0..4].copy_from_slice(&(version + 1).to_le_bytes());
            prop_assert_eq!(refused(&relabelled, page, version + 1), (true, true));
            // Another heap under the same key file, or the same heap under another key.
            let theirs = Sealer::new(&SealKey::from_bytes([0x5a; KEY_BYTES]), 0x00c0_ffee_0000_000a);
            let mut buf = vec![0u8; PAGE_SIZE];
            prop_assert!(open(&theirs, page, version, crc, &value, &mut buf).is_err());
            let other_key = Sealer::new(&SealKey::from_bytes([0x5b; KEY_BYTES]), 0x00c0_ffee_0000_0009);
            prop_assert!(open(&other_key, page, version, crc, &value, &mut buf).is_err());
        }
    }
}
