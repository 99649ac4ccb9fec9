//! The reading side of published statistics: which processes of the user publish
//! ([`published`]) and the latest statistics of one ([`read`]).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use thiserror::Error;

use super::file_of;

/// Why a process's statistics cannot be read.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error(
        "process {pid} publishes no statistics in {dir} (is it running under lego, as this \
         user, with LEGO_PUBLISH on?)"
    )]
    NotPublished { pid: u32, dir: PathBuf },
    #[error("process {pid} is gone (its statistics file {path} was left behind)")]
    Gone { pid: u32, path: PathBuf },
    #[error("reading {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a statistics object")]
    Format {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Whether process `pid` exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The processes with a statistics file in `dir`, in pid order, each with whether it is still
/// running.
pub fn published(dir: &Path) -> Vec<(u32, bool)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, bool)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let pid = name.to_str()?.strip_suffix(".json")?.parse::<u32>().ok()?;
            Some((pid, alive(pid)))
        })
        .collect();
    out.sort_unstable();
    out
}

/// The latest statistics of process `pid`, published in `dir`.
pub fn read(dir: &Path, pid: u32) -> Result<Map<String, Value>, ReadError> {
    let path = file_of(dir, pid);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReadError::NotPublished {
                pid,
                dir: dir.to_path_buf(),
            })
        }
        Err(source) => return Err(ReadError::Io { path, source }),
    };
    if !alive(pid) {
        return Err(ReadError::Gone { pid, path });
    }
    serde_json::from_str(&text).map_err(|source| ReadError::Format { path, source })
}
