//! [`RestoreClaim`]: a seeded heap (`lego replay --to`) claimed for its restore, on every
//! server of its pool, and given back if the restore does not go through.
//!
//! 1. [`RestoreClaim::take`] reads the heap's lease on every server with its CAS token
//!    ([`lease::read`]); every server must answer, no lease may say that a process runs the
//!    heap, and at least one must be seeded. Nothing has changed yet when it refuses.
//! 2. It then claims each seeded lease by compare and swap ([`lease::claim`]: `restoring
//!    pid=PID host=HOST`, still without a time to live), in server order, so that of two
//!    restores of one pool image exactly one gets it; the other finds a changed token, puts
//!    back what it claimed itself and is refused.
//! 3. Until [`RestoreClaim::disarm`], dropping the claim gives the heap back: every lease this
//!    process changed ([`RestoreClaim::touch_all`] once it takes them all over) is set to the
//!    seeded value the replay wrote again ([`lease::reseal`]), so the pool image can be
//!    restored once the cause is fixed.
//!
//! A `restoring` lease never lapses: a process killed while it restored leaves the heap
//! claimed, not lost. A later restore on the same host takes such a lease when its process is
//! gone; from another host it is refused (that host's process may be alive).
//!
//! Rules: the claim keeps a connection per server of its own (the pool's members may be gone
//! by the time it gives the heap back); it never touches a page.

use thiserror::Error;

use super::connection::{Connection, ServerError};
use super::lease::{self, LeaseError, LeaseRead, RESTORING_MARK, SEEDED_MARK};

/// Why a seeded heap cannot be claimed for a restore.
#[derive(Debug, Error)]
pub enum ClaimError {
    #[error("resolving the server {server} failed")]
    Resolve {
        server: String,
        #[source]
        source: ServerError,
    },
    #[error("reading the lease of heap {heap_id:016x} on {server} failed (a restore needs every server of the pool to answer)")]
    Read {
        heap_id: u64,
        server: String,
        #[source]
        source: LeaseError,
    },
    #[error(
        "the heap {heap_id:016x} is already running on {server} (its lease is held by pid {pid} \
         on {host}): a pool image is restored once; run lego replay LOG_DIR --to again for \
         another copy"
    )]
    Running {
        heap_id: u64,
        server: String,
        pid: String,
        host: String,
    },
    #[error(
        "the heap {heap_id:016x} is being restored by pid {pid} on {host} (its lease on {server} \
         says so): a pool image is restored once; if that process was killed while it started, \
         restore again on {host}"
    )]
    Restoring {
        heap_id: u64,
        server: String,
        pid: String,
        host: String,
    },
    #[error(
        "no server holds its seeded lease (heap {heap_id:016x}): it was restored already (and \
         that run ended), collected (lego pool gc --heap), or the servers restarted; run lego \
         replay LOG_DIR --to again"
    )]
    NotSeeded { heap_id: u64 },
    #[error(
        "another process claimed the seeded heap {heap_id:016x} on {server} first (a restore \
         of the same pool image at the same time, or lego pool gc --heap): a pool image is \
         restored once"
    )]
    Taken { heap_id: u64, server: String },
    #[error("claiming the lease of heap {heap_id:016x} on {server} failed")]
    Claim {
        heap_id: u64,
        server: String,
        #[source]
        source: LeaseError,
    },
}

/// A seeded heap claimed for this process's restore (see the module documentation).
pub struct RestoreClaim {
    heap_id: u64,
    /// Every server of the pool, in the pool's order.
    conns: Vec<Connection>,
    /// The servers whose lease this process changed.
    touched: Vec<bool>,
    /// The seeded lease's value as the replay set it: what a give-back puts back.
    seeded_value: Vec<u8>,
    /// Dropping the claim gives the heap back.
    armed: bool,
}

impl RestoreClaim {
    /// Claims heap `heap_id` on `servers` (`HOST:PORT`, every read bounded by `timeout_ms`).
    pub fn take(
        servers: &[String],
        timeout_ms: u64,
        heap_id: u64,
    ) -> Result<RestoreClaim, ClaimError> {
        let mut conns = Vec::with_capacity(servers.len());
        for server in servers {
            conns.push(Connection::new(server, timeout_ms).map_err(|source| {
                ClaimError::Resolve {
                    server: server.clone(),
                    source,
                }
            })?);
        }
        let our_host = lease::host_name();
        // The CAS token of each lease this restore claims.
        let mut claims: Vec<Option<u64>> = vec![None; conns.len()];
        let mut seeded_value: Option<Vec<u8>> = None;
        let mut stale_value: Option<Vec<u8>> = None;
        for (s, conn) in conns.iter().enumerate() {
            let read = lease::read(conn, heap_id).map_err(|source| ClaimError::Read {
                heap_id,
                server: conn.name.clone(),
                source,
            })?;
            let Some(LeaseRead {
                holder, value, cas, ..
            }) = read
            else {
                continue;
            };
            let pid = holder.pid.map_or("?".to_owned(), |p| p.to_string());
            let host = holder.host.clone().unwrap_or_else(|| "?".to_owned());
            if holder.seeded {
                claims[s] = Some(cas);
                seeded_value.get_or_insert(value);
            } else if holder.restoring {
                let gone = holder.host.as_deref() == Some(our_host.as_str())
                    && holder.pid.is_some_and(process_gone);
                if !gone {
                    return Err(ClaimError::Restoring {
                        heap_id,
                        server: conn.name.clone(),
                        pid,
                        host,
                    });
                }
                claims[s] = Some(cas);
                stale_value.get_or_insert(value);
            } else {
                return Err(ClaimError::Running {
                    heap_id,
                    server: conn.name.clone(),
                    pid,
                    host,
                });
            }
        }
        if claims.iter().all(Option::is_none) {
            return Err(ClaimError::NotSeeded { heap_id });
        }
        // A lease left by a killed restore names that restore's process: the seeded value
        // put back names it as the heap's seeder (the replay's is not known any more).
        let seeded_value = seeded_value.unwrap_or_else(|| {
            let stale = stale_value.expect("a claimed lease was seeded or restoring");
            let rest = String::from_utf8_lossy(&stale)
                .trim_start_matches(RESTORING_MARK)
                .trim_start()
                .to_owned();
            format!("{SEEDED_MARK} {rest}").into_bytes()
        });
        let mut claim = RestoreClaim {
            heap_id,
            touched: vec![false; conns.len()],
            conns,
            seeded_value,
            armed: true,
        };
        for (s, cas) in claims.iter().enumerate() {
            let Some(cas) = *cas else { continue };
            let conn = &claim.conns[s];
            match lease::claim(conn, heap_id, cas) {
                Ok(true) => claim.touched[s] = true,
                // Dropping `claim` puts back what this restore claimed before.
                Ok(false) => {
                    return Err(ClaimError::Taken {
                        heap_id,
                        server: conn.name.clone(),
                    })
                }
                Err(source) => {
                    return Err(ClaimError::Claim {
                        heap_id,
                        server: conn.name.clone(),
                        source,
                    })
                }
            }
        }
        Ok(claim)
    }

    /// The heap claimed.
    pub fn heap_id(&self) -> u64 {
        self.heap_id
    }

    /// Counts every server's lease as changed by this process (call before taking them all
    /// over: a give-back then seals every one again, whichever the take-over reached).
    pub fn touch_all(&mut self) {
        self.touched.fill(true);
    }

    /// Whether dropping the claim gives the heap back.
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// The restore went through: dropping the claim no longer gives the heap back (an
    /// explicit [`RestoreClaim::give_back`] still does).
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// Gives the heap back now: the seeded value again, without a time to live, on every
    /// server this process changed. The servers where that failed are named in the error
    /// (there the lease lapses, or stays `restoring`).
    pub fn give_back(&mut self) -> Result<usize, String> {
        self.armed = false;
        let mut sealed = 0;
        let mut failures = Vec::new();
        for (conn, touched) in self.conns.iter().zip(&mut self.touched) {
            if !*touched {
                continue;
            }
            match lease::reseal(conn, self.heap_id, &self.seeded_value) {
                Ok(()) => {
                    *touched = false;
                    sealed += 1;
                }
                Err(e) => failures.push(crate::logging::error_chain(&e)),
            }
        }
        if failures.is_empty() {
            Ok(sealed)
        } else {
            Err(failures.join("; "))
        }
    }
}

impl Drop for RestoreClaim {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let heap_id = self.heap_id;
        match self.give_back() {
            Ok(0) => {}
            Ok(n) => log::warn!(
                "the restore of heap {heap_id:016x} failed: it is seeded again on {n} servers and \
                 can be restored from its pool image once the cause is fixed"
            ),
            Err(e) => log::error!(
                "the restore of heap {heap_id:016x} failed, and giving the heap back failed too \
                 ({e}): restore it again on this host, or free it with lego pool gc --heap \
                 {heap_id:016x}"
            ),
        }
    }
}

/// Whether no process `pid` runs on this machine (`kill(pid, 0)` answers `ESRCH`).
fn process_gone(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled; it sends
    // nothing, and `pid` is a single positive process id (never a group or "all").
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::config::PoolSettings;
    use crate::store::memcached::test_server::TestServer;
    use crate::store::open_restored_pool;

    const HEAP_BYTES: u64 = 1 << 20;

    fn settings() -> PoolSettings {
        PoolSettings {
            replicas: 1,
            timeout_ms: 2000,
            ..PoolSettings::default()
        }
    }

    /// The lease's value, and whether it expires (`None`: no lease).
    fn lease_of(server: &TestServer, heap_id: u64) -> Option<(Vec<u8>, bool)> {
        let conn = Connection::new(&server.addr, 2000).expect("an address");
        let read = lease::read(&conn, heap_id).expect("reading")?;
        Some((read.value, read.ttl_s.is_some()))
    }

    fn seed_as(server: &TestServer, heap_id: u64, value: &[u8]) {
        let conn = Connection::new(&server.addr, 2000).expect("an address");
        lease::reseal(&conn, heap_id, value).expect("seeding");
    }

    #[test]
    fn of_two_restores_at_once_exactly_one_gets_the_heap() {
        let servers = [TestServer::start(16, false), TestServer::start(16, false)];
        let names: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        let heap = 0x5eed_0001;
        let seeded = b"seeded pid=4242 host=replayer".to_vec();
        for round in 0..10 {
            for s in &servers {
                seed_as(s, heap, &seeded);
            }
            let barrier = Arc::new(Barrier::new(2));
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let (names, barrier) = (names.clone(), Arc::clone(&barrier));
                    std::thread::spawn(move || {
                        barrier.wait();
                        open_restored_pool(&names, &settings(), HEAP_BYTES, heap, None)
                    })
                })
                .collect();
            let results: Vec<_> = threads
                .into_iter()
                .map(|t| t.join().expect("no panic"))
                .collect();
            let (won, lost): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
            assert_eq!(
                won.len(),
                1,
                "round {round}: exactly one restore gets the heap"
            );
            let why = crate::logging::error_chain(lost[0].as_ref().err().expect("refused"));
            assert!(
                why.contains("claimed the seeded heap") || why.contains("being restored"),
                "round {round}: {why}"
            );
            // The loser put back nothing of the winner's: the heap is being restored.
            for s in &servers {
                let (value, expires) = lease_of(s, heap).expect("a lease");
                assert!(value.starts_with(RESTORING_MARK.as_bytes()) && !expires);
            }
            // The winner's start fails (dropped before taking over): the heap is seeded again,
            // as the replay left it.
            drop(won);
            for s in &servers {
                assert_eq!(lease_of(s, heap), Some((seeded.clone(), false)));
            }
        }
    }

    #[test]
    fn a_seeded_lease_keeps_no_ttl_after_a_failed_restore() {
        let good = TestServer::start(16, false);
        let evicting = TestServer::start(16, true);
        let heap = 0x5eed_0002;
        let seeded = b"seeded pid=4242 host=replayer".to_vec();
        seed_as(&good, heap, &seeded);
        // A later server may evict: refused before any lease changed.
        let names = vec![good.addr.clone(), evicting.addr.clone()];
        let e = open_restored_pool(&names, &settings(), HEAP_BYTES, heap, None)
            .err()
            .expect("a server that may evict");
        assert!(crate::logging::error_chain(&e).contains("-M"), "{e}");
        assert_eq!(lease_of(&good, heap), Some((seeded.clone(), false)));

        // Claimed, then taken over, then the start fails: seeded again, without a time to
        // live, on every server (also where the take-over set a lease that was not there).
        let other = TestServer::start(16, false);
        let names = vec![good.addr.clone(), other.addr.clone()];
        let mut restored =
            open_restored_pool(&names, &settings(), HEAP_BYTES, heap, None).expect("restoring");
        assert!(
            lease_of(&other, heap).is_none(),
            "no lease is set where none was"
        );
        restored.take_over().expect("taking over");
        assert!(
            lease_of(&good, heap).expect("a lease").1,
            "a running heap's expires"
        );
        drop(restored);
        for s in [&good, &other] {
            assert_eq!(lease_of(s, heap), Some((seeded.clone(), false)));
        }

        // Taken over and disarmed: the heap is this process's (a normal lease).
        let mut restored =
            open_restored_pool(&names, &settings(), HEAP_BYTES, heap, None).expect("restoring");
        restored.take_over().expect("taking over");
        restored.disarm();
        drop(restored);
        let (value, expires) = lease_of(&good, heap).expect("a lease");
        assert!(expires && lease::parse_value(&value).pid == Some(std::process::id()));
    }

    #[test]
    fn a_restore_killed_on_this_host_can_be_claimed_again_but_not_a_live_one() {
        let server = TestServer::start(16, false);
        let names = vec![server.addr.clone()];
        let heap = 0x5eed_0003;
        let host = lease::host_name();
        // This process is alive: its `restoring` lease is refused.
        let live = format!("{RESTORING_MARK} pid={} host={host}", std::process::id());
        seed_as(&server, heap, live.as_bytes());
        let e = open_restored_pool(&names, &settings(), HEAP_BYTES, heap, None)
            .err()
            .expect("a live restore");
        assert!(
            crate::logging::error_chain(&e).contains("being restored"),
            "{e}"
        );
        // Another host's: refused too (its process may be alive).
        let remote = format!("{RESTORING_MARK} pid=1 host=elsewhere-{host}");
        seed_as(&server, heap, remote.as_bytes());
        assert!(open_restored_pool(&names, &settings(), HEAP_BYTES, heap, None).is_err());
        // A process of this host that is gone: a child that ended.
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let pid = child.id();
        child.wait().expect("waiting");
        let stale = format!("{RESTORING_MARK} pid={pid} host={host}");
        seed_as(&server, heap, stale.as_bytes());
        let restored =
            open_restored_pool(&names, &settings(), HEAP_BYTES, heap, None).expect("a stale claim");
        drop(restored);
        let (value, expires) = lease_of(&server, heap).expect("a lease");
        assert!(!expires && lease::parse_value(&value).seeded, "{value:?}");
    }
}
