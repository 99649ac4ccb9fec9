//! `LEGO_MMAP` and `LEGO_MMAP_MIN`: whether the shim serves the program's large private
//! anonymous mappings from the managed region, and from which size on.

use super::error::ConfigError;
use crate::PAGE_SIZE;

/// Default of `LEGO_MMAP`: on, since the whole test suite passes with it on and programs
/// with their own allocators over `mmap` (`gcc`, `g++`, Python's arenas) are paged only so.
pub const MMAP_DEFAULT: bool = true;
/// Default of `LEGO_MMAP_MIN`, in bytes: 290 of the 292 MiB `gcc -O2` maps anonymously come in
/// mappings of at least this size (docs/DESIGN.md), while the many small ones would each cost a
/// span and, once protected, a VMA split.
pub const MMAP_MIN_BYTES_DEFAULT: u64 = 256 << 10;
/// Smallest accepted `LEGO_MMAP_MIN`, in bytes: one page.
pub const MMAP_MIN_BYTES_MIN: u64 = PAGE_SIZE as u64;
/// Largest accepted `LEGO_MMAP_MIN`, in bytes (1 TiB): larger would serve nothing.
pub const MMAP_MIN_BYTES_MAX: u64 = 1 << 40;

const _: () = assert!(MMAP_MIN_BYTES_MIN <= MMAP_MIN_BYTES_DEFAULT);
const _: () = assert!(MMAP_MIN_BYTES_DEFAULT <= MMAP_MIN_BYTES_MAX);

/// Parses `LEGO_MMAP`: `1`/`on`/`yes` (the default, [`MMAP_DEFAULT`]) or `0`/`off`/`no`.
pub(super) fn parse_mmap(value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "1" | "yes" => Ok(true),
        "off" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::Mmap {
            value: value.to_owned(),
        }),
    }
}

/// Checks `LEGO_MMAP_MIN` (already parsed as a size) and rounds it up to pages.
pub(super) fn check_mmap_min(text: &str, bytes: u64) -> Result<u64, ConfigError> {
    if !(MMAP_MIN_BYTES_MIN..=MMAP_MIN_BYTES_MAX).contains(&bytes) {
        return Err(ConfigError::MmapMin {
            value: text.to_owned(),
        });
    }
    Ok(bytes.next_multiple_of(PAGE_SIZE as u64))
}
