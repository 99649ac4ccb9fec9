//! Raw values: reading a variable ([`lookup`]: unset, empty and surrounding whitespace),
//! sizes and percentages of RAM ([`parse_size`], [`SizeError`]), and the machine facts that
//! defaults depend on (total RAM from `/proc/meminfo`, online CPUs).
//!
//! Rules: each parser looks at one value on its own and knows nothing of other settings; the
//! arithmetic is exact (sizes in 128 bits, fractions as decimals) and nothing here panics on
//! any input (the fuzz properties in `fuzz.rs` check it). Only Rust std reads the system (no C
//! stdio), because this runs inside a process whose malloc is replaced.

use thiserror::Error;

use super::{GIB, KIB, MIB, TIB};

/// Longest fraction accepted in a size ("1.123456789G"), in digits; keeps the arithmetic in
/// 64 bits exact.
const SIZE_FRACTION_DIGITS_MAX: usize = 9;

/// What `parse_size` expects, shown in its errors.
const SIZE_EXPECTED: &str = "expected a number with an optional K, M, G or T suffix (512M, 4G) \
                             or a percentage of RAM (25%)";

/// Why a size could not be parsed. Each message starts with the quoted text, so that
/// [`ConfigError`](super::ConfigError) can prefix it with the variable's name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SizeError {
    /// Not a number with a known suffix.
    #[error("{text:?} is not a size: {SIZE_EXPECTED}")]
    NotASize {
        /// The text as given.
        text: String,
    },
    /// Zero bytes (or a fraction that rounds to zero).
    #[error("{text:?} is zero: a size must be at least one byte")]
    Zero {
        /// The text as given.
        text: String,
    },
    /// Larger than 64 bits can hold.
    #[error("{text:?} is too large: a size must be less than 16 EiB")]
    TooLarge {
        /// The text as given.
        text: String,
    },
    /// A percentage outside 1..=100.
    #[error("{text:?} is not a valid share of RAM: expected a percentage from 1% to 100%")]
    PercentOutOfRange {
        /// The text as given.
        text: String,
    },
    /// A percentage, but the machine's RAM could not be read.
    #[error(
        "{text:?} is a percentage of RAM, but the amount of RAM could not be read from \
         /proc/meminfo: give the size in bytes instead (512M, 4G)"
    )]
    RamUnknown {
        /// The text as given.
        text: String,
    },
}

/// Returns the variable's value, or `None` when it is unset or empty. Surrounding whitespace
/// is dropped: it is never meaningful in these values and easy to paste by accident.
pub(super) fn lookup(get: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    let value = get(name)?;
    let trimmed = value.trim();
    if trimmed.is_empty() {
        None
    } else {
        Some(trimmed.to_owned())
    }
}

/// Parses a size in bytes: a whole number ("4096"), a number with a binary suffix ("512K",
/// "512M", "4G", "1T", "1.5G"; "MiB" and "MB" both mean 2^20), or a percentage of
/// `total_ram_bytes` from 1% to 100% ("25%", "12.5%"). Suffixes are case-insensitive.
/// Fractions of a byte are rounded down; zero is rejected.
pub fn parse_size(text: &str, total_ram_bytes: u64) -> Result<u64, SizeError> {
    let not_a_size = || SizeError::NotASize {
        text: text.to_owned(),
    };
    let trimmed = text.trim();
    let number_end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(number_end);
    let number = Decimal::parse(number).ok_or_else(not_a_size)?;
    let suffix = suffix.trim_start();

    if suffix == "%" {
        if total_ram_bytes == 0 {
            return Err(SizeError::RamUnknown {
                text: text.to_owned(),
            });
        }
        // percent * RAM / 100, computed in 128 bits so that no RAM size can overflow.
        let scaled = number.scale(u128::from(total_ram_bytes));
        let bytes = scaled / 100;
        let in_range =
            scaled >= u128::from(total_ram_bytes) && scaled <= u128::from(total_ram_bytes) * 100;
        if !in_range {
            return Err(SizeError::PercentOutOfRange {
                text: text.to_owned(),
            });
        }
        // A share of a (reported) RAM below 100 bytes can round down to nothing.
        if bytes == 0 {
            return Err(SizeError::Zero {
                text: text.to_owned(),
            });
        }
        return u64::try_from(bytes).map_err(|_| SizeError::TooLarge {
            text: text.to_owned(),
        });
    }

    let multiplier = size_multiplier(suffix).ok_or_else(not_a_size)?;
    if multiplier == 1 && number.fraction_digits > 0 {
        // "1.5" bytes is most likely a missing suffix, not a request for one byte.
        return Err(not_a_size());
    }
    let bytes =
        u64::try_from(number.scale(u128::from(multiplier))).map_err(|_| SizeError::TooLarge {
            text: text.to_owned(),
        })?;
    if bytes == 0 {
        return Err(SizeError::Zero {
            text: text.to_owned(),
        });
    }
    Ok(bytes)
}

/// Bytes per unit for a size suffix: "", "B", "K", "KB", "KiB", ... (case-insensitive).
fn size_multiplier(suffix: &str) -> Option<u64> {
    let lower = suffix.to_ascii_lowercase();
    let unit = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    match unit {
        "" => Some(1),
        "k" => Some(KIB),
        "m" => Some(MIB),
        "g" => Some(GIB),
        "t" => Some(TIB),
        _ => None,
    }
}

/// A non-negative decimal number kept exact: `mantissa / 10^fraction_digits`.
#[derive(Debug, Clone, Copy)]
struct Decimal {
    mantissa: u128,
    fraction_digits: usize,
}

impl Decimal {
    /// Parses "123", "1.5", "0.25"; rejects "", ".", "1.", ".5", "1.2.3" and too many digits.
    fn parse(text: &str) -> Option<Decimal> {
        let (whole, fraction) = match text.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (text, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(whole) || whole.len() > 20 {
            return None;
        }
        let fraction = match fraction {
            Some(f) if all_digits(f) && f.len() <= SIZE_FRACTION_DIGITS_MAX => f,
            Some(_) => return None,
            None => "",
        };
        // At most 20 + 9 digits: below 10^29 < 2^128, so this cannot fail.
        let mantissa = format!("{whole}{fraction}").parse::<u128>().ok()?;
        Some(Decimal {
            mantissa,
            fraction_digits: fraction.len(),
        })
    }

    /// `self * factor`, rounded down. Saturates (to a value no u64 can hold) on overflow.
    fn scale(self, factor: u128) -> u128 {
        let divisor = 10u128.pow(u32::try_from(self.fraction_digits).unwrap_or(u32::MAX));
        self.mantissa.saturating_mul(factor) / divisor
    }
}

/// Total RAM of the machine in bytes, from `MemTotal` in `/proc/meminfo`, or from
/// `sysinfo(2)` if that file cannot be read. Returns 0 if neither works.
pub fn total_ram_bytes() -> u64 {
    if let Some(bytes) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total(&text))
    {
        return bytes;
    }
    // SAFETY: `sysinfo` is plain old data for which all-zero bytes are a valid value.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable `struct sysinfo`; the call only fills it in.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return 0;
    }
    // `c_ulong` is `u64` on the 64-bit targets lego runs on, but not everywhere.
    #[allow(clippy::useless_conversion)]
    let total = u64::from(info.totalram);
    total.saturating_mul(u64::from(info.mem_unit))
}

/// Extracts `MemTotal` (given in kB) from the text of `/proc/meminfo`, in bytes.
pub(super) fn parse_meminfo_total(text: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut fields = rest.split_whitespace();
    let kib = fields.next()?.parse::<u64>().ok()?;
    if fields.next() != Some("kB") {
        return None;
    }
    kib.checked_mul(KIB)
}

/// The number of CPUs this process may run on (affinity and cgroup quota included).
pub(super) fn online_cpus() -> usize {
    if let Ok(n) = std::thread::available_parallelism() {
        return n.get();
    }
    // SAFETY: sysconf has no preconditions; it returns -1 on error.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}
