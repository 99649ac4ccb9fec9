//! Parity values of an erasure-coded pool (`LEGO_REDUNDANCY=rs:K+M`): what a member stores
//! and reads besides pages ([`ParityRead`], [`ParityWrite`]), and the value's format.
//!
//! A parity value is `crc32c (u32 LE) of everything after it | K u8 | M u8 | P u8 | 0 u8 |
//! cover | parity page`, where the cover is K x (version u32 LE, crc u32 LE): the data values
//! it was computed from (version 0: a slot never stored, or discarded, coded as zeros).
//! [`value_bytes`] is 8 + 8K + 4096 bytes.
//!
//! Rules: a value is accepted only whole, with its crc right, for the shape and slot asked,
//! and with exactly the cover asked for; any other cover is an old value ([`Unread::Old`]),
//! never combined with values of other versions.

use super::Outcome;
use crate::PAGE_SIZE;

/// Bytes before the cover: the crc and K, M, P and a zero.
pub const PARITY_HEADER_BYTES: usize = 8;
/// Bytes of one cover entry: a version and a crc.
pub const COVER_ENTRY_BYTES: usize = 8;

/// Bytes of a parity value of a code with `data` data pages.
pub const fn value_bytes(data: usize) -> usize {
    PARITY_HEADER_BYTES + COVER_ENTRY_BYTES * data + PAGE_SIZE
}

/// What a data slot held when a parity was computed: its version (0: zeros) and CRC32C.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cover {
    pub version: u32,
    pub crc: u32,
}

/// Parity value `slot` (0..M) of stripe `stripe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParityKey {
    pub stripe: u64,
    pub slot: u8,
}

/// One parity value to read: `buf` gets its parity page, which is `Done` only if the value
/// is whole and its cover is `cover` (K entries).
pub struct ParityRead<'a> {
    pub key: ParityKey,
    pub buf: &'a mut [u8],
    pub cover: &'a [Cover],
    /// M, to check the value's shape.
    pub parity: u8,
    pub outcome: Outcome,
}

/// One parity value to write: the parity page `buf`, computed from the data values `cover`.
pub struct ParityWrite<'a> {
    pub key: ParityKey,
    pub buf: &'a [u8],
    pub cover: &'a [Cover],
    pub parity: u8,
    pub outcome: Outcome,
}

/// Why a parity value was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unread {
    /// Not a whole parity value of this shape and slot, or its crc is wrong.
    Damaged,
    /// Computed from other data values than the cover asked for.
    Old,
}

/// Appends the parity value of `w` to `out`.
pub fn encode(w: &ParityWrite<'_>, out: &mut Vec<u8>) {
    assert_eq!(w.buf.len(), PAGE_SIZE, "a parity value holds one page");
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let data = u8::try_from(w.cover.len()).expect("at most 16 data pages");
    out.extend_from_slice(&[data, w.parity, w.key.slot, 0]);
    for c in w.cover {
        out.extend_from_slice(&c.version.to_le_bytes());
        out.extend_from_slice(&c.crc.to_le_bytes());
    }
    out.extend_from_slice(w.buf);
    let crc = crc32c::crc32c(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len() - start, value_bytes(w.cover.len()));
}

/// Reads the parity value `data` into `r.buf` if it is the one `r` asks for.
pub fn decode(data: &[u8], r: &mut ParityRead<'_>) -> Result<(), Unread> {
    let k = r.cover.len();
    if data.len() != value_bytes(k) {
        return Err(Unread::Damaged);
    }
    let crc = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&data[4..]) {
        return Err(Unread::Damaged);
    }
    if usize::from(data[4]) != k || data[5] != r.parity || data[6] != r.key.slot || data[7] != 0 {
        return Err(Unread::Damaged);
    }
    let cover = &data[PARITY_HEADER_BYTES..PARITY_HEADER_BYTES + COVER_ENTRY_BYTES * k];
    for (entry, want) in cover.chunks_exact(COVER_ENTRY_BYTES).zip(r.cover) {
        let version = u32::from_le_bytes(entry[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(entry[4..8].try_into().expect("4 bytes"));
        if version != want.version || crc != want.crc {
            return Err(Unread::Old);
        }
    }
    r.buf
        .copy_from_slice(&data[PARITY_HEADER_BYTES + COVER_ENTRY_BYTES * k..]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cover(k: usize, seed: u32) -> Vec<Cover> {
        (0..k as u32)
            .map(|i| Cover {
                version: seed.wrapping_add(i),
                crc: seed.wrapping_mul(31).wrapping_add(i),
            })
            .collect()
    }

    #[test]
    fn a_value_reads_back_only_for_its_shape_slot_and_cover() {
        let page = vec![0x3cu8; PAGE_SIZE];
        let c = cover(4, 9);
        let w = ParityWrite {
            key: ParityKey { stripe: 5, slot: 1 },
            buf: &page,
            cover: &c,
            parity: 2,
            outcome: Outcome::Pending,
        };
        let mut value = Vec::new();
        encode(&w, &mut value);
        assert_eq!(value.len(), 4136, "8 + 8K + 4096 for K = 4");
        let mut buf = vec![0u8; PAGE_SIZE];
        let read = |value: &[u8], cover: &[Cover], slot: u8, parity: u8| {
            let mut buf = vec![0u8; PAGE_SIZE];
            let mut r = ParityRead {
                key: ParityKey { stripe: 5, slot },
                buf: &mut buf,
                cover,
                parity,
                outcome: Outcome::Pending,
            };
            decode(value, &mut r).map(|()| buf)
        };
        buf = read(&value, &c, 1, 2).expect("read");
        assert_eq!(buf, page);
        let mut older = c.clone();
        older[3].version -= 1;
        assert_eq!(read(&value, &older, 1, 2), Err(Unread::Old));
        let mut other_crc = c.clone();
        other_crc[0].crc ^= 1;
        assert_eq!(read(&value, &other_crc, 1, 2), Err(Unread::Old));
        assert_eq!(read(&value, &c, 0, 2), Err(Unread::Damaged));
        assert_eq!(read(&value, &c, 1, 3), Err(Unread::Damaged));
        assert_eq!(read(&value, &c[..2], 1, 2), Err(Unread::Damaged));
        assert_eq!(read(&value[1..], &c, 1, 2), Err(Unread::Damaged));
    }

    proptest! {
        #![proptest_config(crate::fuzz_support::config(64))]

        /// Any flipped bit of a value is refused, and any bytes decode without a panic.
        #[test]
        fn fuzz_parity_values_refuse_every_flip_and_any_bytes(
            flip in 0usize..value_bytes(8) * 8,
            seed: u32,
            junk in proptest::collection::vec(any::<u8>(), 0..5000),
        ) {
            let page = vec![seed as u8; PAGE_SIZE];
            let c = cover(8, seed);
            let w = ParityWrite {
                key: ParityKey { stripe: 1, slot: 0 },
                buf: &page,
                cover: &c,
                parity: 2,
                outcome: Outcome::Pending,
            };
            let mut value = Vec::new();
            encode(&w, &mut value);
            value[flip / 8] ^= 1 << (flip % 8);
            let mut buf = vec![0u8; PAGE_SIZE];
            let mut r = ParityRead {
                key: ParityKey { stripe: 1, slot: 0 },
                buf: &mut buf,
                cover: &c,
                parity: 2,
                outcome: Outcome::Pending,
            };
            prop_assert!(decode(&value, &mut r).is_err());
            let _ = decode(&junk, &mut r);
        }
    }
}
