//! `lego pool [--heaps] URL` and `lego pool gc URL`: what a pool of memcached servers holds,
//! and the collection of orphaned heaps on it. The work is in `store::memcached` (`gc`,
//! `lease`); this file asks every server at once (a thread each), then prints.
//!
//! `lego pool URL` prints one line per server (up or down, memcached's version, whether it
//! may evict, its memory, what lego holds there by heap: live heaps, with a lease, and
//! orphaned ones, without), with `--heaps` one line per heap under it, and a closing line
//! for the pool. `lego pool gc URL` collects on every server and prints what it freed.
//!
//! Exit status: 0 when every server answered, 1 when one did not (the others are still
//! printed and collected), 2 for a usage error. `lego pool gc --heap ID URL` deletes one heap
//! that is seeded (`lego replay --to`, not restored) or orphaned, its lease included; a heap a
//! process runs is kept.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Write;

use super::CliError;
use crate::config::{parse_backend, BackendSpec, ConfigError, PoolSettings};
use crate::logging::error_chain;
use crate::store::memcached::connection::{stat, Connection};
use crate::store::memcached::gc::{self, DumpCut, DumpLimits, GcReport, Survey};
use crate::store::memcached::lease::{self, LeaseHolder};

/// What `lego pool` was asked to do.
#[derive(Debug, PartialEq, Eq)]
pub struct PoolArgs {
    pub action: PoolAction,
    /// `HOST:PORT` of every server, in the URL's order.
    pub servers: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PoolAction {
    /// Describe the servers (`--heaps`: and every heap on them).
    Show { heaps: bool },
    /// Collect orphaned heaps.
    Gc,
    /// Delete one heap that is seeded (`lego replay --to`, never restored) or orphaned:
    /// `lego pool gc --heap ID`.
    GcHeap(u64),
}

/// Parses the arguments that follow `lego pool`.
pub fn parse_pool(args: &[OsString]) -> Result<PoolArgs, CliError> {
    let mut all = vec![OsString::from("pool")];
    all.extend(args.iter().cloned());
    match super::args::parse(&all) {
        Ok(super::args::Command::Pool(p)) => pool_args(p),
        Ok(_) => unreachable!("parsed as pool"),
        Err(e) => Err(CliError::Usage(e.render().to_string())),
    }
}

/// The checks of `lego pool` that clap does not make: the URL, the heap id.
pub fn pool_args(p: super::args::PoolCmd) -> Result<PoolArgs, CliError> {
    let usage = |m: String| super::args::usage_error(Some("pool"), m);
    let (action, url) = match p.action {
        Some(super::args::PoolAction::Gc { heap: None, url }) => (PoolAction::Gc, url),
        Some(super::args::PoolAction::Gc { heap: Some(v), url }) => {
            let id = Some(&*v)
                .filter(|v| v.len() == 16)
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .ok_or_else(|| {
                    usage(format!(
                        "--heap {v} is not a heap id: expected 16 hex digits, as lego pool \
                         --heaps shows them"
                    ))
                })?;
            (PoolAction::GcHeap(id), url)
        }
        None => (
            PoolAction::Show { heaps: p.heaps },
            p.url.ok_or_else(|| usage("no pool URL given".into()))?,
        ),
    };
    let servers = parse_pool_url(&url).map_err(usage)?;
    Ok(PoolArgs { action, servers })
}

/// The servers of a pool URL (`memcached://HOST:PORT[,HOST:PORT...]`), or the message of
/// the usage error (of the command the caller names) that says what is expected.
pub fn parse_pool_url(url: &str) -> Result<Vec<String>, String> {
    let not_a_pool = |problem: &str| {
        format!(
            "{url} is not a pool of memcached servers ({problem}): expected \
             memcached://HOST:PORT[,HOST:PORT...] (memcached://127.0.0.1:11211)"
        )
    };
    match parse_backend(url) {
        Ok(BackendSpec::Memcached { servers }) => Ok(servers),
        Ok(_) => Err(not_a_pool("another kind of store")),
        Err(ConfigError::BackendServers { problem, .. }) => Err(not_a_pool(problem)),
        Err(_) => Err(not_a_pool("no memcached:// scheme")),
    }
}

/// Runs `lego pool` as `args` say, printing to `out`. Fails (after printing every server)
/// when some server did not answer.
pub fn run(args: &PoolArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let timeout_ms = PoolSettings::default().timeout_ms;
    // `gc --heap ID` that every server answered without holding the heap.
    let mut not_found = None;
    // One line (or, with --heaps, lines) per server and whether it answered, then the total.
    let (servers, total): (Vec<(String, bool)>, String) = match args.action {
        PoolAction::Show { heaps } => {
            let looks = on_every_server(&args.servers, |s| look(s, timeout_ms, heaps));
            let lines = looks
                .iter()
                .zip(&args.servers)
                .map(|(look, server)| (show_server(server, look, heaps), answered(look)))
                .collect();
            (lines, show_pool(&looks))
        }
        PoolAction::Gc | PoolAction::GcHeap(_) => {
            let heap = match args.action {
                PoolAction::GcHeap(id) => Some(id),
                _ => None,
            };
            let outcomes = on_every_server(&args.servers, |s| collect(s, timeout_ms, heap));
            if heap.is_some()
                && outcomes
                    .iter()
                    .all(|o| matches!(o, Collected::Done(r) if r.heaps_found == 0))
            {
                not_found = heap;
            }
            let lines = outcomes
                .iter()
                .zip(&args.servers)
                .map(|(o, server)| {
                    let ok = matches!(o, Collected::Done(r) if r.failure.is_none());
                    (show_gc(server, o), ok)
                })
                .collect();
            (lines, show_gc_total(&outcomes))
        }
    };
    for (line, _) in &servers {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "{total}");
    let failed: Vec<&str> = servers
        .iter()
        .zip(&args.servers)
        .filter(|((_, ok), _)| !ok)
        .map(|(_, s)| s.as_str())
        .collect();
    if !failed.is_empty() {
        return Err(CliError::ServersFailed {
            failed: failed.len(),
            total: args.servers.len(),
            names: failed.join(", "),
        });
    }
    match not_found {
        Some(heap_id) => Err(CliError::HeapNotFound { heap_id }),
        None => Ok(()),
    }
}

/// `work` on every server at once, the results in the servers' order.
fn on_every_server<T: Send>(servers: &[String], work: impl Fn(&str) -> T + Sync) -> Vec<T> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = servers
            .iter()
            .map(|s| {
                let work = &work;
                scope.spawn(move || work(s))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .expect("a server's thread does not panic (panic = abort)")
            })
            .collect()
    })
}

/// What one server said; `Err` with why it did not answer.
type Look = Result<Up, String>;

/// A server that answered.
struct Up {
    version: String,
    /// `stats settings` says `evictions off` (started with `-M`).
    no_evictions: bool,
    limit_bytes: u64,
    used_bytes: u64,
    /// The server's clock (`time`), for what is left of leases.
    now_s: Option<u64>,
    /// What it holds, or why listing failed.
    survey: Result<Survey, String>,
    /// Who holds the live heaps' leases (with `--heaps`).
    holders: BTreeMap<u64, LeaseHolder>,
}

fn look(server: &str, timeout_ms: u64, heaps: bool) -> Look {
    let conn = Connection::new(server, timeout_ms).map_err(|e| error_chain(&e))?;
    let stats = conn.stats("stats").map_err(|e| error_chain(&e))?;
    let settings = conn.stats("stats settings").map_err(|e| error_chain(&e))?;
    let number = |n: &str| stat(&stats, n).and_then(|v| v.parse::<u64>().ok());
    let survey = gc::survey(&conn, &DumpLimits::COMMAND).map_err(|e| error_chain(&e));
    let mut holders = BTreeMap::new();
    if let (true, Ok(s)) = (heaps, &survey) {
        let live: Vec<u64> = s
            .heaps
            .iter()
            .filter(|(_, h)| h.lease_seen)
            .map(|(&id, _)| id)
            .collect();
        // Only for display: a lease that cannot be read is left out.
        if let Ok(found) = lease::holders(&conn, &live) {
            for (id, holder) in live.into_iter().zip(found) {
                if let Some(holder) = holder {
                    holders.insert(id, holder);
                }
            }
        }
    }
    Ok(Up {
        version: stat(&stats, "version").unwrap_or("?").to_owned(),
        no_evictions: stat(&settings, "evictions") == Some("off"),
        limit_bytes: number("limit_maxbytes").unwrap_or(0),
        used_bytes: number("bytes").unwrap_or(0),
        now_s: number("time"),
        survey,
        holders,
    })
}

fn answered(look: &Look) -> bool {
    matches!(look, Ok(up) if up.survey.is_ok())
}

/// Items and bytes of a kind of heap.
#[derive(Default)]
struct Tally {
    heaps: usize,
    items: u64,
    bytes: u64,
}

/// The live and the orphaned heaps of a survey.
fn tally(survey: &Survey) -> (Tally, Tally) {
    let (mut live, mut orphaned) = (Tally::default(), Tally::default());
    for heap in survey.heaps.values() {
        let t = if heap.lease_seen {
            &mut live
        } else {
            &mut orphaned
        };
        t.heaps += 1;
        t.items += heap.items();
        t.bytes += heap.bytes();
    }
    (live, orphaned)
}

fn show_server(server: &str, look: &Look, heaps: bool) -> String {
    let up = match look {
        Ok(up) => up,
        Err(why) => return format!("{server} down: {why}"),
    };
    let evictions = if up.no_evictions {
        "-M"
    } else {
        "evicts (started without -M: lego refuses it)"
    };
    let mut line = format!(
        "{server} up: memcached {}, {evictions}, memory {} used of {}",
        up.version,
        size(up.used_bytes),
        size(up.limit_bytes)
    );
    let survey = match &up.survey {
        Ok(s) => s,
        Err(why) => {
            let _ = write!(line, "; lego's keys unknown: {why}");
            return line;
        }
    };
    let (live, orphaned) = tally(survey);
    let _ = write!(
        line,
        "; lego: {} ({} items, {}), {} ({} items, {}); other items: {} ({})",
        count(live.heaps, "live heap"),
        live.items,
        size(live.bytes),
        count(orphaned.heaps, "orphaned heap"),
        orphaned.items,
        size(orphaned.bytes),
        survey.other_items,
        size(survey.other_bytes)
    );
    if let Some(cut) = survey.cut {
        let _ = write!(line, "; {}", cut_note(cut));
    }
    if heaps {
        for (id, heap) in &survey.heaps {
            let seeded = up.holders.get(id).is_some_and(|h| h.seeded);
            let state = if heap.lease_seen && seeded {
                let mut s = "seeded, awaiting restore".to_owned();
                if let Some(h) = up.holders.get(id) {
                    if let Some(pid) = h.pid {
                        let _ = write!(s, " (lego replay --to, pid {pid}");
                        if let Some(host) = &h.host {
                            let _ = write!(s, " on {host}");
                        }
                        s.push(')');
                    }
                }
                s
            } else if heap.lease_seen {
                let mut s = "live".to_owned();
                if let Some(h) = up.holders.get(id) {
                    if let Some(pid) = h.pid {
                        let _ = write!(s, ", pid {pid}");
                    }
                    if let Some(host) = &h.host {
                        let _ = write!(s, " on {host}");
                    }
                }
                if let (Some(exp), Some(now)) = (heap.lease_exp, up.now_s) {
                    let _ = write!(s, ", lease {} s left", exp.saturating_sub(now));
                }
                s
            } else {
                "orphaned".to_owned()
            };
            let _ = write!(
                line,
                "\n  heap {id:016x} {state}: {} items, {}",
                heap.items(),
                size(heap.bytes())
            );
        }
    }
    line
}

fn show_pool(looks: &[Look]) -> String {
    let up = looks.iter().filter(|l| l.is_ok()).count();
    let down = looks.len() - up;
    let mut heaps = BTreeSet::new();
    let mut live = BTreeSet::new();
    let (mut items, mut bytes) = (0, 0);
    let (mut orphan_items, mut orphan_bytes, mut orphan_servers) = (0, 0, 0);
    for s in looks
        .iter()
        .filter_map(|l| l.as_ref().ok()?.survey.as_ref().ok())
    {
        for (&id, heap) in &s.heaps {
            heaps.insert(id);
            if heap.lease_seen {
                live.insert(id);
            }
            items += heap.items();
            bytes += heap.bytes();
        }
        let (_, orphaned) = tally(s);
        orphan_items += orphaned.items;
        orphan_bytes += orphaned.bytes;
        orphan_servers += usize::from(orphaned.heaps > 0);
    }
    let mut line = format!(
        "pool: {}, {up} up, {down} down; lego holds {items} items ({}) of {}, {} live",
        count(looks.len(), "server"),
        size(bytes),
        count(heaps.len(), "heap"),
        live.len()
    );
    if orphan_items > 0 {
        let _ = write!(
            line,
            "; orphaned: {orphan_items} items ({}) on {}, freed by lego pool gc",
            size(orphan_bytes),
            count(orphan_servers, "server")
        );
    } else {
        line.push_str("; nothing orphaned");
    }
    line
}

/// What `lego pool gc` did on one server.
enum Collected {
    /// It did not answer, and why.
    Down(String),
    /// It answered, but listing its keys failed, and why.
    NotListed(String),
    Done(GcReport),
}

/// Collects orphaned heaps on `server`, or only `heap` (`--heap ID`, seeded or orphaned).
fn collect(server: &str, timeout_ms: u64, heap: Option<u64>) -> Collected {
    let conn = match Connection::new(server, timeout_ms) {
        Ok(conn) => conn,
        Err(e) => return Collected::Down(error_chain(&e)),
    };
    if let Err(e) = conn.stats("stats") {
        return Collected::Down(error_chain(&e));
    }
    let report = match heap {
        Some(id) => gc::collect_heap(&conn, id, &DumpLimits::COMMAND),
        None => gc::collect_orphans(&conn, &[], &DumpLimits::COMMAND),
    };
    match report {
        Ok(report) => Collected::Done(report),
        Err(e) => Collected::NotListed(error_chain(&e)),
    }
}

fn show_gc(server: &str, outcome: &Collected) -> String {
    let r = match outcome {
        Collected::Down(why) => return format!("{server} down: {why}"),
        Collected::NotListed(why) => return format!("{server} up, but {why}"),
        Collected::Done(r) => r,
    };
    let mut line = format!(
        "{server}: {} ({} live), {} collected: {} deleted, {} freed",
        count(r.heaps_found, "heap"),
        r.heaps_live,
        r.heaps_collected,
        count_u64(r.keys_deleted, "key"),
        size(r.bytes_freed)
    );
    if r.keys_kept > 0 {
        let _ = write!(
            line,
            "; {} kept (written again or gone since the listing)",
            count_u64(r.keys_kept, "key")
        );
    }
    if let Some(cut) = r.cut {
        let _ = write!(line, "; {}: run lego pool gc again", cut_note(cut));
    }
    if let Some(e) = &r.failure {
        let _ = write!(line, "; failed: {}", error_chain(e));
    }
    line
}

fn show_gc_total(outcomes: &[Collected]) -> String {
    let done: Vec<&GcReport> = outcomes
        .iter()
        .filter_map(|o| match o {
            Collected::Done(r) => Some(r),
            _ => None,
        })
        .collect();
    let keys: u64 = done.iter().map(|r| r.keys_deleted).sum();
    let bytes: u64 = done.iter().map(|r| r.bytes_freed).sum();
    let failed = outcomes.len() - done.iter().filter(|r| r.failure.is_none()).count();
    format!(
        "gc: {}, {failed} failed; {} deleted, {} freed in all",
        count(outcomes.len(), "server"),
        count_u64(keys, "key"),
        size(bytes)
    )
}

fn cut_note(cut: DumpCut) -> &'static str {
    match cut {
        DumpCut::Lines => "the listing stopped at its item limit (counts are at least these)",
        DumpCut::Time => "the listing stopped at its time limit (counts are at least these)",
    }
}

/// "1 heap", "2 heaps".
fn count(n: usize, what: &str) -> String {
    count_u64(n as u64, what)
}

fn count_u64(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Bytes for people: `61 B`, `12.3 KiB`, `1.2 MiB`, `3.0 GiB` (tenths rounded down).
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let unit = (1..UNITS.len())
        .rev()
        .find(|&u| bytes >> (10 * u) > 0)
        .unwrap_or(0);
    if unit == 0 {
        return format!("{bytes} B");
    }
    let tenths = (u128::from(bytes) * 10) >> (10 * unit);
    format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn pool_arguments() {
        let url = "memcached://127.0.0.1:11211,cache-2:11212";
        let servers = vec!["127.0.0.1:11211".to_owned(), "cache-2:11212".to_owned()];
        assert_eq!(
            parse_pool(&os(&[url])).expect("parses"),
            PoolArgs {
                action: PoolAction::Show { heaps: false },
                servers: servers.clone()
            }
        );
        for v in [&["--heaps", url][..], &[url, "--heaps"][..]] {
            assert_eq!(
                parse_pool(&os(v)).expect("parses").action,
                PoolAction::Show { heaps: true }
            );
        }
        assert_eq!(
            parse_pool(&os(&["gc", url])).expect("parses"),
            PoolArgs {
                action: PoolAction::Gc,
                servers
            }
        );
        assert_eq!(
            parse_pool(&os(&["gc", "--heap", "00000000000000ab", url]))
                .expect("parses")
                .action,
            PoolAction::GcHeap(0xab)
        );
        for v in [
            &["gc", "--heap", "ab", url][..],
            &["gc", "--heap"][..],
            &["--heap", "00000000000000ab", url][..],
        ] {
            assert!(
                matches!(parse_pool(&os(v)), Err(CliError::Usage(_))),
                "{v:?}"
            );
        }
        for v in [
            &[][..],
            &["gc"][..],
            &["--heaps"][..],
            &[url, url][..],
            &["gc", url, "--heaps"][..],
            &[url, "gc"][..],
            &["--bogus", url][..],
            &["file:/tmp"][..],
            &["memcached://host"][..],
            &["memcached://a:1,a:1"][..],
            &["127.0.0.1:11211"][..],
        ] {
            let e = parse_pool(&os(v)).expect_err("a usage error");
            assert!(matches!(e, CliError::Usage(_)), "{v:?}: {e}");
        }
        let e = parse_pool(&os(&["memcached://h:0"])).expect_err("port 0");
        assert!(
            e.to_string().contains("memcached://h:0 is not a pool")
                && e.to_string().contains("a port is a number"),
            "{e}"
        );
    }

    #[test]
    fn sizes_and_counts_for_people() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(12_697), "12.3 KiB");
        assert_eq!(size(64 << 20), "64.0 MiB");
        assert_eq!(size((3 << 30) + (1 << 29)), "3.5 GiB");
        assert_eq!(size(u64::MAX), "16777215.9 TiB");
        assert_eq!(count(1, "heap"), "1 heap");
        assert_eq!(count(0, "heap"), "0 heaps");
    }

    /// Against a real server: an orphan and a live heap seen, the orphan collected, the live
    /// one kept; a port where nothing listens is down and fails the command.
    #[test]
    fn show_and_collect_on_a_real_server() {
        use crate::store::memcached::protocol;
        use crate::store::memcached::test_server::TestServer;
        use crate::store::memcached::{keys, VALUE_BYTES};

        let server = TestServer::start(16, false);
        let conn = Connection::new(&server.addr, 2000).expect("an address");
        lease::renew(&conn, 0xa, 60).expect("a lease");
        let mut request = Vec::new();
        for (heap, page) in [(0xa, 0), (0xb, 0), (0xb, 1)] {
            let value = vec![7u8; VALUE_BYTES];
            protocol::set(&mut request, &keys::page_key(heap, page), &value, 0);
        }
        protocol::noop(&mut request);
        conn.pipeline(&request, |_| {}).expect("writing");
        let nobody = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .to_string();
        let url = format!("memcached://{},{nobody}", server.addr);
        let run_with = |v: &[&str]| {
            let mut out = Vec::new();
            let result = run(&parse_pool(&os(v)).expect("parses"), &mut out);
            (result, String::from_utf8(out).expect("text"))
        };

        let (result, text) = run_with(&["--heaps", &url]);
        assert!(
            matches!(
                result,
                Err(CliError::ServersFailed {
                    failed: 1,
                    total: 2,
                    ..
                })
            ),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} up: memcached 1.6", server.addr))
                && text.contains("-M")
                && text.contains("1 live heap (2 items")
                && text.contains("1 orphaned heap (2 items")
                && text.contains(&format!("{nobody} down: "))
                && text.contains(&format!(
                    "heap 000000000000000a live, pid {}",
                    std::process::id()
                ))
                && text.contains("heap 000000000000000b orphaned: 2 items")
                && text.contains("pool: 2 servers, 1 up, 1 down")
                && text.contains("orphaned: 2 items"),
            "{text}"
        );

        let (result, text) = run_with(&["gc", &url]);
        assert!(
            matches!(result, Err(CliError::ServersFailed { .. })),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "{}: 2 heaps (1 live), 1 collected: 2 keys deleted",
                server.addr
            )) && text.contains(&format!("{nobody} down: ")),
            "{text}"
        );

        let (result, text) = run_with(&[&format!("memcached://{}", server.addr)]);
        assert!(result.is_ok(), "{text}");
        assert!(
            text.contains("0 orphaned heaps") && text.contains("nothing orphaned"),
            "{text}"
        );
    }
}
