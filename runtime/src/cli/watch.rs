//! `lego stats [PID] [--json]` and `lego top [PID]`: a running process's published statistics
//! (`crate::watch`), as one snapshot or as a view refreshed every second.
//!
//! `lego top` draws on the terminal's alternate screen in raw mode and quits on `q`, Esc or
//! Ctrl-C; every line is cut to the terminal's width and the view to its height (the pool's
//! servers, worst first, are what gets cut). When the process exits the last view stays,
//! marked as such. When its output is not a terminal it prints `--iterations` views (default
//! 1) one after another, for scripts.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use super::CliError;
use crate::watch::read::{published, read, ReadError};
use crate::watch::{now_ms, publish_dir, ServerFact, PUBLISH_INTERVAL_MS};
use crate::PAGE_SIZE;

/// One reading of a process's statistics.
#[derive(Debug, Clone)]
pub struct Reading {
    pub pid: u32,
    pub stats: Map<String, Value>,
}

impl Reading {
    fn num(&self, key: &str) -> u64 {
        match self.stats.get(key) {
            Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
            Some(Value::String(s)) => s.parse().unwrap_or(0),
            _ => 0,
        }
    }

    fn text(&self, key: &str) -> &str {
        self.stats.get(key).and_then(Value::as_str).unwrap_or("")
    }

    fn at_ms(&self) -> u64 {
        self.num("published_ms")
    }
}

fn watch_error(source: ReadError) -> CliError {
    CliError::Watch { source }
}

/// `lego stats`: one snapshot of process `pid` (JSON with `json`, else one `key: value` line
/// per statistic), or the list of publishing processes without a pid.
pub fn run_stats(pid: Option<u32>, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let dir = publish_dir();
    let Some(pid) = pid else {
        let live: Vec<u32> = published(&dir)
            .into_iter()
            .filter_map(|(p, alive)| alive.then_some(p))
            .collect();
        if live.is_empty() {
            let _ = writeln!(
                out,
                "no lego process of this user publishes statistics in {}",
                dir.display()
            );
        }
        for p in live {
            let program = read(&dir, p).map(|m| Reading { pid: p, stats: m }).ok();
            let name = program.as_ref().map_or("?", |r| r.text("program"));
            let _ = writeln!(out, "{p} {name}");
        }
        return Ok(());
    };
    let stats = read(&dir, pid).map_err(watch_error)?;
    if json {
        let _ = writeln!(out, "{}", Value::Object(stats));
    } else {
        for (k, v) in &stats {
            match v {
                Value::String(s) => {
                    let _ = writeln!(out, "{k}: {s}");
                }
                other => {
                    let _ = writeln!(out, "{k}: {other}");
                }
            }
        }
    }
    Ok(())
}

/// A count of pages as bytes, in MiB.
fn mib_of_pages(pages: u64) -> String {
    format!(
        "{:.1} MiB",
        (pages * PAGE_SIZE as u64) as f64 / f64::from(1u32 << 20)
    )
}

/// `n` per second, short: 950, 12.3k, 4.5M.
fn rate(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.0}k", n / 1e3)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// Per-second rates of counters between two readings.
struct Rates<'a> {
    now: &'a Reading,
    before: Option<&'a Reading>,
}

impl Rates<'_> {
    fn per_s(&self, key: &str) -> f64 {
        let Some(b) = self.before else { return 0.0 };
        let dt = self.now.at_ms().saturating_sub(b.at_ms());
        if dt == 0 {
            return 0.0;
        }
        self.now.num(key).saturating_sub(b.num(key)) as f64 * 1000.0 / dt as f64
    }

    fn show(&self, key: &str) -> String {
        format!("{}/s", rate(self.per_s(key)))
    }
}

fn servers(r: &Reading) -> Vec<ServerFact<'_>> {
    let mut out: Vec<ServerFact<'_>> = (0..)
        .map_while(|i| r.stats.get(&format!("pool_server_{i}")))
        .filter_map(|v| v.as_str().and_then(ServerFact::parse))
        .collect();
    // Worst first: down before up, then by errors.
    out.sort_by_key(|s| (s.up, std::cmp::Reverse(s.get("errors"))));
    out
}

/// A bar of `width` cells, `part` of `whole` filled.
fn bar(part: u64, whole: u64, width: usize) -> String {
    let filled = if whole == 0 {
        0
    } else {
        ((part.min(whole) as u128 * width as u128) / whole as u128) as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Cuts `line` to `width` characters.
fn cut(line: String, width: usize) -> String {
    if line.chars().count() <= width {
        line
    } else {
        line.chars().take(width).collect()
    }
}

/// One view of `now` (rates against `before`), at most `height` lines of at most `width`
/// characters. `exited`: the process is gone and this is its last reading.
pub fn frame(
    now: &Reading,
    before: Option<&Reading>,
    exited: bool,
    width: usize,
    height: usize,
) -> Vec<String> {
    let r = Rates { now, before };
    let cache = now.num("cache_pages");
    let resident = now.num("resident_pages");
    let mut lines = vec![format!(
        "lego top - pid {} {} - {}   (q quits)",
        now.pid,
        now.text("program"),
        if exited {
            "EXITED: last statistics shown"
        } else {
            "running"
        }
    )];
    let bar_width = width.saturating_sub(60).clamp(10, 40);
    lines.push(format!(
        "cache    {} {} of {} resident ({}%), peak {}",
        bar(resident, cache, bar_width),
        mib_of_pages(resident),
        mib_of_pages(cache),
        (resident * 100).checked_div(cache).unwrap_or(0),
        mib_of_pages(now.num("peak_resident_pages")),
    ));
    lines.push(format!(
        "faults   zero-fill {}  fetched {}  waited {}  write-protect {}",
        r.show("faults_zero_fill"),
        r.show("faults_fetch"),
        r.show("faults_spurious"),
        r.show("faults_write_protect"),
    ));
    let latency = now.stats.get("fault_latency_ns");
    let lat = |q: &str| {
        latency
            .and_then(|l| l.get(q))
            .and_then(Value::as_u64)
            .map_or("?".to_string(), |ns| {
                if ns >= 10_000_000 {
                    format!("{:.0} ms", ns as f64 / 1e6)
                } else {
                    format!("{:.0} us", ns as f64 / 1e3)
                }
            })
    };
    lines.push(format!(
        "latency  p50 <= {}  p99 <= {}  max {}   faults {}",
        lat("p50"),
        lat("p99"),
        lat("max"),
        now.num("fault_count")
    ));
    lines.push(format!(
        "pages    fetched {}  read ahead {}  stored {}  evicted {}  discarded {}",
        r.show("pages_fetched"),
        r.show("pages_read_ahead"),
        r.show("pages_written_back"),
        r.show("pages_evicted"),
        r.show("pages_discarded"),
    ));
    lines.push(format!(
        "errors   fetch {}  store {}  poisoned {}  log {}",
        now.num("fetch_errors"),
        now.num("store_errors"),
        now.num("pages_poisoned"),
        now.num("log_errors"),
    ));
    if now.stats.contains_key("log_last_epoch") {
        let at = now.num("log_last_epoch_unix_ms");
        let age = if at == 0 {
            "none yet".to_string()
        } else {
            format!("{:.1} s ago", now.at_ms().saturating_sub(at) as f64 / 1e3)
        };
        lines.push(format!(
            "log      epoch {} ({age})  logged {}  {} epochs  {} compactions  size {:.1} MiB",
            now.num("log_last_epoch"),
            r.show("pages_logged"),
            now.num("epochs_committed"),
            now.num("log_compactions"),
            now.num("log_bytes") as f64 / f64::from(1u32 << 20),
        ));
    } else {
        lines.push("log      none (LEGO_LOG_DIR unset)".into());
    }
    lines.push(format!("store    {}", now.text("backend")));
    let list = servers(now);
    if !list.is_empty() {
        let before_list = before.map(servers).unwrap_or_default();
        lines.push(format!(
            "pool     {} stored pages, {} under-replicated, {} failovers, {} servers down",
            now.num("pool_stored_pages"),
            now.num("pool_underreplicated_pages"),
            now.num("pool_failovers"),
            now.num("pool_servers_down"),
        ));
        let dt_s = before.map_or(0.0, |b| now.at_ms().saturating_sub(b.at_ms()) as f64 / 1e3);
        for s in &list {
            let prev = before_list.iter().find(|p| p.server == s.server);
            let per_s = |key: &str| match prev {
                Some(p) if dt_s > 0.0 => rate(s.get(key).saturating_sub(p.get(key)) as f64 / dt_s),
                _ => "0".into(),
            };
            let latency = match prev {
                Some(p) => {
                    let requests = s.get("requests").saturating_sub(p.get("requests"));
                    let busy = s.get("busy_us").saturating_sub(p.get("busy_us"));
                    busy.checked_div(requests)
                        .map_or("-".to_string(), |us| format!("{us} us"))
                }
                None => "-".to_string(),
            };
            lines.push(format!(
                "  {:<22} {:<4}  latency {latency}  fetched {}/s  stored {}/s  errors {}  downs {}  full {}",
                s.server,
                if s.up { "up" } else { "DOWN" },
                per_s("fetched"),
                per_s("stored"),
                s.get("errors"),
                s.get("downs"),
                s.get("full"),
            ));
        }
    }
    lines.truncate(height.max(1));
    lines.into_iter().map(|l| cut(l, width.max(1))).collect()
}

/// One view of every process in `now` (rates against `before`), busiest first, at most
/// `height` lines of at most `width` characters.
pub fn frame_all(now: &[Reading], before: &[Reading], width: usize, height: usize) -> Vec<String> {
    let mut rows: Vec<(f64, String)> = now
        .iter()
        .map(|r| {
            let rates = Rates {
                now: r,
                before: before.iter().find(|b| b.pid == r.pid),
            };
            let faults = rates.per_s("faults_fetch") + rates.per_s("faults_zero_fill");
            let down = if r.stats.contains_key("pool_servers_down") {
                r.num("pool_servers_down").to_string()
            } else {
                "-".into()
            };
            let line = format!(
                "{:<8} {:<16} {:>10} / {:<10} {:>8} {:>9} {:>9} {:>6}",
                r.pid,
                cut(r.text("program").to_string(), 16),
                mib_of_pages(r.num("resident_pages")),
                mib_of_pages(r.num("cache_pages")),
                rate(faults),
                rate(rates.per_s("pages_fetched")),
                rate(rates.per_s("pages_written_back")),
                down,
            );
            (faults, line)
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut lines = vec![
        format!("lego top - {} lego processes   (q quits)", now.len()),
        format!(
            "{:<8} {:<16} {:>10}   {:<10} {:>8} {:>9} {:>9} {:>6}",
            "PID", "PROGRAM", "RESIDENT", "CACHE", "FAULTS/s", "FETCHED/s", "STORED/s", "DOWN"
        ),
    ];
    lines.extend(rows.into_iter().map(|r| r.1));
    lines.truncate(height.max(1));
    lines.into_iter().map(|l| cut(l, width.max(1))).collect()
}

/// The processes of the user that publish, and their readings.
fn read_all(dir: &Path) -> Vec<Reading> {
    published(dir)
        .into_iter()
        .filter(|&(_, alive)| alive)
        .filter_map(|(pid, _)| next_reading(dir, pid))
        .collect()
}

/// What `lego top` shows.
enum View {
    /// One process.
    One {
        now: Reading,
        before: Option<Reading>,
        exited: bool,
    },
    /// Every process of the user.
    All {
        now: Vec<Reading>,
        before: Vec<Reading>,
    },
}

impl View {
    fn lines(&self, width: usize, height: usize) -> Vec<String> {
        match self {
            View::One {
                now,
                before,
                exited,
            } => frame(now, before.as_ref(), *exited, width, height),
            View::All { now, before } => frame_all(now, before, width, height),
        }
    }

    /// Takes the next readings.
    fn refresh(&mut self, dir: &Path) {
        match self {
            View::One {
                now,
                before,
                exited,
            } => {
                if *exited {
                    return;
                }
                match next_reading(dir, now.pid) {
                    Some(r) if r.at_ms() != now.at_ms() => {
                        *before = Some(std::mem::replace(now, r))
                    }
                    Some(_) => {}
                    None => *exited = true,
                }
            }
            View::All { now, before } => *before = std::mem::replace(now, read_all(dir)),
        }
    }
}

/// `lego top [PID]`: one process, or every process of the user without a pid (the only one
/// in detail).
pub fn run_top(pid: Option<u32>, iterations: Option<u64>) -> Result<(), CliError> {
    let dir = publish_dir();
    let one = |pid| -> Result<View, CliError> {
        let stats = read(&dir, pid).map_err(watch_error)?;
        Ok(View::One {
            now: Reading { pid, stats },
            before: None,
            exited: false,
        })
    };
    let view = match pid {
        Some(p) => one(p)?,
        None => {
            let all = read_all(&dir);
            match all.len() {
                0 => {
                    return Err(CliError::Usage(format!(
                        "no lego process of this user publishes statistics in {}",
                        dir.display()
                    )))
                }
                1 => one(all[0].pid)?,
                _ => View::All {
                    now: all,
                    before: Vec::new(),
                },
            }
        }
    };
    if !std::io::stdout().is_terminal() || iterations.is_some() {
        return batch(&dir, view, iterations.unwrap_or(1));
    }
    interactive(&dir, view)
}

fn next_reading(dir: &Path, pid: u32) -> Option<Reading> {
    read(dir, pid).ok().map(|stats| Reading { pid, stats })
}

fn batch(dir: &Path, mut view: View, iterations: u64) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    for i in 0..iterations.max(1) {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(PUBLISH_INTERVAL_MS));
            view.refresh(dir);
        }
        for l in view.lines(200, 200) {
            let _ = writeln!(out, "{l}");
        }
        let _ = writeln!(out);
        if matches!(view, View::One { exited: true, .. }) {
            break;
        }
    }
    Ok(())
}

/// Puts the terminal back however the view ends.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = crossterm::execute!(
            std::io::stdout(),
            crossterm::cursor::Show,
            crossterm::terminal::LeaveAlternateScreen
        );
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

fn interactive(dir: &Path, mut view: View) -> Result<(), CliError> {
    use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    use crossterm::{cursor, queue, terminal};

    let term = |e: std::io::Error| CliError::Terminal { source: e };
    terminal::enable_raw_mode().map_err(term)?;
    let _guard = TerminalGuard;
    let mut out = std::io::stdout();
    crossterm::execute!(out, terminal::EnterAlternateScreen, cursor::Hide).map_err(term)?;
    let mut next_read = now_ms() + PUBLISH_INTERVAL_MS;
    loop {
        let (w, h) = terminal::size().unwrap_or((80, 24));
        queue!(out, terminal::Clear(terminal::ClearType::All)).map_err(term)?;
        for (i, line) in view
            .lines(usize::from(w), usize::from(h))
            .iter()
            .enumerate()
        {
            let row = u16::try_from(i).unwrap_or(u16::MAX);
            queue!(out, cursor::MoveTo(0, row), crossterm::style::Print(line)).map_err(term)?;
        }
        out.flush().map_err(term)?;
        // Wait for a key until the next reading is due.
        let wait = next_read.saturating_sub(now_ms());
        if event::poll(Duration::from_millis(wait)).map_err(term)? {
            match event::read().map_err(term)? {
                Event::Key(k) if k.kind != KeyEventKind::Release => {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                _ => {}
            }
            continue;
        }
        next_read = now_ms() + PUBLISH_INTERVAL_MS;
        view.refresh(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(pid: u32, json: &str) -> Reading {
        Reading {
            pid,
            stats: serde_json::from_str(json).expect("json"),
        }
    }

    #[test]
    fn a_frame_shows_rates_cache_and_worst_server_first_and_fits() {
        let a = reading(
            7,
            r#"{"pid":7,"program":"app","published_ms":1000,"cache_pages":256,"resident_pages":128,
            "faults_fetch":10,"pages_fetched":100,"backend":"memcached://a,b",
            "pool_server_0":"a:1 up fetched=10 stored=0 errors=0",
            "pool_server_1":"b:2 down fetched=0 stored=0 errors=5"}"#,
        );
        let b = reading(
            7,
            r#"{"pid":7,"program":"app","published_ms":2000,"cache_pages":256,"resident_pages":192,
            "faults_fetch":1010,"pages_fetched":2100,"backend":"memcached://a,b",
            "pool_server_0":"a:1 up fetched=510 stored=0 errors=0",
            "pool_server_1":"b:2 down fetched=0 stored=0 errors=5"}"#,
        );
        let f = frame(&b, Some(&a), false, 120, 40);
        let text = f.join("\n");
        assert!(text.contains("0.8 MiB of 1.0 MiB resident (75%)"), "{text}");
        assert!(text.contains("fetched 1.0k/s"), "{text}");
        assert!(text.contains("fetched 2.0k/s"), "{text}");
        let down = f
            .iter()
            .position(|l| l.contains("b:2") && l.contains("DOWN"))
            .expect("down");
        let up = f.iter().position(|l| l.contains("a:1")).expect("up");
        assert!(down < up, "worst first:\n{text}");
        assert!(
            f.iter()
                .any(|l| l.contains("a:1") && l.contains("fetched 500/s")),
            "{text}"
        );
        let small = frame(&b, Some(&a), true, 30, 5);
        assert_eq!(small.len(), 5);
        assert!(small.iter().all(|l| l.chars().count() <= 30));
        assert!(frame(&b, None, true, 200, 5)[0].contains("EXITED"));
        let mut c = b.clone();
        c.pid = 8;
        let all = frame_all(&[c, b.clone()], &[a], 120, 10);
        assert!(all[0].contains("2 lego processes"), "{all:?}");
        assert!(all[2].starts_with("7 "), "busiest first: {all:?}");
        assert!(all[3].starts_with("8 "), "{all:?}");
    }
}
