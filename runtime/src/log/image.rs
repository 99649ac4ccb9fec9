//! Reading a heap image back (the file `lego replay` writes, [`ImageHeader`] then page `i` at
//! [`ImageHeader::page_offset`]): its header, then its non-zero pages in chunks of at most
//! [`IMAGE_CHUNK_PAGES`], for the writer to stream a checkpoint from.
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
    /// end of that data. Without `SEEK_DATA` support the rest of the file is one data range.
    fn find_data(&mut self) {
        let fd = self.file.as_raw_fd();
        let from = offset_t(ImageHeader::page_offset(self.next));
        let data = match lseek(fd, from, Whence::SeekData) {
            Ok(d) => u64::try_from(d).unwrap_or(u64::MAX),
            Err(Errno::ENXIO) => {
                // No data after `from`: the rest is a hole.
                self.next = self.end;
                return;
            }
            Err(e) => {
                log::debug!(
                    "SEEK_DATA on {} failed ({e}); reading the whole image",
                    self.path.display()
                );
                self.data_end = self.end;
                return;
            }
        };
        let hole = match lseek(fd, offset_t(data), Whence::SeekHole) {
            Ok(h) => u64::try_from(h).unwrap_or(u64::MAX),
            Err(_) => u64::MAX,
        };
        let page_of = |offset: u64| offset.saturating_sub(BLOCK_BYTES_U64) / PAGE_BYTES;
        self.next = page_of(data).max(self.next).min(self.end);
        // The page the hole starts in holds data before it (unless it starts at its edge).
        self.data_end = page_of(hole.saturating_add(PAGE_BYTES - 1))
            .max(self.next + 1)
            .min(self.end);
    }
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
