//! [`PageIndex`]: where the newest record of each page is in the log, so that a page whose
//! other copies are gone (a pool server that died) can be read back from the log while the
//! program runs: the log is the copy of last resort.
//!
//! The writer records every page it appends and every zero record once the bytes are in the
//! file (an append may still be in flight when it returns: entries are published after the
//! flush or sync that follows, at the latest the one before the commit record; never before,
//! or a read through the index could find less than the page); a page read through the index is checked against the checksum its reader
//! expects, so an entry that went stale (a segment removed with its generation) only makes the
//! read fail, never serve other bytes.
//!
//! Memory: one `u64` and one `u32` per heap page, in arrays committed only where written (see
//! `cache::array`), behind a lock never held across I/O.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::cache::array::ZeroArray;
use crate::log::format::segment_file_name;
use crate::region::RegionError;
use crate::PAGE_SIZE;

/// An entry's flag: the page's newest record is a zero record.
const ZERO_FLAG: u64 = 1 << 63;
/// Bits of an entry that hold the byte offset (the rest, below the flag, the segment).
const OFFSET_BITS: u32 = 40;
/// Segment files kept open for reads.
const OPEN_SEGMENTS_MAX: usize = 16;

/// Where a page's newest record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Located {
    /// Never logged.
    Nowhere,
    /// Its newest record says it is all zeros.
    Zero,
    /// Its payload is at `offset` of segment `seq`, with this checksum.
    At { seq: u64, offset: u64, crc: u32 },
}

struct Entries {
    /// `(seq << OFFSET_BITS | offset)`, or [`ZERO_FLAG`]; 0: never logged.
    loc: ZeroArray<u64>,
    crc: ZeroArray<u32>,
}

/// The newest record of each page of a heap's log.
pub struct PageIndex {
    dir: PathBuf,
    entries: Mutex<Entries>,
    files: Mutex<HashMap<u64, File>>,
}

/// Why a page could not be read from the log.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("reserving the log's page index failed")]
    Reserve(#[source] RegionError),
    #[error("the log has no record of the page")]
    NotLogged,
    #[error("the log's newest record of the page has other content (checksum {found:#010x}, expected {expected:#010x})")]
    Other { found: u32, expected: u32 },
    #[error("the bytes the index names for the page ({name} at byte {offset}) do not match the record's checksum (found {found:#010x}, expected {expected:#010x})")]
    Damaged {
        name: String,
        offset: u64,
        found: u32,
        expected: u32,
    },
    #[error("reading the page from the log segment {name} failed")]
    Read {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

impl PageIndex {
    /// An empty index for a heap of `pages` pages whose log is in `dir`.
    pub fn new(dir: &Path, pages: u64) -> Result<PageIndex, IndexError> {
        let len = usize::try_from(pages).expect("the heap's pages fit in usize");
        Ok(PageIndex {
            dir: dir.to_path_buf(),
            entries: Mutex::new(Entries {
                loc: ZeroArray::new(len).map_err(IndexError::Reserve)?,
                crc: ZeroArray::new(len).map_err(IndexError::Reserve)?,
            }),
            files: Mutex::new(HashMap::new()),
        })
    }

    fn entries(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The page's payload is at `offset` of segment `seq` now.
    pub fn record(&self, page: u64, seq: u64, offset: u64, crc: u32) {
        assert!(offset < 1 << OFFSET_BITS && seq < 1 << (63 - OFFSET_BITS));
        let mut e = self.entries();
        let i = page as usize;
        e.loc[i] = seq << OFFSET_BITS | offset;
        e.crc[i] = crc;
    }

    /// The page's newest record is a zero record.
    pub fn record_zero(&self, page: u64) {
        let mut e = self.entries();
        let i = page as usize;
        e.loc[i] = ZERO_FLAG;
        e.crc[i] = 0;
    }

    pub fn locate(&self, page: u64) -> Located {
        let e = self.entries();
        let i = page as usize;
        match e.loc[i] {
            0 => Located::Nowhere,
            ZERO_FLAG => Located::Zero,
            loc => Located::At {
                seq: loc >> OFFSET_BITS,
                offset: loc & ((1 << OFFSET_BITS) - 1),
                crc: e.crc[i],
            },
        }
    }

    /// Whether the newest record of `page` holds the content whose checksum is `crc`.
    pub fn holds(&self, page: u64, crc: u32) -> bool {
        matches!(self.locate(page), Located::At { crc: logged, .. } if logged == crc)
    }

    /// Reads `page` from its newest record into `buf` (a page), if that record holds the
    /// content whose checksum is `crc`.
    pub fn read(&self, page: u64, crc: u32, buf: &mut [u8]) -> Result<(), IndexError> {
        assert_eq!(buf.len(), PAGE_SIZE);
        match self.locate(page) {
            Located::Nowhere => Err(IndexError::NotLogged),
            Located::Zero => {
                buf.fill(0);
                mismatch(buf, crc).map_or(Ok(()), |found| {
                    Err(IndexError::Other {
                        found,
                        expected: crc,
                    })
                })
            }
            Located::At {
                seq,
                offset,
                crc: logged,
            } => {
                if logged != crc {
                    return Err(IndexError::Other {
                        found: logged,
                        expected: crc,
                    });
                }
                let name = segment_file_name(seq);
                let read = self.with_file(seq, &name, |f| f.read_exact_at(buf, offset));
                read.map_err(|source| IndexError::Read {
                    name: name.clone(),
                    source,
                })?;
                mismatch(buf, crc).map_or(Ok(()), |found| {
                    Err(IndexError::Damaged {
                        name,
                        offset,
                        found,
                        expected: crc,
                    })
                })
            }
        }
    }

    /// Runs `f` on segment `seq`'s file, opened read-only once and kept among a few.
    fn with_file(
        &self,
        seq: u64,
        name: &str,
        f: impl FnOnce(&File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if !files.contains_key(&seq) {
            if files.len() >= OPEN_SEGMENTS_MAX {
                files.clear();
            }
            files.insert(seq, File::open(self.dir.join(name))?);
        }
        f(&files[&seq])
    }
}

/// The checksum `buf` has, if it is not `crc`.
fn mismatch(buf: &[u8], crc: u32) -> Option<u32> {
    let found = crc32c::crc32c(buf);
    (found != crc).then_some(found)
}

impl crate::store::LogCopies for PageIndex {
    fn holds(&self, page: u64, crc: u32) -> bool {
        PageIndex::holds(self, page, crc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TestDir;

    #[test]
    fn a_recorded_page_reads_back_only_with_its_checksum() {
        let dir = TestDir::new("index");
        let page = vec![7u8; PAGE_SIZE];
        let mut file = vec![0u8; 3 * PAGE_SIZE];
        file[PAGE_SIZE..2 * PAGE_SIZE].copy_from_slice(&page);
        std::fs::write(dir.path().join(segment_file_name(3)), &file).expect("a segment");
        let index = PageIndex::new(dir.path(), 100).expect("an index");
        let crc = crc32c::crc32c(&page);
        let mut buf = vec![0u8; PAGE_SIZE];
        assert!(matches!(
            index.read(5, crc, &mut buf),
            Err(IndexError::NotLogged)
        ));
        index.record(5, 3, PAGE_SIZE as u64, crc);
        index.read(5, crc, &mut buf).expect("read back");
        assert_eq!(buf, page);
        assert!(matches!(
            index.read(5, crc ^ 1, &mut buf),
            Err(IndexError::Other { .. })
        ));
        index.record_zero(5);
        let zero_crc = crc32c::crc32c(&[0u8; PAGE_SIZE]);
        index.read(5, zero_crc, &mut buf).expect("zeros");
        assert!(buf.iter().all(|&b| b == 0));
        // A record whose segment is gone only fails.
        index.record(6, 9, 0, crc);
        assert!(matches!(
            index.read(6, crc, &mut buf),
            Err(IndexError::Read { .. })
        ));
    }
}
