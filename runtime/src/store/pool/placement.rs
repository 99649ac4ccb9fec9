//! Where a page's copies live: rendezvous hashing over the pool's servers, for groups of
//! [`GROUP_PAGES`] neighbouring pages.
//!
//! Every server gets a score for every group, a hash of the group and the server's name; a
//! group's servers in the order of their scores are its ranking, and its copies go to the first
//! N servers of the ranking that are up. Adding a server moves only the groups it now wins
//! (about 1/(n+1) of them), and the order in which servers are listed does not matter. A group
//! is 16 pages (64 KiB), so a read-ahead window's pages come from one or two servers.

use crate::config::REPLICAS_MAX;

/// Pages that always share their servers.
pub const GROUP_PAGES: u64 = 16;

/// Most servers a ranking holds (the pool's bound).
pub const SERVERS_MAX: usize = 64;

/// The servers of a pool, as hashing sees them.
pub struct Placement {
    /// One seed per server, from its name.
    seeds: Vec<u64>,
}

/// A group's servers, best first.
pub struct Ranking {
    order: [u8; SERVERS_MAX],
    len: usize,
}

impl Ranking {
    pub fn servers(&self) -> &[u8] {
        &self.order[..self.len]
    }
}

impl Placement {
    /// A placement over servers named `names` (`HOST:PORT`).
    pub fn new(names: &[String]) -> Placement {
        assert!(
            !names.is_empty() && names.len() <= SERVERS_MAX,
            "a pool has 1 to {SERVERS_MAX} servers"
        );
        Placement {
            seeds: names.iter().map(|n| fnv1a(n.as_bytes())).collect(),
        }
    }

    pub fn servers(&self) -> usize {
        self.seeds.len()
    }

    /// The group of `page`.
    pub fn group(page: u64) -> u64 {
        page / GROUP_PAGES
    }

    /// The servers of `page`'s group, best first.
    pub fn ranking(&self, page: u64) -> Ranking {
        let group = Placement::group(page);
        let mut scored: [(u64, u8); SERVERS_MAX] = [(0, 0); SERVERS_MAX];
        for (i, seed) in self.seeds.iter().enumerate() {
            scored[i] = (mix(group ^ seed), i as u8);
        }
        let n = self.seeds.len();
        // Highest score first; the index breaks ties (identical names are refused earlier).
        scored[..n].sort_unstable_by(|a, b| b.cmp(a));
        let mut order = [0u8; SERVERS_MAX];
        for (slot, (_, i)) in order.iter_mut().zip(&scored[..n]) {
            *slot = *i;
        }
        Ranking { order, len: n }
    }
}

impl Placement {
    /// The servers that may hold value `slot` of stripe `stripe` of a code of `width` = K+M
    /// values whose stripes start at page `first_page`, best first: its home, position
    /// `(slot + stripe) % width` of the group's ranking (the rotation spreads parity over the
    /// group's first `width` servers), then the spares (positions from `width` on) in ranking
    /// order. The caller skips servers that are down or hold another value of the stripe.
    pub fn stripe_candidates(
        &self,
        first_page: u64,
        stripe: u64,
        width: usize,
        slot: usize,
    ) -> Ranking {
        let ranking = self.ranking(first_page);
        let all = ranking.servers();
        assert!(width <= all.len() && slot < width, "a stripe fits the pool");
        let mut order = [0u8; SERVERS_MAX];
        order[0] = all[(slot + (stripe % width as u64) as usize) % width];
        order[1..1 + all.len() - width].copy_from_slice(&all[width..]);
        Ranking {
            order,
            len: 1 + all.len() - width,
        }
    }
}

const _: () = assert!(REPLICAS_MAX <= SERVERS_MAX);

/// FNV-1a of a name (stable across runs and builds).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser: every input bit moves every output bit.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:11211")).collect()
    }

    #[test]
    fn a_group_shares_its_ranking_and_rankings_spread_evenly() {
        let p = Placement::new(&names(3));
        let mut firsts = [0u32; 3];
        for group in 0..30_000u64 {
            let page = group * GROUP_PAGES;
            let r = p.ranking(page);
            assert_eq!(r.servers().len(), 3);
            for other in page..page + GROUP_PAGES {
                assert_eq!(p.ranking(other).servers(), r.servers());
            }
            let mut sorted = r.servers().to_vec();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2], "every server once");
            firsts[r.servers()[0] as usize] += 1;
        }
        for f in firsts {
            assert!((9_000..11_000).contains(&f), "{firsts:?}");
        }
    }

    #[test]
    fn a_stripe_has_distinct_homes_its_rotation_covers_them_and_spares_are_apart() {
        let p = Placement::new(&names(8));
        let (k, m) = (4usize, 2usize);
        let width = k + m;
        for group in 0..200u64 {
            let first = group * GROUP_PAGES;
            let ranking = p.ranking(first);
            let mut parity_homes = std::collections::BTreeSet::new();
            for s in 0..GROUP_PAGES / k as u64 {
                let stripe = group * (GROUP_PAGES / k as u64) + s;
                let homes: Vec<u8> = (0..width)
                    .map(|slot| p.stripe_candidates(first, stripe, width, slot).servers()[0])
                    .collect();
                let mut distinct = homes.clone();
                distinct.sort_unstable();
                distinct.dedup();
                assert_eq!(distinct.len(), width, "K+M distinct servers");
                assert!(homes.iter().all(|h| ranking.servers()[..width].contains(h)));
                parity_homes.extend(homes[k..].iter().copied());
                for slot in 0..width {
                    let c = p.stripe_candidates(first, stripe, width, slot);
                    assert_eq!(&c.servers()[1..], &ranking.servers()[width..], "the spares");
                    assert!(!homes.contains(&c.servers()[1]), "a spare is no home");
                }
            }
            // The rotation moves parity by one server a stripe: four stripes of a group put
            // it on five of its six home servers (and a sweep of the group uses all six).
            assert_eq!(parity_homes.len(), 5, "group {group}");
        }
    }

    #[test]
    fn adding_a_server_moves_only_its_share_and_order_does_not_matter() {
        let three = Placement::new(&names(3));
        let mut four_names = names(4);
        let four = Placement::new(&four_names);
        let groups = 20_000u64;
        let mut moved = 0;
        for group in 0..groups {
            let page = group * GROUP_PAGES;
            let before = three.ranking(page).servers()[0];
            let after = four.ranking(page).servers()[0];
            if before != after {
                assert_eq!(after, 3, "a group moves only to the new server");
                moved += 1;
            }
        }
        assert!((4_000..6_000).contains(&moved), "moved {moved} of {groups}");
        four_names.reverse();
        let reversed = Placement::new(&four_names);
        let by_name = |p: &Placement, list: &[String], page: u64| -> Vec<String> {
            p.ranking(page)
                .servers()
                .iter()
                .map(|&i| list[i as usize].clone())
                .collect()
        };
        for group in 0..1000u64 {
            let page = group * GROUP_PAGES;
            assert_eq!(
                by_name(&four, &names(4), page),
                by_name(&reversed, &four_names, page)
            );
        }
    }
}
