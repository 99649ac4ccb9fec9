//! What the pool knows of each page: the checksum and version of its newest stored copy, and
//! which servers hold that copy (a bit per server). The pager knows the checksum and version
//! too; the pool keeps them to repair copies without the pager, and the holders to know
//! where to read and what to repair.
//!
//! Two arrays with an entry for every page of the heap, committed only where written (see
//! `cache::array`), behind one lock that is never held across I/O.

use std::sync::{Mutex, MutexGuard};

use crate::cache::array::ZeroArray;
use crate::region::RegionError;

/// A page's newest stored copy, as the pool knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Copy {
    pub crc: u32,
    /// 0: never stored (or discarded).
    pub version: u32,
    /// Servers that hold this version, a bit each.
    pub holders: u64,
}

pub struct Records {
    inner: Mutex<Arrays>,
}

pub struct Arrays {
    /// `crc << 32 | version` per page.
    meta: ZeroArray<u64>,
    holders: ZeroArray<u64>,
    /// One past the highest page ever stored (scans stop there).
    top: u64,
}

impl Records {
    pub fn new(pages: u64) -> Result<Records, RegionError> {
        let len = usize::try_from(pages).expect("the heap's pages fit in usize");
        Ok(Records {
            inner: Mutex::new(Arrays {
                meta: ZeroArray::new(len)?,
                holders: ZeroArray::new(len)?,
                top: 0,
            }),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Arrays> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Arrays {
    pub fn get(&self, page: u64) -> Copy {
        let i = page as usize;
        let meta = self.meta[i];
        Copy {
            crc: (meta >> 32) as u32,
            version: meta as u32,
            holders: self.holders[i],
        }
    }

    /// Records that `holders` hold `version` of `page` (and nobody else does).
    pub fn set(&mut self, page: u64, crc: u32, version: u32, holders: u64) {
        let i = page as usize;
        self.meta[i] = u64::from(crc) << 32 | u64::from(version);
        self.holders[i] = holders;
        self.top = self.top.max(page + 1);
    }

    /// Adds `servers` (a bit each) to the holders of `version` of `page`, if that is still its
    /// newest; returns how many were not holders before.
    pub fn add_holders(&mut self, page: u64, version: u32, servers: u64) -> u64 {
        let i = page as usize;
        if self.meta[i] as u32 != version {
            return 0;
        }
        let added = servers & !self.holders[i];
        self.holders[i] |= servers;
        u64::from(added.count_ones())
    }

    /// Removes `server` from the holders of `version` of `page` (its copy was missing, old
    /// or damaged), if that is still its newest.
    pub fn drop_holder(&mut self, page: u64, version: u32, server: usize) {
        let i = page as usize;
        if self.meta[i] as u32 == version {
            self.holders[i] &= !(1 << server);
        }
    }

    /// Forgets `page` (discarded: it reads as zeros).
    pub fn clear(&mut self, page: u64) {
        let i = page as usize;
        self.meta[i] = 0;
        self.holders[i] = 0;
    }

    /// Removes `server` from the holders of every page that has another holder (it restarted
    /// empty, or its lease lapsed: repair then copies those pages again). A page it alone
    /// holds keeps it: it may have been stored there after the restart, and a fetch that
    /// finds it missing treats it as lost anyway (then the log, if any, gives it).
    pub fn forget_server(&mut self, server: usize) -> u64 {
        let mut forgotten = 0;
        let top = self.top as usize;
        let bit = 1u64 << server;
        for h in &mut self.holders[..top] {
            if *h & bit != 0 && *h != bit {
                *h &= !bit;
                forgotten += 1;
            }
        }
        forgotten
    }

    pub fn top(&self) -> u64 {
        self.top
    }
}
