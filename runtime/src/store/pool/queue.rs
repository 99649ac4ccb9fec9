//! The replica queue of optimistic replication: pages whose first copy is stored and whose
//! other copies are still to be written, with their bytes, until every copy is acknowledged.
//!
//! A page is in the queue at most once (a newer version replaces the older), and the queue
//! holds at most [`QUEUE_PAGES_MAX`] pages (16 MiB of page copies): when it is full the
//! evictor writes the other copies itself, as in pessimistic mode. While a page is queued its
//! bytes serve a fetch whose servers fail, so losing the first copy in this window costs
//! nothing while the process lives.
//!
//! Ordering without stripe locks: the pool's thread writes queued copies without holding the
//! pages' stripe locks (holding them across its I/O would stall every write-back behind it).
//! Instead, a page the pool's thread is writing is [`Stage::Draining`], and whoever else is
//! about to write that page (a write-back, a discard, under the page's stripe lock) first
//! waits for it to leave that stage and marks its entry [`Stage::Held`], which the pool's
//! thread does not take. So two writers never write copies of one page at once, and an older
//! copy never lands on a server after a newer one.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::io::AlignedBuf;

/// Most pages waiting for their other copies.
pub const QUEUE_PAGES_MAX: usize = 4096;
/// Page buffers kept for reuse once their page's copies are written (so that queueing a page
/// costs one copy, not an allocation and a zero-fill too), at most.
const SPARE_PAGES_MAX: usize = 512;

const _: () = assert!(SPARE_PAGES_MAX <= QUEUE_PAGES_MAX);

/// One page waiting for copies.
#[derive(Clone)]
pub struct Waiting {
    pub crc: u32,
    pub version: u32,
    /// Page-aligned, as stores want their buffers.
    pub bytes: Arc<AlignedBuf>,
    pub stage: Stage,
}

/// Where a queued page is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for the pool's thread.
    Queued,
    /// Taken by the pool's thread, its copies being written.
    Draining,
    /// Held by a writer of the page (a write-back or a discard); the pool's thread leaves it.
    Held,
}

#[derive(Default)]
pub struct ReplicaQueue {
    pages: Mutex<BTreeMap<u64, Waiting>>,
    /// Signalled whenever a page leaves [`Stage::Draining`].
    drained: Condvar,
    /// Buffers of pages that left the queue, for the next ones.
    spare: Mutex<Vec<AlignedBuf>>,
}

impl ReplicaQueue {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Waiting>> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the buffer of a page that left the queue, if no one else holds it (the pool's
    /// thread may still be writing it: it hands its copies back here when done) and there is
    /// room among the spares.
    pub fn recycle(&self, w: Waiting) {
        if let Ok(buf) = Arc::try_unwrap(w.bytes) {
            let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
            if spare.len() < SPARE_PAGES_MAX {
                spare.push(buf);
            }
        }
    }

    /// A copy of `bytes` in a spare buffer, or in a new one.
    fn copy_of(&self, bytes: &[u8]) -> AlignedBuf {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match spare {
            Some(mut buf) if buf.len() == bytes.len() => {
                buf.as_mut_slice().copy_from_slice(bytes);
                buf
            }
            _ => aligned_copy(bytes),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Room for `n` more pages.
    pub fn has_room(&self, n: usize) -> bool {
        self.lock().len() + n <= QUEUE_PAGES_MAX
    }

    /// Queues `version` of `page` (replacing an older one).
    pub fn push(&self, page: u64, crc: u32, version: u32, bytes: &[u8]) {
        let waiting = Waiting {
            crc,
            version,
            bytes: Arc::new(self.copy_of(bytes)),
            stage: Stage::Queued,
        };
        let replaced = self.lock().insert(page, waiting);
        if let Some(old) = replaced {
            self.recycle(old);
        }
    }

    /// Copies the queued `version` of `page` into `buf`, if it is there.
    pub fn read(&self, page: u64, version: u32, buf: &mut [u8]) -> bool {
        match self.lock().get(&page) {
            Some(w) if w.version == version => {
                buf.copy_from_slice(w.bytes.as_slice());
                true
            }
            _ => false,
        }
    }

    /// Whether the queue holds `version` of `page` (a fetch would read it from here).
    pub fn holds(&self, page: u64, version: u32) -> bool {
        self.lock().get(&page).is_some_and(|w| w.version == version)
    }

    /// Takes up to `n` queued pages, marking them [`Stage::Draining`].
    pub fn take(&self, n: usize) -> Vec<(u64, Waiting)> {
        let mut pages = self.lock();
        let mut taken = Vec::new();
        for (&page, w) in pages.iter_mut() {
            if taken.len() == n {
                break;
            }
            if w.stage == Stage::Queued {
                w.stage = Stage::Draining;
                taken.push((page, w.clone()));
            }
        }
        taken
    }

    /// Before writing `pages` (under their stripe locks): waits until the pool's thread is
    /// writing none of them, then marks their entries [`Stage::Held`] so it does not take
    /// them. [`ReplicaQueue::push`] (a newer version) or [`ReplicaQueue::release`] ends it.
    pub fn hold(&self, pages: &[u64]) {
        let mut map = self.lock();
        if map.is_empty() {
            return;
        }
        while pages
            .iter()
            .any(|p| map.get(p).is_some_and(|w| w.stage == Stage::Draining))
        {
            map = self.drained.wait(map).unwrap_or_else(|e| e.into_inner());
        }
        for p in pages {
            if let Some(w) = map.get_mut(p) {
                w.stage = Stage::Held;
            }
        }
    }

    /// Gives the entries of `pages` that are still [`Stage::Held`] back to the pool's thread.
    pub fn release(&self, pages: &[u64]) {
        let mut map = self.lock();
        if map.is_empty() {
            return;
        }
        for p in pages {
            if let Some(w) = map.get_mut(p) {
                if w.stage == Stage::Held {
                    w.stage = Stage::Queued;
                }
            }
        }
    }

    /// For a discard of `range` (under its stripe locks): waits until no page of it is being
    /// written, then forgets them all, in one step (so none is taken in between).
    pub fn settle_and_remove(&self, range: Range<u64>) {
        let mut map = self.lock();
        while map
            .range(range.clone())
            .any(|(_, w)| w.stage == Stage::Draining)
        {
            map = self.drained.wait(map).unwrap_or_else(|e| e.into_inner());
        }
        let pages: Vec<u64> = map.range(range).map(|(&p, _)| p).collect();
        let removed: Vec<Waiting> = pages.iter().filter_map(|p| map.remove(p)).collect();
        drop(map);
        for w in removed {
            self.recycle(w);
        }
    }

    /// The pool's thread is done with the pages `done`: each `(page, version, complete)` is
    /// removed when `complete`, else put back to be tried again (unless a newer version
    /// replaced it meanwhile). Wakes the writers waiting for them.
    pub fn finish(&self, done: &[(u64, u32, bool)]) {
        let mut pages = self.lock();
        let mut removed = Vec::new();
        for &(page, version, complete) in done {
            if let Some(w) = pages.get_mut(&page) {
                if w.version == version && w.stage == Stage::Draining {
                    if complete {
                        removed.extend(pages.remove(&page));
                    } else {
                        w.stage = Stage::Queued;
                    }
                }
            }
        }
        drop(pages);
        self.drained.notify_all();
        for w in removed {
            self.recycle(w);
        }
    }
}

fn aligned_copy(bytes: &[u8]) -> AlignedBuf {
    let mut buf = AlignedBuf::new(bytes.len());
    buf.as_mut_slice().copy_from_slice(bytes);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_versions_replace_and_finish_only_removes_its_own() {
        let q = ReplicaQueue::default();
        q.push(5, 1, 1, &[1u8; 4096]);
        q.push(5, 2, 2, &[2u8; 4096]);
        assert_eq!(q.len(), 1);
        let mut buf = [0u8; 4096];
        assert!(!q.read(5, 1, &mut buf));
        assert!(q.read(5, 2, &mut buf) && buf[0] == 2);
        let taken = q.take(10);
        assert_eq!(taken.len(), 1);
        assert!(q.take(10).is_empty(), "in flight");
        q.push(5, 3, 3, &[3u8; 4096]);
        q.finish(&[(5, 2, true)]);
        assert_eq!(q.len(), 1, "version 3 stays");
        let taken = q.take(1);
        assert_eq!(taken.len(), 1);
        q.finish(&[(5, 3, false)]);
        assert_eq!(q.take(1).len(), 1, "put back to be tried again");
        q.finish(&[(5, 3, true)]);
        assert_eq!(q.len(), 0);
        assert!(q.has_room(QUEUE_PAGES_MAX));
        assert!(!q.has_room(QUEUE_PAGES_MAX + 1));
    }

    /// A writer of a page the pool's thread is writing waits for it, and the pool's thread
    /// never takes a held page.
    #[test]
    fn writers_wait_for_draining_pages_and_held_pages_are_not_taken() {
        let q = Arc::new(ReplicaQueue::default());
        q.push(1, 1, 1, &[1u8; 4096]);
        q.push(2, 2, 1, &[2u8; 4096]);
        q.push(40, 3, 1, &[3u8; 4096]);
        let taken = q.take(1);
        assert_eq!(taken[0].0, 1);
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                q.hold(&[1, 2]);
                tx.send(()).unwrap();
            })
        };
        // Page 1 is being written: the writer waits.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        q.finish(&[(1, 1, false)]);
        rx.recv().unwrap();
        writer.join().unwrap();
        // 1 and 2 are held now: only 40 can be taken.
        let taken: Vec<u64> = q.take(10).into_iter().map(|(p, _)| p).collect();
        assert_eq!(taken, vec![40]);
        q.release(&[1, 2]);
        q.finish(&[(40, 1, true)]);
        let taken: Vec<u64> = q.take(10).into_iter().map(|(p, _)| p).collect();
        assert_eq!(taken, vec![1, 2]);
        // A discard of 0..10 waits until they are written, then forgets them (40 stays).
        q.push(40, 3, 2, &[3u8; 4096]);
        let settler = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || q.settle_and_remove(0..10))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!settler.is_finished());
        q.finish(&[(1, 1, false), (2, 1, false)]);
        settler.join().unwrap();
        assert_eq!(q.len(), 1, "only page 40 is left");
        assert_eq!(q.take(10).len(), 1);
    }
}
