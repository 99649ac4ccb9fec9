//! [`FileStore`]: the embedded default page store, sparse files holding the whole heap (page
//! `p` at byte offset `p * PAGE_SIZE` of each).
//!
//! Lifecycle: `open` creates a private directory `DIR/lego-PID-XXXXXX` (mode 0700, created
//! exclusively under a random name like `mkdtemp`) and in it the file `pages` (mode 0600, `O_EXCL`), sizes it with `ftruncate`
//! (sparse: untouched pages cost no disk and read back as zeros), then unlinks the file at
//! once and keeps only the descriptor. So a killed process leaves at most an empty
//! directory, which is still worth keeping while the store lives: it names the owning PID for
//! an operator, and it is what [`remove_stale`] sweeps (every `open` does so, for directories
//! of processes that no longer exist). Dropping the store removes the directory;
//! [`FileStore::cleanup_path`] gives it to a crash handler that wants to do the same.
//!
//! Fork: that file is the first of a store's *layers* ([`layers`]): a `fork` freezes the
//! layers written so far for the child, whose store object ([`PageStore::fork_child`]) reads
//! them through duplicated descriptors, read-only, and writes its own pages to layers of its
//! own (made like the first, in a private directory `DIR/lego-CHILDPID-XXXXXX` created at its
//! first write); meanwhile the parent writes to a new layer (`pages-N` in its directory) and
//! punches only copies no child can read. A byte per page names the layer holding the page's
//! current copy; with one layer (no fork ever) it is neither read nor written.
//!
//! I/O: `O_DIRECT`, so that evicted pages really leave memory instead of lingering in the page
//! cache; a filesystem that refuses it (`EINVAL`) gets buffered I/O plus
//! `posix_fadvise(DONTNEED)` after writes. Reads and writes go through io_uring (a small pool
//! of rings, so concurrent handler threads do not queue behind one lock), or through
//! `preadv`/`pwritev` when the kernel refuses io_uring. Each fallback is announced by one
//! `log::warn!` per store. Runs of consecutive pages in one layer become one I/O each
//! (vectored when their buffers are not adjacent in memory). `discard` punches a hole.

mod compact;
mod layers;

#[cfg(test)]
mod fork_tests;

pub use layers::{GENERATIONS_LIVE_MAX, LAYERS_MAX};

use std::collections::hash_map::RandomState;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, TryLockError};

use nix::errno::Errno;
use nix::fcntl::{fallocate, posix_fadvise, FallocateFlags, PosixFadviseAdvice};
use nix::sys::statfs::{fstatfs, TMPFS_MAGIC};

use super::{
    discard_range, refuse_bad_reads, refuse_bad_writes, FailureKind, Outcome, PageRead, PageStore,
    PageWrite, StoreError, StoreOp, PAGE_BYTES,
};
use crate::io::{self, IoError, ReadOp, Ring, WriteOp, RING_ENTRIES};
use crate::PAGE_SIZE;
use layers::{Layer, LayerMap, LayerSet};

/// Most io_uring rings one store keeps: enough for every handler thread plus the evictor on
/// the small machines lego targets; more concurrent callers wait for a ring.
pub const RING_POOL_SIZE_MAX: usize = 4;

/// Name of the first page file inside the private directory (unlinked right after
/// creation); layer `N > 0` is `pages-N`.
const PAGE_FILE_NAME: &str = "pages";

/// Prefix of the private directory's name; the PID and a `mkdtemp` suffix follow.
const DIR_PREFIX: &str = "lego-";

/// Length of the random suffix of the private directory's name.
const DIR_SUFFIX_LEN: usize = 6;

/// Names tried for the private directory before giving up (each collision means another
/// directory with the same random suffix already exists, which is already unlikely once).
const DIR_CREATE_ATTEMPTS_MAX: u32 = 64;

/// Most directory entries [`remove_stale`] looks at, so a huge shared directory cannot stall
/// startup.
pub const STALE_SCAN_ENTRIES_MAX: usize = 10_000;

/// Choices that are normally made by probing the machine; tests force the fallbacks with them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Use `preadv`/`pwritev` even where io_uring works.
    pub force_sync_io: bool,
    /// Open without `O_DIRECT` even where the filesystem supports it.
    pub force_buffered: bool,
}

/// The page files and how they are accessed.
pub struct FileStore {
    // `file:` and the private directory: how errors and `describe` name this store.
    name: String,
    // The directory the private directories are made in (`LEGO_BACKEND=file:DIR`).
    base: PathBuf,
    // This store's private directory, once made (at open; for a forked child's store, at its
    // first write). Only set under the layer set's lock.
    dir: OnceLock<PathBuf>,
    pages: u64,
    // Whether the first layer is accessed with `O_DIRECT` (later ones are asked to be too).
    direct: bool,
    engine: Engine,
    // Whether `discard` found that the filesystem cannot punch holes (warned once, then
    // discards are skipped: they are only an optimisation).
    punch_unsupported: AtomicBool,
    layers: LayerSet,
    // Which layer holds each page's current copy (maintained once there are two layers).
    map: LayerMap,
    // One past the highest page ever written: how much of the map a forked child copies.
    written_end: AtomicU64,
}

impl FileOptions {
    /// Every I/O mode the store can run in (tests run each).
    #[cfg(test)]
    pub(crate) const ALL_MODES: [FileOptions; 3] = [
        FileOptions {
            force_sync_io: false,
            force_buffered: false,
        },
        FileOptions {
            force_sync_io: true,
            force_buffered: false,
        },
        FileOptions {
            force_sync_io: true,
            force_buffered: true,
        },
    ];
}

/// How the bytes move.
enum Engine {
    // Boxed: the pool is a kilobyte of mutexes and rings, the other variant nothing.
    Uring(Box<RingPool>),
    Sync,
}

impl Engine {
    /// io_uring unless `force_sync` or the kernel refuses it (announced once).
    fn new(force_sync: bool) -> Engine {
        if force_sync {
            return Engine::Sync;
        }
        match Ring::new(RING_ENTRIES) {
            Ok(ring) => Engine::Uring(Box::new(RingPool::new(ring))),
            Err(e) => {
                let why = match &e {
                    IoError::Refused { source } | IoError::Setup { source, .. } => {
                        format!("{e} ({source})")
                    }
                    other => other.to_string(),
                };
                log::warn!("{why}; page file I/O falls back to pread/pwrite");
                Engine::Sync
            }
        }
    }
}

impl FileStore {
    /// Creates the page file for a heap of `heap_bytes` (rounded up to whole pages) in a new
    /// private directory inside `dir`.
    pub fn open(dir: &Path, heap_bytes: u64) -> Result<FileStore, StoreError> {
        Self::open_with(dir, heap_bytes, FileOptions::default())
    }

    /// [`FileStore::open`] with the probing choices overridden.
    pub fn open_with(
        dir: &Path,
        heap_bytes: u64,
        options: FileOptions,
    ) -> Result<FileStore, StoreError> {
        let pages = heap_bytes.div_ceil(PAGE_BYTES);
        let file_bytes = pages
            .checked_mul(PAGE_BYTES)
            .filter(|&b| b > 0 && i64::try_from(b).is_ok())
            .ok_or_else(|| StoreError::HeapSize {
                backend: format!("file:{}", dir.display()),
                heap_bytes,
            })?;

        let swept = remove_stale(dir);
        if swept > 0 {
            log::info!(
                "removed {swept} page-store directories of dead processes from {}",
                dir.display()
            );
        }
        let private = DirGuard::create(dir)?;
        let path = private.path.join(PAGE_FILE_NAME);
        let (file, direct) = create_file(&path, file_bytes, options.force_buffered)?;
        std::fs::remove_file(&path).map_err(|source| StoreError::Open {
            backend: format!("file:{}", dir.display()),
            what: format!("unlinking the page file {} after creation", path.display()),
            source: Box::new(source),
        })?;
        if let Ok(fs) = fstatfs(file.as_fd()) {
            if fs.filesystem_type() == TMPFS_MAGIC {
                log::warn!(
                    "page store directory {} is on tmpfs: evicted pages stay in RAM; \
                     point LEGO_BACKEND=file:DIR at a disk",
                    dir.display()
                );
            }
        }
        let map_len = usize::try_from(pages).map_err(|_| StoreError::HeapSize {
            backend: format!("file:{}", dir.display()),
            heap_bytes,
        })?;
        let map = LayerMap::new(map_len).map_err(|source| StoreError::Open {
            backend: format!("file:{}", dir.display()),
            what: format!("reserving the layer map of {pages} pages"),
            source: Box::new(source),
        })?;
        let engine = Engine::new(options.force_sync_io);
        let private_dir = private.keep();
        let store = FileStore {
            name: format!("file:{}", private_dir.display()),
            base: dir.to_path_buf(),
            dir: OnceLock::from(private_dir),
            pages,
            direct,
            engine,
            punch_unsupported: AtomicBool::new(false),
            layers: LayerSet::new(Layer::new(file, path, direct)),
            map,
            written_end: AtomicU64::new(0),
        };
        log::info!("page store: {}", store.describe());
        Ok(store)
    }

    /// The one filesystem entry this store leaves while it is open (its private directory,
    /// empty because the page files are already unlinked), if it has made it yet (a forked
    /// child's store makes it at its first write). A crash handler may `rmdir` it.
    pub fn cleanup_path(&self) -> Option<&Path> {
        self.dir.get().map(PathBuf::as_path)
    }

    /// Pages the file holds.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether the file is accessed with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether I/O goes through io_uring (rather than `preadv`/`pwritev`).
    pub fn uses_io_uring(&self) -> bool {
        matches!(self.engine, Engine::Uring(_))
    }

    /// Page layers (files) this store reads from: one until a fork.
    pub fn layer_count(&self) -> usize {
        self.layers.count()
    }

    /// Fork generations that still keep layers frozen.
    pub fn generations_live(&self) -> usize {
        self.layers.generations_live()
    }

    /// Makes layer `index` (a new page file in the private directory, unlinked at once),
    /// creating the directory first if this store has none yet. Called under the layer set's
    /// lock, so never twice at once.
    fn make_layer(&self, index: usize) -> Result<Layer, StoreError> {
        let dir = match self.dir.get() {
            Some(dir) => dir,
            None => {
                let made = DirGuard::create(&self.base)?.keep();
                // Under the layer set's lock nobody else sets it: the first value stays.
                let _ = self.dir.set(made);
                self.dir.get().expect("the private directory was just set")
            }
        };
        let path = dir.join(format!("{PAGE_FILE_NAME}-{index}"));
        let (file, direct) = create_file(&path, self.pages * PAGE_BYTES, !self.direct)?;
        std::fs::remove_file(&path).map_err(|source| StoreError::Open {
            backend: self.name.clone(),
            what: format!("unlinking the page file {} after creation", path.display()),
            source: Box::new(source),
        })?;
        log::debug!(
            "{}: page layer {index} made ({})",
            self.name,
            path.display()
        );
        Ok(Layer::new(file, path, direct))
    }

    /// The layer this write-back goes to (see [`layers::LayerSet::write_layer`]).
    fn write_layer(&self) -> Result<usize, StoreError> {
        self.layers
            .write_layer(&self.name, |index| self.make_layer(index))
    }

    fn io_error(&self, op: StoreOp, page: u64, kind: FailureKind, source: IoError) -> StoreError {
        StoreError::Io {
            backend: self.name.clone(),
            op,
            page,
            kind,
            source: Box::new(source),
        }
    }

    /// Reads the pages of `batches` still `Pending` from the layers holding them, runs of
    /// consecutive pages in one layer as one I/O each, all submitted on one ring (one
    /// submission per layer read from).
    fn read_pending(&self, batches: &mut [&mut [PageRead<'_>]]) -> Result<(), IoError> {
        // With one layer (no fork ever) every page is in it, and the map is not read.
        let single = self.layers.count() == 1;
        let mut ops: [Vec<ReadOp<'_>>; LAYERS_MAX] = Default::default();
        let mut prev: Option<(u64, usize)> = None;
        for r in batches.iter_mut().flat_map(|b| b.iter_mut()) {
            if r.outcome != Outcome::Pending {
                prev = None;
                continue;
            }
            let layer = if single { 0 } else { self.map.get(r.page) };
            let runs = &mut ops[layer];
            let follows = prev.is_some_and(|(p, l)| l == layer && p.checked_add(1) == Some(r.page));
            match runs.last_mut() {
                Some(op) if follows => op.push(&mut *r.buf),
                _ => {
                    let mut op = ReadOp::new(r.page * PAGE_BYTES);
                    op.push(&mut *r.buf);
                    runs.push(op);
                }
            }
            prev = Some((r.page, layer));
        }
        match &self.engine {
            Engine::Uring(pool) => {
                pool.with(|ring| self.read_layers(&mut ops, |fd, runs| ring.read_at(fd, runs)))
            }
            Engine::Sync => self.read_layers(&mut ops, io::sync::read_at),
        }
    }

    /// Runs `read_at` on the runs of each layer that has some (`ops[layer]`).
    fn read_layers<'a>(
        &self,
        ops: &mut [Vec<ReadOp<'a>>],
        mut read_at: impl FnMut(BorrowedFd<'_>, &mut [ReadOp<'a>]) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        for (layer, runs) in ops.iter_mut().enumerate() {
            if !runs.is_empty() {
                read_at(self.layers.layer(layer).file.as_fd(), runs)?;
            }
        }
        Ok(())
    }

    /// Writes the pages of `batch` still `Pending` to `layer`, runs of consecutive pages as
    /// one I/O each.
    fn write_pending(&self, batch: &mut [PageWrite<'_>], layer: &Layer) -> Result<(), IoError> {
        let mut ops: Vec<WriteOp<'_>> = Vec::new();
        let mut prev: Option<u64> = None;
        for w in batch.iter() {
            if w.outcome != Outcome::Pending {
                prev = None;
                continue;
            }
            match ops.last_mut() {
                Some(op) if prev.and_then(|p| p.checked_add(1)) == Some(w.page) => op.push(w.buf),
                _ => {
                    let mut op = WriteOp::new(w.page * PAGE_BYTES);
                    op.push(w.buf);
                    ops.push(op);
                }
            }
            prev = Some(w.page);
        }
        if ops.is_empty() {
            return Ok(());
        }
        let fd = layer.file.as_fd();
        match &self.engine {
            Engine::Uring(pool) => pool.with(|ring| ring.write_at(fd, &mut ops)),
            Engine::Sync => io::sync::write_at(fd, &mut ops),
        }
    }

    /// After a write-back to layer `write`: the map names it for every page written, and a
    /// page's older copy in another layer that no child can read is punched (its disk space
    /// back; best effort). With one layer there is nothing to record.
    fn record_writes(&self, batch: &[PageWrite<'_>], write: usize) {
        let Some(end) = batch
            .iter()
            .filter(|w| w.outcome.is_done())
            .map(|w| w.page + 1)
            .max()
        else {
            return;
        };
        self.written_end.fetch_max(end, Ordering::AcqRel);
        if self.layers.count() == 1 {
            return;
        }
        // Runs of stale copies: (layer, first page, pages).
        let mut stale: Option<(usize, u64, u64)> = None;
        for w in batch.iter().filter(|w| w.outcome.is_done()) {
            let old = self.map.get(w.page);
            if old == write {
                continue;
            }
            self.map.set(w.page, write);
            if !self.layers.layer(old).punchable() {
                continue;
            }
            match &mut stale {
                Some((layer, first, n)) if *layer == old && *first + *n == w.page => *n += 1,
                _ => {
                    if let Some((layer, first, n)) = stale.replace((old, w.page, 1)) {
                        self.punch_stale(layer, first, n);
                    }
                }
            }
        }
        if let Some((layer, first, n)) = stale {
            self.punch_stale(layer, first, n);
        }
    }

    /// Punches an older copy that a write-back made stale; only an optimisation, so a failure
    /// is only logged.
    fn punch_stale(&self, layer: usize, first: u64, count: u64) {
        if let Err(e) = self.punch(self.layers.layer(layer), first, count) {
            log::debug!("{}: punching stale copies: {e}", self.name);
        }
    }

    /// Punches pages `[first, first+count)` of `layer` (which must be punchable). A filesystem
    /// that cannot punch holes is warned about once, and punching stops.
    fn punch(&self, layer: &Layer, first: u64, count: u64) -> Result<(), StoreError> {
        debug_assert!(
            layer.punchable(),
            "a frozen or inherited layer is never punched"
        );
        if self.punch_unsupported.load(Ordering::Relaxed) {
            return Ok(());
        }
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        loop {
            match fallocate(
                layer.file.as_raw_fd(),
                flags,
                page_offset(first),
                page_offset(count),
            ) {
                Ok(()) => return Ok(()),
                // Only a signal interrupts it, and each retry is a fresh, complete attempt.
                Err(Errno::EINTR) => continue,
                Err(Errno::EOPNOTSUPP) => {
                    if !self.punch_unsupported.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "the filesystem of {} cannot punch holes; freed pages keep their \
                             disk space until exit",
                            layer.path.display()
                        );
                    }
                    return Ok(());
                }
                Err(e) => {
                    let source = std::io::Error::from(e);
                    return Err(StoreError::Io {
                        backend: self.name.clone(),
                        op: StoreOp::Discard,
                        page: first,
                        kind: FailureKind::of_errno(source.raw_os_error()),
                        source: Box::new(source),
                    });
                }
            }
        }
    }

    /// Without O_DIRECT the written pages sit in the page cache, i.e. still in RAM. One
    /// advice over the batch's span starts their writeback and drops what is already clean;
    /// it is best effort, so a failure is not the caller's problem.
    fn drop_cached(&self, batch: &[PageWrite<'_>], layer: &Layer) {
        if layer.direct {
            return;
        }
        let written = batch.iter().filter(|w| w.outcome.is_done()).map(|w| w.page);
        let (Some(low), Some(high)) = (written.clone().min(), written.max()) else {
            return;
        };
        let span = (high - low + 1).saturating_mul(PAGE_BYTES);
        let span = i64::try_from(span).expect("a span within the file fits off_t");
        if let Err(e) = posix_fadvise(
            layer.file.as_raw_fd(),
            page_offset(low),
            span,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        ) {
            log::debug!("posix_fadvise(DONTNEED) on {}: {e}", layer.path.display());
        }
    }
}

/// Byte offset of `page` as an `off_t`.
fn page_offset(page: u64) -> i64 {
    // Pages are checked against `pages`, whose byte size was checked to fit `off_t` at open.
    i64::try_from(page.saturating_mul(PAGE_BYTES)).expect("page offsets within the file fit off_t")
}

impl PageStore for FileStore {
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        self.fetch_all(&mut [batch])
    }

    /// `fetch_all` checks every page it reads against its checksum (`verify_reads`).
    fn verifies_reads(&self) -> bool {
        true
    }

    fn fetch_all(&self, batches: &mut [&mut [PageRead<'_>]]) -> Result<(), StoreError> {
        let mut first_error = refuse_bad_reads(
            &self.name,
            self.pages,
            batches.iter_mut().flat_map(|b| b.iter_mut()),
        );
        // Every batch's runs go to the kernel together; only if that fails is each page read
        // on its own, so that one bad page does not fail its neighbours.
        if let Err(batched) = self.read_pending(batches) {
            log::debug!(
                "{}: a batched read failed ({batched}); reading page by page",
                self.name
            );
            for r in batches.iter_mut().flat_map(|b| b.iter_mut()) {
                if r.outcome != Outcome::Pending {
                    continue;
                }
                if let Err(source) = self.read_pending(&mut [std::slice::from_mut(r)]) {
                    let kind = FailureKind::of_errno(source.errno());
                    r.outcome = Outcome::Failed(kind);
                    first_error
                        .get_or_insert_with(|| self.io_error(StoreOp::Fetch, r.page, kind, source));
                }
            }
        }
        for batch in batches.iter_mut() {
            if let Err(e) = super::verify_reads(&self.name, batch) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
        let mut first_error = refuse_bad_writes(&self.name, self.pages, batch);
        let Some(first_pending) = batch
            .iter()
            .find(|w| w.outcome == Outcome::Pending)
            .map(|w| w.page)
        else {
            // Nothing to write: no layer is chosen (a forked child makes none for it).
            return first_error.map_or(Ok(()), Err);
        };
        let write = match self.write_layer() {
            Ok(write) => write,
            Err(e) => {
                let e = match e {
                    StoreError::LayersFull { .. } => e,
                    // Making the layer failed: as transient or final as its errno says.
                    other => StoreError::Io {
                        backend: self.name.clone(),
                        op: StoreOp::Store,
                        page: first_pending,
                        kind: FailureKind::of_errno(other.errno()),
                        source: Box::new(other),
                    },
                };
                super::settle_writes(batch, Outcome::Failed(e.kind()));
                return Err(first_error.unwrap_or(e));
            }
        };
        let layer = self.layers.layer(write);
        layer.mark_written();
        if self.write_pending(batch, layer).is_err() {
            for i in 0..batch.len() {
                if batch[i].outcome != Outcome::Pending {
                    continue;
                }
                if let Err(source) = self.write_pending(&mut batch[i..=i], layer) {
                    let kind = FailureKind::of_errno(source.errno());
                    batch[i].outcome = Outcome::Failed(kind);
                    first_error.get_or_insert_with(|| {
                        self.io_error(StoreOp::Store, batch[i].page, kind, source)
                    });
                }
            }
        }
        super::settle_writes(batch, Outcome::Done);
        self.record_writes(batch, write);
        self.drop_cached(batch, layer);
        first_error.map_or(Ok(()), Err)
    }

    /// Punches the range in every layer no child can read; a copy in a frozen layer stays
    /// (its disk space comes back when its generation ends and the page is discarded or
    /// written again, or at exit).
    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
        if self.punch_unsupported.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some(range) = discard_range(&self.name, first, count, self.pages)? else {
            return Ok(());
        };
        let pages = range.end - range.start;
        self.layers
            .punch_each(|layer| self.punch(layer, range.start, pages))
    }

    fn at_exit(&self) {
        // The page files were unlinked at creation and stay open; only the directory is left.
        if let Some(dir) = self.dir.get() {
            remove_private_dir(dir);
        }
    }

    fn describe(&self) -> String {
        let layers = match self.layers.count() {
            1 => String::new(),
            n => format!(", {n} layers"),
        };
        format!(
            "{} ({}, {}{layers})",
            self.name,
            if self.direct { "O_DIRECT" } else { "buffered" },
            if self.uses_io_uring() {
                "io_uring"
            } else {
                "pread/pwrite"
            }
        )
    }

    fn report(&self) -> Vec<(String, String)> {
        vec![
            ("store_layers".into(), self.layers.count().to_string()),
            (
                "fork_generations_live".into(),
                self.layers.generations_live().to_string(),
            ),
        ]
    }

    /// Freezes every layer written so far (see [`layers`]), first merging the layers no child
    /// reads when the fork would otherwise need too many; false when the parent or the child
    /// would still be left without a layer to write ([`LAYERS_MAX`]).
    fn fork_freeze(&self) -> bool {
        self.layers.freeze(
            &self.name,
            |index| self.make_layer(index),
            |target, sources| self.compact(target, sources),
        )
    }

    fn fork_parent(&self, hup: Option<OwnedFd>) {
        self.layers.parent(&self.name, hup);
    }

    /// The child's store: every layer of this one inherited (read-only, through duplicated
    /// descriptors), the map copied up to the highest page ever written, rings of its own, and
    /// a private directory of its own made at its first write. Touches nothing of this
    /// object but its layers' descriptors, its map and constants (see [`layers`]).
    fn fork_child(&self) -> Result<Box<dyn PageStore>, StoreError> {
        let name = format!(
            "file:{} (forked child {})",
            self.base.display(),
            std::process::id()
        );
        let layers = self
            .layers
            .inherit()
            .map_err(|(index, source)| StoreError::Open {
                backend: name.clone(),
                what: format!(
                    "duplicating the descriptor of the parent's page layer {index} ({})",
                    self.layers.layer(index).path.display()
                ),
                source: Box::new(source),
            })?;
        let map_len = usize::try_from(self.pages).expect("the page count fitted the map at open");
        let map = LayerMap::new(map_len).map_err(|source| StoreError::Open {
            backend: name.clone(),
            what: format!("reserving the layer map of {} pages", self.pages),
            source: Box::new(source),
        })?;
        let written_end = self.written_end.load(Ordering::Acquire);
        // With one layer the map was never written: every entry names layer 0.
        if self.layers.count() > 1 {
            map.copy_from(&self.map, written_end);
        }
        let child = FileStore {
            name,
            base: self.base.clone(),
            dir: OnceLock::new(),
            pages: self.pages,
            direct: self.direct,
            engine: Engine::new(!self.uses_io_uring()),
            punch_unsupported: AtomicBool::new(self.punch_unsupported.load(Ordering::Relaxed)),
            layers,
            map,
            written_end: AtomicU64::new(written_end),
        };
        log::info!("page store of a forked child: {}", child.describe());
        Ok(Box::new(child))
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        // The page files are already unlinked; their blocks go when the descriptors close.
        if let Some(dir) = self.dir.get() {
            remove_private_dir(dir);
        }
    }
}

/// Removes a private directory, tolerating that someone (a crash handler, a sweep by another
/// process) already did.
fn remove_private_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => log::warn!("removing page store directory {}: {e}", dir.display()),
    }
}

/// Creates and sizes the page file, with `O_DIRECT` unless refused or `buffered`. Returns the
/// file and whether it is direct.
fn create_file(path: &Path, bytes: u64, buffered: bool) -> Result<(File, bool), StoreError> {
    let err = |what: &'static str| {
        move |source: std::io::Error| StoreError::Open {
            backend: format!("file:{}", path.parent().unwrap_or(path).display()),
            what: format!("preparing the page file {} ({what})", path.display()),
            source: Box::new(source),
        }
    };
    let open = |create: bool, direct: bool| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .mode(0o600)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(path)
    };
    let (file, mut direct) = if buffered {
        (open(true, false).map_err(err("creating it"))?, false)
    } else {
        match open(true, true) {
            Ok(file) => (file, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                warn_buffered(path);
                (open(true, false).map_err(err("creating it"))?, false)
            }
            Err(e) => return Err(err("creating it")(e)),
        }
    };
    file.set_len(bytes).map_err(err("sizing it"))?;
    if direct && !direct_reads_work(&file).map_err(err("probing O_DIRECT on it"))? {
        // Some filesystems accept the flag at open and refuse the I/O itself.
        warn_buffered(path);
        direct = false;
        return Ok((open(false, false).map_err(err("reopening it"))?, direct));
    }
    Ok((file, direct))
}

fn warn_buffered(path: &Path) {
    log::warn!(
        "the filesystem of {} refuses O_DIRECT; evicted pages go through the page cache \
         (dropped with posix_fadvise after writes)",
        path.display()
    );
}

/// One page-aligned page, for the O_DIRECT probe.
#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE_SIZE]);

/// Reads page 0 of a freshly sized (sparse, so all-zero) file with O_DIRECT: `Ok(false)` when
/// the filesystem refuses direct I/O with `EINVAL`.
fn direct_reads_work(file: &File) -> Result<bool, std::io::Error> {
    let mut page = Box::new(AlignedPage([0; PAGE_SIZE]));
    let mut op = ReadOp::new(0);
    op.push(&mut page.0);
    match io::sync::read_at(file.as_fd(), &mut [op]) {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(std::io::Error::other(e)),
    }
}

/// `DIR_SUFFIX_LEN` random alphanumeric characters. The randomness is std's per-process hash
/// keys (seeded from the OS), which is all a name needs: creation is exclusive anyway.
fn random_suffix(attempt: u32) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(attempt);
    let mut bits = hasher.finish();
    let alphabet_len = u64::try_from(ALPHABET.len()).expect("a short alphabet");
    (0..DIR_SUFFIX_LEN)
        .map(|_| {
            let i = usize::try_from(bits % alphabet_len).expect("an index below the alphabet");
            bits /= alphabet_len;
            char::from(ALPHABET[i])
        })
        .collect()
}

/// The error of a private directory that could not be made in `parent`.
fn create_dir_error(parent: &Path, source: std::io::Error) -> StoreError {
    StoreError::Open {
        backend: format!("file:{}", parent.display()),
        what: format!(
            "creating a private store directory in {} (LEGO_BACKEND=file:DIR must name a \
             writable directory)",
            parent.display()
        ),
        source: Box::new(source),
    }
}

/// The private directory while `open` is still running: removed again if `open` fails.
struct DirGuard {
    path: PathBuf,
    armed: bool,
}

impl DirGuard {
    /// Creates `parent/lego-PID-XXXXXX` with mode 0700, like `mkdtemp` (which allocates
    /// nothing either, but is behind a nix feature this crate does not enable).
    fn create(parent: &Path) -> Result<DirGuard, StoreError> {
        let mut last_error = None;
        for attempt in 0..DIR_CREATE_ATTEMPTS_MAX {
            let path = parent.join(format!(
                "{DIR_PREFIX}{}-{}",
                std::process::id(),
                random_suffix(attempt)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(DirGuard { path, armed: true }),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => last_error = Some(e),
                Err(source) => return Err(create_dir_error(parent, source)),
            }
        }
        Err(create_dir_error(
            parent,
            last_error.unwrap_or_else(|| ErrorKind::AlreadyExists.into()),
        ))
    }

    fn keep(mut self) -> PathBuf {
        self.armed = false;
        std::mem::take(&mut self.path)
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if self.armed {
            remove_private_dir(&self.path);
        }
    }
}

/// Removes the private directories in `dir` left by processes of this user that no longer
/// exist (killed before they could clean up). Best effort: returns how many it removed.
pub fn remove_stale(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    // SAFETY: geteuid has no preconditions, touches no memory of ours and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut removed = 0;
    for entry in entries.take(STALE_SCAN_ENTRIES_MAX).flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(stale_dir_pid) else {
            continue;
        };
        // symlink_metadata: a symlink named like ours is never followed, let alone removed.
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != me || pid_alive(pid) {
            continue;
        }
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The PID in a name of the form `lego-PID-XXXXXX`, if the name has that form.
fn stale_dir_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(DIR_PREFIX)?;
    let (pid, suffix) = rest.split_once('-')?;
    if suffix.len() != DIR_SUFFIX_LEN || !suffix.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|&pid| pid > 0)
}

/// Whether a process with this PID exists (signal 0 probes without sending anything). A
/// process of another user (`EPERM`) counts as alive.
fn pid_alive(pid: i32) -> bool {
    if u32::try_from(pid).is_ok_and(|pid| pid == std::process::id()) {
        return true;
    }
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(Errno::ESRCH)
    )
}

/// Up to [`RING_POOL_SIZE_MAX`] rings, created on demand when every existing one is busy.
struct RingPool {
    // Filled in order: slot k is only created by a caller that found slots 0..k all built.
    slots: [OnceLock<Mutex<Ring>>; RING_POOL_SIZE_MAX],
    // Round-robin choice of the ring to wait for when all are busy.
    next: AtomicUsize,
    // Set once creating another ring failed; from then on the pool stops growing.
    full: AtomicBool,
}

impl RingPool {
    fn new(first: Ring) -> RingPool {
        let pool = RingPool {
            slots: std::array::from_fn(|_| OnceLock::new()),
            next: AtomicUsize::new(0),
            full: AtomicBool::new(false),
        };
        // A fresh OnceLock accepts its first value.
        let _ = pool.slots[0].set(Mutex::new(first));
        pool
    }

    /// Runs `f` on a ring no other thread is using: a free one, a new one, or (when the pool
    /// is at its size limit) the next one in turn once it is free.
    fn with<R>(&self, f: impl FnOnce(&mut Ring) -> R) -> R {
        let mut built = 0;
        for slot in &self.slots {
            let ring = match slot.get() {
                Some(ring) => ring,
                None => {
                    if self.full.load(Ordering::Relaxed) {
                        break;
                    }
                    match Ring::new(RING_ENTRIES) {
                        // Losing a race to another creator is fine: its ring is as good.
                        Ok(ring) => slot.get_or_init(|| Mutex::new(ring)),
                        Err(e) => {
                            log::debug!("not growing the io_uring pool: {e}");
                            self.full.store(true, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            };
            built += 1;
            match ring.try_lock() {
                Ok(mut guard) => return f(&mut guard),
                // A panic never leaves a ring mid-call with I/O in flight (the ring waits for
                // every completion before returning), so a poisoned ring is still sound.
                Err(TryLockError::Poisoned(poisoned)) => return f(&mut poisoned.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed) % built.max(1);
        let ring = self.slots[index]
            .get()
            .expect("slot 0 is filled at creation and slots fill in order");
        let mut guard = ring.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::test_support::{fill, pages};
    use std::os::unix::fs::PermissionsExt;

    /// A directory of its own for each test, so stale sweeps and listings do not interfere
    /// (the fork tests use it too).
    pub(super) struct TestDir(pub(super) PathBuf);

    impl TestDir {
        pub(super) fn new(name: &str) -> TestDir {
            let path =
                std::env::temp_dir().join(format!("lego-store-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir(&path).expect("creating the test directory");
            TestDir(path)
        }

        pub(super) fn entries(&self) -> usize {
            std::fs::read_dir(&self.0)
                .expect("listing the test directory")
                .count()
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const HEAP_PAGES: u64 = 16_384;

    fn open(dir: &TestDir, options: FileOptions) -> FileStore {
        FileStore::open_with(&dir.0, HEAP_PAGES * PAGE_BYTES, options).expect("opening the store")
    }

    /// The round trips, discards and refusals of every mode are in the conformance suite
    /// (`store/conformance.rs`); here, that each mode is the one asked for.
    #[test]
    fn modes_are_the_ones_asked_for() {
        let dir = TestDir::new("round-trip");
        for options in FileOptions::ALL_MODES {
            let store = open(&dir, options);
            assert_eq!(store.uses_io_uring(), !options.force_sync_io);
            assert_eq!(store.is_direct(), !options.force_buffered);
        }
    }

    #[test]
    fn consecutive_pages_with_scattered_buffers_use_vectored_io() {
        let dir = TestDir::new("vectored");
        for options in FileOptions::ALL_MODES {
            let store = open(&dir, options);
            let mut src = pages(8);
            for (i, p) in src.iter_mut().enumerate() {
                fill(&mut p.0, 1000 + i as u64);
            }
            // Pages 10..14 from every other buffer: one file run, four memory segments.
            let mut writes: Vec<PageWrite<'_>> = (0..4)
                .map(|i| PageWrite::new(10 + i, &src[2 * i as usize].0, 1))
                .collect();
            store.store(&mut writes).expect("storing");
            let crcs: Vec<u32> = writes.iter().map(|w| w.crc).collect();
            let mut dst = pages(4);
            let mut reads: Vec<PageRead<'_>> = dst
                .iter_mut()
                .enumerate()
                .map(|(i, p)| PageRead::new(10 + i as u64, &mut p.0, crcs[i], 1))
                .collect();
            // Reverse the buffers' order so the read is vectored too.
            let n = reads.len();
            for i in 0..n / 2 {
                let (a, b) = reads.split_at_mut(n - 1 - i);
                std::mem::swap(&mut a[i].buf, &mut b[0].buf);
            }
            store.fetch(&mut reads).expect("fetching");
            drop(reads);
            for i in 0..4 {
                assert!(dst[3 - i].0 == src[2 * i].0, "page {} differs", 10 + i);
            }
        }
    }

    #[test]
    fn modes_o_direct_and_cleanup() {
        let dir = TestDir::new("modes");
        let store = open(&dir, FileOptions::default());
        let private = store
            .cleanup_path()
            .expect("an opened store has its directory")
            .to_path_buf();
        assert!(private.starts_with(&dir.0));
        let dir_mode = std::fs::metadata(&private)
            .expect("the private directory exists while the store is open")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let file_meta = store
            .layers
            .layer(0)
            .file
            .metadata()
            .expect("fstat of the page file");
        assert_eq!(file_meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            file_meta.nlink(),
            0,
            "the page file is unlinked after opening"
        );
        assert_eq!(file_meta.len(), HEAP_PAGES * PAGE_BYTES);
        assert_eq!(
            std::fs::read_dir(&private)
                .expect("listing the private directory")
                .count(),
            0
        );
        // /tmp on this machine is a disk filesystem: O_DIRECT must really be in effect.
        let flags = nix::fcntl::fcntl(
            store.layers.layer(0).file.as_raw_fd(),
            nix::fcntl::FcntlArg::F_GETFL,
        )
        .expect("F_GETFL on the page file");
        assert_ne!(flags & libc::O_DIRECT, 0, "the page file must be O_DIRECT");
        assert!(store.describe().contains("O_DIRECT, io_uring"));
        drop(store);
        assert_eq!(dir.entries(), 0, "nothing may be left after drop");

        let buffered = open(
            &dir,
            FileOptions {
                force_sync_io: true,
                force_buffered: true,
            },
        );
        let flags = nix::fcntl::fcntl(
            buffered.layers.layer(0).file.as_raw_fd(),
            nix::fcntl::FcntlArg::F_GETFL,
        )
        .expect("F_GETFL on the page file");
        assert_eq!(flags & libc::O_DIRECT, 0);
        assert!(buffered.describe().contains("buffered, pread/pwrite"));
        drop(buffered);
        assert_eq!(dir.entries(), 0, "nothing may be left after drop");
    }

    #[test]
    fn heap_sizes_round_up_and_zero_is_refused() {
        let dir = TestDir::new("sizes");
        let store = FileStore::open(&dir.0, 3 * PAGE_BYTES + 1).expect("opening");
        assert_eq!(store.pages(), 4);
        drop(store);
        assert!(matches!(
            FileStore::open(&dir.0, 0),
            Err(StoreError::HeapSize { heap_bytes: 0, .. })
        ));
        assert!(matches!(
            FileStore::open(&dir.0, u64::MAX),
            Err(StoreError::HeapSize { .. })
        ));
        assert_eq!(dir.entries(), 0, "a failed open leaves nothing behind");
        assert!(matches!(
            FileStore::open(&dir.0.join("missing"), PAGE_BYTES),
            Err(StoreError::Open { .. })
        ));
    }

    #[test]
    fn stale_directories_of_dead_processes_are_swept() {
        let dir = TestDir::new("stale");
        // A PID above the kernel's maximum (2^22) can never be alive.
        let dead = dir.0.join("lego-4194400-abc123");
        std::fs::create_dir(&dead).expect("creating a fake stale directory");
        std::fs::write(dead.join(PAGE_FILE_NAME), b"left over").expect("writing a leftover");
        let alive = dir.0.join(format!("lego-{}-xyz789", std::process::id()));
        std::fs::create_dir(&alive).expect("creating a live-looking directory");
        let unrelated = dir.0.join("lego-4194400-not-ours");
        std::fs::create_dir(&unrelated).expect("creating an unrelated directory");
        assert_eq!(remove_stale(&dir.0), 1);
        assert!(!dead.exists());
        assert!(alive.exists());
        assert!(unrelated.exists());
    }

    #[test]
    fn stale_names_parse() {
        assert_eq!(stale_dir_pid("lego-123-a1B2c3"), Some(123));
        assert_eq!(stale_dir_pid("lego-123-a1B2c"), None);
        assert_eq!(stale_dir_pid("lego--a1B2c3"), None);
        assert_eq!(stale_dir_pid("lego-0-a1B2c3"), None);
        assert_eq!(stale_dir_pid("lego-x1-a1B2c3"), None);
        assert_eq!(stale_dir_pid("other-1-a1B2c3"), None);
    }
}
