//! The replica queue of optimistic replication: pages whose first copy is stored and whose
//! other copies are still to be written, with their bytes, until every copy is acknowledged.
//!
//! A page is in the queue at most once (a newer version replaces the older), and the queue
//! holds at most [`QUEUE_PAGES_MAX`] pages (16 MiB of page copies): when it is full the
//! evictor writes the other copies itself, as in pessimistic mode. While a page is queued its
//! bytes serve a fetch whose servers fail, so losing the first copy in this window costs
//! nothing while the process lives.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

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
    /// Taken by the pool's thread and being written.
    pub in_flight: bool,
}

#[derive(Default)]
pub struct ReplicaQueue {
    pages: Mutex<BTreeMap<u64, Waiting>>,
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
            in_flight: false,
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

    /// Takes up to `n` pages that are not in flight, marking them so.
    pub fn take(&self, n: usize) -> Vec<(u64, Waiting)> {
        let mut pages = self.lock();
        let mut taken = Vec::new();
        for (&page, w) in pages.iter_mut() {
            if taken.len() == n {
                break;
            }
            if !w.in_flight {
                w.in_flight = true;
                taken.push((page, w.clone()));
            }
        }
        taken
    }

    /// The pool's thread is done with `version` of `page`: removed when `complete`, else put
    /// back to be tried again (unless a newer version replaced it meanwhile).
    pub fn finish(&self, page: u64, version: u32, complete: bool) {
        let mut pages = self.lock();
        let mut done = None;
        if let Some(w) = pages.get_mut(&page) {
            if w.version == version {
                if complete {
                    done = pages.remove(&page);
                } else {
                    w.in_flight = false;
                }
            }
        }
        drop(pages);
        if let Some(w) = done {
            self.recycle(w);
        }
    }

    /// Forgets `page` (discarded).
    pub fn remove(&self, page: u64) {
        let removed = self.lock().remove(&page);
        if let Some(w) = removed {
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
        q.finish(5, 2, true);
        assert_eq!(q.len(), 1, "version 3 stays");
        q.finish(5, 3, false);
        assert_eq!(q.take(1).len(), 1);
        q.finish(5, 3, true);
        assert_eq!(q.len(), 0);
        assert!(q.has_room(QUEUE_PAGES_MAX));
        assert!(!q.has_room(QUEUE_PAGES_MAX + 1));
    }
}
