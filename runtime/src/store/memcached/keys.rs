//! The names lego gives its values on a memcached server, in one place: a page of a heap is
//! `lego:HEAPID:PAGE`, parity value P of an erasure-coded stripe is `lego:HEAPID:sSTRIPE:P`,
//! and a heap's lease is `lego:HEAPID:lease`, with HEAPID 16 lowercase hex digits and PAGE,
//! STRIPE and P lowercase hex without leading zeros.
//!
//! Rules: [`parse_key`] accepts exactly the names [`page_key`], [`parity_key`] and
//! [`lease_key`] write (a
//! name it accepts is written back byte for byte), so garbage collection, which deletes only
//! what this parser calls lego's, never touches a key another program chose, even one that
//! starts with `lego:`.

/// What every key of lego's starts with.
pub const KEY_PREFIX: &str = "lego:";
/// The last part of a heap's lease key.
pub const LEASE_SUFFIX: &str = "lease";
/// Hex digits of a heap id in a key.
const HEAP_ID_DIGITS: usize = 16;

/// The key of page `page` of heap `heap_id`.
pub fn page_key(heap_id: u64, page: u64) -> String {
    PageKey::new(heap_id, page).as_str().to_owned()
}

/// Bytes of the longest page key: the prefix, 16 digits, ':', 16 digits.
const PAGE_KEY_BYTES_MAX: usize = KEY_PREFIX.len() + HEAP_ID_DIGITS + 1 + 16;

/// A page key on the stack (the fault path builds one per page: no allocation).
pub struct PageKey {
    buf: [u8; PAGE_KEY_BYTES_MAX],
    len: usize,
}

impl PageKey {
    pub fn new(heap_id: u64, page: u64) -> PageKey {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; PAGE_KEY_BYTES_MAX];
        let prefix = KEY_PREFIX.len();
        buf[..prefix].copy_from_slice(KEY_PREFIX.as_bytes());
        for i in 0..HEAP_ID_DIGITS {
            buf[prefix + i] = HEX[((heap_id >> (4 * (HEAP_ID_DIGITS - 1 - i))) & 0xf) as usize];
        }
        let mut len = prefix + HEAP_ID_DIGITS;
        buf[len] = b':';
        len += 1;
        let digits = (64 - page.leading_zeros()).div_ceil(4).max(1) as usize;
        for i in 0..digits {
            buf[len + i] = HEX[((page >> (4 * (digits - 1 - i))) & 0xf) as usize];
        }
        PageKey {
            buf,
            len: len + digits,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("ASCII")
    }
}

/// The key of parity value `slot` of stripe `stripe` of heap `heap_id`.
pub fn parity_key(heap_id: u64, stripe: u64, slot: u8) -> String {
    ParityKeyName::new(heap_id, stripe, slot)
        .as_str()
        .to_owned()
}

/// What starts the last part of a parity key.
const PARITY_MARK: u8 = b's';
/// Bytes of the longest parity key: a page key, 's', ':', 2 digits.
const PARITY_KEY_BYTES_MAX: usize = PAGE_KEY_BYTES_MAX + 4;

/// A parity key on the stack.
pub struct ParityKeyName {
    buf: [u8; PARITY_KEY_BYTES_MAX],
    len: usize,
}

impl ParityKeyName {
    pub fn new(heap_id: u64, stripe: u64, slot: u8) -> ParityKeyName {
        let page = PageKey::new(heap_id, stripe);
        let mut buf = [0u8; PARITY_KEY_BYTES_MAX];
        // lego:HEAPID: then 's', the stripe's digits, ':' and the slot's.
        let head = KEY_PREFIX.len() + HEAP_ID_DIGITS + 1;
        buf[..head].copy_from_slice(&page.buf[..head]);
        buf[head] = PARITY_MARK;
        let digits = page.len - head;
        buf[head + 1..head + 1 + digits].copy_from_slice(&page.buf[head..page.len]);
        let mut len = head + 1 + digits;
        buf[len] = b':';
        len += 1;
        const HEX: &[u8; 16] = b"0123456789abcdef";
        if slot >= 16 {
            buf[len] = HEX[usize::from(slot >> 4)];
            len += 1;
        }
        buf[len] = HEX[usize::from(slot & 0xf)];
        ParityKeyName { buf, len: len + 1 }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("ASCII")
    }
}

/// The key of the lease of heap `heap_id`.
pub fn lease_key(heap_id: u64) -> String {
    format!("{KEY_PREFIX}{heap_id:016x}:{LEASE_SUFFIX}")
}

/// A key lego wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegoKey {
    Page { heap_id: u64, page: u64 },
    Parity { heap_id: u64, stripe: u64, slot: u8 },
    Lease { heap_id: u64 },
}

impl LegoKey {
    pub fn heap_id(self) -> u64 {
        match self {
            LegoKey::Page { heap_id, .. }
            | LegoKey::Parity { heap_id, .. }
            | LegoKey::Lease { heap_id } => heap_id,
        }
    }
}

/// What `key` (raw bytes, as a metadump decodes them) names, if it is one of lego's.
pub fn parse_key(key: &[u8]) -> Option<LegoKey> {
    let rest = key.strip_prefix(KEY_PREFIX.as_bytes())?;
    if rest.len() <= HEAP_ID_DIGITS || rest[HEAP_ID_DIGITS] != b':' {
        return None;
    }
    let heap_id = hex(&rest[..HEAP_ID_DIGITS])?;
    let tail = &rest[HEAP_ID_DIGITS + 1..];
    if tail == LEASE_SUFFIX.as_bytes() {
        return Some(LegoKey::Lease { heap_id });
    }
    if let Some(parity) = tail.strip_prefix(&[PARITY_MARK]) {
        let colon = parity.iter().position(|&b| b == b':')?;
        let slot = number(&parity[colon + 1..])?;
        return Some(LegoKey::Parity {
            heap_id,
            stripe: number(&parity[..colon])?,
            slot: u8::try_from(slot).ok()?,
        });
    }
    Some(LegoKey::Page {
        heap_id,
        page: number(tail)?,
    })
}

/// A number as lego writes it in a key: lowercase hex without leading zeros ("0" is 0).
fn number(digits: &[u8]) -> Option<u64> {
    if digits.len() > HEAP_ID_DIGITS || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    hex(digits)
}

/// Lowercase hex digits (1 to 16 of them) as a number.
fn hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > HEAP_ID_DIGITS {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some((n << 4) | u64::from(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lego_keys_and_others() {
        assert_eq!(page_key(0xab, 0x1f), "lego:00000000000000ab:1f");
        assert_eq!(page_key(0xab, 0), "lego:00000000000000ab:0");
        assert_eq!(
            page_key(u64::MAX, u64::MAX),
            format!("lego:{:016x}:{:x}", u64::MAX, u64::MAX)
        );
        for page in [1u64, 15, 16, 255, 256, 0xdead_beef, 1 << 40] {
            assert_eq!(
                page_key(0x0123_4567_89ab_cdef, page),
                format!("lego:0123456789abcdef:{page:x}")
            );
        }
        assert_eq!(lease_key(0xab), "lego:00000000000000ab:lease");
        assert_eq!(parity_key(0xab, 0x1f0, 1), "lego:00000000000000ab:s1f0:1");
        assert_eq!(parity_key(0xab, 0, 0), "lego:00000000000000ab:s0:0");
        assert_eq!(
            parity_key(u64::MAX, u64::MAX, 255),
            format!("lego:{:016x}:s{:x}:ff", u64::MAX, u64::MAX)
        );
        assert_eq!(
            parse_key(b"lego:00000000000000ab:s1f0:1"),
            Some(LegoKey::Parity {
                heap_id: 0xab,
                stripe: 0x1f0,
                slot: 1
            })
        );
        assert_eq!(
            parse_key(b"lego:00000000000000ab:1f"),
            Some(LegoKey::Page {
                heap_id: 0xab,
                page: 0x1f
            })
        );
        assert_eq!(
            parse_key(b"lego:00000000000000ab:0"),
            Some(LegoKey::Page {
                heap_id: 0xab,
                page: 0
            })
        );
        assert_eq!(
            parse_key(b"lego:ffffffffffffffff:lease"),
            Some(LegoKey::Lease { heap_id: u64::MAX })
        );
        for other in [
            &b"lego:"[..],
            b"lego:ab:1",
            b"lego:00000000000000AB:1",
            b"lego:00000000000000ab:01",
            b"lego:00000000000000ab:",
            b"lego:00000000000000ab:1:2",
            b"lego:00000000000000ab:leases",
            b"lego:00000000000000ab:11111111111111111",
            b"lego:00000000000000abc:1",
            b"lego:00000000000000ab-1",
            b"lego:00000000000000ab:s",
            b"lego:00000000000000ab:s1",
            b"lego:00000000000000ab:s1:",
            b"lego:00000000000000ab:s01:1",
            b"lego:00000000000000ab:s1:01",
            b"lego:00000000000000ab:s1:100",
            b"lego:00000000000000ab:s1:1:2",
            b"lego:00000000000000ab:S1:1",
            b"LEGO:00000000000000ab:1",
            b"session:42",
            b"xlego:00000000000000ab:1",
        ] {
            assert_eq!(
                parse_key(other),
                None,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }

    proptest! {
        #![proptest_config(crate::fuzz_support::config(256))]

        /// Every key lego writes is read back as what it names.
        #[test]
        fn fuzz_keys_round_trip(heap_id: u64, page: u64, slot: u8) {
            prop_assert_eq!(
                parse_key(parity_key(heap_id, page, slot).as_bytes()),
                Some(LegoKey::Parity { heap_id, stripe: page, slot })
            );
            prop_assert_eq!(
                parse_key(page_key(heap_id, page).as_bytes()),
                Some(LegoKey::Page { heap_id, page })
            );
            prop_assert_eq!(
                parse_key(lease_key(heap_id).as_bytes()),
                Some(LegoKey::Lease { heap_id })
            );
        }

        /// Any bytes: a key the parser calls lego's is exactly the key lego would write for
        /// it, so nothing else is ever taken for one of lego's.
        #[test]
        fn fuzz_only_lego_keys_are_lego_keys(
            tail in proptest::collection::vec(
                prop_oneof![Just(b'0'), Just(b'a'), Just(b':'), Just(b'f'), Just(b'g'), Just(b's'), any::<u8>()],
                0..40,
            ),
            prefixed: bool,
        ) {
            let mut key = if prefixed { KEY_PREFIX.as_bytes().to_vec() } else { Vec::new() };
            key.extend_from_slice(&tail);
            if let Some(k) = parse_key(&key) {
                let written = match k {
                    LegoKey::Page { heap_id, page } => page_key(heap_id, page),
                    LegoKey::Parity { heap_id, stripe, slot } => parity_key(heap_id, stripe, slot),
                    LegoKey::Lease { heap_id } => lease_key(heap_id),
                };
                prop_assert_eq!(written.as_bytes(), &key[..]);
            }
        }
    }
}
