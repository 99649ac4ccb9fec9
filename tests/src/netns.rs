//! Network namespaces as "hosts" for tests that need a network they can break: each
//! [`NetHost`] is a namespace joined to this (the root) namespace by a veth pair, with an
//! address of its own in a private /24 (`10.201.N.2`; the root side is `10.201.N.1`), so a
//! server started inside it ([`crate::memcached::Memcached::start_in_netns`]) is reached over
//! a link the test can cut ([`NetHost::cut`]) and mend ([`NetHost::mend`]).
//!
//! Rules:
//! - Everything a host creates is removed on drop, also when the test panics: the processes
//!   left in the namespace are killed, the veth pair, the fallback route and the namespace
//!   are deleted. A test process killed outright cannot drop; the next run removes what it
//!   left ([`reap_leftovers`]): names carry the creating process's id, so leftovers of a
//!   dead process are told apart from a parallel run's hosts, which are never touched.
//! - Names are unique per process and host (`lego-test-PID-I`, veth `lgtPID-I`), and a /24 is
//!   only taken when no address or route of this namespace mentions it.
//! - A cut link must look like a partition, not send the server's traffic elsewhere: with
//!   the link down its connected route goes, and the default route would carry the packets
//!   out of the machine (where a transparent proxy may even accept the connection). Each host
//!   therefore has an `unreachable` route for its /24 at a low priority
//!   ([`FALLBACK_ROUTE_METRIC`]): while the link is up the connected route wins; while it is
//!   down new connections fail with "no route to host" and established ones time out.
//! - Needs `CAP_NET_ADMIN` and `CAP_SYS_ADMIN` (root): [`unavailable`] says why a test must
//!   skip; where they are held every failure is a test failure.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The first two octets of every host's /24: `10.201.N.0/24`, N from 1 to 254.
pub const SUBNET_PREFIX: &str = "10.201";

/// Every namespace this module creates is named `lego-test-PID-I`.
const NETNS_PREFIX: &str = "lego-test-";

/// The veth end inside a namespace (each namespace has its own interface names).
const NS_VETH: &str = "veth0";

/// Priority of each host's `unreachable` route for its /24, below the connected route's
/// (metric 0) so it only applies while the link is down.
pub const FALLBACK_ROUTE_METRIC: u32 = 4242;

/// Longest interface name Linux accepts (IFNAMSIZ less the terminating NUL).
const IFNAME_BYTES_MAX: usize = 15;

/// `CAP_NET_ADMIN` (veth pairs, addresses, routes) and `CAP_SYS_ADMIN` (`ip netns add`
/// mounts the namespace), as bit numbers of `CapEff`.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

static NEXT_HOST: AtomicU64 = AtomicU64::new(0);

/// Held while a host picks its /24 and takes it, so two hosts of one process never pick the
/// same. (Two processes could, in the moment between looking and taking; they start looking
/// at different /24s, chosen by their process ids, which makes that unlikely.)
static PICKING: Mutex<()> = Mutex::new(());

/// Why network namespaces cannot be made here (a test should print it and skip), or None.
pub fn unavailable() -> Option<String> {
    let status = match fs::read_to_string("/proc/self/status") {
        Ok(status) => status,
        Err(e) => return Some(format!("cannot read /proc/self/status: {e}")),
    };
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
    let Some(effective) = effective else {
        return Some("/proc/self/status has no readable CapEff line".to_string());
    };
    let missing: Vec<&str> = [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| effective & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        None
    } else {
        Some(format!(
            "making network namespaces needs {} (run the tests as root, as CI does)",
            missing.join(" and ")
        ))
    }
}

/// The `ip` of iproute2: the one on PATH, else the one in `/usr/sbin` or `/sbin` (not on every
/// user's PATH).
pub fn ip_binary() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
            .map(|dir| dir.join("ip"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("ip"))
    })
    .clone()
}

/// Runs `ip ARGS` and returns its stdout, or what it printed on stderr.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new(ip_binary()).args(args).output().map_err(|e| {
        format!("cannot run ip ({e}): install iproute2 (scripts/test.sh --setup-only does)")
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `ip ARGS` for set-up, panicking with its error.
fn ip_or_panic(args: &[&str]) -> String {
    ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Kills every process still running in `netns`.
fn kill_processes_in(netns: &str) {
    let Ok(pids) = ip(&["netns", "pids", netns]) else {
        return;
    };
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) has no memory-safety requirements; the pid was just listed as a
        // process of a namespace this module created, whose processes it started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The /24 of `10.201.N.0/24` that no address or route of this namespace mentions, looked
/// for from a place that depends on this process's id.
fn free_subnet() -> u8 {
    let addrs = ip_or_panic(&["-o", "-4", "addr", "show"]);
    let routes = ip_or_panic(&["-4", "route", "show", "table", "all"]);
    let start = std::process::id() % 254;
    (0..254)
        .map(|k| u8::try_from((start + k) % 254 + 1).expect("at most 254"))
        .find(|n| {
            let needle = format!("{SUBNET_PREFIX}.{n}.");
            !addrs.contains(&needle) && !routes.contains(&needle)
        })
        .unwrap_or_else(|| {
            panic!("every {SUBNET_PREFIX}.N.0/24 is in use here:\n{addrs}\n{routes}")
        })
}

/// A "host": a network namespace behind a veth link from this namespace.
pub struct NetHost {
    netns: String,
    veth: String,
    subnet: u8,
    netns_added: bool,
    veth_added: bool,
    route_added: bool,
}

impl NetHost {
    /// Creates a namespace with a veth link to this one, both ends up and addressed, `lo` up
    /// inside, and the fallback route. Panics if any step fails (after undoing the others).
    pub fn create() -> NetHost {
        let _picking = PICKING.lock().unwrap_or_else(|p| p.into_inner());
        let pid = std::process::id();
        let i = NEXT_HOST.fetch_add(1, Ordering::Relaxed);
        let mut host = NetHost {
            netns: format!("{NETNS_PREFIX}{pid}-{i}"),
            veth: format!("lgt{pid}-{i}"),
            subnet: free_subnet(),
            netns_added: false,
            veth_added: false,
            route_added: false,
        };
        assert!(
            host.veth.len() <= IFNAME_BYTES_MAX,
            "interface name {} is longer than {IFNAME_BYTES_MAX} bytes",
            host.veth
        );
        // A namespace of this name can only be a leftover of a dead process whose id this
        // one now has.
        let _ = ip(&["netns", "del", &host.netns]);
        ip_or_panic(&["netns", "add", &host.netns]);
        host.netns_added = true;
        let (netns, veth) = (host.netns.clone(), host.veth.clone());
        ip_or_panic(&[
            "link", "add", &veth, "type", "veth", "peer", "name", NS_VETH, "netns", &netns,
        ]);
        host.veth_added = true;
        ip_or_panic(&[
            "addr",
            "add",
            &format!("{}/24", host.host_ip()),
            "dev",
            &veth,
        ]);
        ip_or_panic(&["link", "set", &veth, "up"]);
        ip_or_panic(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/24", host.ip()),
            "dev",
            NS_VETH,
        ]);
        ip_or_panic(&["-n", &netns, "link", "set", NS_VETH, "up"]);
        ip_or_panic(&["-n", &netns, "link", "set", "lo", "up"]);
        ip_or_panic(&[
            "route",
            "add",
            "unreachable",
            &host.subnet_cidr(),
            "metric",
            &FALLBACK_ROUTE_METRIC.to_string(),
        ]);
        host.route_added = true;
        host
    }

    /// The namespace's name (for `ip netns exec NAME ...`).
    pub fn name(&self) -> &str {
        &self.netns
    }

    /// The root-side end of the link (the interface [`NetHost::cut`] takes down).
    pub fn veth(&self) -> &str {
        &self.veth
    }

    /// The host's address, inside its namespace: `10.201.N.2`.
    pub fn ip(&self) -> String {
        format!("{SUBNET_PREFIX}.{}.2", self.subnet)
    }

    /// This namespace's address on the link: `10.201.N.1`.
    pub fn host_ip(&self) -> String {
        format!("{SUBNET_PREFIX}.{}.1", self.subnet)
    }

    fn subnet_cidr(&self) -> String {
        format!("{SUBNET_PREFIX}.{}.0/24", self.subnet)
    }

    /// Cuts the host off: the root-side end of its link goes down.
    pub fn cut(&self) {
        ip_or_panic(&["link", "set", &self.veth, "down"]);
    }

    /// Mends the link [`NetHost::cut`] cut: the root-side end goes up again (and with it the
    /// connected route).
    pub fn mend(&self) {
        ip_or_panic(&["link", "set", &self.veth, "up"]);
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        let mut failures = Vec::new();
        if self.netns_added {
            kill_processes_in(&self.netns);
        }
        if self.veth_added {
            failures.extend(ip(&["link", "del", &self.veth]).err());
        }
        if self.route_added {
            let metric = FALLBACK_ROUTE_METRIC.to_string();
            let cidr = self.subnet_cidr();
            failures.extend(ip(&["route", "del", "unreachable", &cidr, "metric", &metric]).err());
        }
        if self.netns_added {
            failures.extend(ip(&["netns", "del", &self.netns]).err());
        }
        for failure in failures {
            eprintln!("cleaning up network namespace {}: {failure}", self.netns);
        }
    }
}

/// Removes the hosts that test processes no longer alive left behind (a run killed with
/// `SIGKILL` cannot drop them): their processes, fallback routes, links and namespaces.
/// Hosts of live processes, this one's included, are left alone.
pub fn reap_leftovers() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    let own = std::process::id();
    for netns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some((pid, i)) = netns
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split_once('-'))
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == own || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing network namespace {netns}, left by a dead test process {pid}");
        // Its address names its /24, and so the fallback route.
        if let Ok(addrs) = ip(&["-n", netns, "-o", "-4", "addr", "show", "dev", NS_VETH]) {
            let prefix = format!("{SUBNET_PREFIX}.");
            let subnet = addrs
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&prefix))
                .and_then(|rest| rest.split('.').next())
                .and_then(|n| n.parse::<u8>().ok());
            if let Some(n) = subnet {
                let cidr = format!("{SUBNET_PREFIX}.{n}.0/24");
                let metric = FALLBACK_ROUTE_METRIC.to_string();
                let _ = ip(&["route", "del", "unreachable", &cidr, "metric", &metric]);
            }
        }
        kill_processes_in(netns);
        let _ = ip(&["link", "del", &format!("lgt{pid}-{i}")]);
        if let Err(e) = ip(&["netns", "del", netns]) {
            eprintln!("removing leftover network namespace {netns}: {e}");
        }
    }
}
