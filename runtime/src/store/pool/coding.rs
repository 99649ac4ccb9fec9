//! [`Code`]: Reed-Solomon over GF(2^8) for stripes of K data pages and M parity pages
//! (`LEGO_REDUNDANCY=rs:K+M`), over `reed-solomon-erasure` with its SIMD kernels.
//!
//! Pure: no I/O and no knowledge of servers. It encodes a stripe's parity from its K data
//! pages, updates parity for a change of one data page (a delta), and rebuilds missing values
//! from any K of the K+M. Every value is one page ([`PAGE_SIZE`] bytes).
//!
//! Rules: a rebuild never guesses: more than M values missing is an error, and the caller
//! checks the rebuilt page's CRC32C against what the pool recorded. The delta update never
//! trusts `encode_single_sep` in place (see [`Code::delta`]).

use reed_solomon_erasure::galois_8::ReedSolomon;
use thiserror::Error;

use crate::PAGE_SIZE;

/// Data pages of a stripe allowed (each divides a placement group).
pub const DATA_SHARDS_ALLOWED: [usize; 4] = [2, 4, 8, 16];
/// Most parity pages of a stripe.
pub const PARITY_SHARDS_MAX: usize = 4;
/// Most values of a stripe (data and parity).
pub const STRIPE_VALUES_MAX: usize = 16 + PARITY_SHARDS_MAX;

/// Errors of coding.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodingError {
    #[error("an rs:{data}+{parity} code is not supported: data pages must be 2, 4, 8 or 16 and parity pages 1 to {PARITY_SHARDS_MAX}")]
    Shape { data: usize, parity: usize },
    #[error("a stripe of rs:{data}+{parity} cannot be rebuilt: {missing} of its values are missing, at most {parity} may be")]
    TooManyMissing {
        data: usize,
        parity: usize,
        missing: usize,
    },
    #[error("a stripe was given {given} values of the wrong count or size (expected {expected} values of {PAGE_SIZE} bytes)")]
    Values { given: usize, expected: usize },
}

/// A Reed-Solomon code of K data and M parity pages.
pub struct Code {
    rs: ReedSolomon,
    data: usize,
    parity: usize,
}

impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rs:{}+{}", self.data, self.parity)
    }
}

impl Code {
    /// The code rs:`data`+`parity` (the configuration checked the shape already).
    pub fn new(data: usize, parity: usize) -> Result<Code, CodingError> {
        if !DATA_SHARDS_ALLOWED.contains(&data) || !(1..=PARITY_SHARDS_MAX).contains(&parity) {
            return Err(CodingError::Shape { data, parity });
        }
        let rs = ReedSolomon::new(data, parity).map_err(|_| CodingError::Shape { data, parity })?;
        Ok(Code { rs, data, parity })
    }

    /// K: data pages of a stripe.
    pub fn data(&self) -> usize {
        self.data
    }

    /// M: parity pages of a stripe.
    pub fn parity(&self) -> usize {
        self.parity
    }

    /// Computes the M parity pages of the K `data` pages into `parity` (overwritten).
    pub fn encode<T: AsRef<[u8]>, U: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        data: &[T],
        parity: &mut [U],
    ) -> Result<(), CodingError> {
        self.check(data.len(), self.data, data.iter().map(|d| d.as_ref().len()))?;
        self.check(
            parity.len(),
            self.parity,
            parity.iter().map(|p| p.as_ref().len()),
        )?;
        self.rs
            .encode_sep(data, parity)
            .expect("the counts and sizes were checked");
        Ok(())
    }

    /// Updates the stripe's `parity` for data slot `slot` changing from `old` to `new`.
    ///
    /// `encode_single_sep` overwrites the parity for slot 0 and accumulates for the others,
    /// so it is never applied in place: the delta (old xor new) is encoded into a zeroed
    /// scratch parity, which then is xored into the stored one, the same for every slot.
    pub fn delta<U: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        slot: usize,
        old: &[u8],
        new: &[u8],
        parity: &mut [U],
    ) -> Result<(), CodingError> {
        if slot >= self.data || old.len() != PAGE_SIZE || new.len() != PAGE_SIZE {
            return Err(CodingError::Values {
                given: slot,
                expected: self.data,
            });
        }
        self.check(
            parity.len(),
            self.parity,
            parity.iter().map(|p| p.as_ref().len()),
        )?;
        let delta: Vec<u8> = old.iter().zip(new).map(|(a, b)| a ^ b).collect();
        let mut scratch = vec![vec![0u8; PAGE_SIZE]; self.parity];
        self.rs
            .encode_single_sep(slot, &delta, &mut scratch)
            .expect("the counts and sizes were checked");
        for (p, s) in parity.iter_mut().zip(&scratch) {
            for (b, d) in p.as_mut().iter_mut().zip(s) {
                *b ^= d;
            }
        }
        Ok(())
    }

    /// Rebuilds the data values of a stripe that are missing: `values` holds the K data then
    /// the M parity values, each with whether it is present; the missing data values are
    /// written in place (missing parity values are left as they are). More than M missing is
    /// an error, and then nothing is written.
    pub fn rebuild(&self, values: &mut [(&mut [u8], bool)]) -> Result<(), CodingError> {
        self.check(
            values.len(),
            self.data + self.parity,
            values.iter().map(|(v, _)| v.len()),
        )?;
        let missing = values.iter().filter(|(_, present)| !present).count();
        if missing > self.parity {
            return Err(CodingError::TooManyMissing {
                data: self.data,
                parity: self.parity,
                missing,
            });
        }
        if values[..self.data].iter().all(|(_, present)| *present) {
            return Ok(());
        }
        self.rs
            .reconstruct_data(values)
            .map_err(|_| CodingError::TooManyMissing {
                data: self.data,
                parity: self.parity,
                missing,
            })
    }

    fn check(
        &self,
        given: usize,
        expected: usize,
        mut sizes: impl Iterator<Item = usize>,
    ) -> Result<(), CodingError> {
        if given != expected || !sizes.all(|s| s == PAGE_SIZE) {
            return Err(CodingError::Values { given, expected });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pages(n: usize, seed: u64) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let mut p = vec![0u8; PAGE_SIZE];
                crate::io::test_support::fill(&mut p, seed.wrapping_add(i as u64 * 7919));
                p
            })
            .collect()
    }

    fn encoded(code: &Code, data: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut parity = vec![vec![0u8; PAGE_SIZE]; code.parity()];
        code.encode(data, &mut parity).expect("encode");
        parity
    }

    /// Every subset of `n` items with at most `most` of them.
    fn patterns(n: usize, most: usize) -> Vec<Vec<usize>> {
        (0u32..1 << n)
            .filter(|m| m.count_ones() as usize <= most && *m != 0)
            .map(|m| (0..n).filter(|i| m & (1 << i) != 0).collect())
            .collect()
    }

    fn rebuilt(code: &Code, all: &[Vec<u8>], lost: &[usize]) -> Result<Vec<Vec<u8>>, CodingError> {
        let mut values: Vec<Vec<u8>> = all
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if lost.contains(&i) {
                    vec![0xa5u8; PAGE_SIZE]
                } else {
                    v.clone()
                }
            })
            .collect();
        let mut slices: Vec<(&mut [u8], bool)> = values
            .iter_mut()
            .enumerate()
            .map(|(i, v)| (v.as_mut_slice(), !lost.contains(&i)))
            .collect();
        code.rebuild(&mut slices)?;
        Ok(values)
    }

    #[test]
    fn shapes_outside_the_allowed_ones_are_refused() {
        for (k, m) in [(3, 1), (4, 0), (4, 5), (1, 1), (32, 2)] {
            assert_eq!(
                Code::new(k, m).expect_err("refused"),
                CodingError::Shape { data: k, parity: m }
            );
        }
        assert_eq!(format!("{:?}", Code::new(4, 2).expect("ok")), "rs:4+2");
    }

    #[test]
    fn every_loss_of_at_most_m_values_is_rebuilt_for_4_2_and_8_2() {
        for (k, m, expected_patterns) in [(4, 2, 21), (8, 2, 55), (2, 1, 3)] {
            let code = Code::new(k, m).expect("code");
            let data = pages(k, 11);
            let mut all = data.clone();
            all.extend(encoded(&code, &data));
            let ps = patterns(k + m, m);
            assert_eq!(ps.len(), expected_patterns, "rs:{k}+{m}");
            // Exactly M lost: the design's 15 patterns for 4+2 and 45 for 8+2.
            let exactly_m = ps.iter().filter(|p| p.len() == m).count();
            assert_eq!(
                exactly_m,
                [15, 45, 3][[(4, 2), (8, 2), (2, 1)]
                    .iter()
                    .position(|s| *s == (k, m))
                    .expect("shape")]
            );
            for lost in ps {
                let values = rebuilt(&code, &all, &lost).expect("rebuilt");
                assert_eq!(&values[..k], &data[..], "rs:{k}+{m} lost {lost:?}");
            }
        }
    }

    #[test]
    fn more_than_m_lost_is_an_error_and_writes_nothing() {
        let code = Code::new(4, 2).expect("code");
        let data = pages(4, 3);
        let mut all = data.clone();
        all.extend(encoded(&code, &data));
        let e = rebuilt(&code, &all, &[0, 1, 4]).expect_err("too many");
        assert_eq!(
            e,
            CodingError::TooManyMissing {
                data: 4,
                parity: 2,
                missing: 3
            }
        );
    }

    #[test]
    fn delta_equals_re_encoding_for_every_slot_slot_0_included() {
        for (k, m) in [(2, 1), (4, 2), (8, 2), (16, 4)] {
            let code = Code::new(k, m).expect("code");
            for slot in 0..k {
                let mut data = pages(k, 100 + slot as u64);
                let mut parity = encoded(&code, &data);
                let new = pages(1, 999 + slot as u64).remove(0);
                code.delta(slot, &data[slot], &new, &mut parity)
                    .expect("delta");
                data[slot] = new;
                assert_eq!(parity, encoded(&code, &data), "rs:{k}+{m} slot {slot}");
            }
        }
    }

    #[test]
    fn wrong_counts_and_sizes_are_refused() {
        let code = Code::new(4, 2).expect("code");
        let data = pages(3, 1);
        let mut parity = vec![vec![0u8; PAGE_SIZE]; 2];
        assert!(code.encode(&data, &mut parity).is_err());
        let mut short = vec![vec![0u8; 100]; 2];
        assert!(code.encode(&pages(4, 1), &mut short).is_err());
        assert!(code.delta(4, &data[0], &data[1], &mut parity).is_err());
    }

    /// A measurement, not a test, so it is built only with the `measure` feature (`cargo test
    /// --release -p lego-runtime --features measure coding_costs -- --nocapture`): medians of
    /// encoding and rebuilding one stripe of 4 KiB pages.
    #[cfg(feature = "measure")]
    #[test]
    fn coding_costs() {
        for (k, m) in [(4, 2), (8, 2)] {
            let code = Code::new(k, m).expect("code");
            let data = pages(k, 5);
            let mut all = data.clone();
            all.extend(encoded(&code, &data));
            let median = |f: &mut dyn FnMut()| {
                let mut times: Vec<u128> = (0..2001)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f();
                        t.elapsed().as_nanos()
                    })
                    .collect();
                times.sort_unstable();
                times[times.len() / 2]
            };
            let mut parity = vec![vec![0u8; PAGE_SIZE]; m];
            let encode = median(&mut || code.encode(&data, &mut parity).expect("encode"));
            let mut values = all.clone();
            let rebuild = |lost: &[usize], values: &mut Vec<Vec<u8>>| {
                let mut slices: Vec<(&mut [u8], bool)> = values
                    .iter_mut()
                    .enumerate()
                    .map(|(i, v)| (v.as_mut_slice(), !lost.contains(&i)))
                    .collect();
                code.rebuild(&mut slices).expect("rebuild");
            };
            let one = median(&mut || rebuild(&[1], &mut values));
            let two = median(&mut || rebuild(&[0, 2], &mut values));
            println!(
                "rs:{k}+{m} stripe of 4 KiB pages: encode {:.2} us ({:.2} us/page), rebuild 1 lost {:.2} us, {m} lost {:.2} us",
                encode as f64 / 1000.0,
                encode as f64 / 1000.0 / k as f64,
                one as f64 / 1000.0,
                two as f64 / 1000.0
            );
        }
    }

    proptest! {
        #![proptest_config(crate::fuzz_support::config(48))]

        /// Random pages, a random code and a random loss of at most M values: the data comes
        /// back byte for byte; a random change of one page by delta equals a re-encoding.
        #[test]
        fn fuzz_random_stripes_round_trip(
            seed: u64,
            shape in 0usize..5,
            lost_mask: u32,
            slot_pick: usize,
        ) {
            let (k, m) = [(2, 1), (4, 2), (8, 2), (8, 4), (16, 2)][shape];
            let code = Code::new(k, m).expect("code");
            let data = pages(k, seed);
            let mut all = data.clone();
            all.extend(encoded(&code, &data));
            let mut lost: Vec<usize> = (0..k + m).filter(|i| lost_mask & (1 << i) != 0).collect();
            lost.truncate(m);
            let values = rebuilt(&code, &all, &lost).expect("rebuilt");
            prop_assert_eq!(&values[..k], &data[..]);

            let slot = slot_pick % k;
            let mut parity = all[k..].to_vec();
            let new = pages(1, seed ^ 0x5555).remove(0);
            code.delta(slot, &data[slot], &new, &mut parity).expect("delta");
            let mut changed = data.clone();
            changed[slot] = new;
            prop_assert_eq!(parity, encoded(&code, &changed));
        }
    }
}
