//! The memcached pool (`LEGO_BACKEND=memcached://...`) under real programs: memcached started
//! the way users start it (`memcached -l 127.0.0.1 -p PORT -M -m MB`), on loopback, and
//! always stopped.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lego_tests::{heavy, program, Run, ShimSetup};

/// A memcached on a free loopback port, killed on drop.
struct Memcached {
    child: Child,
    addr: String,
}

impl Memcached {
    fn start(megabytes: u32) -> Memcached {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut cmd = Command::new("memcached");
        cmd.args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0", "-M"])
            .args(["-m", &megabytes.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-u", "root"]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("starting memcached failed ({e}): scripts/test.sh --setup-only installs it")
        });
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "memcached at {addr} never accepted"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Memcached { child, addr }
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A program whose heap is four times its cache runs on a pool of two servers with the same
/// output as without lego: its evicted pages went to the servers and came back.
#[test]
fn a_program_runs_on_a_pool_of_two_servers() {
    let _serial = heavy();
    let native = Run::new(program("sigbus_fetch")).args(["128"]).run();
    native.assert_success();
    let (a, b) = (Memcached::start(128), Memcached::start(128));
    let setup = ShimSetup::new("pool", 32);
    let out = setup
        .apply(Run::new(program("sigbus_fetch")).args(["128"]))
        .env("LEGO_BACKEND", format!("memcached://{},{}", a.addr, b.addr))
        .hang_after(300)
        .run();
    out.assert_success();
    assert_eq!(out.stdout, native.stdout, "{out}");
    let stats = setup.stats();
    assert!(
        stats.number("pages_fetched").is_some_and(|n| n > 10_000),
        "the pages must have come back from the pool:\n{}",
        stats.raw
    );
    assert_eq!(stats.number("pages_poisoned"), Some(0), "{}", stats.raw);
    assert!(
        stats
            .raw
            .contains(&format!("memcached://{},{}", a.addr, b.addr)),
        "the run must have used the pool:\n{}",
        stats.raw
    );
}
