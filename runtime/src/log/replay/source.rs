//! Read access to one segment: the [`SegmentSource`] trait (a file, or bytes in memory for
//! tests), [`SegmentFile`] (a segment file read with `O_DIRECT` where the file system allows
//! it, through the page cache otherwise) and [`read_exact_at`], the exact read of the second
//! pass and of compaction's copies.
//!
//! Rules: sources are only read, never written; a short read happens only at the end of a
//! segment, and a read the second pass makes past that end means the log changed under it.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::ReplayError;
use crate::io::{self};
use crate::log::format::{FormatError, Record};

/// Read access to one segment: a file, or bytes in memory (tests). Shared with the reader
/// thread of the first pass, hence `Sync`.
pub trait SegmentSource: Sync {
    /// Bytes in the segment.
    fn size(&self) -> u64;
    /// Reads at `offset` into `buf`, like `pread`: fewer bytes only at the end, 0 past it.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl SegmentSource for [u8] {
    fn size(&self) -> u64 {
        <[u8]>::len(self) as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(<[u8]>::len(self) - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

impl SegmentSource for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        SegmentSource::read_at(self.as_slice(), offset, buf)
    }
}

impl<T: SegmentSource + ?Sized> SegmentSource for Box<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        (**self).read_at(offset, buf)
    }
}

/// A segment file opened for reading; its length is taken once, at open. Reads whose buffer,
/// offset and length are aligned go through a second descriptor opened with `O_DIRECT`, the
/// others (and all of them where the file system refuses `O_DIRECT`) through the page cache.
pub struct SegmentFile {
    file: File,
    /// The same file opened with `O_DIRECT`, unless its file system refused that.
    direct: Option<File>,
    /// Set when a direct read failed with `EINVAL` (a file system that opens with `O_DIRECT`
    /// but cannot read that way): later reads go through the page cache.
    direct_refused: AtomicBool,
    len: u64,
}

impl SegmentFile {
    /// Opens the segment at `path` read-only.
    pub fn open(path: &Path) -> std::io::Result<SegmentFile> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        let direct = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(d) => {
                // The path could name another file by now (a segment replaced by compaction):
                // then only the first descriptor is used.
                let d_meta = d.metadata()?;
                (d_meta.dev() == meta.dev() && d_meta.ino() == meta.ino()).then_some(d)
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::debug!(
                    "{} refuses O_DIRECT; replay reads it through the page cache",
                    path.display()
                );
                None
            }
            Err(e) => return Err(e),
        };
        Ok(SegmentFile {
            file,
            direct,
            direct_refused: AtomicBool::new(false),
            len: meta.len(),
        })
    }
}

/// `pread` that retries when interrupted.
fn pread(file: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match file.read_at(buf, offset) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

impl SegmentSource for SegmentFile {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(direct) = &self.direct {
            if io::is_direct_aligned(offset, buf) && !self.direct_refused.load(Ordering::Relaxed) {
                // A short tail comes back short, which is what `read_at` promises; the caller's
                // next read is then unaligned and goes through the page cache, finding the end.
                match pread(direct, offset, buf) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct_refused.store(true, Ordering::Relaxed);
                    }
                    other => return other,
                }
            }
        }
        pread(&self.file, offset, buf)
    }
}

/// One segment of a log: its sequence number (from its file name), where it is, its bytes.
pub struct Segment<S> {
    pub seq: u64,
    pub path: PathBuf,
    pub source: S,
}

/// Reads all of `buf` at `offset` of `seg` for the second pass (and compaction's copies).
pub(crate) fn read_exact_at<S: SegmentSource>(
    seg: &Segment<S>,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ReplayError> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        match seg.source.read_at(at, &mut buf[done..]) {
            Ok(0) => {
                return Err(ReplayError::LogChanged {
                    path: seg.path.clone(),
                    offset: at,
                    source: FormatError::Truncated {
                        record: Record::PageEntry,
                        need: buf.len(),
                        have: done,
                    },
                })
            }
            Ok(n) => done += n,
            Err(source) => {
                return Err(ReplayError::ReadSegment {
                    path: seg.path.clone(),
                    offset: at,
                    source,
                })
            }
        }
    }
    Ok(())
}
