//! A *pool image*: what `lego replay LOG_DIR --to memcached://...` leaves on the local disk
//! after it has stored a heap's pages in a pool, and what `LEGO_RESTORE` needs to bring the
//! heap back from that pool. It is small (24 bytes per non-zero page, not the page): the
//! epoch's image header fields, the heap id whose keys hold the pages, the pool's servers, and
//! per page its checksum, version and the servers that hold it.
//!
//! Layout (4 KiB blocks, little-endian, every block ends with the CRC32C of its first 4092
//! bytes, like the log's):
//!
//! ```text
//! block 0:  magic "LEGO-PIM", version, page size, region base and length, epoch, log id,
//!           entries, flags (program checkpoint, values sealed), replicas, heap id, servers' text length,
//!           then the servers ("HOST:PORT,HOST:PORT")
//! block k:  entries in this block, block number k, heap id, then up to
//!           ENTRIES_PER_BLOCK entries (page, holders, crc, version), pages ascending
//! ```
//!
//! Rules: the magic differs from a heap image's (`LEGO-IMG`), so neither can be taken for
//! the other; a pool image is refused whole when any block is damaged, missing, out of order
//! or of another heap, when the file's length is not what the header says, or when an entry is
//! outside the region, not after the one before, has no version or names a server the list
//! does not have. It is written under a temporary name (0600) and renamed into place once
//! durable, like a heap image. Reading is streamed: memory is one chunk of blocks.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::format::{EpochOrigin, FormatError, Record, RegionInfo, BLOCK_BYTES, CRC_OFFSET};
use crate::PAGE_SIZE;

/// What a pool image starts with (a heap image starts with `LEGO-IMG`).
pub const POOL_IMAGE_MAGIC: [u8; 8] = *b"LEGO-PIM";
/// Format version of pool images.
pub const POOL_IMAGE_VERSION: u32 = 1;
/// Bytes of one page's entry.
pub const ENTRY_BYTES: usize = 24;
/// Bytes before the entries in an entry block: count, block number, heap id.
const ENTRY_BLOCK_HEADER_BYTES: usize = 16;
/// Entries in one block.
pub const ENTRIES_PER_BLOCK: usize = (CRC_OFFSET - ENTRY_BLOCK_HEADER_BYTES) / ENTRY_BYTES;
/// Where the servers' text starts in the header block.
const SERVERS_OFFSET: usize = 80;
/// Longest servers' text a pool image holds, in bytes.
pub const SERVERS_BYTES_MAX: usize = CRC_OFFSET - SERVERS_OFFSET;
/// Most servers a pool image names (the pool's holder masks have a bit per server).
pub const SERVERS_MAX: usize = 64;
/// Blocks read (or written) at once: 1 MiB.
pub const CHUNK_BLOCKS: usize = 256;
/// The header's flag: the epoch is a program checkpoint.
const FLAG_PROGRAM: u32 = 1;
/// The header's flag: the pool's values are sealed (seeded with a key, `--key-file`).
const FLAG_SEALED: u32 = 2;

const _: () = assert!(ENTRIES_PER_BLOCK >= 128 && BLOCK_BYTES == PAGE_SIZE);
const _: () = assert!(ENTRY_BLOCK_HEADER_BYTES + ENTRIES_PER_BLOCK * ENTRY_BYTES <= CRC_OFFSET);

/// One page of a pool image: where its copies are and what they must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolPage {
    pub page: u64,
    /// The servers (a bit each, by their place in the list) that hold the copy.
    pub holders: u64,
    pub crc: u32,
    pub version: u32,
}

/// What a pool image says of the heap as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolImageHeader {
    pub region: RegionInfo,
    pub epoch: u64,
    pub log_id: u64,
    pub origin: EpochOrigin,
    /// Pages the image lists (its entries).
    pub pages: u64,
    /// The heap whose keys (`lego:HEAPID:PAGE`) hold the pages.
    pub heap_id: u64,
    /// Copies asked for when the pool was seeded.
    pub replicas: u32,
    /// The pool's servers, `HOST:PORT`, in the order the holder bits count them.
    pub servers: Vec<String>,
    /// Whether the values are sealed (`LEGO_KEY_FILE`): a restore needs the same key.
    pub sealed: bool,
}

/// Why a pool image cannot be written or read. Each names the file.
#[derive(Debug, Error)]
pub enum PoolImageError {
    #[error("{what} the pool image {path} failed")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a lego pool image (a file written by `lego replay --to memcached://...`)"
    )]
    NotPoolImage { path: PathBuf },
    #[error("the pool image {path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error("the pool image {path} has format version {found}; this lego reads version {POOL_IMAGE_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error(
        "the pool image {path} is {bytes} bytes long, but its header says {pages} pages \
         ({expected} bytes): it was cut short or changed"
    )]
    Length {
        path: PathBuf,
        bytes: u64,
        pages: u64,
        expected: u64,
    },
    #[error("{path} exists and is not a lego image; refusing to replace it (choose another -o)")]
    InTheWay { path: PathBuf },
    #[error(
        "the pool's servers do not fit the pool image {path}: {count} servers ({bytes} bytes), \
         at most {SERVERS_MAX} servers in {SERVERS_BYTES_MAX} bytes"
    )]
    TooManyServers {
        path: PathBuf,
        count: usize,
        bytes: usize,
    },
}

/// Whether `head` (a file's first bytes) starts like a pool image.
pub fn has_magic(head: &[u8]) -> bool {
    head.get(..8) == Some(&POOL_IMAGE_MAGIC[..])
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn seal(b: &mut [u8]) {
    let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
    put_u32(b, CRC_OFFSET, crc);
}

fn sealed(b: &[u8]) -> bool {
    get_u32(b, CRC_OFFSET) == crc32c::crc32c(&b[..CRC_OFFSET])
}

/// Blocks of entries for `pages` pages.
fn entry_blocks(pages: u64) -> u64 {
    pages.div_ceil(ENTRIES_PER_BLOCK as u64)
}

impl PoolImageHeader {
    /// The file's length for this header, in bytes.
    pub fn file_bytes(&self) -> u64 {
        (1 + entry_blocks(self.pages)) * BLOCK_BYTES as u64
    }

    fn servers_text(&self) -> String {
        self.servers.join(",")
    }

    fn encode(&self, path: &Path) -> Result<Vec<u8>, PoolImageError> {
        let text = self.servers_text();
        if self.servers.len() > SERVERS_MAX || text.len() > SERVERS_BYTES_MAX {
            return Err(PoolImageError::TooManyServers {
                path: path.to_path_buf(),
                count: self.servers.len(),
                bytes: text.len(),
            });
        }
        let mut b = vec![0u8; BLOCK_BYTES];
        b[0..8].copy_from_slice(&POOL_IMAGE_MAGIC);
        put_u32(&mut b, 8, POOL_IMAGE_VERSION);
        put_u32(&mut b, 12, u32::try_from(PAGE_SIZE).expect("4096 fits u32"));
        put_u64(&mut b, 16, self.region.base);
        put_u64(&mut b, 24, self.region.len);
        put_u64(&mut b, 32, self.epoch);
        put_u64(&mut b, 40, self.log_id);
        put_u64(&mut b, 48, self.pages);
        put_u32(
            &mut b,
            56,
            (if self.origin.is_program() {
                FLAG_PROGRAM
            } else {
                0
            }) | if self.sealed { FLAG_SEALED } else { 0 },
        );
        put_u32(&mut b, 60, self.replicas);
        put_u64(&mut b, 64, self.heap_id);
        put_u32(
            &mut b,
            72,
            u32::try_from(text.len()).expect("bounded by SERVERS_BYTES_MAX"),
        );
        b[SERVERS_OFFSET..SERVERS_OFFSET + text.len()].copy_from_slice(text.as_bytes());
        seal(&mut b);
        Ok(b)
    }

    /// Decodes and checks a header block; `Err` says why, for [`PoolImageError::Damaged`].
    fn decode(path: &Path, b: &[u8]) -> Result<PoolImageHeader, PoolImageError> {
        let damaged = |why: String| PoolImageError::Damaged {
            path: path.to_path_buf(),
            why,
        };
        if b.len() < BLOCK_BYTES || !has_magic(b) {
            return Err(PoolImageError::NotPoolImage {
                path: path.to_path_buf(),
            });
        }
        if !sealed(b) {
            return Err(damaged("its header block's CRC32C does not match".into()));
        }
        let version = get_u32(b, 8);
        if version != POOL_IMAGE_VERSION {
            return Err(PoolImageError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        if get_u32(b, 12) as usize != PAGE_SIZE {
            return Err(damaged(format!(
                "its page size is {}, not {PAGE_SIZE}",
                get_u32(b, 12)
            )));
        }
        let region = RegionInfo {
            base: get_u64(b, 16),
            len: get_u64(b, 24),
        };
        region
            .check(Record::ImageHeader)
            .map_err(|e: FormatError| damaged(e.to_string()))?;
        let text_len = get_u32(b, 72) as usize;
        if text_len == 0 || text_len > SERVERS_BYTES_MAX || get_u32(b, 76) != 0 {
            return Err(damaged(format!("its servers' length {text_len} is wrong")));
        }
        let text = std::str::from_utf8(&b[SERVERS_OFFSET..SERVERS_OFFSET + text_len])
            .map_err(|_| damaged("its servers are not text".into()))?;
        let servers: Vec<String> = text.split(',').map(str::to_owned).collect();
        let replicas = get_u32(b, 60);
        if servers.len() > SERVERS_MAX
            || servers.iter().any(String::is_empty)
            || replicas == 0
            || replicas as usize > servers.len()
        {
            return Err(damaged(format!(
                "its servers ({text}) or copies ({replicas}) are wrong"
            )));
        }
        let header = PoolImageHeader {
            region,
            epoch: get_u64(b, 32),
            log_id: get_u64(b, 40),
            pages: get_u64(b, 48),
            origin: EpochOrigin::from_program_flag(get_u32(b, 56) & FLAG_PROGRAM != 0),
            replicas,
            heap_id: get_u64(b, 64),
            servers,
            sealed: get_u32(b, 56) & FLAG_SEALED != 0,
        };
        if header.pages > region.pages() {
            return Err(damaged(format!(
                "it lists {} pages, more than its region's {}",
                header.pages,
                region.pages()
            )));
        }
        Ok(header)
    }
}

/// Writes a pool image at `path`: under a temporary name (0600) in the same directory, made
/// durable, then renamed into place. An existing file at `path` is replaced only if it is a
/// lego image (a pool image or a heap image). `pages` must be ascending and as many as
/// `header.pages`.
pub fn write_pool_image(
    path: &Path,
    header: &PoolImageHeader,
    pages: impl IntoIterator<Item = PoolPage>,
) -> Result<(), PoolImageError> {
    write_pool_image_then(path, header, pages, || true).map(|_| ())
}

/// [`write_pool_image`], calling `before_rename` once the temporary file is durable and
/// before it is renamed into place: `Ok(false)` when that said no (the temporary file is
/// removed, `path` untouched). A seeding seals the heap's lease there, so that a crash leaves
/// either no seeded lease or a whole pool image, but for the rename itself.
pub fn write_pool_image_then(
    path: &Path,
    header: &PoolImageHeader,
    pages: impl IntoIterator<Item = PoolPage>,
    before_rename: impl FnOnce() -> bool,
) -> Result<bool, PoolImageError> {
    check_replaceable(path)?;
    let io = |what, source| PoolImageError::Io {
        path: path.to_path_buf(),
        what,
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| io("naming", ErrorKind::InvalidInput.into()))?;
    let partial = path.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| io("creating a temporary file for", e))?;
        file.write_all(&header.encode(path)?)
            .map_err(|e| io("writing", e))?;
        let mut chunk = Vec::with_capacity(CHUNK_BLOCKS * BLOCK_BYTES);
        let mut block = vec![0u8; BLOCK_BYTES];
        let mut in_block = 0usize;
        let mut blocks = 0u64;
        let mut count = 0u64;
        let mut flush_block = |block: &mut Vec<u8>, in_block: &mut usize, chunk: &mut Vec<u8>| {
            put_u32(block, 0, u32::try_from(*in_block).expect("at most a block"));
            put_u32(block, 4, u32::try_from(blocks + 1).unwrap_or(u32::MAX));
            put_u64(block, 8, header.heap_id);
            seal(block);
            chunk.extend_from_slice(block);
            block.fill(0);
            *in_block = 0;
            blocks += 1;
        };
        for p in pages {
            let at = ENTRY_BLOCK_HEADER_BYTES + in_block * ENTRY_BYTES;
            put_u64(&mut block, at, p.page);
            put_u64(&mut block, at + 8, p.holders);
            put_u32(&mut block, at + 16, p.crc);
            put_u32(&mut block, at + 20, p.version);
            in_block += 1;
            count += 1;
            if in_block == ENTRIES_PER_BLOCK {
                flush_block(&mut block, &mut in_block, &mut chunk);
                if chunk.len() >= CHUNK_BLOCKS * BLOCK_BYTES {
                    file.write_all(&chunk).map_err(|e| io("writing", e))?;
                    chunk.clear();
                }
            }
        }
        if in_block > 0 {
            flush_block(&mut block, &mut in_block, &mut chunk);
        }
        assert_eq!(count, header.pages, "the header counts the pages written");
        file.write_all(&chunk).map_err(|e| io("writing", e))?;
        file.sync_all().map_err(|e| io("fsync of", e))?;
        if !before_rename() {
            return Ok(false);
        }
        std::fs::rename(&partial, path)
            .map(|()| true)
            .map_err(|e| io("renaming the finished", e))
    })();
    if !matches!(result, Ok(true)) {
        let _ = std::fs::remove_file(&partial);
    }
    if !result? {
        return Ok(false);
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing the directory of", e))?;
    Ok(true)
}

/// Refuses to replace anything at `path` but a regular file that starts like a lego image.
pub fn check_replaceable(path: &Path) -> Result<(), PoolImageError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(PoolImageError::Io {
                path: path.to_path_buf(),
                what: "looking at the existing",
                source,
            })
        }
    };
    let mut head = [0u8; 8];
    let is_image = meta.is_file()
        && File::open(path)
            .and_then(|f| f.read_exact_at(&mut head, 0))
            .is_ok()
        && (has_magic(&head) || super::format::ImageHeader::has_magic(&head));
    if is_image {
        Ok(())
    } else {
        Err(PoolImageError::InTheWay {
            path: path.to_path_buf(),
        })
    }
}

/// A pool image opened for reading: the header is checked at open, and every block by
/// [`PoolImage::check`] (a whole pass) or as [`PoolImage::for_each_page`] reads it.
pub struct PoolImage {
    path: PathBuf,
    file: File,
    header: PoolImageHeader,
}

impl PoolImage {
    /// Opens `path` and checks its header and length.
    pub fn open(path: &Path) -> Result<PoolImage, PoolImageError> {
        let io = |what, source| PoolImageError::Io {
            path: path.to_path_buf(),
            what,
            source,
        };
        let file = File::open(path).map_err(|e| io("opening", e))?;
        let bytes = file.metadata().map_err(|e| io("looking at", e))?.len();
        let mut block = vec![0u8; BLOCK_BYTES];
        let mut have = 0;
        while have < BLOCK_BYTES {
            match file.read_at(&mut block[have..], have as u64) {
                Ok(0) => break,
                Ok(n) => have += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io("reading", e)),
            }
        }
        let header = PoolImageHeader::decode(path, &block[..have])?;
        if bytes != header.file_bytes() {
            return Err(PoolImageError::Length {
                path: path.to_path_buf(),
                bytes,
                pages: header.pages,
                expected: header.file_bytes(),
            });
        }
        Ok(PoolImage {
            path: path.to_path_buf(),
            file,
            header,
        })
    }

    pub fn header(&self) -> &PoolImageHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads every block and checks it (without handing out pages): a pool image that passes
    /// gives every page to [`PoolImage::for_each_page`] unless the file changes meanwhile.
    pub fn check(&self) -> Result<(), PoolImageError> {
        self.for_each_page(|_| {})
    }

    /// Calls `found` with every page, in ascending order, checking each block before any of
    /// its pages is handed out.
    pub fn for_each_page(&self, mut found: impl FnMut(PoolPage)) -> Result<(), PoolImageError> {
        let h = &self.header;
        let damaged = |why: String| PoolImageError::Damaged {
            path: self.path.clone(),
            why,
        };
        let blocks = entry_blocks(h.pages);
        let servers_mask = if h.servers.len() >= 64 {
            u64::MAX
        } else {
            (1u64 << h.servers.len()) - 1
        };
        let mut buf = vec![0u8; CHUNK_BLOCKS * BLOCK_BYTES];
        let mut next_page: u64 = 0;
        let mut left = h.pages;
        let mut k = 0u64;
        while k < blocks {
            let n = (blocks - k).min(CHUNK_BLOCKS as u64) as usize;
            let bytes = &mut buf[..n * BLOCK_BYTES];
            self.file
                .read_exact_at(bytes, (1 + k) * BLOCK_BYTES as u64)
                .map_err(|source| PoolImageError::Io {
                    path: self.path.clone(),
                    what: "reading",
                    source,
                })?;
            for (j, b) in bytes.chunks(BLOCK_BYTES).enumerate() {
                let number = k + j as u64 + 1;
                let at = |why: &str| damaged(format!("block {number}: {why}"));
                if !sealed(b) {
                    return Err(at("its CRC32C does not match"));
                }
                let count = get_u32(b, 0) as usize;
                let want = left.min(ENTRIES_PER_BLOCK as u64) as usize;
                if count != want || u64::from(get_u32(b, 4)) != number || get_u64(b, 8) != h.heap_id
                {
                    return Err(at("it is not the block the header's heap has here"));
                }
                for e in 0..count {
                    let o = ENTRY_BLOCK_HEADER_BYTES + e * ENTRY_BYTES;
                    let p = PoolPage {
                        page: get_u64(b, o),
                        holders: get_u64(b, o + 8),
                        crc: get_u32(b, o + 16),
                        version: get_u32(b, o + 20),
                    };
                    if p.page < next_page
                        || p.page >= h.region.pages()
                        || p.version == 0
                        || p.holders == 0
                        || p.holders & !servers_mask != 0
                    {
                        return Err(at(&format!("its entry for page {} is wrong", p.page)));
                    }
                    next_page = p.page + 1;
                    found(p);
                }
                left -= count as u64;
            }
            k += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TestDir;

    fn header(pages: u64) -> PoolImageHeader {
        PoolImageHeader {
            region: RegionInfo {
                base: 0x2000_0000_0000,
                len: 1 << 30,
            },
            epoch: 12,
            log_id: 0xfeed,
            origin: EpochOrigin::Program,
            pages,
            heap_id: 0x0123_4567_89ab_cdef,
            replicas: 2,
            servers: vec!["127.0.0.1:11211".into(), "127.0.0.1:11212".into()],
            sealed: pages % 2 == 1,
        }
    }

    fn entries(n: u64) -> Vec<PoolPage> {
        (0..n)
            .map(|i| PoolPage {
                page: i * 3 + 1,
                holders: 1 + (i % 3),
                crc: (i as u32).wrapping_mul(0x9e37_79b9),
                version: 1,
            })
            .collect()
    }

    fn read_all(path: &Path) -> Result<(PoolImageHeader, Vec<PoolPage>), PoolImageError> {
        let img = PoolImage::open(path)?;
        let mut got = Vec::new();
        img.for_each_page(|p| got.push(p))?;
        Ok((img.header().clone(), got))
    }

    #[test]
    fn pool_images_round_trip() {
        let dir = TestDir::new("pool-image");
        for n in [0u64, 1, ENTRIES_PER_BLOCK as u64, 1000] {
            let path = dir.0.join(format!("heap-{n}.pool"));
            write_pool_image(&path, &header(n), entries(n)).expect("write");
            let (h, got) = read_all(&path).expect("read");
            assert_eq!(h, header(n));
            assert_eq!(got, entries(n));
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Replacing a pool image is allowed; replacing anything else is not.
        let path = dir.0.join("heap-1.pool");
        write_pool_image(&path, &header(2), entries(2)).expect("replace");
        let other = dir.0.join("notes.txt");
        std::fs::write(&other, b"mine").expect("write");
        let err = write_pool_image(&other, &header(1), entries(1)).expect_err("in the way");
        assert!(matches!(err, PoolImageError::InTheWay { .. }), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzz_support::config(64))]

        /// Any change of one byte of a pool image is refused (at open or when its pages are
        /// read): a pool image read back is exactly the one written, or nothing.
        #[test]
        fn fuzz_a_changed_byte_is_refused(at in 0usize..3 * 4096, bit in 0u8..8) {
            let dir = TestDir::new("pool-image-fuzz");
            let path = dir.0.join("heap.pool");
            write_pool_image(&path, &header(300), entries(300)).expect("write");
            let mut bytes = std::fs::read(&path).expect("read");
            bytes[at] ^= 1 << bit;
            std::fs::write(&path, &bytes).expect("write");
            proptest::prop_assert!(read_all(&path).is_err(), "byte {} bit {}", at, bit);
        }

        /// Arbitrary bytes never panic the reader.
        #[test]
        fn fuzz_any_bytes_are_read_or_refused(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..9000)) {
            let dir = TestDir::new("pool-image-bytes");
            let path = dir.0.join("heap.pool");
            let mut bytes = bytes;
            if bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&POOL_IMAGE_MAGIC);
            }
            std::fs::write(&path, &bytes).expect("write");
            let _ = read_all(&path);
        }
    }

    #[test]
    fn damaged_or_truncated_pool_images_are_refused() {
        let dir = TestDir::new("pool-image-bad");
        let path = dir.0.join("heap.pool");
        write_pool_image(&path, &header(400), entries(400)).expect("write");
        let good = std::fs::read(&path).expect("read");
        let bad = dir.0.join("bad.pool");
        // Every cut short is refused at open (the length is the header's).
        for len in [0, 8, 4095, 4096, 8192, good.len() - 1] {
            std::fs::write(&bad, &good[..len]).expect("write");
            assert!(read_all(&bad).is_err(), "cut at {len} bytes");
        }
        // A flipped byte anywhere is refused, at open or when read.
        for at in [0, 9, 20, 70, 100, 4096, 4100, 5000, 8191, good.len() - 1] {
            let mut b = good.clone();
            b[at] ^= 0x40;
            std::fs::write(&bad, &b).expect("write");
            assert!(read_all(&bad).is_err(), "byte {at} changed");
        }
        // Blocks swapped (each whole and sealed) are refused.
        let mut b = good.clone();
        let (one, two) = b[4096..3 * 4096].split_at_mut(4096);
        one.swap_with_slice(two);
        std::fs::write(&bad, &b).expect("write");
        let err = read_all(&bad).expect_err("swapped");
        assert!(err.to_string().contains("is damaged"), "{err}");
        // A heap image is not a pool image.
        let mut b = good.clone();
        b[..8].copy_from_slice(b"LEGO-IMG");
        std::fs::write(&bad, &b).expect("write");
        let err = read_all(&bad).expect_err("a heap image's magic");
        assert!(
            err.to_string().contains("is not a lego pool image"),
            "{err}"
        );
    }
}
