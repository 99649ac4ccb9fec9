//! Reading a heap image (as `lego replay` writes it) for `LEGO_RESTORE`: the header is checked
//! once, the pages that hold data are found from the file's extents (an image is sparse: holes
//! are zero pages and are never read), and pages are read on demand.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use thiserror::Error;

use super::format::{FormatError, ImageHeader, BLOCK_BYTES};
use crate::io::{self, ReadOp};
use crate::PAGE_SIZE;

/// Errors of opening and reading an image. Each names the file.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("cannot open the heap image {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a lego heap image (make one with `lego replay LOG_DIR -o IMAGE`)", path.display())]
    NotAnImage { path: PathBuf },
    #[error("the header of the heap image {} is damaged", path.display())]
    BadHeader {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("reading the heap image {} failed", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An open heap image.
pub struct ImageFile {
    file: File,
    path: PathBuf,
    header: ImageHeader,
}

impl ImageFile {
    /// Opens `path` and checks its header.
    pub fn open(path: &Path) -> Result<ImageFile, RestoreError> {
        let file = File::open(path).map_err(|source| RestoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let mut block = vec![0u8; BLOCK_BYTES];
        let mut op = ReadOp::new(0);
        op.push(&mut block);
        let read = io::sync::read_at(file.as_fd(), &mut [op]);
        if read.is_err() || !ImageHeader::has_magic(&block) {
            return Err(RestoreError::NotAnImage {
                path: path.to_path_buf(),
            });
        }
        let header = ImageHeader::decode(&block).map_err(|source| RestoreError::BadHeader {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            header,
        })
    }

    pub fn header(&self) -> &ImageHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Calls `found(first_page, pages)` for each run of pages the file holds data for (holes
    /// and the part past the end of the file are zero pages). The runs come from
    /// `SEEK_DATA`/`SEEK_HOLE`; a file system without them reports the whole file as data.
    pub fn for_each_data_run(&self, mut found: impl FnMut(u64, u64)) -> Result<(), RestoreError> {
        let read_err = |source: std::io::Error| RestoreError::Read {
            path: self.path.clone(),
            source,
        };
        let len = self.file.metadata().map_err(read_err)?.len();
        let first_byte = ImageHeader::page_offset(0);
        let pages_max = self.header.region.pages();
        let page_of = |byte: u64| (byte - first_byte) / PAGE_SIZE as u64;
        let mut at = first_byte;
        while at < len {
            let data = match lseek(self.file.as_raw_fd(), off(at), Whence::SeekData) {
                Ok(d) => d as u64,
                Err(Errno::ENXIO) => break,
                Err(e) => return Err(read_err(e.into())),
            };
            let hole = match lseek(self.file.as_raw_fd(), off(data), Whence::SeekHole) {
                Ok(h) => h as u64,
                Err(e) => return Err(read_err(e.into())),
            };
            let first = page_of(data.max(first_byte));
            let end = page_of(hole.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64).min(pages_max);
            if end > first {
                found(first, end - first);
            }
            at = hole.max(data + 1);
        }
        Ok(())
    }

    /// Reads pages `first..first + bufs.len()` into `bufs` (each `PAGE_SIZE` bytes).
    pub fn read_pages(&self, first: u64, bufs: &mut [&mut [u8]]) -> Result<(), RestoreError> {
        let mut op = ReadOp::new(ImageHeader::page_offset(first));
        for b in bufs.iter_mut() {
            op.push(b);
        }
        io::sync::read_at(self.file.as_fd(), &mut [op]).map_err(|e| RestoreError::Read {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })
    }
}

fn off(byte: u64) -> i64 {
    i64::try_from(byte).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::RegionInfo;
    use crate::log::test_support::{page, TestDir};
    use std::os::unix::fs::FileExt;

    #[test]
    fn data_runs_skip_holes_and_pages_read_back() {
        let dir = TestDir::new("image");
        let path = dir.0.join("heap.img");
        let header = ImageHeader {
            region: RegionInfo {
                base: 0x7e00_0000_0000,
                len: 4096 * PAGE_SIZE as u64,
            },
            epoch: 7,
            log_id: 9,
            pages: 3,
        };
        let f = File::create(&path).expect("create");
        f.write_all_at(&header.encode().0, 0).expect("header");
        for p in [2u64, 3, 1000] {
            f.write_all_at(&page(p), ImageHeader::page_offset(p))
                .expect("page");
        }
        drop(f);
        let img = ImageFile::open(&path).expect("open");
        assert_eq!(img.header().epoch, 7);
        let mut pages = Vec::new();
        img.for_each_data_run(|first, n| pages.extend(first..first + n))
            .expect("runs");
        for p in [2u64, 3, 1000] {
            assert!(pages.contains(&p), "page {p} in {pages:?}");
        }
        assert!(!pages.contains(&500), "a hole is not data: {pages:?}");
        let mut buf = vec![0u8; PAGE_SIZE];
        img.read_pages(1000, &mut [&mut buf]).expect("read");
        assert_eq!(buf, page(1000));

        std::fs::write(&path, b"not an image at all").expect("write");
        assert!(matches!(
            ImageFile::open(&path),
            Err(RestoreError::NotAnImage { .. })
        ));
    }
}
