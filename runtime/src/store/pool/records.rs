//! What the pool knows of each page: the checksum and version of its newest stored copy, and
//! which servers hold that copy (a bit per server). The pager knows the checksum and version
//! too; the pool keeps them to repair copies without the pager, and the holders to know
//! where to read and what to repair.
//!
//! Two arrays with an entry for every page of the heap, committed only where written (see
//! `cache::array`), behind one lock that is never held across I/O.
//!
//! An erasure-coded pool (`rs:K+M`) also keeps, per stripe of K pages, which server holds
//! each of its M parity values: byte m of the stripe's word is 1 + that server's index, 0 for
//! none. **Invariant P**: a nonzero byte means that server holds parity m computed from
//! exactly the (version, crc) the records hold now for the stripe's K pages. Whoever changes
//! a page's record under its stripe lock rewrites the stripe's parity bytes in the same
//! critical section (with parities just stored) or clears them.

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
    /// Per stripe, the servers of its parity values (erasure-coded pools only).
    parity: Option<ZeroArray<u64>>,
    /// K: pages of a stripe (0 without a code).
    stripe_pages: u64,
}

impl Records {
    pub fn new(pages: u64) -> Result<Records, RegionError> {
        Records::with_stripes(pages, 0)
    }

    /// Records of an erasure-coded pool whose stripes are `stripe_pages` pages (0: no code).
    pub fn with_stripes(pages: u64, stripe_pages: u64) -> Result<Records, RegionError> {
        let len = usize::try_from(pages).expect("the heap's pages fit in usize");
        let parity = match stripe_pages {
            0 => None,
            k => Some(ZeroArray::new(len.div_ceil(k as usize).max(1))?),
        };
        Ok(Records {
            inner: Mutex::new(Arrays {
                meta: ZeroArray::new(len)?,
                holders: ZeroArray::new(len)?,
                top: 0,
                parity,
                stripe_pages,
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
    ///
    /// With a code, every value there is forgotten: its parity bytes and its data pages too
    /// (a data page's only holder: the page is rebuilt from the rest of its stripe, by a
    /// degraded read and by repair, which writes it again).
    pub fn forget_server(&mut self, server: usize) -> u64 {
        let mut forgotten = 0;
        let top = self.top as usize;
        let bit = 1u64 << server;
        let coded = self.parity.is_some();
        for h in &mut self.holders[..top] {
            if *h & bit != 0 && (*h != bit || coded) {
                *h &= !bit;
                forgotten += 1;
            }
        }
        let stripes = self.stripes_top() as usize;
        if let Some(parity) = &mut self.parity {
            let tag = server as u64 + 1;
            for word in &mut parity[..stripes] {
                for m in 0..8 {
                    if (*word >> (8 * m)) & 0xff == tag {
                        *word &= !(0xff << (8 * m));
                        forgotten += 1;
                    }
                }
            }
        }
        forgotten
    }

    /// The servers of stripe `stripe`'s parity values: byte m = 1 + server, 0 = none.
    pub fn parity(&self, stripe: u64) -> u64 {
        self.parity.as_ref().map_or(0, |p| p[stripe as usize])
    }

    /// Sets the servers of stripe `stripe`'s parity values (see invariant P).
    pub fn set_parity(&mut self, stripe: u64, servers: u64) {
        let parity = self
            .parity
            .as_mut()
            .expect("parity is recorded with a code only");
        parity[stripe as usize] = servers;
    }

    /// Clears parity value `slot` of stripe `stripe` if `server` holds it (it was found
    /// missing, old or damaged there).
    pub fn drop_parity(&mut self, stripe: u64, slot: usize, server: usize) {
        if let Some(parity) = &mut self.parity {
            let word = &mut parity[stripe as usize];
            if (*word >> (8 * slot)) & 0xff == server as u64 + 1 {
                *word &= !(0xff << (8 * slot));
            }
        }
    }

    /// One past the highest stripe holding a stored page.
    pub fn stripes_top(&self) -> u64 {
        match self.stripe_pages {
            0 => 0,
            k => self.top.div_ceil(k),
        }
    }

    pub fn top(&self) -> u64 {
        self.top
    }
}

/// The server of parity `slot` in a stripe's parity word, if any.
pub fn parity_server(word: u64, slot: usize) -> Option<usize> {
    match (word >> (8 * slot)) & 0xff {
        0 => None,
        tag => Some(tag as usize - 1),
    }
}

/// `word` with parity `slot` on `server` (None: no server).
pub fn with_parity_server(word: u64, slot: usize, server: Option<usize>) -> u64 {
    let tag = server.map_or(0, |s| s as u64 + 1);
    (word & !(0xff << (8 * slot))) | tag << (8 * slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parity_bytes_name_servers_and_a_restart_forgets_everything_there() {
        let records = Records::with_stripes(64, 4).expect("records");
        let mut r = records.lock();
        r.set(0, 7, 1, 1 << 2);
        r.set(1, 8, 1, 1 << 3);
        r.set(5, 9, 2, 1 << 2);
        let word = with_parity_server(with_parity_server(0, 0, Some(4)), 1, Some(2));
        assert_eq!(
            (parity_server(word, 0), parity_server(word, 1)),
            (Some(4), Some(2))
        );
        assert_eq!(parity_server(word, 2), None);
        assert_eq!(parity_server(with_parity_server(word, 0, None), 0), None);
        r.set_parity(0, word);
        r.set_parity(1, with_parity_server(0, 0, Some(0)));
        assert_eq!(r.stripes_top(), 2);
        // Server 2 restarted: its data pages (even as their only holder) and parity go.
        assert_eq!(r.forget_server(2), 3);
        assert_eq!(r.get(0).holders, 0);
        assert_eq!(r.get(1).holders, 1 << 3);
        assert_eq!(r.get(5).holders, 0);
        assert_eq!(parity_server(r.parity(0), 0), Some(4));
        assert_eq!(parity_server(r.parity(0), 1), None);
        r.drop_parity(0, 0, 3);
        assert_eq!(
            parity_server(r.parity(0), 0),
            Some(4),
            "another server's: kept"
        );
        r.drop_parity(0, 0, 4);
        assert_eq!(r.parity(0), 0);
        // Without a code a sole holder keeps the page.
        let plain = Records::new(16).expect("records");
        let mut p = plain.lock();
        p.set(0, 1, 1, 1 << 2);
        assert_eq!(p.forget_server(2), 0);
        assert_eq!(p.parity(0), 0);
    }
}
