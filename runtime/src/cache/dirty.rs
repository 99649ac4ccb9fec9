//! The durable heap's dirty set: which pages changed since the log last recorded them
//! ("log-dirty": the next epoch logs their content, or a `ZERO` record when they are absent).
//! It is the truth about log-dirtiness, kept in the page table under the cache lock and
//! changed only through [`Table::set_log_dirty`] and [`Table::clear_log_dirty`], so that an
//! epoch cut finds its pages by walking the set, not the whole used table.
//!
//! [`PageSet`] is a hierarchical bitmap: level 0 has a bit per page, each level above a bit
//! per word of the level below, set when that word is not zero. Inserting and removing touch
//! one word per level at most (usually one in all); finding the members walks down from the
//! top and skips empty ranges 64, 4096, ... pages at a time, so it costs about the number of
//! members times the number of levels. Every level is a [`ZeroArray`] reserved at start
//! (`MAP_NORESERVE`), committed only where written.
//!
//! Rules: nothing here allocates after [`PageSet::new`]: the set is changed by
//! `forget_range`, which runs on a program thread with the runtime's locks held (glibc's TLS
//! lives in the managed heap). A table without a log has no set: marking a page log-dirty is
//! then one branch, and nothing is recorded.

use super::array::ZeroArray;
use super::Table;
use crate::region::RegionError;

const WORD_BITS: usize = u64::BITS as usize;

/// A set of page indexes below a fixed bound, that allocates nothing once made.
pub struct PageSet {
    /// `levels[0]`: a bit per page; `levels[k + 1]`: a bit per word of `levels[k]`. The top
    /// level is one word.
    levels: Vec<ZeroArray<u64>>,
    /// Members.
    len: usize,
}

impl PageSet {
    /// An empty set for pages `0..pages`.
    pub fn new(pages: usize) -> Result<PageSet, RegionError> {
        let mut levels = Vec::new();
        let mut bits = pages.max(1);
        loop {
            let words = bits.div_ceil(WORD_BITS);
            levels.push(ZeroArray::new(words)?);
            if words == 1 {
                break;
            }
            bits = words;
        }
        Ok(PageSet { levels, len: 0 })
    }

    /// Members of the set.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, page: usize) -> bool {
        self.levels[0][page / WORD_BITS] & (1 << (page % WORD_BITS)) != 0
    }

    /// Adds `page`; false if it was there already.
    pub fn insert(&mut self, page: usize) -> bool {
        if self.contains(page) {
            return false;
        }
        self.len += 1;
        let mut i = page;
        for level in self.levels.iter_mut() {
            let (w, bit) = (i / WORD_BITS, 1u64 << (i % WORD_BITS));
            let was = level[w];
            level[w] = was | bit;
            if was != 0 {
                // The word was not empty: the levels above know already.
                break;
            }
            i = w;
        }
        true
    }

    /// Removes `page`; false if it was not there.
    pub fn remove(&mut self, page: usize) -> bool {
        if !self.contains(page) {
            return false;
        }
        self.len -= 1;
        let mut i = page;
        for level in self.levels.iter_mut() {
            let (w, bit) = (i / WORD_BITS, 1u64 << (i % WORD_BITS));
            level[w] &= !bit;
            if level[w] != 0 {
                // The word still has members: the levels above stay as they are.
                break;
            }
            i = w;
        }
        true
    }

    /// The smallest member at or after `from`.
    pub fn next_from(&self, from: usize) -> Option<usize> {
        self.next_at(0, from)
    }

    /// The smallest set bit at or after bit `from` of level `level`.
    fn next_at(&self, level: usize, from: usize) -> Option<usize> {
        let words = &self.levels[level];
        let mut w = from / WORD_BITS;
        if w >= words.len() {
            return None;
        }
        let mut bits = words[w] & (!0u64 << (from % WORD_BITS));
        loop {
            if bits != 0 {
                return Some(w * WORD_BITS + bits.trailing_zeros() as usize);
            }
            // The next non-empty word, found in the level above (the top level is one word).
            w = if level + 1 < self.levels.len() {
                self.next_at(level + 1, w + 1)?
            } else {
                return None;
            };
            bits = words[w];
        }
    }

    /// The members in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        let mut next = self.next_from(0);
        std::iter::from_fn(move || {
            let p = next?;
            next = self.next_from(p + 1);
            Some(p)
        })
    }

    /// Removes every member (walking the members only).
    pub fn clear(&mut self) {
        while let Some(p) = self.next_from(0) {
            self.remove(p);
        }
    }
}

impl Table {
    /// Whether the table tracks log-dirty pages (the heap has a log).
    pub fn tracks_log_dirty(&self) -> bool {
        self.log_dirty.is_some()
    }

    /// Records that `page` changed since the log last recorded it. Without a log: nothing.
    pub fn set_log_dirty(&mut self, page: usize) {
        if let Some(set) = &mut self.log_dirty {
            set.insert(page);
        }
    }

    /// Records that an epoch took `page`.
    pub fn clear_log_dirty(&mut self, page: usize) {
        if let Some(set) = &mut self.log_dirty {
            set.remove(page);
        }
    }

    pub fn is_log_dirty(&self, page: usize) -> bool {
        self.log_dirty.as_ref().is_some_and(|s| s.contains(page))
    }

    /// The log-dirty pages, in increasing order (none without a log).
    pub fn log_dirty_pages(&self) -> impl Iterator<Item = usize> + '_ {
        self.log_dirty.iter().flat_map(|s| s.iter())
    }

    /// How many pages are log-dirty.
    pub fn log_dirty_count(&self) -> usize {
        self.log_dirty.as_ref().map_or(0, |s| s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn members_come_back_in_order_across_levels() {
        let pages = 1 << 20;
        let mut s = PageSet::new(pages).expect("reserve");
        assert_eq!(s.levels.len(), 4, "2^20 bits: 2^14, 2^8, 2^2 words, then 1");
        let members = [0, 1, 63, 64, 4095, 4096, 262_143, 262_144, pages - 1];
        for &p in members.iter().rev() {
            assert!(s.insert(p));
        }
        assert!(!s.insert(64), "a second insert changes nothing");
        assert_eq!(s.len(), members.len());
        assert_eq!(s.iter().collect::<Vec<_>>(), members);
        assert_eq!(s.next_from(65), Some(4095));
        assert!(s.remove(4095) && !s.remove(4095));
        assert_eq!(s.next_from(65), Some(4096));
        s.clear();
        assert!(s.is_empty());
        assert_eq!(s.next_from(0), None);
        assert!(s.levels.iter().all(|l| l.iter().all(|&w| w == 0)));
    }

    #[test]
    fn a_set_of_one_page_and_a_table_without_a_log() {
        let mut s = PageSet::new(1).expect("reserve");
        assert!(s.insert(0));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0]);
        let cache = super::super::Cache::new(8, 8, false).expect("reserve");
        let mut t = cache.lock();
        t.set_log_dirty(3);
        assert!(!t.tracks_log_dirty() && !t.is_log_dirty(3));
        assert_eq!(t.log_dirty_pages().count(), 0);
    }

    proptest! {
        /// The set agrees with a `BTreeSet` after any sequence of inserts and removes.
        #[test]
        fn agrees_with_a_btreeset(ops in proptest::collection::vec((any::<bool>(), 0usize..20_000), 0..400)) {
            let mut s = PageSet::new(20_000).expect("reserve");
            let mut model = std::collections::BTreeSet::new();
            for (add, p) in ops {
                if add {
                    prop_assert_eq!(s.insert(p), model.insert(p));
                } else {
                    prop_assert_eq!(s.remove(p), model.remove(&p));
                }
            }
            prop_assert_eq!(s.len(), model.len());
            prop_assert_eq!(s.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
        }
    }
}
