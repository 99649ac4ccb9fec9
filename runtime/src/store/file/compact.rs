//! Merging layers no child reads, so that a store that forks again and again keeps a free
//! layer (see [`super::layers::LayerSet::freeze`]). Runs only inside `fork_freeze`, under the
//! layer set's lock: no fetch or store is in flight (the fork's contract) and no discard can
//! start, so a page's copy and its map entry change together with nobody looking.
//!
//! Each page the map places in a source layer is read into a bounce buffer of its own
//! (mapped, page-aligned, never the managed heap) and written to the target at the same
//! offset, in runs of consecutive pages; a page of zeros is punched in the target instead of
//! written (a hole reads the same), so pages discarded since their last write cost no disk.
//! Then each source is punched whole. A failure stops the merge with every page either moved
//! (its entry naming the target) or still where it was.

use std::os::fd::AsFd;

use super::layers::{Layer, LayerMask};
use super::{Engine, FileStore};
use crate::io::{self, IoError, ReadOp, WriteOp};
use crate::region::Region;
use crate::store::{FailureKind, StoreError, StoreOp, PAGE_BYTES};
use crate::PAGE_SIZE;

/// Pages moved per read and write: one bounce buffer of 256 KiB.
const COMPACT_RUN_PAGES: usize = 64;

/// `COMPACT_RUN_PAGES` page-aligned pages of anonymous memory, unmapped when dropped.
struct Bounce {
    region: Region,
}

impl Bounce {
    fn new() -> Result<Bounce, crate::region::RegionError> {
        Ok(Bounce {
            region: Region::reserve(COMPACT_RUN_PAGES * PAGE_SIZE, None)?,
        })
    }

    /// The first `n` pages, each `PAGE_SIZE` bytes and page-aligned.
    fn pages(&mut self, n: usize) -> std::slice::ChunksExactMut<'_, u8> {
        let n = n.min(COMPACT_RUN_PAGES);
        // SAFETY: the mapping is readable and writable for `COMPACT_RUN_PAGES` pages, owned by
        // `self` and unmapped only when it drops; `&mut self` makes this the only reference.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(self.region.base as *mut u8, n * PAGE_SIZE) };
        bytes.chunks_exact_mut(PAGE_SIZE)
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: the mapping was made for this buffer alone and no reference into it
        // outlives `self`. A failure only leaks address space.
        let _ = unsafe { crate::region::sys_munmap(self.region.base, self.region.len) };
    }
}

impl FileStore {
    /// Moves every page the map places in a layer of `sources` to layer `target`, then
    /// punches the sources whole (see the module docs). Called only from `fork_freeze`.
    pub(super) fn compact(&self, target: usize, sources: LayerMask) -> Result<(), StoreError> {
        let mut bounce = Bounce::new().map_err(|source| StoreError::Open {
            backend: self.name.clone(),
            what: "mapping the buffer that merges page layers".into(),
            source: Box::new(source),
        })?;
        let end = self.written_end.load(std::sync::atomic::Ordering::Acquire);
        let in_sources = |layer: usize| sources & 1 << layer != 0;
        let mut moved = 0u64;
        let mut page = 0;
        while page < end {
            let layer = self.map.get(page);
            if !in_sources(layer) {
                page += 1;
                continue;
            }
            let mut n = 1;
            while n < COMPACT_RUN_PAGES as u64 && page + n < end && self.map.get(page + n) == layer
            {
                n += 1;
            }
            self.move_run(&mut bounce, layer, target, page, n)?;
            moved += n;
            page += n;
        }
        for layer in (0..self.layers.count()).filter(|&i| in_sources(i)) {
            self.punch(self.layers.layer(layer), 0, self.pages)?;
        }
        log::info!(
            "{}: merged {moved} pages of {} page layers into layer {target} to make room for \
             a fork",
            self.name,
            sources.count_ones()
        );
        Ok(())
    }

    /// Moves pages `[first, first+n)` (`n <= COMPACT_RUN_PAGES`) from layer `from` to `to`.
    fn move_run(
        &self,
        bounce: &mut Bounce,
        from: usize,
        to: usize,
        first: u64,
        n: u64,
    ) -> Result<(), StoreError> {
        let count = usize::try_from(n).expect("a run is at most COMPACT_RUN_PAGES");
        let io_error = |op, source: IoError| StoreError::Io {
            backend: self.name.clone(),
            op,
            page: first,
            kind: FailureKind::of_errno(source.errno()),
            source: Box::new(source),
        };
        let (source, target) = (self.layers.layer(from), self.layers.layer(to));
        let mut read = ReadOp::new(first * PAGE_BYTES);
        for page in bounce.pages(count) {
            read.push(page);
        }
        self.run_reads(source, &mut [read])
            .map_err(|e| io_error(StoreOp::Fetch, e))?;

        // Sub-runs of pages that hold data are written; pages of zeros become holes (unless
        // the filesystem cannot punch them: then they are written too).
        let punch = !self
            .punch_unsupported
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut writes: Vec<WriteOp<'_>> = Vec::new();
        let mut prev_written = false;
        // Runs of pages of zeros: (first page, pages).
        let mut zeros: Vec<(u64, u64)> = Vec::new();
        for (i, page) in bounce.pages(count).enumerate() {
            let index = first + u64::try_from(i).expect("a run index fits u64");
            if punch && page.iter().all(|&b| b == 0) {
                match zeros.last_mut() {
                    Some((start, len)) if *start + *len == index => *len += 1,
                    _ => zeros.push((index, 1)),
                }
                prev_written = false;
                continue;
            }
            match writes.last_mut() {
                Some(op) if prev_written => op.push(page),
                _ => {
                    let mut op = WriteOp::new(index * PAGE_BYTES);
                    op.push(page);
                    writes.push(op);
                }
            }
            prev_written = true;
        }
        if !writes.is_empty() {
            self.run_writes(target, &mut writes)
                .map_err(|e| io_error(StoreOp::Store, e))?;
        }
        for (start, len) in zeros {
            self.punch(target, start, len)?;
        }
        for page in first..first + n {
            self.map.set(page, to);
        }
        Ok(())
    }

    fn run_reads(&self, layer: &Layer, ops: &mut [ReadOp<'_>]) -> Result<(), IoError> {
        let fd = layer.file.as_fd();
        match &self.engine {
            Engine::Uring(pool) => pool.with(|ring| ring.read_at(fd, ops)),
            Engine::Sync => io::sync::read_at(fd, ops),
        }
    }

    fn run_writes(&self, layer: &Layer, ops: &mut [WriteOp<'_>]) -> Result<(), IoError> {
        let fd = layer.file.as_fd();
        match &self.engine {
            Engine::Uring(pool) => pool.with(|ring| ring.write_at(fd, ops)),
            Engine::Sync => io::sync::write_at(fd, ops),
        }
    }
}
