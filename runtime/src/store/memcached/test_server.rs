//! A memcached server for tests: started as users start it (`memcached -l 127.0.0.1 -p PORT
//! -M -m MB`), on a free loopback port, and always stopped (killed on drop).

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a test waits for a started server to accept connections.
const START_WAIT_MS: u64 = 10_000;

pub(crate) struct TestServer {
    child: Child,
    pub(crate) addr: String,
}

impl TestServer {
    /// Starts a memcached holding `megabytes`, refusing to evict (`-M`) unless `evict`.
    pub(crate) fn start(megabytes: u32, evict: bool) -> TestServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut cmd = Command::new("memcached");
        cmd.args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0"])
            .args(["-m", &megabytes.to_string(), "-t", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if !evict {
            cmd.arg("-M");
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // memcached refuses to run as root without naming the user.
            cmd.args(["-u", "root"]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("starting memcached failed ({e}): install it (apt-get install memcached; scripts/test.sh --setup-only does)")
        });
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_millis(START_WAIT_MS);
        while TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "memcached at {addr} never accepted"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TestServer { child, addr }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
