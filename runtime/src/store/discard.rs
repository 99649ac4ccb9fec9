//! [`DiscardQueue`]: discards go to the store from a runtime thread, never from the program's.
//!
//! The allocator gives freed runs back on the program's thread, with the pager's `events`
//! lock held for writing (no page can be installed meanwhile). A store call there (a hole
//! punch, a network round trip) would stall every install in the process. So the pager only
//! [`push`](DiscardQueue::push)es the range into a fixed array (no allocation, no logging, no
//! thread-locals: the program's thread may be inside malloc), and the `lego-discard` thread
//! sends the ranges to the store in batches.
//!
//! Rules:
//! - Order: a page discarded and then stored again must keep its new copy. Whoever stores
//!   pages (the evictor) calls [`drain`](DiscardQueue::drain) first, which returns only when
//!   every range pushed before it has reached the store (if the discard thread is sending some,
//!   it waits for them). A page cannot be stored again before its discard is pushed: the pager
//!   pushes under the `events` write lock, before the page can be installed again.
//! - A full queue drops the range (counted in `discard_ranges_dropped`): a discard is only an
//!   optimisation, and the stale copy is never read (the page table forgot it, and its
//!   version is older than any later one). The queue is large enough that this only happens
//!   when the store stalls.
//! - Store calls happen on runtime threads only (asserted).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::PageStore;

/// Ranges the queue holds before it drops new ones.
pub const DISCARD_QUEUE_RANGES_MAX: usize = 1024;
/// How long the discard thread sleeps when nothing wakes it, in milliseconds (it is woken by
/// every push; the timeout only bounds a lost wake-up).
const DISCARD_IDLE_MS: u64 = 1000;

/// Pending `(first page, count)` ranges in a fixed array.
struct Ranges {
    ranges: [(u64, u64); DISCARD_QUEUE_RANGES_MAX],
    len: usize,
}

impl Ranges {
    const fn new() -> Ranges {
        Ranges {
            ranges: [(0, 0); DISCARD_QUEUE_RANGES_MAX],
            len: 0,
        }
    }

    /// Appends a range, merging it with the last one when they touch. False when full.
    fn push(&mut self, first: u64, count: u64) -> bool {
        if let Some(last) = self.ranges[..self.len].last_mut() {
            if last.0.saturating_add(last.1) == first {
                last.1 = last.1.saturating_add(count);
                return true;
            }
        }
        if self.len == DISCARD_QUEUE_RANGES_MAX {
            return false;
        }
        self.ranges[self.len] = (first, count);
        self.len += 1;
        true
    }
}

/// The queue between the pager's discards and the store.
pub struct DiscardQueue {
    pending: Mutex<Ranges>,
    wanted: Condvar,
    // Held while ranges taken from `pending` are being sent to the store, so that `drain`
    // waits for a batch the discard thread is still sending. Holds the sender's copy.
    sending: Mutex<Box<Ranges>>,
    dropped: AtomicU64,
}

impl Default for DiscardQueue {
    fn default() -> Self {
        DiscardQueue::new()
    }
}

impl DiscardQueue {
    pub fn new() -> DiscardQueue {
        DiscardQueue {
            pending: Mutex::new(Ranges::new()),
            wanted: Condvar::new(),
            sending: Mutex::new(Box::new(Ranges::new())),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues the discard of pages `[first, first+count)`. Safe on a program thread inside
    /// malloc: it takes one short lock, copies two numbers and wakes the discard thread.
    pub fn push(&self, first: u64, count: u64) {
        if count == 0 {
            return;
        }
        let queued = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(first, count);
        if !queued {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.wanted.notify_one();
    }

    /// Ranges dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sends every queued range to `store`, and waits for ranges the discard thread is still
    /// sending. On return, every range pushed before the call has reached the store. Returns
    /// the pages sent. Runtime threads only.
    pub fn drain(&self, store: &dyn PageStore) -> u64 {
        assert!(
            crate::threads::is_runtime_thread() || cfg!(test),
            "a store discard must run on a runtime thread"
        );
        let mut sending = self.sending.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.len == 0 {
                return 0;
            }
            std::mem::swap(&mut **sending, &mut *pending);
        }
        let mut pages = 0;
        for &(first, count) in &sending.ranges[..sending.len] {
            pages += count;
            // A failed discard leaves a stale copy that nothing reads any more.
            if let Err(e) = store.discard(first, count) {
                log::debug!("{e}");
            }
        }
        sending.len = 0;
        pages
    }

    /// The discard thread's loop: waits for ranges and drains them, forever (late frees from
    /// other libraries' destructors may come after lego's exit handler).
    pub fn run(&self, store: &dyn PageStore) -> ! {
        loop {
            {
                let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                if pending.len == 0 {
                    let _ = self
                        .wanted
                        .wait_timeout(pending, Duration::from_millis(DISCARD_IDLE_MS))
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
            self.drain(store);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{PageRead, PageWrite, StoreError};
    use std::sync::Arc;

    /// Records the discards that reach it, and on which thread.
    #[derive(Default)]
    struct Recorder {
        discards: Mutex<Vec<(u64, u64, Option<String>)>>,
    }

    impl PageStore for Recorder {
        fn fetch(&self, _batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
            Ok(())
        }
        fn store(&self, _batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
            Ok(())
        }
        fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
            let name = std::thread::current().name().map(str::to_string);
            self.discards
                .lock()
                .expect("test lock")
                .push((first, count, name));
            Ok(())
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    #[test]
    fn adjacent_ranges_merge_and_drain_sends_them_in_order() {
        let queue = DiscardQueue::new();
        let store = Recorder::default();
        queue.push(10, 2);
        queue.push(12, 3);
        queue.push(20, 1);
        queue.push(30, 0);
        assert_eq!(queue.drain(&store), 6);
        let got: Vec<(u64, u64)> = store
            .discards
            .lock()
            .expect("test lock")
            .iter()
            .map(|&(f, c, _)| (f, c))
            .collect();
        assert_eq!(got, [(10, 5), (20, 1)]);
        assert_eq!(queue.drain(&store), 0, "nothing left");
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let queue = DiscardQueue::new();
        for i in 0..DISCARD_QUEUE_RANGES_MAX as u64 + 5 {
            queue.push(i * 2, 1);
        }
        assert_eq!(queue.dropped(), 5);
        let store = Recorder::default();
        assert_eq!(queue.drain(&store), DISCARD_QUEUE_RANGES_MAX as u64);
    }

    /// The pages reach the store from the discard thread, never from the one that pushed.
    #[test]
    fn the_discard_thread_sends_what_program_threads_push() {
        let queue = Arc::new(DiscardQueue::new());
        let store = Arc::new(Recorder::default());
        {
            let (queue, store) = (Arc::clone(&queue), Arc::clone(&store));
            std::thread::Builder::new()
                .name("lego-discard".into())
                .spawn(move || queue.run(&*store))
                .expect("spawning the discard thread");
        }
        for i in 0..100u64 {
            queue.push(i * 10, 3);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let n: u64 = store
                .discards
                .lock()
                .expect("test lock")
                .iter()
                .map(|d| d.1)
                .sum();
            if n == 300 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {n} of 300 pages"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let discards = store.discards.lock().expect("test lock");
        assert!(discards
            .iter()
            .all(|d| d.2.as_deref() == Some("lego-discard")));
    }

    /// A page discarded and stored again keeps its new copy: `drain` before the store.
    #[test]
    fn drain_before_a_store_keeps_the_new_copy() {
        let queue = DiscardQueue::new();
        let store = MemoryStore::new(64 * crate::PAGE_SIZE as u64);
        let page = crate::io::test_support::pages(1);
        let mut page = page;
        page[0].0[0] = 7;
        queue.push(3, 1);
        queue.drain(&store);
        let mut writes = [PageWrite::new(3, &page[0].0, 2)];
        store.store(&mut writes).expect("storing");
        assert_eq!(queue.drain(&store), 0);
        let mut back = crate::io::test_support::pages(1);
        let mut reads = [PageRead::new(3, &mut back[0].0, writes[0].crc, 2)];
        store.fetch(&mut reads).expect("the new copy is there");
    }
}
