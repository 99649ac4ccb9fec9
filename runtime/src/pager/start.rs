//! Starting the runtime: probing the kernel, opening the userfaultfds, the store, the log and
//! the areas pages move through, building the page table (pages the allocator already wrote
//! are resident, a restored image's are evicted), then [`Shared`], then the threads.
//!
//! Rules: everything the threads will need is mapped or opened here, before any thread runs,
//! so that running out of memory or address space stops the start, never a fault, a fork or
//! an epoch. The region is registered before the present pages are looked at: pages touched
//! from then on fault, so none can appear unseen.

use std::sync::Arc;

use super::buf::PageBuf;
use super::epoch::{self, snapshot::Snapshot, Durable};
use super::events::Kernel;
use super::{
    discard, evict, fault, fork, restore, PagerError, Quiesce, Residency, Runtime, Shared,
    EVICT_BATCH_PAGES_MAX, FETCH_CHUNK_PAGES, STATS,
};
use crate::cache::{Cache, CacheError, PageSet, PageState, Table};
use crate::config::{Config, LogSync};
use crate::log::image::ImageReader;
use crate::log::{LogWriter, PageIndex, RegionInfo, SyncMode, WriterOptions};
use crate::region::{self, Region};
use crate::seal::SealKey;
use crate::store::{self, DiscardQueue};
use crate::uffd::{self, Kick, PagemapScanner, Userfault};
use crate::PAGE_SIZE;

/// Features lego asks for on the heap's userfaultfd.
const HEAP_FEATURES: u64 = uffd::sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP
    | uffd::sys::UFFD_FEATURE_WP_ASYNC
    | uffd::sys::UFFD_FEATURE_WP_UNPOPULATED
    | uffd::sys::UFFD_FEATURE_EVENT_REMOVE
    | uffd::sys::UFFD_FEATURE_EVENT_UNMAP
    | uffd::sys::UFFD_FEATURE_EVENT_REMAP
    | uffd::sys::UFFD_FEATURE_THREAD_ID
    | uffd::sys::UFFD_FEATURE_POISON
    | uffd::sys::UFFD_FEATURE_MOVE;

impl Runtime {
    /// Registers `region` with a new userfaultfd, marks the pages already present as resident
    /// (the allocator may have run before the runtime started), opens the store and starts the
    /// threads. `key` is the key of `config.key_file`, loaded by the caller (which reports a
    /// bad key file as a bad setting); the pool's values are sealed under it.
    pub fn start(
        config: &Config,
        region: Region,
        restoring: Option<restore::RestoreFrom>,
        quiesce: Option<Quiesce>,
        key: Option<&SealKey>,
    ) -> Result<Runtime, PagerError> {
        assert_eq!(
            key.is_some(),
            config.key_file.is_some(),
            "the caller loads the key file the configuration names"
        );
        let (image, pool_image) = match restoring {
            Some(restore::RestoreFrom::Image(img)) => (Some(img), None),
            Some(restore::RestoreFrom::Pool(img)) => (None, Some(img)),
            None => (None, None),
        };
        if let Some(thread) = config.spawn_failure {
            crate::threads::fail_spawns_of(thread);
        }
        if let Some(stall) = config.stall_injection {
            super::epoch::snapshot::stall_copies_for(stall.ms);
        }
        let uffd = open_heap_uffd()?;
        let reports_forks = uffd.features().has(uffd::sys::UFFD_FEATURE_EVENT_FORK);
        let staging_uffd = Userfault::open(0)?;
        let batch = config.evict_batch_pages.clamp(1, EVICT_BATCH_PAGES_MAX);
        let mut eviction = evict::Eviction::new(&staging_uffd, batch)?;
        let scratch = discard::Scratch::new(&staging_uffd)?;
        let fill = fault::Fill::new()?;
        let pool_pages = match &pool_image {
            Some(img) => restore::pool_pages(img)?,
            None => Vec::new(),
        };
        let (store, mut give_back) = match &pool_image {
            // A heap restored from a pool: its pages are already there.
            Some(img) => {
                let (store, give_back) = restore::open_pool_store(config, img, &pool_pages, key)?;
                (store, Some(give_back))
            }
            None => (
                store::open(
                    &config.backend,
                    &config.pool,
                    config.heap_bytes,
                    config.fault_injection.as_ref(),
                    key,
                )?,
                None,
            ),
        };
        let scanner = PagemapScanner::open()?;
        // A pool that may keep one copy of a page, and a log that cuts epochs on its own:
        // the log is the second copy (evicted pages are in it, and read from it when the
        // pool cannot give them).
        let index = match &config.log {
            Some(log) if log.flush_ms.is_some() && store.wants_log_copy() => Some(Arc::new(
                PageIndex::new(&log.dir, region.pages() as u64).map_err(|e| {
                    PagerError::Thread {
                        name: "the log's page index".into(),
                        source: std::io::Error::other(crate::logging::error_chain(&e)),
                    }
                })?,
            )),
            _ => None,
        };
        if let Some(index) = &index {
            store.log_stands_in(Arc::clone(index) as Arc<dyn crate::store::LogCopies>);
        }
        let mut pool_checkpoint = pool_image
            .as_ref()
            .map(|img| restore::PoolCheckpoint::new(store.as_ref(), img, &pool_pages));
        let writer = open_log(
            config,
            &region,
            image.as_ref(),
            pool_checkpoint.as_mut(),
            index.clone(),
        )?;
        drop(pool_checkpoint);
        let snapshot = match &writer {
            Some(_) => Some(Snapshot::new(region.len, &staging_uffd)?),
            None => None,
        };

        let capacity = usize::try_from(config.cache_pages())
            .unwrap_or(usize::MAX)
            .max(1);
        let (high, low) = eviction.set_watermarks(capacity);

        uffd.register(region.base, region.len, true)?;
        let cache = Cache::new(region.pages(), capacity, writer.is_some())?;
        let restore = image.map(restore::Restore::new);
        {
            let mut t = cache.lock();
            mark_present_pages(&mut t, &region);
            // A restored heap: the image's pages are evicted, and read from the image when
            // touched.
            if let Some(r) = &restore {
                r.mark_image_pages(&mut t);
            }
            // Restored from a pool: the image's pages are evicted, fetched from the pool.
            if pool_image.is_some() {
                restore::mark_pool_pages(&mut t, &pool_pages);
            }
            STATS.set_resident_pages(t.resident() as u64);
        }

        let kick = Kick::new().map_err(|source| PagerError::Thread {
            name: "eventfd".into(),
            source,
        })?;
        let durable = match (config.log.clone(), snapshot) {
            (Some(settings), Some(snapshot)) => Some(Durable::new(
                settings,
                snapshot,
                quiesce,
                config
                    .fault_injection
                    .filter(|p| p.op == crate::config::FaultOp::ReadBack)
                    .map(store::FaultBudget::new),
                PageSet::new(region.pages()).map_err(|source| CacheError::Reserve {
                    pages: region.pages(),
                    source,
                })?,
                index,
            )),
            _ => None,
        };
        let shared = Arc::new(Shared {
            kernel: Kernel::new(region, uffd, staging_uffd, scanner, kick),
            cache: Residency::new(cache),
            gate: super::gate::Gate::new(),
            store,
            discards: DiscardQueue::new(),
            fill,
            evict: eviction,
            discard: scratch,
            fork: fork::ForkState::new(reports_forks)?,
            durable,
            restore,
        });

        let handlers = config.handler_threads.max(1);
        // The restored heap becomes this process's (its lease renewed from now on) before the
        // threads may write its pages to the pool; until the threads run, a failure still
        // gives it back (the guard's drop), and after that the caller may
        // ([`Runtime::give_back_restored_heap`]) while nothing ran in the heap.
        if let Some(g) = give_back.as_mut() {
            g.take_over()?;
        }
        spawn_threads(&shared, handlers, writer)?;
        if let Some(g) = give_back.as_mut() {
            g.disarm();
        }
        let features = shared.kernel.uffd.features();
        log::info!(
            "userfaultfd features {:#x}; dirty tracking: asynchronous write-protect + PAGEMAP_SCAN; eviction: UFFDIO_MOVE; {} handler threads; cache {} pages (evict above {}, down to {}); store {}",
            features.0,
            handlers,
            capacity,
            high,
            low,
            shared.store.describe()
        );
        Ok(Runtime {
            shared,
            features,
            handlers,
            restored: std::sync::Mutex::new(give_back),
        })
    }
}

/// Opens the heap's userfaultfd with the features lego uses, refusing a kernel that lacks the
/// ones it cannot do without. Fork events are asked for too (a served fork, `fork.rs`); the
/// kernel grants them only with `CAP_SYS_PTRACE`, and without them forks are paged in.
fn open_heap_uffd() -> Result<Userfault, PagerError> {
    let offered = Userfault::probe()?;
    let needed = uffd::sys::UFFD_FEATURE_WP_ASYNC
        | uffd::sys::UFFD_FEATURE_MOVE
        | uffd::sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP;
    if !offered.has(needed) {
        return Err(PagerError::KernelTooOld { offered: offered.0 });
    }
    let features = HEAP_FEATURES & offered.0;
    if offered.has(uffd::sys::UFFD_FEATURE_EVENT_FORK) {
        match Userfault::open(features | uffd::sys::UFFD_FEATURE_EVENT_FORK) {
            Ok(u) => {
                log::info!("fork: served by the child (its evicted pages stay evicted)");
                return Ok(u);
            }
            Err(e) => log::info!(
                "fork: paged in (the kernel refused fork events: {e}; they need CAP_SYS_PTRACE)"
            ),
        }
    }
    Ok(Userfault::open(features)?)
}

/// Opens the log when the heap has one (`LEGO_LOG_DIR`): a new log, or, when restoring, the
/// log resumed from the image (which it writes as a checkpoint first).
fn open_log(
    config: &Config,
    region: &Region,
    image: Option<&ImageReader>,
    pool: Option<&mut restore::PoolCheckpoint<'_>>,
    index: Option<Arc<PageIndex>>,
) -> Result<Option<LogWriter>, PagerError> {
    let Some(log) = &config.log else {
        return Ok(None);
    };
    let region_info = RegionInfo {
        base: region.base as u64,
        len: region.len as u64,
    };
    let options = WriterOptions {
        sync: match log.sync {
            LogSync::Fdatasync => SyncMode::Data,
            LogSync::None => SyncMode::None,
        },
        ..WriterOptions::default()
    };
    Ok(Some(match (image, pool) {
        (Some(img), _) => {
            LogWriter::resume_indexed(&log.dir, region_info, options, img.path(), index)?
        }
        // Restored from a pool: the checkpoint's pages are read back from it.
        (None, Some(source)) => {
            LogWriter::resume_from(&log.dir, region_info, options, source, index)?
        }
        (None, None) => {
            let mut writer = LogWriter::create(&log.dir, region_info, options)?;
            if let Some(index) = index {
                writer.set_index(index);
            }
            writer
        }
    }))
}

/// Marks the pages of `region` that are present already (the allocator ran before the
/// runtime) as resident. The cache lock is held (`t`); the region is registered.
fn mark_present_pages(t: &mut Table, region: &Region) {
    for part in written_parts(region) {
        region::for_each_present_page(region.base + part.start, part.len(), |p| {
            t.set_state(part.start / PAGE_SIZE + p, PageState::Resident);
        });
    }
}

/// Starts the fault handlers (one per CPU, pinned, when there are no more than CPUs), the
/// evictor, `lego-fork` when forks are reported and, with a log, the flusher.
pub(super) fn spawn_threads(
    shared: &Arc<Shared>,
    handlers: usize,
    writer: Option<LogWriter>,
) -> Result<(), PagerError> {
    let cpus = online_cpus();
    for i in 0..handlers {
        let sh = Arc::clone(shared);
        let fetch = PageBuf::new(FETCH_CHUNK_PAGES).map_err(|source| PagerError::Buffer {
            what: format!("fetch buffer of the fault handler lego-fault-{i}"),
            source,
        })?;
        let cpu = if handlers <= cpus {
            Some(i % cpus)
        } else {
            None
        };
        crate::threads::spawn(&format!("lego-fault-{i}"), move || {
            fault::handler_loop(&sh, cpu, fetch)
        })
        .map_err(|source| PagerError::Thread {
            name: format!("lego-fault-{i}"),
            source,
        })?;
    }
    let sh = Arc::clone(shared);
    crate::threads::spawn("lego-discard", move || {
        sh.discards.run(&*sh.store);
    })
    .map_err(|source| PagerError::Thread {
        name: "lego-discard".into(),
        source,
    })?;
    let sh = Arc::clone(shared);
    crate::threads::spawn("lego-evict", move || evict::evictor_loop(&sh)).map_err(|source| {
        PagerError::Thread {
            name: "lego-evict".into(),
            source,
        }
    })?;
    if shared.fork.reports_forks() {
        let sh = Arc::clone(shared);
        crate::threads::spawn("lego-fork", move || fork::fork_loop(&sh)).map_err(|source| {
            PagerError::Thread {
                name: "lego-fork".into(),
                source,
            }
        })?;
    }
    if let Some(writer) = writer {
        let sh = Arc::clone(shared);
        crate::threads::spawn("lego-flush", move || epoch::flusher_loop(sh, writer)).map_err(
            |source| PagerError::Thread {
                name: "lego-flush".into(),
                source,
            },
        )?;
    }
    Ok(())
}

/// The parts of `region` (byte ranges from its start) that may hold pages already: those the
/// allocator may have written when the region holds a heap, none when even its first page was
/// never touched (a region reserved for a restore), the whole region otherwise. Scanning only
/// those keeps the start of a 4 TiB heap as quick as a small one's. Call after the region is
/// registered: pages touched from then on fault, so none can appear unseen above the top read
/// here.
fn written_parts(region: &Region) -> [std::ops::Range<usize>; 2] {
    if !region::page_present(region.base) {
        return [0..0, 0..0];
    }
    // SAFETY: the region's first page is mapped and present, so reading it cannot fault.
    match unsafe { crate::heap::Heap::written_ranges(region.base as *const u8) } {
        Some(parts) => parts.map(|r| r.start.min(region.len)..r.end.min(region.len)),
        None => [0..region.len, 0..0],
    }
}

fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
