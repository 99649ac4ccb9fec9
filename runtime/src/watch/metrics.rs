//! The statistics for monitoring systems (`LEGO_METRICS=127.0.0.1:PORT` or `unix:PATH`):
//! [`render`] writes a [`StatsSnapshot`] in Prometheus' text exposition format (version
//! 0.0.4) and [`serve`] answers `GET /metrics` with it from a thread `lego-metrics`.
//!
//! What is exported, all named `lego_*`:
//! - every counter as `lego_NAME_total` (type `counter`);
//! - the resident gauges, the fault latency percentiles (in seconds) and every numeric fact
//!   the runtime and the store add (`cache_pages`, `pool_stored_pages`, ...) as gauges;
//! - the facts that are words (`backend`, `dirty_tracking`, ...) as labels of `lego_info 1`;
//! - each pool server (`pool_server_N`, "HOST:PORT up|down key=value ...") as
//!   `lego_pool_server_up{server="HOST:PORT"}` and `lego_pool_server_KEY{server=...}`.
//!
//! Rules: the server only answers; it reads at most [`REQUEST_BYTES_MAX`] of a request and
//! gives up on a client after [`CLIENT_TIMEOUT_MS`], one client at a time. It binds where the
//! user said: an address that is not loopback is served (the user named it) with a warning.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::ServerFact;
pub use crate::config::MetricsAddr;
use crate::stats::{Counter, StatsSnapshot};

/// Most bytes of a request read before it is answered.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// How long a client may take to send its request, in milliseconds.
pub const CLIENT_TIMEOUT_MS: u64 = 2000;

/// The `Content-Type` of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why the metrics cannot be served.
#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr} for LEGO_METRICS")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the thread lego-metrics")]
    Spawn(#[source] std::io::Error),
}

/// A metric name from a statistic's name: `lego_` and the name with every character that
/// a metric name cannot hold made `_`.
fn metric_name(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 5);
    out.push_str("lego_");
    for c in key.chars() {
        out.push(if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        });
    }
    out
}

/// A label value, escaped as the format wants (backslash, quote, newline).
fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A label name from a fact's key.
fn label_name(key: &str) -> String {
    let mut out: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Keys of facts that are counters (they only grow) although the store reports them as
/// facts.
fn fact_is_counter(key: &str) -> bool {
    key.starts_with("pool_")
        && !matches!(
            key,
            "pool_stored_pages"
                | "pool_underreplicated_pages"
                | "pool_servers_down"
                | "pool_queued_pages"
        )
}

/// `snap` in the text exposition format.
pub fn render(snap: &StatsSnapshot) -> String {
    let mut out = String::with_capacity(8 * 1024);
    for &c in Counter::ALL {
        let name = metric_name(&format!("{}_total", c.name()));
        family(
            &mut out,
            &name,
            "counter",
            &format!("lego's {} counter.", c.name()),
        );
        let _ = writeln!(out, "{name} {}", snap.get(c));
    }
    let gauges = [
        (
            "resident_pages",
            snap.resident_pages,
            "Pages resident in the DRAM cache.",
        ),
        (
            "peak_resident_pages",
            snap.peak_resident_pages,
            "Most pages ever resident in the DRAM cache.",
        ),
    ];
    for (key, value, help) in gauges {
        let name = metric_name(key);
        family(&mut out, &name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        &mut out,
        "lego_faults_timed_total",
        "counter",
        "Faults whose latency was recorded.",
    );
    let _ = writeln!(out, "lego_faults_timed_total {}", snap.fault_count);
    family(
        &mut out,
        "lego_fault_latency_seconds",
        "gauge",
        "Fault latency percentiles (upper bound of the histogram bucket) and maximum.",
    );
    for (q, ns) in [
        ("0.5", snap.fault_latency_p50_ns),
        ("0.9", snap.fault_latency_p90_ns),
        ("0.99", snap.fault_latency_p99_ns),
        ("1", snap.fault_latency_max_ns),
    ] {
        let _ = writeln!(
            out,
            "lego_fault_latency_seconds{{quantile=\"{q}\"}} {}",
            ns as f64 / 1e9
        );
    }
    let mut info: Vec<(String, String)> = Vec::new();
    let mut servers: Vec<ServerFact<'_>> = Vec::new();
    for (key, value) in &snap.extra {
        if key.starts_with("pool_server_") {
            if let Some(f) = ServerFact::parse(value) {
                servers.push(f);
                continue;
            }
        }
        match value.parse::<u64>() {
            Ok(n) => {
                let counter = fact_is_counter(key);
                let name = if counter {
                    metric_name(&format!("{key}_total"))
                } else {
                    metric_name(key)
                };
                family(
                    &mut out,
                    &name,
                    if counter { "counter" } else { "gauge" },
                    &format!("lego's {key}."),
                );
                let _ = writeln!(out, "{name} {n}");
            }
            Err(_) => info.push((label_name(key), label_value(value))),
        }
    }
    family(
        &mut out,
        "lego_info",
        "gauge",
        "What the process runs with, as labels.",
    );
    out.push_str("lego_info{");
    for (i, (k, v)) in info.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{v}\"");
    }
    out.push_str("} 1\n");
    if !servers.is_empty() {
        family(
            &mut out,
            "lego_pool_server_up",
            "gauge",
            "Whether a pool server is up.",
        );
        for s in &servers {
            let _ = writeln!(
                out,
                "lego_pool_server_up{{server=\"{}\"}} {}",
                label_value(s.server),
                u8::from(s.up)
            );
        }
        let mut keys: Vec<&str> = servers
            .iter()
            .flat_map(|s| s.values.iter().map(|v| v.0))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let name = metric_name(&format!("pool_server_{key}_total"));
            family(
                &mut out,
                &name,
                "counter",
                &format!("A pool server's {key}."),
            );
            for s in &servers {
                if let Some((_, v)) = s.values.iter().find(|(k, _)| *k == key) {
                    let _ = writeln!(out, "{name}{{server=\"{}\"}} {v}", label_value(s.server));
                }
            }
        }
    }
    out
}

/// What a request gets: status line, content type and body.
fn answer(request: &[u8], source: &super::Source) -> (String, &'static str, String) {
    let text = String::from_utf8_lossy(request);
    let first = text.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => ("200 OK".into(), CONTENT_TYPE, render(&source())),
        ("GET", _) => (
            "404 Not Found".into(),
            "text/plain; charset=utf-8",
            "lego serves its metrics at /metrics\n".into(),
        ),
        _ => (
            "405 Method Not Allowed".into(),
            "text/plain; charset=utf-8",
            "only GET /metrics is served\n".into(),
        ),
    }
}

fn handle<S: Read + Write>(mut stream: S, source: &super::Source) {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while request.len() < REQUEST_BYTES_MAX && !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    if request.is_empty() {
        return;
    }
    let (status, kind, body) = answer(&request, source);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
    let _ = stream.flush();
}

/// A metrics server, running until the process ends; [`Metrics::finish`] removes its
/// socket file.
pub struct Metrics {
    unix_path: Option<PathBuf>,
}

impl Metrics {
    /// Removes the Unix socket (at exit); a TCP port closes with the process.
    pub fn finish(&self) {
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds `addr` and serves `GET /metrics` from a thread `lego-metrics`.
pub fn serve(addr: &MetricsAddr, source: super::Source) -> Result<Metrics, MetricsError> {
    let bind_err = |source| MetricsError::Bind {
        addr: addr.to_string(),
        source,
    };
    match addr {
        MetricsAddr::Tcp(a) => {
            if !a.ip().is_loopback() {
                log::warn!(
                    "LEGO_METRICS: serving the metrics on {a}, which is not a loopback address"
                );
            }
            let listener = TcpListener::bind(a).map_err(bind_err)?;
            spawn_server(move || answer_all(listener.incoming(), &source))?;
            Ok(Metrics { unix_path: None })
        }
        MetricsAddr::Unix(path) => {
            let listener = bind_private(path).map_err(bind_err)?;
            spawn_server(move || answer_all(listener.incoming(), &source))?;
            Ok(Metrics {
                unix_path: Some(path.clone()),
            })
        }
    }
}

/// A client's connection: TCP or Unix.
trait Client: Read + Write {
    fn set_timeouts(&self, timeout: Option<Duration>);
}

impl Client for std::net::TcpStream {
    fn set_timeouts(&self, timeout: Option<Duration>) {
        let _ = self.set_read_timeout(timeout);
        let _ = self.set_write_timeout(timeout);
    }
}

impl Client for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, timeout: Option<Duration>) {
        let _ = self.set_read_timeout(timeout);
        let _ = self.set_write_timeout(timeout);
    }
}

/// Answers the clients of a listener, one at a time, for ever.
fn answer_all<C: Client>(
    incoming: impl Iterator<Item = std::io::Result<C>>,
    source: &super::Source,
) {
    for client in incoming.flatten() {
        client.set_timeouts(Some(Duration::from_millis(CLIENT_TIMEOUT_MS)));
        handle(client, source);
    }
}

fn spawn_server(body: impl FnOnce() + Send + 'static) -> Result<(), MetricsError> {
    crate::threads::spawn("lego-metrics", body).map_err(MetricsError::Spawn)
}

/// Binds a Unix socket at `path` that only its owner can connect to: bound under a
/// temporary name, made 0600, then renamed to `path` (so it is never open to others).
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let done = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Checks every line of an exposition (version 0.0.4; for tests and tools that scrape): comments are HELP or TYPE lines, each
/// sample is `name{labels} value` with a valid name, quoted label values and a number, and
/// every sample's family has a TYPE. Returns the samples; panics at the first bad line.
pub fn parse_exposition(text: &str) -> Vec<(String, f64)> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut w = rest.splitn(3, ' ');
            let (kw, name) = (w.next().expect("kw"), w.next().expect("name"));
            assert!(valid_name(name), "{line}");
            match kw {
                "HELP" => {}
                "TYPE" => {
                    let kind = w.next().expect("type");
                    assert!(["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind));
                    typed.insert(name.to_string());
                }
                _ => panic!("comment {line}"),
            }
            continue;
        }
        assert!(!line.is_empty(), "empty line");
        let (series, value) = line.rsplit_once(' ').expect("value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("number in {line}"));
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("closing brace");
                if !labels.is_empty() {
                    for pair in labels.split("\",") {
                        let (k, v) = pair.split_once('=').expect("label=");
                        assert!(valid_name(k), "{line}");
                        assert!(v.starts_with('"'), "{line}");
                    }
                }
                name
            }
            None => series,
        };
        assert!(valid_name(name), "{line}");
        assert!(typed.contains(name), "no TYPE for {name}");
        samples.push((series.to_string(), value));
    }
    samples
}
