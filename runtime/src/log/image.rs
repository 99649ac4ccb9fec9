//! Reading a heap image back (the file `lego replay` writes, [`ImageHeader`] then page `i` at
//! [`ImageHeader::page_offset`]): its header, then its non-zero pages in chunks of at most
//! [`IMAGE_CHUNK_PAGES`], for the writer to stream a checkpoint from; or, for `LEGO_RESTORE`,
//! its data runs once and single pages on demand.
//!
//! Rules: the image is only read. Holes are skipped with `SEEK_DATA`/`SEEK_HOLE` (a file
//! system without them reads as all data), and all-zero pages inside data are skipped too, so
//! a sparse image of a huge region costs what its pages cost. Memory is one chunk, whatever
//! the image's size. An image has no per-page checksum; what can be checked is: the header
//! (magic, version, CRC), the file's length (a whole number of pages, none past the region)
//! and, at the end, that the non-zero pages found are as many as the header says (a
//! truncated or changed image is refused, not checkpointed).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use thiserror::Error;

use super::format::{
    EpochPage, FormatError, ImageHeader, BLOCK_BYTES, BLOCK_BYTES_U64, PAGE_BYTES,
};
use crate::PAGE_SIZE;

/// Most pages read from an image at once (and handed to the writer in one chunk): 1 MiB.
pub const IMAGE_CHUNK_PAGES: usize = 256;

const _: () = assert!(IMAGE_CHUNK_PAGES > 0 && IMAGE_CHUNK_PAGES * PAGE_SIZE <= 4 << 20);

/// Why an image cannot be read. Each names the image file.
#[derive(Debug, Error)]
pub enum ImageError {
    #[error("{what} the heap image {path} failed")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a lego heap image (a file written by `lego replay`)")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error(
        "the heap image {path} is {bytes} bytes long; an image is a 4096-byte header followed \
         by whole 4096-byte pages (was it cut short?)"
    )]
    Length { path: PathBuf, bytes: u64 },
    #[error(
        "the heap image {path} is {bytes} bytes long, which reaches past its region of \
         {pages} pages"
    )]
    PastRegion {
        path: PathBuf,
        bytes: u64,
        pages: u64,
    },
    #[error(
        "the heap image {path} holds {found} non-zero pages but its header says {header}: \
         the image is incomplete or was changed"
    )]
    PageCount {
        path: PathBuf,
        header: u64,
        found: u64,
    },
}

/// A heap image opened for reading its pages in order, one chunk at a time.
pub struct ImageReader {
    path: PathBuf,
    file: File,
    header: ImageHeader,
    /// Pages the file holds (its length after the header, in pages).
    end: u64,
    /// The next page to read, and the end of the data range it is in.
    next: u64,
    data_end: u64,
    buf: Vec<u8>,
    /// Non-zero pages handed out so far.
    found: u64,
}

impl ImageReader {
    /// Opens `path` and checks its header and length.
    pub fn open(path: &Path) -> Result<ImageReader, ImageError> {
        let io_err = |what, source| ImageError::Io {
            path: path.to_path_buf(),
            what,
            source,
        };
        let file = File::open(path).map_err(|e| io_err("opening", e))?;
        let bytes = file.metadata().map_err(|e| io_err("looking at", e))?.len();
        let mut block = vec![0u8; BLOCK_BYTES];
        let have = read_full_at(&file, &mut block, 0).map_err(|e| io_err("reading", e))?;
        let header = ImageHeader::decode(&block[..have]).map_err(|source| ImageError::Format {
            path: path.to_path_buf(),
            source,
        })?;
        if bytes < BLOCK_BYTES_U64 || !(bytes - BLOCK_BYTES_U64).is_multiple_of(PAGE_BYTES) {
            return Err(ImageError::Length {
                path: path.to_path_buf(),
                bytes,
            });
        }
        let end = (bytes - BLOCK_BYTES_U64) / PAGE_BYTES;
        if end > header.region.pages() {
            return Err(ImageError::PastRegion {
                path: path.to_path_buf(),
                bytes,
                pages: header.region.pages(),
            });
        }
        Ok(ImageReader {
            path: path.to_path_buf(),
            file,
            header,
            end,
            next: 0,
            data_end: 0,
            buf: Vec::new(),
            found: 0,
        })
    }

    pub fn header(&self) -> &ImageHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The non-zero pages of the next chunk that has any, in ascending order, or `None` once
    /// the image is read (after checking the header's page count against what was found).
    pub fn next_chunk(&mut self) -> Result<Option<Vec<EpochPage<'_>>>, ImageError> {
        loop {
            if self.next >= self.end {
                if self.found != self.header.pages {
                    return Err(ImageError::PageCount {
                        path: self.path.clone(),
                        header: self.header.pages,
                        found: self.found,
                    });
                }
                return Ok(None);
            }
            if self.next >= self.data_end {
                self.find_data();
                continue;
            }
            let n = (self.data_end - self.next).min(IMAGE_CHUNK_PAGES as u64);
            let len = usize::try_from(n).expect("at most IMAGE_CHUNK_PAGES") * PAGE_SIZE;
            self.buf.resize(IMAGE_CHUNK_PAGES * PAGE_SIZE, 0);
            let first = self.next;
            let offset = ImageHeader::page_offset(first);
            let have =
                read_full_at(&self.file, &mut self.buf[..len], offset).map_err(|source| {
                    ImageError::Io {
                        path: self.path.clone(),
                        what: "reading",
                        source,
                    }
                })?;
            if have < len {
                // The file shrank since it was opened.
                return Err(ImageError::Length {
                    path: self.path.clone(),
                    bytes: offset + have as u64,
                });
            }
            self.next += n;
            let nonzero = self.buf[..len]
                .chunks(PAGE_SIZE)
                .filter(|p| p.iter().any(|&b| b != 0))
                .count();
            if nonzero == 0 {
                continue;
            }
            self.found += nonzero as u64;
            let pages = self.buf[..len]
                .chunks(PAGE_SIZE)
                .zip(first..)
                .filter(|(p, _)| p.iter().any(|&b| b != 0))
                .map(|(p, page)| EpochPage {
                    page,
                    data: Some(p),
                })
                .collect();
            return Ok(Some(pages));
        }
    }

    /// Moves `next` to the first page at or after it that holds data, and `data_end` to the
    /// end of that data.
    fn find_data(&mut self) {
        match data_range(&self.file, &self.path, self.next, self.end) {
            Some((first, end)) => {
                self.next = first.max(self.next);
                self.data_end = end;
            }
            None => self.next = self.end,
        }
    }

    /// Calls `found(first_page, pages)` for each run of pages the file holds data for (holes
    /// and the part past the end of the file are zero pages): what `LEGO_RESTORE` serves from
    /// the image.
    pub fn for_each_data_run(&self, mut found: impl FnMut(u64, u64)) {
        let mut next = 0;
        while let Some((first, end)) = data_range(&self.file, &self.path, next, self.end) {
            if end > first {
                found(first, end - first);
            }
            next = end.max(first + 1);
        }
    }

    /// Reads pages `first..first + bufs.len()` (each `PAGE_SIZE` bytes) into `bufs`, in any
    /// order and from any thread: `LEGO_RESTORE`'s faults. Pages past the end of the file are
    /// zeros.
    pub fn read_pages(&self, first: u64, bufs: &mut [&mut [u8]]) -> Result<(), ImageError> {
        for (page, buf) in (first..).zip(bufs.iter_mut()) {
            let have = read_full_at(&self.file, buf, ImageHeader::page_offset(page)).map_err(
                |source| ImageError::Io {
                    path: self.path.clone(),
                    what: "reading",
                    source,
                },
            )?;
            buf[have..].fill(0);
        }
        Ok(())
    }
}

/// The first run of data pages at or after page `from` (before `end`): `(first, end)`, from
/// `SEEK_DATA`/`SEEK_HOLE`; `None` when only holes follow. Without `SEEK_DATA` support the
/// rest of the file is one data range.
fn data_range(file: &File, path: &Path, from: u64, end: u64) -> Option<(u64, u64)> {
    if from >= end {
        return None;
    }
    let fd = file.as_raw_fd();
    let data = match lseek(
        fd,
        offset_t(ImageHeader::page_offset(from)),
        Whence::SeekData,
    ) {
        Ok(d) => u64::try_from(d).unwrap_or(u64::MAX),
        // No data after `from`: the rest is a hole.
        Err(Errno::ENXIO) => return None,
        Err(e) => {
            log::debug!(
                "SEEK_DATA on {} failed ({e}); reading the whole image",
                path.display()
            );
            return Some((from, end));
        }
    };
    let hole = match lseek(fd, offset_t(data), Whence::SeekHole) {
        Ok(h) => u64::try_from(h).unwrap_or(u64::MAX),
        Err(_) => u64::MAX,
    };
    let page_of = |offset: u64| offset.saturating_sub(BLOCK_BYTES_U64) / PAGE_BYTES;
    let first = page_of(data).max(from).min(end);
    if first >= end {
        return None;
    }
    // The page the hole starts in holds data before it (unless it starts at its edge).
    let last = page_of(hole.saturating_add(PAGE_BYTES - 1))
        .max(first + 1)
        .min(end);
    Some((first, last))
}

/// A file offset for `lseek` (image offsets come from a file's length, far below 2^63).
fn offset_t(offset: u64) -> libc::off_t {
    libc::off_t::try_from(offset).unwrap_or(libc::off_t::MAX)
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::RegionInfo;
    use crate::log::test_support::page;
    use crate::test_support::TestDir;

    /// What `LEGO_RESTORE` asks of an image: its data runs (holes skipped) and single pages.
    #[test]
    fn data_runs_skip_holes_and_pages_read_back() {
        let dir = TestDir::new("image-restore");
        let path = dir.0.join("heap.img");
        let header = ImageHeader {
            region: RegionInfo {
                base: 0x7e00_0000_0000,
                len: 4096 * PAGE_BYTES,
            },
            epoch: 7,
            log_id: 9,
            pages: 3,
            origin: crate::log::EpochOrigin::Automatic,
        };
        let f = File::create(&path).expect("create");
        f.write_all_at(&header.encode().0, 0).expect("header");
        for p in [2u64, 3, 1000] {
            f.write_all_at(&page(p), ImageHeader::page_offset(p))
                .expect("page");
        }
        drop(f);
        let img = ImageReader::open(&path).expect("open");
        assert_eq!(img.header().epoch, 7);
        let mut pages = Vec::new();
        img.for_each_data_run(|first, n| pages.extend(first..first + n));
        for p in [2u64, 3, 1000] {
            assert!(pages.contains(&p), "page {p} in {pages:?}");
        }
        assert!(!pages.contains(&500), "a hole is not data: {pages:?}");
        let mut a = vec![1u8; PAGE_SIZE];
        let mut b = vec![1u8; PAGE_SIZE];
        img.read_pages(1000, &mut [&mut a, &mut b]).expect("read");
        assert_eq!(a, page(1000));
        assert!(
            b.iter().all(|&x| x == 0),
            "past the end of the file reads as zeros"
        );

        std::fs::write(&path, vec![7u8; 8192]).expect("write");
        let err = ImageReader::open(&path).err().expect("not an image");
        assert!(
            err.to_string().contains("is not a lego heap image"),
            "{err}"
        );
    }
}
