//! The field codec every record shares: little-endian `u32`/`u64` fields at fixed offsets,
//! and the checks a decoder makes before it trusts a block (whole, magic, version, kind, CRC,
//! page size, reserved bytes zero).
//!
//! Rules: a check names the record and the field it refused and the value it found; nothing
//! here allocates or does I/O.

use super::{
    BlockKind, FormatError, Record, BLOCK_BYTES, CRC_OFFSET, FORMAT_VERSION, FORMAT_VERSION_MIN,
};
use crate::PAGE_SIZE;

pub(super) fn whole_block(record: Record, bytes: &[u8]) -> Result<&[u8], FormatError> {
    bytes.get(..BLOCK_BYTES).ok_or(FormatError::Truncated {
        record,
        need: BLOCK_BYTES,
        have: bytes.len(),
    })
}

pub(super) fn check_magic(record: Record, b: &[u8], expected: [u8; 8]) -> Result<(), FormatError> {
    let mut found = [0; 8];
    found.copy_from_slice(&b[..8]);
    if found == expected {
        Ok(())
    } else if b.iter().all(|&x| x == 0) {
        Err(FormatError::Unwritten)
    } else {
        Err(FormatError::BadMagic {
            record,
            expected,
            found,
        })
    }
}

pub(super) fn check_version(record: Record, b: &[u8]) -> Result<(), FormatError> {
    match get_u32(b, 8) {
        FORMAT_VERSION_MIN..=FORMAT_VERSION => Ok(()),
        found => Err(FormatError::UnsupportedVersion {
            record,
            found,
            supported: FORMAT_VERSION,
        }),
    }
}

pub(super) fn check_kind(record: Record, b: &[u8], expected: u32) -> Result<(), FormatError> {
    match get_u32(b, 0) {
        k if k == expected => Ok(()),
        other => Err(match BlockKind::of(b) {
            Ok(_) => bad_field(record, "kind", other.into(), "the kind of this record"),
            Err(e) => e,
        }),
    }
}

pub(super) fn check_crc(record: Record, b: &[u8]) -> Result<(), FormatError> {
    let stored = get_u32(b, CRC_OFFSET);
    let computed = crc32c::crc32c(&b[..CRC_OFFSET]);
    if stored == computed {
        Ok(())
    } else {
        Err(FormatError::BadCrc {
            record,
            stored,
            computed,
        })
    }
}

pub(super) fn check_page_size(record: Record, page_size: u32) -> Result<(), FormatError> {
    if usize::try_from(page_size).ok() == Some(PAGE_SIZE) {
        Ok(())
    } else {
        Err(bad_field(record, "page size", page_size.into(), "4096"))
    }
}

/// Reserved bytes must be zero (the CRC already vouches for them; this catches a writer bug).
pub(super) fn check_zero(
    record: Record,
    b: &[u8],
    range: std::ops::Range<usize>,
) -> Result<(), FormatError> {
    let start = range.start;
    match b[range].iter().position(|&x| x != 0) {
        None => Ok(()),
        Some(i) => Err(bad_field(
            record,
            "reserved byte",
            (start + i) as u64,
            "zero (this is its offset)",
        )),
    }
}

pub(super) fn unknown_kind(b: &[u8], kind: u32) -> FormatError {
    if b.iter().all(|&x| x == 0) {
        FormatError::Unwritten
    } else {
        FormatError::UnknownKind { kind }
    }
}

pub(super) fn bad_field(
    record: Record,
    field: &'static str,
    value: u64,
    expected: &'static str,
) -> FormatError {
    FormatError::BadField {
        record,
        field,
        value,
        expected,
    }
}

/// A count of at most [`GROUP_ENTRIES_MAX`] as the `u32` a header holds.
pub(super) fn u32_of(n: usize) -> u32 {
    u32::try_from(n).expect("group counts are at most GROUP_ENTRIES_MAX")
}

pub(super) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

pub(super) fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}
