//! Leases: how a server tells a running heap's pages from a dead process's. A heap keeps the
//! key `lego:HEAPID:lease` ([`keys::lease_key`]) on every server of its pool, with a time to
//! live of [`LEASE_TTL_S`] on the server's clock, and renews it every [`LEASE_RENEW_S`]. Its
//! value says who holds it (`pid=PID host=HOST`), for people reading `lego pool --heaps`.
//!
//! - A heap takes its lease on a server before it stores a page there
//!   ([`super::MemcachedServer::open`] does), so a page of a running heap never sits on a
//!   server without a lease but when renewals failed for a whole TTL.
//! - A normal exit releases the lease ([`release`]); a process killed with SIGKILL leaves it
//!   to expire. Either way the heap's pages stay until garbage collection ([`super::gc`])
//!   finds them without a lease.
//! - [`renew`] touches the lease (`mg KEY T<ttl>`: a new time to live in place, so a full
//!   server that refuses new values still renews it); when it was gone (expired, or the
//!   server restarted) it is set again and [`Renewal::Started`] says so, because garbage
//!   collection may have freed the heap's pages there in between.
//!
//! - A heap seeded from a log (`lego replay --to`, [`seed`]) holds a lease without a time to
//!   live whose value starts with [`SEEDED_MARK`]: nobody runs it yet, and garbage collection
//!   keeps it (it has a lease) until the run restored from its pool image takes it over.
//! - A restore first claims the seeded lease by compare and swap ([`read`] gives its value and
//!   CAS token, [`claim`] sets `restoring pid=PID host=HOST` only while that token is
//!   unchanged, still without a time to live), so that of two restores of one pool image
//!   only one gets it; the other is refused before it changed anything. Once its start is
//!   through, the restored run takes the lease over ([`take`]: a normal lease from then on);
//!   a start that fails puts the seeded value back ([`reseal`]). A run killed while it
//!   restores leaves its `restoring` lease, which never lapses: a later restore on the same
//!   host takes it when that process is gone.
//!
//! Rules: the value is plain ASCII without spaces in its parts and at most
//! [`LEASE_VALUE_BYTES_MAX`]; nothing here keeps a connection of its own.

use thiserror::Error;

use super::connection::{Connection, ServerError};
use super::keys;
use super::protocol::{self, Reply};
use super::PIPELINE_REQUESTS_MAX;

/// How long a lease lives on a server after its last renewal, in seconds.
pub const LEASE_TTL_S: u32 = 60;
/// How often a running heap renews its leases, in seconds.
pub const LEASE_RENEW_S: u32 = 20;
/// Longest host name a lease names, in bytes (longer ones are cut).
pub const HOST_NAME_BYTES_MAX: usize = 64;
/// Longest lease value, in bytes.
pub const LEASE_VALUE_BYTES_MAX: usize = 128;
/// The first word of a seeded heap's lease value: the heap waits for its restore.
pub const SEEDED_MARK: &str = "seeded";
/// The first word of a seeded heap's lease while a process restores it (its start is not
/// through yet).
pub const RESTORING_MARK: &str = "restoring";

// Two renewals in a row may fail (a server briefly down) before a lease lapses.
const _: () = assert!(3 * LEASE_RENEW_S <= LEASE_TTL_S);
const _: () = assert!(LEASE_TTL_S <= protocol::TTL_S_MAX);
const _: () = assert!(
    SEEDED_MARK.len() + " pid=4294967295 host= ".len() + HOST_NAME_BYTES_MAX
        <= LEASE_VALUE_BYTES_MAX
);
const _: () = assert!(
    RESTORING_MARK.len() + " pid=4294967295 host= ".len() + HOST_NAME_BYTES_MAX
        <= LEASE_VALUE_BYTES_MAX
);

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The lease was there: it now runs for its whole TTL again.
    Extended,
    /// There was no lease (the first renewal, or it had expired or the server restarted): it
    /// is taken now. Pages the heap stored on this server before may have been collected.
    Started,
}

/// Who holds a lease, as its value says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub pid: Option<u32>,
    pub host: Option<String>,
    /// A seeded heap's lease ([`seed`]): `pid` and `host` are those of the `lego replay` that
    /// seeded it, and no process runs the heap yet.
    pub seeded: bool,
    /// A seeded heap's lease claimed by a restore ([`claim`]): `pid` and `host` are the
    /// restoring process's, whose start is not through.
    pub restoring: bool,
}

/// A lease as [`read`] found it: its value and CAS token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRead {
    pub holder: LeaseHolder,
    pub value: Vec<u8>,
    pub cas: u64,
    /// Seconds it has left to live; `None`: it never expires (a seeded or claimed heap's).
    pub ttl_s: Option<u32>,
}

/// Why a lease could not be renewed, released or read. Every one is transient: the server
/// did not answer, or refused for now (out of memory); the next renewal tries again.
#[derive(Debug, Error)]
pub enum LeaseError {
    #[error("renewing the lease of heap {heap_id:016x} on {server} failed")]
    Renew {
        heap_id: u64,
        server: String,
        #[source]
        source: ServerError,
    },
    #[error("the server {server} did not store the lease of heap {heap_id:016x}")]
    NotStored { heap_id: u64, server: String },
    #[error("releasing the lease of heap {heap_id:016x} on {server} failed")]
    Release {
        heap_id: u64,
        server: String,
        #[source]
        source: ServerError,
    },
    #[error("reading leases on {server} failed")]
    Read {
        server: String,
        #[source]
        source: ServerError,
    },
}

/// Renews (or takes) the lease of heap `heap_id` on the server for `ttl_s` seconds (1 to
/// [`protocol::TTL_S_MAX`]; [`LEASE_TTL_S`] but in tests). One round trip when the lease is
/// there, two when it was gone.
pub fn renew(conn: &Connection, heap_id: u64, ttl_s: u32) -> Result<Renewal, LeaseError> {
    debug_assert!((1..=protocol::TTL_S_MAX).contains(&ttl_s), "ttl {ttl_s} s");
    let ttl_s = ttl_s.clamp(1, protocol::TTL_S_MAX);
    let key = keys::lease_key(heap_id);
    let renew_error = |source| LeaseError::Renew {
        heap_id,
        server: conn.name.clone(),
        source,
    };
    // Whether the server answered the one request of `request` with HD.
    let stored = |request: &mut Vec<u8>| -> Result<bool, LeaseError> {
        protocol::noop(request);
        let mut stored = false;
        conn.pipeline(request, |reply| {
            stored |= matches!(reply, Reply::Stored { .. });
        })
        .map_err(renew_error)?;
        Ok(stored)
    };
    let mut request = Vec::with_capacity(2 * LEASE_VALUE_BYTES_MAX);
    protocol::touch(&mut request, &key, ttl_s, 0);
    if stored(&mut request)? {
        return Ok(Renewal::Extended);
    }
    let value = lease_value(std::process::id(), &host_name());
    request.clear();
    protocol::set_expiring(&mut request, &key, value.as_bytes(), ttl_s, 0);
    if stored(&mut request)? {
        return Ok(Renewal::Started);
    }
    Err(LeaseError::NotStored {
        heap_id,
        server: conn.name.clone(),
    })
}

/// Sets the lease of a heap seeded from a log (`lego replay --to`): no time to live (it never
/// lapses, so garbage collection keeps the heap), value `seeded pid=PID host=HOST`.
pub fn seed(conn: &Connection, heap_id: u64) -> Result<(), LeaseError> {
    let value = format!(
        "{SEEDED_MARK} {}",
        lease_value(std::process::id(), &host_name())
    );
    set_lease(conn, heap_id, value.as_bytes(), None)
}

/// Reads the lease of heap `heap_id` with its CAS token: `None` when there is none.
pub fn read(conn: &Connection, heap_id: u64) -> Result<Option<LeaseRead>, LeaseError> {
    let mut request = Vec::with_capacity(64);
    protocol::get_cas(&mut request, &keys::lease_key(heap_id), 0);
    protocol::noop(&mut request);
    let mut found = None;
    conn.pipeline(&request, |reply| {
        if let Reply::ValueCas {
            cas, ttl_s, data, ..
        } = reply
        {
            let value = data[..data.len().min(LEASE_VALUE_BYTES_MAX)].to_vec();
            found = Some(LeaseRead {
                holder: parse_value(&value),
                value,
                cas,
                ttl_s,
            });
        }
    })
    .map_err(|source| LeaseError::Read {
        server: conn.name.clone(),
        source,
    })?;
    Ok(found)
}

/// Claims the lease of heap `heap_id` for this process's restore: sets it to
/// `restoring pid=PID host=HOST`, without a time to live, only while its CAS token is still
/// `cas` (what [`read`] gave). `Ok(false)`: it changed or went since (another process claimed
/// it, or collected the heap), and nothing was set.
pub fn claim(conn: &Connection, heap_id: u64, cas: u64) -> Result<bool, LeaseError> {
    let value = format!(
        "{RESTORING_MARK} {}",
        lease_value(std::process::id(), &host_name())
    );
    let mut request = Vec::with_capacity(2 * LEASE_VALUE_BYTES_MAX);
    protocol::set_if(
        &mut request,
        &keys::lease_key(heap_id),
        value.as_bytes(),
        cas,
        None,
        0,
    );
    protocol::noop(&mut request);
    let mut stored = false;
    conn.pipeline(&request, |reply| {
        stored |= matches!(reply, Reply::Stored { .. });
    })
    .map_err(|source| LeaseError::Renew {
        heap_id,
        server: conn.name.clone(),
        source,
    })?;
    Ok(stored)
}

/// Puts a seeded lease back (a restore whose start failed): `value` (the seeded lease's as
/// the replay set it), without a time to live.
pub fn reseal(conn: &Connection, heap_id: u64, value: &[u8]) -> Result<(), LeaseError> {
    set_lease(conn, heap_id, value, None)
}

/// Deletes the lease of heap `heap_id` only while its CAS token is still `cas` (what [`read`]
/// gave): `Ok(false)` when it changed since (a restore claimed it) or is gone.
pub fn delete_if_unchanged(conn: &Connection, heap_id: u64, cas: u64) -> Result<bool, LeaseError> {
    let mut request = Vec::with_capacity(64);
    protocol::delete_if_answered(&mut request, &keys::lease_key(heap_id), cas, 0);
    protocol::noop(&mut request);
    let mut deleted = false;
    conn.pipeline(&request, |reply| {
        deleted |= matches!(reply, Reply::Stored { .. });
    })
    .map_err(|source| LeaseError::Release {
        heap_id,
        server: conn.name.clone(),
        source,
    })?;
    Ok(deleted)
}

/// Takes over the lease of heap `heap_id` (a restored seeded heap): from now on it is this
/// process's, with a time to live of `ttl_s` seconds, renewed as any running heap's.
pub fn take(conn: &Connection, heap_id: u64, ttl_s: u32) -> Result<(), LeaseError> {
    let value = lease_value(std::process::id(), &host_name());
    set_lease(
        conn,
        heap_id,
        value.as_bytes(),
        Some(ttl_s.clamp(1, protocol::TTL_S_MAX)),
    )
}

/// Sets the lease's value, with a time to live or without one; `NotStored` unless the server
/// said it stored it.
fn set_lease(
    conn: &Connection,
    heap_id: u64,
    value: &[u8],
    ttl_s: Option<u32>,
) -> Result<(), LeaseError> {
    let key = keys::lease_key(heap_id);
    let mut request = Vec::with_capacity(2 * LEASE_VALUE_BYTES_MAX);
    let mut refused = false;
    let mut stored = false;
    match ttl_s {
        Some(ttl_s) => protocol::set_expiring(&mut request, &key, value, ttl_s, 0),
        // Quiet: the server answers only a failure (`NS`), then `MN`.
        None => {
            protocol::set(&mut request, &key, value, 0);
            stored = true;
        }
    }
    protocol::noop(&mut request);
    conn.pipeline(&request, |reply| match reply {
        Reply::Stored { .. } => stored = true,
        Reply::NotDone { .. } => refused = true,
        _ => {}
    })
    .map_err(|source| LeaseError::Renew {
        heap_id,
        server: conn.name.clone(),
        source,
    })?;
    if stored && !refused {
        Ok(())
    } else {
        Err(LeaseError::NotStored {
            heap_id,
            server: conn.name.clone(),
        })
    }
}

/// Releases the lease of heap `heap_id` on the server (at a normal exit). A lease already
/// gone is no error.
pub fn release(conn: &Connection, heap_id: u64) -> Result<(), LeaseError> {
    let mut request = Vec::with_capacity(64);
    protocol::delete(&mut request, &keys::lease_key(heap_id), 0);
    protocol::noop(&mut request);
    conn.pipeline(&request, |_| {})
        .map(|_| ())
        .map_err(|source| LeaseError::Release {
            heap_id,
            server: conn.name.clone(),
            source,
        })
}

/// The holders of the leases of `heap_ids` on the server, in their order: `None` where there
/// is no lease (expired, released, or never taken).
pub fn holders(
    conn: &Connection,
    heap_ids: &[u64],
) -> Result<Vec<Option<LeaseHolder>>, LeaseError> {
    let mut found = vec![None; heap_ids.len()];
    for (c, chunk) in heap_ids.chunks(PIPELINE_REQUESTS_MAX).enumerate() {
        let mut request = Vec::with_capacity(chunk.len() * 48);
        for (k, &heap_id) in chunk.iter().enumerate() {
            let opaque = u32::try_from(k).expect("a pipeline's requests are counted in u32");
            protocol::get(&mut request, &keys::lease_key(heap_id), opaque);
        }
        protocol::noop(&mut request);
        let base = c * PIPELINE_REQUESTS_MAX;
        conn.pipeline(&request, |reply| {
            if let Reply::Value { opaque, data } = reply {
                if let Some(slot) = usize::try_from(opaque)
                    .ok()
                    .filter(|&k| k < chunk.len())
                    .and_then(|k| found.get_mut(base + k))
                {
                    *slot = Some(parse_value(data));
                }
            }
        })
        .map_err(|source| LeaseError::Read {
            server: conn.name.clone(),
            source,
        })?;
    }
    Ok(found)
}

/// The value of a lease: `pid=PID host=HOST`.
pub fn lease_value(pid: u32, host: &str) -> String {
    let value = format!("pid={pid} host={host}");
    debug_assert!(value.len() <= LEASE_VALUE_BYTES_MAX);
    value
}

/// Reads a lease's value; parts it does not know (or a value another version wrote) are
/// left out, never an error: a lease is alive by being there.
pub fn parse_value(value: &[u8]) -> LeaseHolder {
    let text = String::from_utf8_lossy(&value[..value.len().min(LEASE_VALUE_BYTES_MAX)]);
    let mut holder = LeaseHolder {
        pid: None,
        host: None,
        seeded: false,
        restoring: false,
    };
    for part in text.split(' ') {
        if part == SEEDED_MARK {
            holder.seeded = true;
        } else if part == RESTORING_MARK {
            holder.restoring = true;
        } else if let Some(pid) = part.strip_prefix("pid=") {
            holder.pid = pid.parse().ok();
        } else if let Some(host) = part.strip_prefix("host=").filter(|h| !h.is_empty()) {
            holder.host = Some(host.to_owned());
        }
    }
    holder
}

/// This machine's name (`/proc/sys/kernel/hostname`), printable ASCII only, at most
/// [`HOST_NAME_BYTES_MAX`] bytes; `unknown` when it cannot be read.
pub fn host_name() -> String {
    let raw = std::fs::read("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .iter()
        .copied()
        .filter(u8::is_ascii_graphic)
        .take(HOST_NAME_BYTES_MAX)
        .map(char::from)
        .collect();
    if name.is_empty() {
        "unknown".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::store::memcached::test_server::TestServer;

    /// How long a test waits for a lease to expire, at most (memcached's clock ticks once a
    /// second, so a TTL of 1 s ends within 2 to 3 s).
    const EXPIRY_WAIT_MS: u64 = 15_000;

    fn wait_until_gone(conn: &Connection, heap_id: u64) {
        let deadline = Instant::now() + Duration::from_millis(EXPIRY_WAIT_MS);
        while holders(conn, &[heap_id]).expect("reading")[0].is_some() {
            assert!(
                Instant::now() < deadline,
                "the lease of {heap_id:x} never expired"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn a_lease_is_taken_renewed_released_and_expires() {
        let server = TestServer::start(16, false);
        let conn = Connection::new(&server.addr, 2000).expect("an address");
        let (a, b) = (0x1111, 0x2222);
        assert_eq!(holders(&conn, &[a, b]).expect("reading"), vec![None, None]);

        assert_eq!(renew(&conn, a, 60).expect("taking"), Renewal::Started);
        assert_eq!(renew(&conn, a, 60).expect("renewing"), Renewal::Extended);
        let found = holders(&conn, &[a, b]).expect("reading");
        assert_eq!(
            found[0],
            Some(LeaseHolder {
                pid: Some(std::process::id()),
                host: Some(host_name()),
                seeded: false,
                restoring: false,
            })
        );
        assert_eq!(found[1], None, "another heap's lease is not taken");

        release(&conn, a).expect("releasing");
        assert_eq!(holders(&conn, &[a]).expect("reading"), vec![None]);
        release(&conn, a).expect("releasing a released lease is no error");

        // A short lease, renewed, lives on; left alone, it expires, and the next renewal
        // says the lease had lapsed. (Renewed every second with 5 s to live: only a stall of
        // 4 s on a loaded machine, not memcached's one-second clock, could lapse it.)
        assert_eq!(renew(&conn, b, 5).expect("taking"), Renewal::Started);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(1000));
            assert_eq!(renew(&conn, b, 5).expect("renewing"), Renewal::Extended);
        }
        assert!(holders(&conn, &[b]).expect("reading")[0].is_some());
        assert_eq!(renew(&conn, b, 1).expect("renewing"), Renewal::Extended);
        wait_until_gone(&conn, b);
        assert_eq!(renew(&conn, b, 60).expect("taking again"), Renewal::Started);
    }

    #[test]
    fn a_seeded_lease_never_lapses_until_taken_over() {
        let server = TestServer::start(16, false);
        let conn = Connection::new(&server.addr, 2000).expect("an address");
        let heap = 0x5eed;
        seed(&conn, heap).expect("seeding");
        let holder = holders(&conn, &[heap]).expect("reading")[0]
            .clone()
            .expect("a lease");
        assert!(holder.seeded, "{holder:?}");
        // A restore claims it by its CAS token, still without a time to live (nothing renews
        // it until the take-over: a failed restore leaves a seeded lease without one); a
        // second claim with the same token finds it changed.
        let read = read(&conn, heap).expect("reading").expect("a lease");
        assert_eq!(read.ttl_s, None);
        assert!(claim(&conn, heap, read.cas).expect("claiming"));
        assert!(!claim(&conn, heap, read.cas).expect("claiming again"));
        let claimed = super::read(&conn, heap).expect("reading").expect("a lease");
        assert!(claimed.holder.restoring && claimed.ttl_s.is_none());
        reseal(&conn, heap, &read.value).expect("giving it back");
        let again = super::read(&conn, heap).expect("reading").expect("a lease");
        assert_eq!((again.value, again.ttl_s), (read.value, None));
        take(&conn, heap, 60).expect("taking over");
        let holder = holders(&conn, &[heap]).expect("reading")[0]
            .clone()
            .expect("a lease");
        assert!(!holder.seeded && holder.pid == Some(std::process::id()));
        let taken = super::read(&conn, heap).expect("reading").expect("a lease");
        assert!(taken.ttl_s.is_some_and(|t| t <= 60));
        // Deleted only with the token it has now.
        assert!(!delete_if_unchanged(&conn, heap, read_cas_before(&taken)).expect("deleting"));
        assert!(delete_if_unchanged(&conn, heap, taken.cas).expect("deleting"));
        assert_eq!(holders(&conn, &[heap]).expect("reading"), vec![None]);
    }

    fn read_cas_before(read: &LeaseRead) -> u64 {
        read.cas.wrapping_sub(1)
    }

    #[test]
    fn lease_errors_name_the_server() {
        // A port where nothing listens: bind one, then let it go.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .to_string();
        let conn = Connection::new(&addr, 500).expect("an address");
        let e = renew(&conn, 7, 60).expect_err("nothing listens");
        assert!(
            e.to_string()
                .contains(&format!("lease of heap 0000000000000007 on {addr}")),
            "{e}"
        );
        assert!(release(&conn, 7).is_err() && holders(&conn, &[7]).is_err());
    }

    #[test]
    fn values_read_back_and_unknown_ones_are_no_error() {
        let v = lease_value(42, "build-3");
        assert_eq!(v, "pid=42 host=build-3");
        assert_eq!(
            parse_value(v.as_bytes()),
            LeaseHolder {
                pid: Some(42),
                host: Some("build-3".into()),
                seeded: false,
                restoring: false,
            }
        );
        assert_eq!(
            parse_value(b"\xff\x00 pid=x"),
            LeaseHolder {
                pid: None,
                host: None,
                seeded: false,
                restoring: false,
            }
        );
        let seeded = parse_value(format!("{SEEDED_MARK} {v}").as_bytes());
        assert!(seeded.seeded && seeded.pid == Some(42));
        let host = host_name();
        assert!(!host.is_empty() && host.len() <= HOST_NAME_BYTES_MAX);
        assert!(host.bytes().all(|b| b.is_ascii_graphic()));
    }
}
