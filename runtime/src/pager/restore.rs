//! The pager's side of `LEGO_RESTORE`: a heap started from an image that `lego replay`
//! wrote. At start every data page of the image is marked `Evicted` + `IMAGE` (its content
//! is in the image and nowhere else, with no checksum in the table: replay checked the log's
//! when it wrote the image); a fault on such a page reads it from the image (`fetch.rs`
//! asks [`read_image_pages`] for the runs of `IMAGE` pages it fetches). Once installed, or
//! discarded, a page loses `IMAGE` and lives as any other.
//!
//! The rest of the restore path lives elsewhere: the image format and reader are
//! `log/image.rs`, writing it is `log/replay.rs`, reserving the region at the image's address
//! and opening the heap in it is the preload library's `lego_init`, and a log resumed from
//! the image is `LogWriter::resume` (called by `start.rs`).
//!
//! A *pool image* (`lego replay --to memcached://...`, `log/pool_image.rs`) restores a heap
//! whose pages are in a pool: [`open_restore`] tells the two kinds apart by their magic and
//! refuses, before `main`, a pool image with another `LEGO_BACKEND` than the servers it
//! names. [`open_pool_store`] opens the pool under the
//! image's heap id and adopts its copies, and [`mark_pool_pages`] marks each of its pages
//! `Evicted` + `STORED` with the checksum and version the image gives: they are then fetched
//! and checked like any evicted page, and one that no server can give is `SIGBUS`, never other
//! bytes. With `LEGO_LOG_DIR` the log is resumed as from a heap image, its first checkpoint
//! read back from the pool at start ([`PoolCheckpoint`], every page checked).
//!
//! Rules: pages are marked only at start, before any thread runs and before the heap is
//! opened (its header faults in from the image); the image is only read after that, from any
//! handler thread at once.

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use crate::cache::{PageState, Table, IMAGE};
use crate::config::{vars, BackendSpec, Config};
use crate::io::AlignedBuf;
use crate::log::format::{EpochPage, ImageHeader, RegionInfo};
use crate::log::image::{ImageError, ImageReader, IMAGE_CHUNK_PAGES};
use crate::log::pool_image::{self, PoolImage, PoolImageError, PoolPage};
use crate::log::{CheckpointSource, LogError};
use crate::seal::SealKey;
use crate::store::pool::records::Copy;
use crate::store::pool::PoolStore;
use crate::store::{self, FailureKind, FaultyStore, Outcome, PageRead, PageStore};
use crate::PAGE_SIZE;

use super::PagerError;

/// What `LEGO_RESTORE` names: a heap image, or a pool image.
pub enum RestoreFrom {
    Image(ImageReader),
    Pool(PoolImage),
}

impl RestoreFrom {
    /// The region the heap had (and must have again).
    pub fn region(&self) -> RegionInfo {
        match self {
            RestoreFrom::Image(img) => img.header().region,
            RestoreFrom::Pool(img) => img.header().region,
        }
    }
}

/// Why `LEGO_RESTORE` cannot be used; each message names the variables involved.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    PoolImage(#[from] PoolImageError),
    #[error(
        "{restore}={path} is a pool image of heap {heap_id:016x} on memcached://{servers}, but \
         {backend}={given}: set {backend}=memcached://{servers} (the same servers, in the same \
         order), or restore a heap image (lego replay LOG_DIR -o IMAGE) instead"
    )]
    OtherBackend {
        restore: &'static str,
        backend: &'static str,
        path: String,
        heap_id: u64,
        servers: String,
        given: String,
    },
    #[error(
        "{restore}={path} is a pool image of heap {heap_id:016x} whose values are sealed, but \
         {key_file} is not set: set {key_file} to the key file it was seeded with \
         (lego replay --key-file)"
    )]
    SealedNeedsKey {
        restore: &'static str,
        key_file: &'static str,
        path: String,
        heap_id: u64,
    },
    #[error(
        "{restore}={path} is a pool image of heap {heap_id:016x} whose values are not sealed, \
         but {key_file} is set: unset {key_file} to restore it, or seed the pool again with \
         lego replay --to ... --key-file FILE"
    )]
    NotSealed {
        restore: &'static str,
        key_file: &'static str,
        path: String,
        heap_id: u64,
    },
}

impl RestoreError {
    /// Whether the error is in the settings (`LEGO_BACKEND`, `LEGO_KEY_FILE` do not fit the
    /// image) rather than in the image.
    pub fn is_setting(&self) -> bool {
        matches!(
            self,
            RestoreError::OtherBackend { .. }
                | RestoreError::SealedNeedsKey { .. }
                | RestoreError::NotSealed { .. }
        )
    }
}

/// Opens what `path` (`LEGO_RESTORE`) names and checks that it can be restored with `config`
/// (before `main`): a heap image, or a pool image whose servers are `LEGO_BACKEND`'s and
/// every block of which is sound.
pub fn open_restore(config: &Config, path: &Path) -> Result<RestoreFrom, RestoreError> {
    let mut head = [0u8; 8];
    let is_pool = std::fs::File::open(path)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0))
        .is_ok()
        && pool_image::has_magic(&head);
    if !is_pool {
        return Ok(RestoreFrom::Image(ImageReader::open(path)?));
    }
    let img = PoolImage::open(path)?;
    let h = img.header();
    let matches =
        matches!(&config.backend, BackendSpec::Memcached { servers } if *servers == h.servers);
    if !matches {
        return Err(RestoreError::OtherBackend {
            restore: vars::RESTORE,
            backend: vars::BACKEND,
            path: path.display().to_string(),
            heap_id: h.heap_id,
            servers: h.servers.join(","),
            given: config.backend.to_string(),
        });
    }
    match (h.sealed, config.key_file.is_some()) {
        (true, false) => {
            return Err(RestoreError::SealedNeedsKey {
                restore: vars::RESTORE,
                key_file: vars::KEY_FILE,
                path: path.display().to_string(),
                heap_id: h.heap_id,
            })
        }
        (false, true) => {
            return Err(RestoreError::NotSealed {
                restore: vars::RESTORE,
                key_file: vars::KEY_FILE,
                path: path.display().to_string(),
                heap_id: h.heap_id,
            })
        }
        _ => {}
    }
    img.check()?;
    Ok(RestoreFrom::Pool(img))
}

/// The pages a pool image lists, read once at start (24 bytes each: the adoption, the page
/// table and a resumed log's checkpoint all go through them).
pub(super) fn pool_pages(img: &PoolImage) -> Result<Vec<PoolPage>, PagerError> {
    let mut pages = Vec::with_capacity(usize::try_from(img.header().pages).unwrap_or(0));
    img.for_each_page(|p| pages.push(p))?;
    Ok(pages)
}

/// The store of a heap restored from a pool image: the pool under the image's heap id, its
/// seeded lease claimed, the image's copies adopted (and the fault injector over it, if
/// asked), and the guard that gives the heap back (a seeded lease again) if the start fails:
/// [`store::RestoredPool::take_over`] once the start is through.
pub(super) fn open_pool_store(
    config: &Config,
    img: &PoolImage,
    pages: &[PoolPage],
    key: Option<&SealKey>,
) -> Result<(Box<dyn PageStore>, store::RestoredPool), PagerError> {
    let h = img.header();
    let restored =
        store::open_restored_pool(&h.servers, &config.pool, h.region.len, h.heap_id, key)?;
    let pool = Arc::clone(restored.pool());
    let adopted = pool.adopt(pages.iter().map(|p| {
        (
            p.page,
            Copy {
                crc: p.crc,
                version: p.version,
                holders: p.holders,
            },
        )
    }))?;
    log::info!(
        "restoring {adopted} pages of epoch {} from the pool {} (heap {:016x}, {})",
        h.epoch,
        pool.describe(),
        h.heap_id,
        img.path().display()
    );
    let store: Box<dyn PageStore> = Box::new(SharedPool(pool));
    let store = match &config.fault_injection {
        Some(plan) => Box::new(FaultyStore::new(store, *plan)),
        None => store,
    };
    Ok((store, restored))
}

/// A pool shared between the pager (as its store) and the [`store::RestoredPool`] guard.
struct SharedPool(Arc<PoolStore>);

impl PageStore for SharedPool {
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), store::StoreError> {
        self.0.fetch(batch)
    }

    fn fetch_all(&self, batches: &mut [&mut [PageRead<'_>]]) -> Result<(), store::StoreError> {
        self.0.fetch_all(batches)
    }

    fn store(&self, batch: &mut [store::PageWrite<'_>]) -> Result<(), store::StoreError> {
        self.0.store(batch)
    }

    fn discard(&self, first: u64, count: u64) -> Result<(), store::StoreError> {
        self.0.discard(first, count)
    }

    fn describe(&self) -> String {
        self.0.describe()
    }

    fn at_exit(&self) {
        self.0.at_exit();
    }

    fn wants_log_copy(&self) -> bool {
        self.0.wants_log_copy()
    }

    fn log_copy_now(&self) -> bool {
        self.0.log_copy_now()
    }

    fn log_stands_in(&self, log: std::sync::Arc<dyn crate::store::LogCopies>) {
        self.0.log_stands_in(log)
    }

    fn verifies_reads(&self) -> bool {
        self.0.verifies_reads()
    }

    fn report(&self) -> Vec<(String, String)> {
        self.0.report()
    }
}

/// Marks the pool image's pages that are still `Absent` as `Evicted` with their stored copy's
/// checksum and version: fetched from the pool when touched. The cache lock is held (`t`).
pub(super) fn mark_pool_pages(t: &mut Table, pages: &[PoolPage]) {
    for p in pages {
        let i = usize::try_from(p.page).expect("checked against the region");
        if i < t.pages() && t.state(i) == PageState::Absent {
            t.set_state(i, PageState::Evicted);
            t.set_stored(i, p.crc, p.version);
            t.note_used(i);
        }
    }
}

/// Tries of a page read for a resumed log's checkpoint (a transient failure or a copy that
/// fails its checksum is read again; the pool fails over to another copy itself).
const CHECKPOINT_READ_ATTEMPTS_MAX: u32 = 3;
/// Wait before the next try, times the try's number, in milliseconds.
const CHECKPOINT_READ_RETRY_MS: u64 = 50;

/// A resumed log's first checkpoint when the heap is restored from a pool (`LEGO_RESTORE` of
/// a pool image with `LEGO_LOG_DIR`): the pool image's pages, read back from the pool at
/// start, each checked against the checksum and version the image gives. A page no copy can
/// give stops the start (the log is left as it was): never a checkpoint of another heap.
pub(super) struct PoolCheckpoint<'a> {
    store: &'a dyn PageStore,
    path: &'a Path,
    header: ImageHeader,
    pages: &'a [PoolPage],
    next: usize,
    buf: AlignedBuf,
}

impl<'a> PoolCheckpoint<'a> {
    pub(super) fn new(
        store: &'a dyn PageStore,
        img: &'a PoolImage,
        pages: &'a [PoolPage],
    ) -> PoolCheckpoint<'a> {
        let h = img.header();
        PoolCheckpoint {
            store,
            path: img.path(),
            header: ImageHeader {
                region: h.region,
                epoch: h.epoch,
                log_id: h.log_id,
                pages: h.pages,
                origin: h.origin,
            },
            pages,
            next: 0,
            buf: AlignedBuf::new(IMAGE_CHUNK_PAGES * PAGE_SIZE),
        }
    }

    fn failed(&self, page: u64, attempts: u32, why: String) -> LogError {
        LogError::PoolCheckpoint {
            image: self.path.to_path_buf(),
            page,
            attempts,
            why,
        }
    }
}

impl CheckpointSource for PoolCheckpoint<'_> {
    fn header(&self) -> ImageHeader {
        self.header
    }

    fn path(&self) -> &Path {
        self.path
    }

    fn next_chunk(&mut self) -> Result<Option<Vec<EpochPage<'_>>>, LogError> {
        let chunk = &self.pages[self.next..(self.next + IMAGE_CHUNK_PAGES).min(self.pages.len())];
        if chunk.is_empty() {
            return Ok(None);
        }
        self.next += chunk.len();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut reads: Vec<PageRead<'_>> = self
                .buf
                .as_mut_slice()
                .chunks_mut(PAGE_SIZE)
                .zip(chunk)
                .map(|(buf, p)| PageRead::new(p.page, buf, p.crc, p.version))
                .collect();
            let result = self.store.fetch(&mut reads);
            let bad = reads
                .iter()
                .find(|r| !r.outcome.is_done() || crc32c::crc32c(r.buf) != r.crc)
                .map(|r| (r.page, r.outcome));
            drop(reads);
            match bad {
                None => break,
                Some((page, outcome)) => {
                    let retry = attempt < CHECKPOINT_READ_ATTEMPTS_MAX
                        && outcome != Outcome::Failed(FailureKind::Lost)
                        && outcome != Outcome::Failed(FailureKind::Refused);
                    if !retry {
                        let why = match result {
                            Err(e) => crate::logging::error_chain(&e),
                            Ok(()) => format!("page {page} does not match its checksum"),
                        };
                        return Err(self.failed(page, attempt, why));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(
                        CHECKPOINT_READ_RETRY_MS * u64::from(attempt),
                    ));
                }
            }
        }
        let data = self.buf.as_mut_slice();
        Ok(Some(
            data.chunks(PAGE_SIZE)
                .zip(chunk)
                .map(|(d, p)| EpochPage {
                    page: p.page,
                    data: Some(d),
                })
                .collect(),
        ))
    }
}

/// The image being restored.
pub(super) struct Restore {
    image: ImageReader,
}

impl Restore {
    pub(super) fn new(image: ImageReader) -> Restore {
        Restore { image }
    }

    /// Marks the image's data runs (`SEEK_DATA`/`SEEK_HOLE`) that are still `Absent` as
    /// `Evicted` + `IMAGE`: they are read from the image when touched. The log already has
    /// them (a resumed log starts with the image). The cache lock is held (`t`).
    pub(super) fn mark_image_pages(&self, t: &mut Table) {
        let img = &self.image;
        let mut count = 0u64;
        img.for_each_data_run(|first, n| {
            for p in first..first + n {
                let p = p as usize;
                if t.state(p) == PageState::Absent {
                    t.set_state(p, PageState::Evicted);
                    t.set_flag(p, IMAGE, true);
                    t.note_used(p);
                    count += 1;
                }
            }
        });
        log::info!(
            "restoring {count} pages of epoch {} from {}",
            img.header().epoch,
            img.path().display()
        );
    }
}

/// Reads pages `first..first + bufs.len()`, all marked `IMAGE`, from the restore image.
pub(super) fn read_image_pages(
    restore: Option<&Restore>,
    first: usize,
    bufs: &mut [&mut [u8]],
) -> Result<(), String> {
    let Some(r) = restore else {
        return Err("the page is marked as in the restore image, but none is open".into());
    };
    r.image
        .read_pages(first as u64, bufs)
        .map_err(|e| crate::logging::error_chain(&e))
}
