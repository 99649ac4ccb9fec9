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
//!
//! Sealed (`LEGO_KEY_FILE`, [`encode_sealed`]): `K u8 | M u8 | P u8 | 1 u8 | K x version
//! u32 LE | parity page sealed by [`Sealer`]`, bound to the heap, the stripe, the slot, the
//! shape and the whole cover (versions and CRC32Cs: [`SealedParityAs`]).
//! [`sealed_value_bytes`] is 4 + 4K + 28 + 4096 bytes. No checksum of a data page leaves the
//! machine (it would let a server confirm a guess of a page): the cover's checksums are only
//! in the associated data, which is not sent. The versions are in the clear, like a sealed
//! page's, so that an old value is told from a forged one without opening it; a value that
//! does not open ([`Unread::Forged`]) is changed, swapped, relabelled or under another key.
//! Either way it is not used, and on failure the buffer holds no byte of the value.

use super::Outcome;
use crate::seal::{SealedParityAs, Sealer, PARITY_COVER_ENTRIES_MAX, SEALED_OVERHEAD_BYTES};
use crate::PAGE_SIZE;

/// Bytes before the cover: the crc and K, M, P and a zero.
pub const PARITY_HEADER_BYTES: usize = 8;
/// Bytes of one cover entry: a version and a crc.
pub const COVER_ENTRY_BYTES: usize = 8;

/// Bytes of a parity value of a code with `data` data pages.
pub const fn value_bytes(data: usize) -> usize {
    PARITY_HEADER_BYTES + COVER_ENTRY_BYTES * data + PAGE_SIZE
}

/// Bytes before the sealed parity page in a sealed value: K, M, P and the sealed mark.
pub const SEALED_PARITY_HEADER_BYTES: usize = 4;
/// The header's fourth byte in a sealed value (0 in an unsealed one).
const SEALED_MARK: u8 = 1;

/// Bytes of a sealed parity value of a code with `data` data pages.
pub const fn sealed_value_bytes(data: usize) -> usize {
    SEALED_PARITY_HEADER_BYTES + 4 * data + SEALED_OVERHEAD_BYTES + PAGE_SIZE
}

const _: () = assert!(
    COVER_ENTRY_BYTES == crate::seal::PARITY_COVER_ENTRY_BYTES,
    "the seal binds the cover as this module lays it out"
);

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
    /// A sealed value that does not open with this key for this heap, stripe, slot and cover
    /// (changed, swapped, relabelled, or sealed under another key).
    Forged,
}

/// Appends the parity value of `w` to `out`.
pub fn encode(w: &ParityWrite<'_>, out: &mut Vec<u8>) {
    assert_eq!(w.buf.len(), PAGE_SIZE, "a parity value holds one page");
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let data = u8::try_from(w.cover.len()).expect("at most 16 data pages");
    out.extend_from_slice(&[data, w.parity, w.key.slot, 0]);
    let mut cover = [0u8; COVER_ENTRY_BYTES * PARITY_COVER_ENTRIES_MAX];
    let len = cover_bytes(w.cover, &mut cover);
    out.extend_from_slice(&cover[..len]);
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

/// The cover as an unsealed value holds it and a seal binds it: K x (version u32 LE, crc u32
/// LE), in `buf`; its length.
fn cover_bytes(
    cover: &[Cover],
    buf: &mut [u8; COVER_ENTRY_BYTES * PARITY_COVER_ENTRIES_MAX],
) -> usize {
    assert!(
        cover.len() <= PARITY_COVER_ENTRIES_MAX,
        "at most 16 data pages"
    );
    for (entry, c) in buf.chunks_exact_mut(COVER_ENTRY_BYTES).zip(cover) {
        entry[0..4].copy_from_slice(&c.version.to_le_bytes());
        entry[4..8].copy_from_slice(&c.crc.to_le_bytes());
    }
    COVER_ENTRY_BYTES * cover.len()
}

/// Appends the sealed parity value of `w` to `out`; false if `sealer` has no nonce left
/// (`protocol::set_with` then drops what was appended).
pub fn encode_sealed(sealer: &Sealer, w: &ParityWrite<'_>, out: &mut Vec<u8>) -> bool {
    assert_eq!(w.buf.len(), PAGE_SIZE, "a parity value holds one page");
    let start = out.len();
    let data = u8::try_from(w.cover.len()).expect("at most 16 data pages");
    out.extend_from_slice(&[data, w.parity, w.key.slot, SEALED_MARK]);
    for c in w.cover {
        out.extend_from_slice(&c.version.to_le_bytes());
    }
    let mut cover = [0u8; COVER_ENTRY_BYTES * PARITY_COVER_ENTRIES_MAX];
    let len = cover_bytes(w.cover, &mut cover);
    let what = SealedParityAs {
        stripe: w.key.stripe,
        slot: w.key.slot,
        data,
        parity: w.parity,
        cover: &cover[..len],
    };
    let sealed = sealer.seal_parity_into(&what, w.buf, out).is_ok();
    debug_assert!(!sealed || out.len() - start == sealed_value_bytes(w.cover.len()));
    sealed
}

/// Opens the sealed parity value `data` into `r.buf` if it is the one `r` asks for; on any
/// failure `r.buf` holds no byte of the value.
pub fn decode_sealed(sealer: &Sealer, data: &[u8], r: &mut ParityRead<'_>) -> Result<(), Unread> {
    let k = r.cover.len();
    let refuse = |r: &mut ParityRead<'_>, why| {
        r.buf.fill(0);
        Err(why)
    };
    if data.len() != sealed_value_bytes(k) {
        return refuse(r, Unread::Damaged);
    }
    if usize::from(data[0]) != k
        || data[1] != r.parity
        || data[2] != r.key.slot
        || data[3] != SEALED_MARK
    {
        return refuse(r, Unread::Damaged);
    }
    let versions = &data[SEALED_PARITY_HEADER_BYTES..SEALED_PARITY_HEADER_BYTES + 4 * k];
    for (v, want) in versions.chunks_exact(4).zip(r.cover) {
        if u32::from_le_bytes(v.try_into().expect("4 bytes")) != want.version {
            return refuse(r, Unread::Old);
        }
    }
    let mut cover = [0u8; COVER_ENTRY_BYTES * PARITY_COVER_ENTRIES_MAX];
    let len = cover_bytes(r.cover, &mut cover);
    let what = SealedParityAs {
        stripe: r.key.stripe,
        slot: r.key.slot,
        data: data[0],
        parity: r.parity,
        cover: &cover[..len],
    };
    sealer
        .open_parity_into(&what, &data[SEALED_PARITY_HEADER_BYTES + 4 * k..], r.buf)
        .map_err(|_| Unread::Forged)
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

    /// The unsealed value of parity `slot` of `stripe` (shape K+`parity`, K = `c.len()`).
    fn unsealed(stripe: u64, slot: u8, parity: u8, page: &[u8], c: &[Cover]) -> Vec<u8> {
        let w = ParityWrite {
            key: ParityKey { stripe, slot },
            buf: page,
            cover: c,
            parity,
            outcome: Outcome::Pending,
        };
        let mut value = Vec::new();
        encode(&w, &mut value);
        value
    }

    #[test]
    fn a_value_reads_back_only_for_its_shape_slot_and_cover() {
        let page = vec![0x3cu8; PAGE_SIZE];
        let c = cover(4, 9);
        let value = unsealed(5, 1, 2, &page, &c);
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

    fn sealer(heap: u64, key: u8) -> Sealer {
        Sealer::new(
            &crate::seal::SealKey::from_bytes([key; crate::seal::KEY_BYTES]),
            heap,
        )
    }

    fn sealed(s: &Sealer, stripe: u64, slot: u8, page: &[u8], c: &[Cover]) -> Vec<u8> {
        let w = ParityWrite {
            key: ParityKey { stripe, slot },
            buf: page,
            cover: c,
            parity: 2,
            outcome: Outcome::Pending,
        };
        let mut value = Vec::new();
        assert!(encode_sealed(s, &w, &mut value));
        assert_eq!(value.len(), sealed_value_bytes(c.len()));
        value
    }

    /// Opens `value` as parity `slot` of `stripe` (shape K+`parity`) with `cover`: the page,
    /// or why not (and then the buffer must hold zeros).
    fn open_sealed(
        s: &Sealer,
        value: &[u8],
        stripe: u64,
        slot: u8,
        parity: u8,
        cover: &[Cover],
    ) -> Result<Vec<u8>, Unread> {
        let mut buf = vec![0xeeu8; PAGE_SIZE];
        let mut r = ParityRead {
            key: ParityKey { stripe, slot },
            buf: &mut buf,
            cover,
            parity,
            outcome: Outcome::Pending,
        };
        match decode_sealed(s, value, &mut r) {
            Ok(()) => Ok(buf),
            Err(why) => {
                assert!(buf.iter().all(|&b| b == 0), "no byte of a refused value");
                Err(why)
            }
        }
    }

    /// A sealed parity value holds neither its page nor any cover checksum in the clear, and
    /// opens only for its heap, key, stripe, slot, shape and exact cover.
    #[test]
    fn a_sealed_value_opens_only_for_its_heap_stripe_slot_shape_and_cover() {
        let s = sealer(0x11, 3);
        let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 13 % 251) as u8).collect();
        let c = cover(4, 21);
        let value = sealed(&s, 9, 1, &page, &c);
        assert!(!value.windows(32).any(|w| w == &page[64..96]), "plaintext");
        for entry in &c {
            let crc = entry.crc.to_le_bytes();
            assert!(!value.windows(4).any(|w| w == crc), "a cover checksum");
        }
        assert_eq!(open_sealed(&s, &value, 9, 1, 2, &c), Ok(page.clone()));
        let mut older = c.clone();
        older[2].version -= 1;
        assert_eq!(open_sealed(&s, &value, 9, 1, 2, &older), Err(Unread::Old));
        let mut other_crc = c.clone();
        other_crc[1].crc ^= 1;
        assert_eq!(
            open_sealed(&s, &value, 9, 1, 2, &other_crc),
            Err(Unread::Forged)
        );
        assert_eq!(open_sealed(&s, &value, 8, 1, 2, &c), Err(Unread::Forged));
        assert_eq!(open_sealed(&s, &value, 9, 0, 2, &c), Err(Unread::Damaged));
        assert_eq!(open_sealed(&s, &value, 9, 1, 3, &c), Err(Unread::Damaged));
        assert_eq!(
            open_sealed(&s, &value, 9, 1, 2, &c[..2]),
            Err(Unread::Damaged)
        );
        // The slot relabelled in the clear: the seal binds the slot it was made for.
        let mut relabelled = value.clone();
        relabelled[2] = 0;
        assert_eq!(
            open_sealed(&s, &relabelled, 9, 0, 2, &c),
            Err(Unread::Forged)
        );
        // An old value relabelled with the current versions.
        let mut now = c.clone();
        now[0].version += 1;
        let mut stale = value.clone();
        stale[4..8].copy_from_slice(&now[0].version.to_le_bytes());
        assert_eq!(open_sealed(&s, &stale, 9, 1, 2, &now), Err(Unread::Forged));
        assert_eq!(
            open_sealed(&sealer(0x12, 3), &value, 9, 1, 2, &c),
            Err(Unread::Forged),
            "another heap"
        );
        assert_eq!(
            open_sealed(&sealer(0x11, 4), &value, 9, 1, 2, &c),
            Err(Unread::Forged),
            "another key"
        );
        // An unsealed value is not a sealed one, whatever its length.
        let plain = unsealed(9, 1, 2, &page, &c);
        assert!(open_sealed(&s, &plain, 9, 1, 2, &c).is_err());
        let c6 = cover(6, 5);
        let plain6 = unsealed(9, 1, 2, &page, &c6);
        assert_eq!(
            plain6.len(),
            sealed_value_bytes(6),
            "the same length for K = 6"
        );
        assert!(open_sealed(&s, &plain6, 9, 1, 2, &c6).is_err());
        // Two seals of one parity never share a nonce: their bytes differ.
        assert_ne!(sealed(&s, 9, 1, &page, &c), value);
    }

    proptest! {
        #![proptest_config(crate::fuzz_support::config(64))]

        /// Random pages and covers round-trip sealed; any flipped bit is refused with the
        /// buffer left zeroed; any bytes decode without a panic.
        #[test]
        fn fuzz_sealed_parity_values_round_trip_and_refuse_every_flip(
            k in prop::sample::select(vec![2usize, 4, 8, 16]),
            seed: u32,
            stripe: u64,
            slot in 0u8..4,
            page in proptest::collection::vec(any::<u8>(), PAGE_SIZE),
            flip: proptest::sample::Index,
            junk in proptest::collection::vec(any::<u8>(), 0..5000),
        ) {
            let s = sealer(seed.into(), 9);
            let c = cover(k, seed);
            let w = ParityWrite {
                key: ParityKey { stripe, slot },
                buf: &page,
                cover: &c,
                parity: 4,
                outcome: Outcome::Pending,
            };
            let mut value = Vec::new();
            prop_assert!(encode_sealed(&s, &w, &mut value));
            prop_assert_eq!(open_sealed(&s, &value, stripe, slot, 4, &c), Ok(page.clone()));
            let bit = flip.index(value.len() * 8);
            value[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(open_sealed(&s, &value, stripe, slot, 4, &c).is_err());
            let _ = open_sealed(&s, &junk, stripe, slot, 4, &c);
            let mut sized = junk.clone();
            sized.resize(sealed_value_bytes(k), 0);
            sized[0] = k as u8;
            sized[1] = 4;
            sized[2] = slot;
            sized[3] = SEALED_MARK;
            prop_assert!(open_sealed(&s, &sized, stripe, slot, 4, &c).is_err());
        }

        /// Any flipped bit of a value is refused, and any bytes decode without a panic.
        #[test]
        fn fuzz_parity_values_refuse_every_flip_and_any_bytes(
            flip in 0usize..value_bytes(8) * 8,
            seed: u32,
            junk in proptest::collection::vec(any::<u8>(), 0..5000),
        ) {
            let page = vec![seed as u8; PAGE_SIZE];
            let c = cover(8, seed);
            let mut value = unsealed(1, 0, 2, &page, &c);
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
