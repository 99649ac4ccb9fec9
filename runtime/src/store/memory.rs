//! [`MemoryStore`]: a page store in this process's memory, for tests only. It is the
//! reference the conformance suite is checked against first, and a base for tests of layers
//! stacked over stores. Unlike the file store it keeps each page's version and serves a copy
//! only if both its checksum and its version are the ones asked for (what a store that may
//! hold an older copy must do).

use std::collections::HashMap;
use std::sync::Mutex;

use super::{
    discard_range, refuse_bad_reads, refuse_bad_writes, FailureKind, Outcome, PageRead, PageStore,
    PageWrite, StoreError, PAGE_BYTES,
};
use crate::PAGE_SIZE;

/// How errors name this store.
const BACKEND: &str = "memory";

/// One stored page: its content, CRC32C and version.
struct Stored {
    bytes: Box<[u8]>,
    crc: u32,
    version: u32,
}

/// Pages in a map under one lock.
pub(crate) struct MemoryStore {
    pages: u64,
    copies: Mutex<HashMap<u64, Stored>>,
}

impl MemoryStore {
    /// A store for a heap of `heap_bytes` (rounded up to whole pages).
    pub(crate) fn new(heap_bytes: u64) -> MemoryStore {
        MemoryStore {
            pages: heap_bytes.div_ceil(PAGE_BYTES),
            copies: Mutex::new(HashMap::new()),
        }
    }
}

impl PageStore for MemoryStore {
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        let copies = self.copies.lock().expect("the memory store's lock");
        let mut first_error = refuse_bad_reads(BACKEND, self.pages, batch.iter_mut());
        for r in batch.iter_mut().filter(|r| r.outcome == Outcome::Pending) {
            let (found, version) = match copies.get(&r.page) {
                Some(copy) => {
                    r.buf.copy_from_slice(&copy.bytes);
                    (copy.crc, copy.version)
                }
                // Never stored, or discarded: zeros, as in the file store.
                None => {
                    r.buf.fill(0);
                    (crc32c::crc32c(&[0; PAGE_SIZE]), r.version)
                }
            };
            if found == r.crc && version == r.version {
                r.outcome = Outcome::Done;
            } else {
                r.outcome = Outcome::Failed(FailureKind::Lost);
                first_error.get_or_insert(StoreError::Mismatch {
                    backend: BACKEND.into(),
                    page: r.page,
                    found,
                    expected: r.crc,
                    version: r.version,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
        let mut copies = self.copies.lock().expect("the memory store's lock");
        let first_error = refuse_bad_writes(BACKEND, self.pages, batch);
        for w in batch.iter_mut().filter(|w| w.outcome == Outcome::Pending) {
            copies.insert(
                w.page,
                Stored {
                    bytes: w.buf.into(),
                    crc: w.crc,
                    version: w.version,
                },
            );
            w.outcome = Outcome::Done;
        }
        first_error.map_or(Ok(()), Err)
    }

    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
        let Some(range) = discard_range(BACKEND, first, count, self.pages)? else {
            return Ok(());
        };
        let (first, end) = (range.start, range.end);
        let mut copies = self.copies.lock().expect("the memory store's lock");
        if end - first < copies.len() as u64 {
            for page in first..end {
                copies.remove(&page);
            }
        } else {
            copies.retain(|&page, _| !(first..end).contains(&page));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "memory (tests only)".to_string()
    }
}
