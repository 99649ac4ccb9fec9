//! The layers of a [`super::FileStore`] and the fork generations that freeze them.
//!
//! A *layer* is one page file (unlinked right after creation; page `p` at offset
//! `p * PAGE_SIZE`). A store starts with one; a per-page byte, the [`LayerMap`], names the
//! layer that holds each page's current copy (all zero at first: layer 0). Layers are only
//! ever added, never closed or reordered, so a reader can use a layer it found without a lock.
//!
//! A *generation* is what a `fork` leaves behind: the child's memory (this store object, its
//! map) is a copy of the parent's at the fork, so every copy the map named then must stay as
//! it was for as long as the child (or a descendant) may read it. [`LayerSet::freeze`] freezes
//! every layer written so far (a count per layer: several generations may be live); the
//! parent's writes then go to the *write layer*, the lowest layer neither frozen nor
//! inherited, made on demand. The generation ends when the read end of its pipe reports
//! `POLLHUP` (every write end, which only the child and its descendants hold, is closed: the
//! child exited, was killed or `exec`'d): the live generations are polled with a zero timeout
//! whenever the write layer is chosen while one is live, and at each discard. No thread of its
//! own. A store made for a child ([`LayerSet::inherit`]) holds the parent's layers through
//! duplicated descriptors, *inherited*: read-only for ever (never written, never punched).
//! Layers are never removed, but a fork that would need more than [`LAYERS_MAX`] first merges
//! the layers no child reads into the lowest of them (`compact.rs`), which leaves the others
//! empty and free to write again.
//!
//! Rules: a frozen or inherited layer is never written or punched; deciding that a layer may
//! be punched and punching it happen under the set's lock, which freezing takes too, so a
//! discard in flight on another thread cannot punch a copy a fork has just frozen. Freezing
//! and ending a fork (`freeze`, `parent`) run while no fetch or store is in flight (the pager's
//! gate is closed); a store may therefore read the frozen counts without the lock (they only
//! go down under it meanwhile, which at worst leaves a copy unpunched). The map must stay a
//! private anonymous mapping, copied on write by `fork` (no `MADV_DONTFORK`/`WIPEONFORK`).
//! A child must never lock or use anything of the inherited set but its files and its map:
//! another thread of the parent may have held the lock at the fork.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use super::super::StoreError;
use crate::region::{Region, RegionError};

/// Most layers (page files) one store holds, inherited ones included. A fork is refused
/// ([`LayerSet::freeze`] returns false: the pager then pages the child in) when it would leave
/// the parent or the child without a layer to write.
pub const LAYERS_MAX: usize = 8;

/// Most fork generations live at once in one store (each holds one pipe descriptor, polled at
/// every write-back while it lives); a fork past it is refused like one past [`LAYERS_MAX`].
pub const GENERATIONS_LIVE_MAX: usize = 256;

// A generation's layers are a bit mask, and map entries are bytes.
const _: () = assert!(LAYERS_MAX <= u8::BITS as usize);

/// The write-layer cache's value while there is none (a child before its first write).
const NO_LAYER: usize = usize::MAX;

/// A bit mask of layer indices.
pub(super) type LayerMask = u8;

/// One byte per page, zero at first, reserved for every page of the store and committed by
/// the kernel a page (4096 entries) at a time where it is first written. Every access is
/// atomic: stores on several threads set entries of different pages at once.
pub(super) struct LayerMap {
    region: Region,
    len: usize,
}

// SAFETY: the map owns its mapping exclusively and every access to it goes through atomics.
unsafe impl Send for LayerMap {}
// SAFETY: as above: shared access only ever loads and stores atomically.
unsafe impl Sync for LayerMap {}

impl LayerMap {
    /// Reserves a map of `len` entries, all naming layer 0.
    pub(super) fn new(len: usize) -> Result<LayerMap, RegionError> {
        // A zero-length mapping is refused by mmap; reserve one page for an empty map.
        let region = Region::reserve(len.max(1), None)?;
        Ok(LayerMap { region, len })
    }

    fn entries(&self) -> &[AtomicU8] {
        // SAFETY: the mapping is readable and writable for `len` bytes, zero-initialised (a
        // valid `AtomicU8`), owned by `self` and unmapped only when `self` drops; `AtomicU8`
        // has the size and alignment of `u8`; no non-atomic reference into it is ever made.
        unsafe { std::slice::from_raw_parts(self.region.base as *const AtomicU8, self.len) }
    }

    fn index(page: u64) -> usize {
        usize::try_from(page).expect("pages are checked against the store's size, which fits")
    }

    /// The layer holding `page`'s current copy.
    pub(super) fn get(&self, page: u64) -> usize {
        // Acquire: pairs with `set`, so a reader that sees the entry also sees the layer it
        // names (made before the write that set it).
        usize::from(self.entries()[Self::index(page)].load(Ordering::Acquire))
    }

    /// Records that `layer` holds `page`'s current copy.
    pub(super) fn set(&self, page: u64, layer: usize) {
        let layer = u8::try_from(layer).expect("layer indices are below LAYERS_MAX");
        self.entries()[Self::index(page)].store(layer, Ordering::Release);
    }

    /// Copies the entries of pages `[0, pages)` from `other` (a child's map from the one it
    /// inherited). Entries naming layer 0 are left alone, so the parts of the map that only
    /// ever named it cost the child no memory.
    pub(super) fn copy_from(&self, other: &LayerMap, pages: u64) {
        let n = Self::index(pages).min(self.len).min(other.len);
        for (to, from) in self.entries()[..n].iter().zip(&other.entries()[..n]) {
            let layer = from.load(Ordering::Relaxed);
            if layer != 0 {
                to.store(layer, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for LayerMap {
    fn drop(&mut self) {
        // SAFETY: the mapping was created for this map alone and no reference into it
        // outlives `self`. A failure only leaks address space.
        let _ = unsafe { crate::region::sys_munmap(self.region.base, self.region.len) };
    }
}

/// One page file of the store.
pub(super) struct Layer {
    pub(super) file: File,
    /// The name it had in its private directory before it was unlinked (for messages).
    pub(super) path: PathBuf,
    /// Whether it is accessed with `O_DIRECT`.
    pub(super) direct: bool,
    /// Inherited from the parent process: read-only for ever.
    inherited: bool,
    /// Set before the first write to it: a layer never written holds nothing to keep.
    written: AtomicBool,
    /// The generations (live or pending) that froze it.
    frozen: AtomicU32,
}

impl Layer {
    /// A new layer of this store's own.
    pub(super) fn new(file: File, path: PathBuf, direct: bool) -> Layer {
        Layer {
            file,
            path,
            direct,
            inherited: false,
            written: AtomicBool::new(false),
            frozen: AtomicU32::new(0),
        }
    }

    /// Marks the layer as holding pages (before the write that puts them there).
    pub(super) fn mark_written(&self) {
        if !self.written.load(Ordering::Relaxed) {
            self.written.store(true, Ordering::Release);
        }
    }

    fn was_written(&self) -> bool {
        self.written.load(Ordering::Acquire)
    }

    /// Marks the layer as holding nothing any more (its pages were moved and punched).
    fn mark_empty(&self) {
        self.written.store(false, Ordering::Release);
    }

    /// Whether copies in it may be overwritten or punched: it is neither frozen nor inherited.
    pub(super) fn punchable(&self) -> bool {
        !self.inherited && self.frozen.load(Ordering::Acquire) == 0
    }
}

/// A fork's generation: the layers it froze and the read end of its pipe.
struct Generation {
    layers: LayerMask,
    hup: OwnedFd,
    // Whether the warning about an invalid descriptor was given.
    warned: bool,
}

/// What [`LayerSet::freeze`] would do (see [`LayerSet::plan_freeze`]).
struct FreezePlan {
    frozen: LayerMask,
    write_after: Option<usize>,
    count_after: usize,
}

/// What changes only under the set's lock.
struct Generations {
    /// Frozen by `freeze`, waiting for `parent` to say whether the fork happened.
    pending: Option<LayerMask>,
    live: Vec<Generation>,
}

/// The layers of one store and its generations.
pub(super) struct LayerSet {
    // Filled in order under `state`'s lock; slots `[0, count)` are set.
    slots: [OnceLock<Layer>; LAYERS_MAX],
    count: AtomicUsize,
    // The write layer as last chosen (under the lock), or `NO_LAYER`.
    write: AtomicUsize,
    // `state.live.len()`, readable without the lock: while it is 0 a store needs no poll.
    live: AtomicUsize,
    state: Mutex<Generations>,
}

impl LayerSet {
    /// A set of one layer, the store's first.
    pub(super) fn new(first: Layer) -> LayerSet {
        let set = LayerSet::empty();
        set.push(first);
        set.choose_write();
        set
    }

    fn empty() -> LayerSet {
        LayerSet {
            slots: std::array::from_fn(|_| OnceLock::new()),
            count: AtomicUsize::new(0),
            write: AtomicUsize::new(NO_LAYER),
            live: AtomicUsize::new(0),
            state: Mutex::new(Generations {
                pending: None,
                live: Vec::new(),
            }),
        }
    }

    /// The set a forked child's store starts with: every layer of this one, inherited (its
    /// descriptor duplicated), and no write layer yet. Takes no lock (see the module docs).
    /// On failure, the index of the layer that could not be duplicated.
    pub(super) fn inherit(&self) -> Result<LayerSet, (usize, std::io::Error)> {
        let set = LayerSet::empty();
        for index in 0..self.count() {
            let from = self.layer(index);
            let file = from.file.try_clone().map_err(|e| (index, e))?;
            set.push(Layer {
                file,
                path: from.path.clone(),
                direct: from.direct,
                inherited: true,
                written: AtomicBool::new(from.was_written()),
                frozen: AtomicU32::new(0),
            });
        }
        Ok(set)
    }

    /// Layers made so far.
    pub(super) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Layer `index`, which must exist (the map names only layers already made).
    pub(super) fn layer(&self, index: usize) -> &Layer {
        self.slots[index]
            .get()
            .expect("a layer index comes from the map or the count, which name made layers")
    }

    /// Live generations.
    pub(super) fn generations_live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, Generations> {
        // Nothing under the lock leaves the state half-changed when it panics.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a layer; under the lock, or before the set is shared.
    fn push(&self, layer: Layer) {
        let index = self.count.load(Ordering::Relaxed);
        assert!(
            index < LAYERS_MAX && self.slots[index].set(layer).is_ok(),
            "layers are added in order, under the lock, below LAYERS_MAX"
        );
        // Release: whoever sees the new count sees the layer.
        self.count.store(index + 1, Ordering::Release);
    }

    /// Recomputes the write layer: the lowest layer neither frozen nor inherited.
    fn choose_write(&self) {
        let write = (0..self.count())
            .find(|&i| self.layer(i).punchable())
            .unwrap_or(NO_LAYER);
        self.write.store(write, Ordering::Release);
    }

    /// The layer a store writes to now, made with `make` (given its index) when there is
    /// none. While a generation lives, the generations are polled first.
    pub(super) fn write_layer(
        &self,
        backend: &str,
        make: impl FnOnce(usize) -> Result<Layer, StoreError>,
    ) -> Result<usize, StoreError> {
        if self.generations_live() == 0 {
            let write = self.write.load(Ordering::Acquire);
            if write != NO_LAYER {
                return Ok(write);
            }
        }
        let mut state = self.lock();
        self.reap(&mut state);
        let write = self.write.load(Ordering::Acquire);
        if write != NO_LAYER {
            return Ok(write);
        }
        let index = self.count();
        if index >= LAYERS_MAX {
            return Err(StoreError::LayersFull {
                backend: backend.to_string(),
                layers: LAYERS_MAX,
            });
        }
        self.push(make(index)?);
        self.choose_write();
        Ok(index)
    }

    /// Calls `punch` on every layer whose copies may be dropped (written, neither frozen nor
    /// inherited), all under the lock, after polling the generations; returns the first
    /// error, having tried every layer.
    pub(super) fn punch_each(
        &self,
        mut punch: impl FnMut(&Layer) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        self.reap(&mut state);
        let mut first_error = None;
        for index in 0..self.count() {
            let layer = self.layer(index);
            if layer.punchable() && layer.was_written() {
                if let Err(e) = punch(layer) {
                    first_error.get_or_insert(e);
                }
            }
        }
        drop(state);
        first_error.map_or(Ok(()), Err)
    }

    /// Before a fork: freezes every layer written so far as the pending generation, and makes
    /// sure a layer is left to write afterwards (made with `make` if need be) while the child
    /// could still make one of its own. When that would take more than [`LAYERS_MAX`] layers,
    /// the layers no child reads (written, neither frozen nor inherited) are first merged into
    /// the lowest of them: `compact(target, sources)` moves every page the map places in
    /// `sources` to `target` and punches the sources, which are then empty (so forks that
    /// follow one another, each child gone before the next fork, never run out of layers).
    /// False, with no content changed, when it cannot be done.
    pub(super) fn freeze(
        &self,
        backend: &str,
        make: impl FnOnce(usize) -> Result<Layer, StoreError>,
        compact: impl FnOnce(usize, LayerMask) -> Result<(), StoreError>,
    ) -> bool {
        let mut state = self.lock();
        self.reap(&mut state);
        if state.pending.is_some() {
            log::warn!("{backend}: a fork was prepared twice without its end; refusing the second");
            return false;
        }
        if state.live.len() >= GENERATIONS_LIVE_MAX {
            log::info!(
                "{backend}: {GENERATIONS_LIVE_MAX} fork generations are live; this fork is paged in"
            );
            return false;
        }
        let mut plan = self.plan_freeze();
        if plan.count_after >= LAYERS_MAX {
            let movable: Vec<usize> = (0..self.count())
                .filter(|&i| self.layer(i).punchable() && self.layer(i).was_written())
                .collect();
            if let [target, rest @ ..] = movable.as_slice() {
                if !rest.is_empty() {
                    let sources = rest.iter().fold(0, |mask: LayerMask, &i| mask | 1 << i);
                    if let Err(e) = compact(*target, sources) {
                        log::warn!("{}; this fork is paged in", crate::logging::error_chain(&e));
                        return false;
                    }
                    for &i in rest {
                        self.layer(i).mark_empty();
                    }
                    plan = self.plan_freeze();
                }
            }
        }
        let count = self.count();
        if plan.count_after >= LAYERS_MAX {
            log::info!(
                "{backend}: {count} page layers are in use, and a fork needs one left for the \
                 parent to write and one more for the child (at most {LAYERS_MAX}); this fork \
                 is paged in"
            );
            return false;
        }
        if plan.write_after.is_none() {
            match make(count) {
                Ok(layer) => self.push(layer),
                Err(e) => {
                    log::warn!("{}; this fork is paged in", crate::logging::error_chain(&e));
                    return false;
                }
            }
        }
        for index in 0..count {
            if plan.frozen & 1 << index != 0 {
                self.layer(index).frozen.fetch_add(1, Ordering::AcqRel);
            }
        }
        state.pending = Some(plan.frozen);
        self.choose_write();
        true
    }

    /// What a freeze now would do: the layers it freezes (every one written, but inherited
    /// ones, which nobody writes anyway), the layer the parent writes afterwards if one exists,
    /// and the layers there would be at the fork (one more when the write layer must be made).
    fn plan_freeze(&self) -> FreezePlan {
        let count = self.count();
        let frozen: LayerMask = (0..count)
            .filter(|&i| !self.layer(i).inherited && self.layer(i).was_written())
            .fold(0, |mask, i| mask | 1 << i);
        let write_after = (0..count).find(|&i| frozen & 1 << i == 0 && self.layer(i).punchable());
        // The child inherits every layer there is at the fork and needs one more of its own.
        let count_after = if write_after.is_some() {
            count
        } else {
            count + 1
        };
        FreezePlan {
            frozen,
            write_after,
            count_after,
        }
    }

    /// After the fork: the pending generation lives until `hup` reports `POLLHUP`, or (`None`:
    /// the fork failed) ends now.
    pub(super) fn parent(&self, backend: &str, hup: Option<OwnedFd>) {
        let mut state = self.lock();
        let Some(frozen) = state.pending.take() else {
            log::warn!("{backend}: the end of a fork that was not prepared; ignored");
            return;
        };
        match hup {
            // Closing the descriptor (dropping it) is all an empty generation needs.
            Some(hup) if frozen != 0 => {
                state.live.push(Generation {
                    layers: frozen,
                    hup,
                    warned: false,
                });
                self.live.store(state.live.len(), Ordering::Release);
            }
            Some(_) => {}
            None => self.unfreeze(frozen),
        }
        self.choose_write();
    }

    fn unfreeze(&self, frozen: LayerMask) {
        for index in 0..self.count() {
            if frozen & 1 << index != 0 {
                let before = self.layer(index).frozen.fetch_sub(1, Ordering::AcqRel);
                debug_assert!(before > 0, "layer {index} was frozen");
            }
        }
    }

    /// Ends every live generation whose pipe reports `POLLHUP` (a zero-timeout poll).
    fn reap(&self, state: &mut Generations) {
        let n = state.live.len();
        if n == 0 {
            return;
        }
        let mut fds = [libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        }; GENERATIONS_LIVE_MAX];
        for (slot, generation) in fds.iter_mut().zip(&state.live) {
            // No events asked for: POLLHUP (and POLLERR, POLLNVAL) are reported anyway.
            slot.fd = generation.hup.as_raw_fd();
        }
        let nfds = libc::nfds_t::try_from(n).expect("at most GENERATIONS_LIVE_MAX descriptors");
        // SAFETY: `fds` holds `n` initialised entries and outlives the call, which only writes
        // their `revents`; a zero timeout never blocks.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), nfds, 0) };
        if ready <= 0 {
            // None ended, or the poll failed (EINTR, ENOMEM): the next call asks again.
            return;
        }
        // Backwards, so that removing one keeps the indices of those before it.
        for index in (0..n).rev() {
            let revents = fds[index].revents;
            if revents & libc::POLLHUP != 0 {
                let generation = state.live.remove(index);
                self.unfreeze(generation.layers);
            } else if revents & libc::POLLNVAL != 0 && !state.live[index].warned {
                // Someone closed a descriptor of ours: keep the layers frozen (disk space is
                // the only cost) rather than risk a child's pages.
                state.live[index].warned = true;
                log::warn!(
                    "a fork generation's pipe descriptor {} was closed behind the page store; \
                     its layers stay frozen until exit",
                    fds[index].fd
                );
            }
        }
        self.live.store(state.live.len(), Ordering::Release);
        self.choose_write();
    }
}
