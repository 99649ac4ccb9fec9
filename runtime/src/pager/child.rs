//! A served fork's child runtime ([`Runtime::start_child`]): started in the child's atfork
//! handler, with the child's userfaultfd from the parent (`handover.rs`). It is a runtime like
//! the parent's over the table the child inherited, which is the parent's at the fork: resident
//! pages are shared copy-on-write with the parent, evicted ones are read from the store's copies
//! frozen for the child (`PageStore::fork_child`), and the child's own write-backs go to a store
//! of its own. Its cache counts against its own `LEGO_CACHE_SIZE` (from its environment,
//! which it inherited).
//!
//! Rules: nothing the parent's threads use is touched: not the inherited userfaultfds (the heap's
//! is the parent's context), not the rings or sockets of the inherited store, not the inherited
//! locks but the table's, which the parent held across the fork. The child has no log and no
//! restore image (such forks are paged in). The generation pipe's write end lives as long as
//! the child: when it and every process that inherited it are gone, the parent's store lets the
//! copies go.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::events::Kernel;
use super::start::spawn_threads;
use super::{
    discard, evict, fault, fork, PagerError, Residency, Runtime, Shared, EVICT_BATCH_PAGES_MAX,
    STATS,
};
use crate::config::Config;
use crate::region::Region;
use crate::store::DiscardQueue;
use crate::uffd::{Kick, PagemapScanner, Userfault};

impl Runtime {
    /// In a served fork's child (one thread): starts the child's runtime over the inherited
    /// table, serving `uffd` (the child's userfaultfd); `installed` are the pages the parent put
    /// into the child before now; `generation` is the write end of the fork's generation pipe,
    /// held for the child's life.
    pub(super) fn start_child(
        &self,
        config: &Config,
        uffd: OwnedFd,
        installed: &[u64],
        generation: OwnedFd,
    ) -> Result<Runtime, PagerError> {
        let parent = &self.shared;
        let uffd = Userfault::adopt(uffd, self.features);
        let staging_uffd = Userfault::open(0)?;
        let batch = config.evict_batch_pages.clamp(1, EVICT_BATCH_PAGES_MAX);
        let mut eviction = evict::Eviction::new(&staging_uffd, batch)?;
        let scratch = discard::Scratch::new(&staging_uffd)?;
        let fill = fault::Fill::new()?;
        let store = parent.store.fork_child()?;
        let scanner = PagemapScanner::open()?;
        let capacity = usize::try_from(config.cache_pages())
            .unwrap_or(usize::MAX)
            .max(1);
        eviction.set_watermarks(capacity);
        // SAFETY: this is the child with one thread; the parent's forking thread held the
        // table's lock across the fork and the child released it; the inherited runtime is
        // never used or dropped in the child again (the preload library replaces it).
        let cache = unsafe { parent.cache.cache.inherit(capacity, installed) };
        STATS.set_resident_pages(cache.lock().resident() as u64);
        let kick = Kick::new().map_err(|source| PagerError::Thread {
            name: "eventfd".into(),
            source,
        })?;
        let region = Region {
            base: parent.kernel.region.base,
            len: parent.kernel.region.len,
        };
        let events = uffd
            .features()
            .has(crate::uffd::sys::UFFD_FEATURE_EVENT_FORK);
        let shared = Arc::new(Shared {
            kernel: Kernel::new(region, uffd, staging_uffd, scanner, kick),
            cache: Residency::new(cache),
            gate: super::gate::Gate::new(),
            store,
            discards: DiscardQueue::new(),
            fill,
            evict: eviction,
            discard: scratch,
            fork: fork::ForkState::new(events)?,
            durable: None,
            restore: None,
        });
        let handlers = config.handler_threads.max(1);
        spawn_threads(&shared, handlers, None)?;
        // The write end goes with the process: closed by its exit or its exec.
        std::mem::forget(generation);
        shared.cache.want_eviction_all();
        log::info!(
            "forked child {}: its own runtime serves its heap ({} pages resident, cache {} pages)",
            std::process::id(),
            shared.cache.lock().resident(),
            capacity
        );
        Ok(Runtime {
            features: self.features,
            handlers,
            shared,
            restored: std::sync::Mutex::new(None),
        })
    }
}
