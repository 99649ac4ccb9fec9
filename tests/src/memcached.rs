//! memcached servers for the pool tests (`LEGO_BACKEND=memcached://...`), started the way users
//! start them (`memcached -l ADDR -p PORT -M -m MB`), on loopback or inside a network
//! namespace ([`crate::netns`]).
//!
//! Rules: a server is always stopped (killed and reaped on drop, also when the test panics);
//! a server that dies at start is reported at once with its status rather than waited for;
//! [`Memcached::kill`] is `SIGKILL`, a crash, never a clean shutdown, and
//! [`Memcached::restart`] brings up an empty server on the same address, as an operator
//! restarting a crashed host would.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The port memcached listens on inside a namespace of its own (its default port: the
/// namespace has no other listener).
pub const NETNS_PORT: u16 = 11211;

/// How long a started server may take to accept connections.
const START_WAIT_MS: u64 = 10_000;

/// Bound on one connection attempt while waiting for a server to accept.
const CONNECT_ATTEMPT_MS: u64 = 200;

/// Free ports tried before a loopback server is given up on.
const START_ATTEMPTS: usize = 5;

/// Pause between connection attempts while waiting for a server to accept.
const CONNECT_RETRY_MS: u64 = 20;

/// A memcached that refuses to evict (`-M`: a pool, not a cache), killed on drop.
pub struct Memcached {
    child: Option<Child>,
    /// `HOST:PORT`, as `LEGO_BACKEND` names it.
    pub addr: String,
    ip: String,
    port: u16,
    megabytes: u32,
    /// The network namespace it runs in (through `ip netns exec`), or None for this one.
    netns: Option<String>,
}

impl Memcached {
    /// Starts a server holding `megabytes` on a free loopback port. A server that cannot
    /// listen there (another process took the port in between) is started again on another.
    pub fn start(megabytes: u32) -> Memcached {
        for _ in 0..START_ATTEMPTS {
            let mut server = Memcached::new("127.0.0.1", crate::free_port(), megabytes, None);
            match server.spawn() {
                Ok(()) => return server,
                Err(status) => eprintln!("memcached at {} exited at start ({status})", server.addr),
            }
        }
        panic!("memcached did not start on any of {START_ATTEMPTS} free loopback ports");
    }

    /// Starts a server holding `megabytes` inside the network namespace `netns`, listening on
    /// `ip` (an address of that namespace) at [`NETNS_PORT`]. `ip` must be reachable from
    /// this namespace: the wait for the server to accept connects from here.
    pub fn start_in_netns(netns: &str, ip: &str, megabytes: u32) -> Memcached {
        Memcached::start_with(ip, NETNS_PORT, megabytes, Some(netns.to_string()))
    }

    fn start_with(ip: &str, port: u16, megabytes: u32, netns: Option<String>) -> Memcached {
        let mut server = Memcached::new(ip, port, megabytes, netns);
        server.spawn_or_panic();
        server
    }

    fn new(ip: &str, port: u16, megabytes: u32, netns: Option<String>) -> Memcached {
        Memcached {
            child: None,
            addr: format!("{ip}:{port}"),
            ip: ip.to_string(),
            port,
            megabytes,
            netns,
        }
    }

    fn spawn_or_panic(&mut self) {
        if let Err(status) = self.spawn() {
            panic!(
                "memcached for {} exited at start ({status}): is the address taken, or not \
                 an address of {}?",
                self.addr,
                self.netns.as_deref().unwrap_or("this namespace")
            );
        }
    }

    /// Starts the server and waits until it accepts; Err with its exit status if it exited
    /// first.
    fn spawn(&mut self) -> Result<(), std::process::ExitStatus> {
        assert!(
            self.child.is_none(),
            "memcached at {} already runs",
            self.addr
        );
        let mut cmd = match &self.netns {
            // `ip netns exec` execs memcached in place (no fork), so the child is memcached
            // itself and killing it kills the server.
            Some(netns) => {
                let mut cmd = Command::new(crate::netns::ip_binary());
                cmd.args(["netns", "exec", netns, "memcached"]);
                cmd
            }
            None => Command::new("memcached"),
        };
        cmd.args([
            "-l",
            &self.ip,
            "-p",
            &self.port.to_string(),
            "-U",
            "0",
            "-M",
        ])
        .args(["-m", &self.megabytes.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // memcached refuses to run as root without naming the user.
            cmd.args(["-u", "root"]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "starting memcached for {} failed ({e}): install memcached and iproute2 \
                 (scripts/test.sh --setup-only does)",
                self.addr
            )
        });
        self.child = Some(child);
        self.wait_until_accepting()
    }

    /// Waits until the server answers `stats` with its own process id: a connection alone
    /// could reach another process on the port (ours then exits, unable to bind).
    fn wait_until_accepting(&mut self) -> Result<(), std::process::ExitStatus> {
        let addr: SocketAddr = self
            .addr
            .parse()
            .unwrap_or_else(|e| panic!("{} is not an IP address and port: {e}", self.addr));
        let deadline = Instant::now() + Duration::from_millis(START_WAIT_MS);
        loop {
            let child = self.child.as_mut().expect("spawned above");
            let pid = child.id();
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(status);
            }
            if server_pid(&addr) == Some(pid) {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "memcached at {} did not answer as process {pid} within {START_WAIT_MS} ms",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(CONNECT_RETRY_MS));
        }
    }

    /// Kills the server with `SIGKILL` (a crash: its pages are gone) and reaps it. Killing a
    /// server that is not running does nothing.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it runs, then starts a new, empty one on the same address and
    /// waits until it accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_or_panic();
    }

    /// The server's process is alive (it has not exited or been killed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Sends raw protocol commands on a new connection and returns every reply up to `last`
    /// (the end of the last command's reply, for example `"END\r\n"`, or `"MN\r\n"` after a
    /// pipeline of quiet meta commands ended by `mn`). Panics if the server closes first or
    /// says nothing for 10 s.
    pub fn talk(&self, request: &[u8], last: &str) -> String {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(&self.addr).expect("connecting to memcached");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a timeout");
        s.write_all(request).expect("writing to memcached");
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while !reply.ends_with(last.as_bytes()) {
            let n = s.read(&mut buf).expect("reading memcached's replies");
            assert!(
                n > 0,
                "memcached at {} closed the connection: {}",
                self.addr,
                String::from_utf8_lossy(&reply)
            );
            reply.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&reply).into_owned()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The process id the memcached at `addr` reports in `stats`, or None if none answers.
fn server_pid(addr: &SocketAddr) -> Option<u32> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream =
        TcpStream::connect_timeout(addr, Duration::from_millis(CONNECT_ATTEMPT_MS)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(CONNECT_ATTEMPT_MS)))
        .ok()?;
    stream.write_all(b"stats\r\n").ok()?;
    for line in BufReader::new(stream).lines() {
        let line = line.ok()?;
        if let Some(pid) = line.strip_prefix("STAT pid ") {
            return pid.trim().parse().ok();
        }
        if line == "END" {
            return None;
        }
    }
    None
}

/// `memcached://A,B,...`: the `LEGO_BACKEND` value for a pool of `servers`, in order.
pub fn pool_backend<'a>(servers: impl IntoIterator<Item = &'a Memcached>) -> String {
    let addrs: Vec<&str> = servers.into_iter().map(|s| s.addr.as_str()).collect();
    format!("memcached://{}", addrs.join(","))
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};

    use super::*;

    /// Sends one request line and returns the reply's first line.
    fn request(addr: &str, line: &str) -> std::io::Result<String> {
        let addr: SocketAddr = addr.parse().expect("an address and port");
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(line.as_bytes())?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply)?;
        Ok(reply)
    }

    #[test]
    fn a_killed_server_is_gone_and_restarts_empty_on_its_address() {
        let mut server = Memcached::start(8);
        let addr = server.addr.clone();
        assert!(server.is_running());
        assert_eq!(request(&addr, "ms k 1 T0\r\nx\r\n").unwrap(), "HD\r\n");
        assert_eq!(request(&addr, "mg k v\r\n").unwrap(), "VA 1\r\n");

        server.kill();
        assert!(!server.is_running());
        assert_eq!(server.pid(), None);
        assert!(request(&addr, "mn\r\n").is_err(), "{addr} still answers");
        server.kill(); // a second kill does nothing

        server.restart();
        assert!(server.is_running());
        assert_eq!(server.addr, addr);
        assert_eq!(request(&addr, "mg k v\r\n").unwrap(), "EN\r\n", "not empty");
        assert_eq!(pool_backend([&server]), format!("memcached://{addr}"));
    }
}
