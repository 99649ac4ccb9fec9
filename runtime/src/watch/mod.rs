//! Watching a running process: its statistics published while it runs, for `lego stats`,
//! `lego top` and monitoring systems.
//!
//! - [`Publisher`] (thread `lego-watch`) writes the process's statistics, the same JSON
//!   object as `LEGO_STATS` writes at exit plus `pid`, `program` and `published_ms`, to
//!   `DIR/PID.json` once every [`PUBLISH_INTERVAL_MS`], and removes it at exit. `DIR` is
//!   [`publish_dir`]: `$XDG_RUNTIME_DIR/lego`, else `/run/lego` for root, else
//!   `/tmp/lego-UID`; it is made `0700` and must belong to the user, the file is `0600` (the
//!   statistics name addresses and servers of the process). Each write replaces the file
//!   whole (a temporary file renamed over it), so a reader never sees half of one.
//! - [`metrics`] serves the same statistics over HTTP (`GET /metrics`) in Prometheus' text
//!   exposition format (`LEGO_METRICS`).
//! - [`read`] is the reading side: the published processes of the user, each one's latest
//!   statistics.
//!
//! Rules: publishing never touches the managed heap (the thread is a runtime thread) and
//! never stops the program: a directory that cannot be used is reported once at `warn` and
//! nothing is published. A process killed without exit leaves its file behind; readers skip
//! (and `lego top` removes) files of processes that are gone.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

pub mod metrics;
pub mod read;

/// Time between two publications of a process's statistics, in milliseconds.
pub const PUBLISH_INTERVAL_MS: u64 = 1000;

/// Mode of the directory the statistics are published in.
const DIR_MODE: u32 = 0o700;
/// Mode of a published file.
const FILE_MODE: u32 = 0o600;

/// Why the statistics cannot be published.
#[derive(Debug, Error)]
pub enum WatchError {
    #[error("cannot create the statistics directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the statistics directory {path} belongs to uid {owner} or is open to others (mode \
         {mode:04o}); it must be the user's own, mode 0700"
    )]
    NotPrivate {
        path: PathBuf,
        owner: u32,
        mode: u32,
    },
    #[error("writing the statistics file {path} failed")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the thread lego-watch")]
    Spawn(#[source] std::io::Error),
}

/// The directory statistics are published in (see the module documentation), from the
/// environment as it is now.
pub fn publish_dir() -> PathBuf {
    dir_for(
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        euid(),
    )
}

fn dir_for(xdg_runtime_dir: Option<PathBuf>, uid: u32) -> PathBuf {
    match xdg_runtime_dir {
        Some(d) if d.is_absolute() => d.join("lego"),
        _ if uid == 0 => PathBuf::from("/run/lego"),
        _ => PathBuf::from(format!("/tmp/lego-{uid}")),
    }
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Makes `dir` (mode 0700) if it is missing, and checks that it is the user's alone.
pub fn private_dir(dir: &Path) -> Result<(), WatchError> {
    match std::fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(WatchError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|source| WatchError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != euid() || mode & 0o077 != 0 {
        return Err(WatchError::NotPrivate {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            mode,
        });
    }
    Ok(())
}

/// The file a process's statistics are published in.
pub fn file_of(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.json"))
}

/// A pool server's fact in the statistics (`pool_server_N`: "HOST:PORT up|down key=value
/// ...").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFact<'a> {
    pub server: &'a str,
    pub up: bool,
    pub values: Vec<(&'a str, u64)>,
}

impl<'a> ServerFact<'a> {
    /// Reads a fact; `None` for anything else.
    pub fn parse(fact: &'a str) -> Option<ServerFact<'a>> {
        let mut words = fact.split_whitespace();
        let server = words.next()?;
        let up = match words.next()? {
            "up" => true,
            "down" => false,
            _ => return None,
        };
        let values = words
            .filter_map(|w| {
                let (k, v) = w.split_once('=')?;
                Some((k, v.parse().ok()?))
            })
            .collect();
        Some(ServerFact { server, up, values })
    }

    /// The value of `key` (0 when the fact has none).
    pub fn get(&self, key: &str) -> u64 {
        self.values
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(0, |v| v.1)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Wraps a statistics object (`{...}`, from `StatsSnapshot::to_json`) with the publication's
/// own facts: the process, its program name and when it was taken.
pub fn stamped(json: &str, pid: u32, program: &str, at_ms: u64) -> String {
    let body = json.trim().strip_prefix('{').unwrap_or(json);
    let mut out = String::with_capacity(json.len() + 96);
    out.push_str("{\"pid\":");
    out.push_str(&pid.to_string());
    out.push_str(",\"program\":");
    crate::stats::push_json_string(&mut out, program);
    out.push_str(",\"published_ms\":");
    out.push_str(&at_ms.to_string());
    if body.trim_start().starts_with('}') {
        out.push('}');
    } else {
        out.push(',');
        out.push_str(body);
    }
    out
}

/// Writes `json` to `path` whole: a temporary file in the same directory, renamed over it.
pub fn write_whole(path: &Path, json: &str) -> Result<(), WatchError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        f.write_all(json.as_bytes())?;
        f.write_all(b"\n")?;
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        WatchError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// A source of the process's statistics as one JSON object.
pub type Source = Box<dyn Fn() -> crate::stats::StatsSnapshot + Send + Sync>;

/// The publishing thread of one process.
pub struct Publisher {
    path: PathBuf,
    /// Set (under its lock) when the process exits; a write is made under the same lock, so
    /// none lands after the file was removed.
    stopped: Arc<Mutex<bool>>,
}

impl Publisher {
    /// Publishes `source` in `dir` for process `pid` now and then every
    /// [`PUBLISH_INTERVAL_MS`] from a thread `lego-watch`.
    pub fn start(
        dir: &Path,
        pid: u32,
        program: String,
        source: Source,
    ) -> Result<Publisher, WatchError> {
        private_dir(dir)?;
        let path = file_of(dir, pid);
        write_whole(
            &path,
            &stamped(&source().to_json(), pid, &program, now_ms()),
        )?;
        let stopped = Arc::new(Mutex::new(false));
        let (thread_path, thread_stopped) = (path.clone(), Arc::clone(&stopped));
        crate::threads::spawn("lego-watch", move || {
            let mut warned = false;
            loop {
                std::thread::sleep(Duration::from_millis(PUBLISH_INTERVAL_MS));
                let json = stamped(&source().to_json(), pid, &program, now_ms());
                let stopped = thread_stopped.lock().unwrap_or_else(|e| e.into_inner());
                if *stopped {
                    return;
                }
                if let Err(e) = write_whole(&thread_path, &json) {
                    if !warned {
                        log::warn!("{}", crate::logging::error_chain(&e));
                        warned = true;
                    }
                }
            }
        })
        .map_err(|e| {
            let _ = std::fs::remove_file(&path);
            WatchError::Spawn(e)
        })?;
        Ok(Publisher { path, stopped })
    }

    /// The published file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops publishing and removes the file (at exit).
    pub fn finish(&self) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        *stopped = true;
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests;
