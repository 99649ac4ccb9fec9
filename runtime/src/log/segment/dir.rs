//! The log directory on disk: [`LogDir`] creates it `0700`, holds its `flock` (with the
//! holder's PID in `LOG_DIR/lock`) for as long as it lives, and writes segments `0600` with
//! `O_CREAT|O_EXCL`, through io_uring ([`crate::io::staged`]) or, where that is refused,
//! `pwritev` and `fdatasync`.
//!
//! Rules: one writer per directory (a second one is refused with a message naming the
//! holder); a segment is only ever appended to; dropping the directory waits for the writes in
//! flight and reports their failure.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::{LogError, LogStorage, LOCK_FILE_BYTES_MAX, LOCK_FILE_NAME};
use crate::io::SegmentRing;
use crate::io::{self, IoError, WriteOp};
use crate::log::format::segment_file_name;

/// A log directory, locked for one writer for as long as the value lives. Segments are written
/// through io_uring ([`crate::io::staged`]): `append` may return before its bytes are written, and
/// `sync_segment`, `flush`, `create_segment`, `remove_segment` and drop wait for them. Where
/// io_uring is refused, `pwritev` and `fdatasync` (one warning says so).
pub struct LogDir {
    dir: PathBuf,
    // Holding the lock is all this field does; dropping it closes the file and unlocks.
    _lock: Flock<File>,
    current: Option<(u64, File)>,
    // The io_uring engine; `None` when io_uring is refused (or turned off), and segments are
    // written with `pwritev` and `fdatasync`.
    ring: Option<Box<SegmentRing>>,
    // Whether segments are opened with O_DIRECT (io_uring only; cleared when the file system
    // refuses it).
    direct: bool,
}

/// How a [`LogDir`] writes its segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogDirOptions {
    /// Write through io_uring (falling back to `pwritev` with one warning when it is
    /// refused); `false` uses `pwritev` from the start, with the same warning.
    pub uring: bool,
    /// Open segments with `O_DIRECT` when writing through io_uring, so the log does not fill
    /// the page cache (buffered I/O where the file system refuses it).
    pub direct: bool,
}

impl Default for LogDirOptions {
    fn default() -> Self {
        LogDirOptions {
            uring: true,
            direct: true,
        }
    }
}

/// What a [`LogDir`] writes with, for messages and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEngine {
    /// io_uring with staging buffers, registered or not, and whether files are `O_DIRECT`.
    Uring { registered: bool, direct: bool },
    /// `pwritev` and `fdatasync`.
    Sync,
}

impl LogDir {
    /// Opens `dir` for writing, creating it (mode 0700) when it does not exist, and takes its
    /// lock. A directory that exists keeps its mode; a warning says so when others can read it.
    pub fn open(dir: &Path) -> Result<LogDir, LogError> {
        Self::open_with(dir, LogDirOptions::default())
    }

    /// [`LogDir::open`] with a choice of I/O engine.
    pub fn open_with(dir: &Path, options: LogDirOptions) -> Result<LogDir, LogError> {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let meta = std::fs::metadata(dir).map_err(|source| LogError::CreateDir {
                    dir: dir.to_path_buf(),
                    source,
                })?;
                if !meta.is_dir() {
                    return Err(LogError::NotADirectory {
                        dir: dir.to_path_buf(),
                    });
                }
                if meta.mode() & 0o077 != 0 {
                    log::warn!(
                        "the log directory {} has mode {:o}: other users can list it (the \
                         segments themselves are 0600); chmod 700 it",
                        dir.display(),
                        meta.mode() & 0o777
                    );
                }
            }
            Err(source) => {
                return Err(LogError::CreateDir {
                    dir: dir.to_path_buf(),
                    source,
                })
            }
        }
        let lock = lock_dir(dir)?;
        let ring = if options.uring {
            SegmentRing::new().map_err(|e| match &e {
                IoError::Refused { source } | IoError::Setup { source, .. } => {
                    format!("{e} ({source})")
                }
                other => other.to_string(),
            })
        } else {
            Err("io_uring is turned off for this log directory".to_string())
        };
        let ring = match ring {
            Ok(ring) => Some(Box::new(ring)),
            Err(why) => {
                log::warn!(
                    "{why}; the log in {} is written with pwritev and fdatasync",
                    dir.display()
                );
                None
            }
        };
        let log_dir = LogDir {
            dir: dir.to_path_buf(),
            _lock: lock,
            current: None,
            ring,
            direct: options.direct,
        };
        log::info!("log directory {}: {:?}", dir.display(), log_dir.engine());
        Ok(log_dir)
    }

    /// The I/O engine segments are written with.
    pub fn engine(&self) -> LogEngine {
        match &self.ring {
            Some(ring) => LogEngine::Uring {
                registered: ring.registered(),
                direct: self.direct,
            },
            None => LogEngine::Sync,
        }
    }

    /// Injects a failure into the io_uring engine's I/O (tests only; the engine must be
    /// io_uring).
    #[cfg(test)]
    pub(crate) fn inject(
        &mut self,
        at: crate::io::staged::FaultAt,
        fault: crate::io::staged::Fault,
    ) {
        self.ring
            .as_mut()
            .expect("faults are injected into the io_uring engine")
            .inject(at, fault);
    }

    /// Waits for the newest segment's writes in flight and reports their first failure.
    fn finish_current(&mut self) -> std::io::Result<()> {
        if let (Some(ring), Some((_, file))) = (&mut self.ring, &self.current) {
            ring.finish(file.as_fd())?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn current(&mut self) -> std::io::Result<&mut File> {
        match &mut self.current {
            Some((_, f)) => Ok(f),
            None => Err(std::io::Error::other("no segment was created yet")),
        }
    }
}

/// Takes the exclusive lock on `dir/lock` and writes our PID into it.
fn lock_dir(dir: &Path) -> Result<Flock<File>, LogError> {
    let path = dir.join(LOCK_FILE_NAME);
    let lock_err = |source| LogError::Lock {
        dir: dir.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(lock_err)?;
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            return Err(LogError::Locked {
                dir: dir.to_path_buf(),
                holder: read_pid(&mut file),
            })
        }
        Err((_, errno)) => return Err(lock_err(errno.into())),
    };
    // The PID is only for messages: a stale one left by a dead holder is simply overwritten.
    let pid = format!("{}\n", std::process::id());
    lock.set_len(0).map_err(lock_err)?;
    lock.write_all_at(pid.as_bytes(), 0).map_err(lock_err)?;
    Ok(lock)
}

/// The PID a lock holder wrote into the lock file, if it is there yet.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(LOCK_FILE_BYTES_MAX)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

impl LogStorage for LogDir {
    fn create_segment(&mut self, seq: u64) -> std::io::Result<()> {
        // The previous segment's writes complete (or report their failure) before the next
        // segment exists.
        self.finish_current()?;
        self.current = None;
        let path = self.segment_path(seq);
        let open = |direct: bool| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(if direct { libc::O_DIRECT } else { 0 })
                .open(&path)
        };
        let direct = self.ring.is_some() && self.direct;
        let (file, direct) = match open(direct) {
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                log::info!(
                    "the file system of {} refuses O_DIRECT; the log is written buffered",
                    self.dir.display()
                );
                self.direct = false;
                (open(false)?, false)
            }
            other => (other?, direct),
        };
        if let Some(ring) = &mut self.ring {
            ring.start(&path, direct);
        }
        self.current = Some((seq, file));
        Ok(())
    }

    fn append(&mut self, offset: u64, pieces: &[&[u8]]) -> std::io::Result<()> {
        let (Some(ring), Some((_, file))) = (&mut self.ring, &self.current) else {
            let file = self.current()?;
            let mut op = WriteOp::new(offset);
            for p in pieces {
                op.push(p);
            }
            return io::sync::write_at(file.as_fd(), &mut [op]).map_err(std::io::Error::other);
        };
        Ok(ring.write(file.as_fd(), offset, pieces)?)
    }

    fn sync_segment(&mut self) -> std::io::Result<()> {
        match (&mut self.ring, &self.current) {
            (Some(ring), Some((_, file))) => Ok(ring.sync(file.as_fd())?),
            _ => self.current()?.sync_data(),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match (&mut self.ring, &self.current) {
            (Some(ring), Some((_, file))) => Ok(ring.flush(file.as_fd())?),
            _ => Ok(()),
        }
    }

    fn sync_dir(&mut self) -> std::io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn remove_segment(&mut self, seq: u64) -> std::io::Result<()> {
        if self.current.as_ref().is_some_and(|(s, _)| *s == seq) {
            let finished = self.finish_current();
            self.current = None;
            finished?;
        } else if let (Some(ring), Some((_, file))) = (&mut self.ring, &self.current) {
            // Writes in flight end here at the latest, so their failure is not lost.
            ring.flush(file.as_fd())?;
        }
        std::fs::remove_file(self.segment_path(seq))
    }

    fn segments(&self) -> std::io::Result<Vec<u64>> {
        let mut seqs = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Some(seq) = entry
                .file_name()
                .to_str()
                .and_then(crate::log::format::parse_segment_file_name)
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }

    fn segment_path(&self, seq: u64) -> PathBuf {
        self.dir.join(segment_file_name(seq))
    }

    fn location(&self) -> PathBuf {
        self.dir.clone()
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if let Err(e) = self.finish_current() {
            log::error!(
                "writing the end of the log in {} failed: {e}",
                self.dir.display()
            );
        }
    }
}
