use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::metrics::{parse_exposition, render, serve, MetricsAddr};
use super::*;
use crate::stats::{Counter, StatsSnapshot};
use crate::test_support::TestDir;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
}

fn snapshot(fetched: u64) -> StatsSnapshot {
    let mut s = StatsSnapshot {
        resident_pages: 12,
        peak_resident_pages: 40,
        fault_count: 3,
        fault_latency_p50_ns: 4096,
        ..StatsSnapshot::default()
    };
    s.set(Counter::ALL[0], fetched);
    s.extra = vec![
        (
            "backend".into(),
            "memcached://127.0.0.1:1 (1 server, 1 copy)".into(),
        ),
        ("cache_pages".into(), "256".into()),
        ("pool_failovers".into(), "2".into()),
        (
            "pool_server_0".into(),
            "127.0.0.1:11211 up fetched=5 stored=7 errors=0".into(),
        ),
        (
            "pool_server_1".into(),
            "127.0.0.1:11212 down fetched=1 stored=2 errors=4".into(),
        ),
    ];
    s
}

#[test]
fn the_directory_follows_the_environment() {
    assert_eq!(
        dir_for(Some(PathBuf::from("/run/user/1000")), 1000),
        PathBuf::from("/run/user/1000/lego")
    );
    assert_eq!(dir_for(None, 0), PathBuf::from("/run/lego"));
    assert_eq!(
        dir_for(Some(PathBuf::from("rel")), 1000),
        PathBuf::from("/tmp/lego-1000")
    );
    assert_eq!(dir_for(None, 1000), PathBuf::from("/tmp/lego-1000"));
}

#[test]
fn the_directory_is_private_and_others_are_refused() {
    let t = TestDir::new("watch-dir");
    let d = t.path().join("lego");
    private_dir(&d).expect("made");
    assert_eq!(mode(&d), 0o700);
    private_dir(&d).expect("again");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let e = private_dir(&d).expect_err("open to others");
    assert!(e.to_string().contains("mode 0700"), "{e}");
}

#[test]
fn a_publication_is_stamped_and_parses() {
    let json = stamped(&snapshot(9).to_json(), 42, "python3 \"x\"", 1234);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["pid"], 42);
    assert_eq!(v["program"], "python3 \"x\"");
    assert_eq!(v["published_ms"], 1234);
    assert_eq!(v[Counter::ALL[0].name()], 9);
    assert_eq!(v["resident_pages"], 12);
    assert_eq!(
        stamped("{}", 1, "p", 2),
        "{\"pid\":1,\"program\":\"p\",\"published_ms\":2}"
    );
}

#[test]
fn the_publisher_writes_owner_only_updates_and_removes_at_exit() {
    let t = TestDir::new("watch-pub");
    let d = t.path().join("lego");
    let n = Arc::new(AtomicU64::new(1));
    let n2 = Arc::clone(&n);
    let p = Publisher::start(
        &d,
        777,
        "prog".into(),
        Box::new(move || snapshot(n2.fetch_add(1, Relaxed))),
    )
    .expect("starts");
    assert_eq!(p.path(), file_of(&d, 777));
    assert_eq!(mode(p.path()), 0o600);
    let first: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.path()).expect("read")).expect("json");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let later = loop {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p.path()).expect("read")).expect("json");
        if v[Counter::ALL[0].name()] != first[Counter::ALL[0].name()] {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "never republished");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(later["published_ms"].as_u64() >= first["published_ms"].as_u64());
    p.finish();
    assert!(!p.path().exists());
    std::thread::sleep(Duration::from_millis(PUBLISH_INTERVAL_MS + 300));
    assert!(!p.path().exists(), "written again after finish");
}

#[test]
fn the_exposition_parses_and_carries_every_counter_and_server() {
    let text = render(&snapshot(5));
    let samples = parse_exposition(&text);
    let get = |series: &str| {
        samples
            .iter()
            .find(|(s, _)| s == series)
            .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
            .1
    };
    for &c in Counter::ALL {
        get(&format!("lego_{}_total", c.name()));
    }
    assert_eq!(get(&format!("lego_{}_total", Counter::ALL[0].name())), 5.0);
    assert_eq!(get("lego_resident_pages"), 12.0);
    assert_eq!(get("lego_cache_pages"), 256.0);
    assert_eq!(get("lego_pool_failovers_total"), 2.0);
    assert_eq!(get("lego_pool_server_up{server=\"127.0.0.1:11211\"}"), 1.0);
    assert_eq!(get("lego_pool_server_up{server=\"127.0.0.1:11212\"}"), 0.0);
    assert_eq!(
        get("lego_pool_server_errors_total{server=\"127.0.0.1:11212\"}"),
        4.0
    );
    assert!(text.contains("lego_info{backend=\"memcached://127.0.0.1:1 (1 server, 1 copy)\"} 1"));
}

fn get(mut s: impl Read + Write, path: &str) -> String {
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[test]
fn metrics_are_served_on_loopback_and_on_an_owner_only_socket() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let addr = probe.local_addr().expect("addr");
    drop(probe);
    let m = serve(&MetricsAddr::Tcp(addr), Box::new(|| snapshot(3))).expect("serves");
    let reply = get(
        std::net::TcpStream::connect(addr).expect("connect"),
        "/metrics",
    );
    let (head, body) = reply.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("version=0.0.4"), "{head}");
    parse_exposition(body);
    let reply = get(std::net::TcpStream::connect(addr).expect("connect"), "/");
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    m.finish();

    let t = TestDir::new("watch-sock");
    let path = t.path().join("m.sock");
    let m = serve(&MetricsAddr::Unix(path.clone()), Box::new(|| snapshot(4))).expect("serves");
    assert_eq!(mode(&path), 0o600);
    let reply = get(
        std::os::unix::net::UnixStream::connect(&path).expect("connect"),
        "/metrics",
    );
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    m.finish();
    assert!(!path.exists());
}
