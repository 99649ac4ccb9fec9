//! The lines of `lru_crawler metadump all` (memcached 1.6): one item per line,
//! `key=KEY exp=EXP la=LAST cas=CAS fetch=yes|no cls=CLASS size=BYTES`, then `END`. Pure: the
//! connection reads the lines ([`super::connection::Connection::text_lines`]), this parses
//! one; it is tested and fuzzed on its own.
//!
//! - KEY is URL-encoded (`lego:` arrives as `lego%3A`); [`parse_line`] decodes it to bytes.
//! - EXP is the Unix time (on the server's clock) at which the item expires, `-1` for never;
//!   items already expired are not listed.
//! - CAS is the item's compare-and-swap token: a delete with `C<cas>` removes the item only
//!   while it is the one the dump saw.
//! - BYTES is the item's whole size in the server's memory (key, value, header): what the
//!   server's `bytes` counts.
//!
//! Rules: a line missing one of these fields, or with a bad number or escape, is an error (the
//! caller skips that line, never guesses); fields this parser does not know are ignored, so a
//! later memcached that adds some is still read.

use thiserror::Error;

/// One item of a metadump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpItem {
    /// The key, decoded.
    pub key: Vec<u8>,
    /// When it expires (Unix time on the server's clock), or `None` for never.
    pub exp: Option<u64>,
    pub cas: u64,
    pub size: u64,
}

/// Why a metadump line was not read.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the server sent a metadump line that is not an item ({problem}): {line:?}")]
pub struct DumpError {
    /// The start of the line.
    pub line: String,
    pub problem: &'static str,
}

/// Parses one line of a metadump (without its line end).
pub fn parse_line(line: &[u8]) -> Result<DumpItem, DumpError> {
    let bad = |problem| DumpError {
        line: String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned(),
        problem,
    };
    let (mut key, mut exp, mut cas, mut size) = (None, None, None, None);
    for field in line.split(|&b| b == b' ').filter(|f| !f.is_empty()) {
        let Some(eq) = field.iter().position(|&b| b == b'=') else {
            return Err(bad("a field without ="));
        };
        let (name, value) = (&field[..eq], &field[eq + 1..]);
        let slot = match name {
            b"key" => &mut key,
            b"exp" => &mut exp,
            b"cas" => &mut cas,
            b"size" => &mut size,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(bad("a field named twice"));
        }
    }
    let key = percent_decode(key.ok_or_else(|| bad("no key"))?).ok_or_else(|| bad("a bad %"))?;
    if key.is_empty() {
        return Err(bad("an empty key"));
    }
    let exp = match exp.ok_or_else(|| bad("no exp"))? {
        b"-1" => None,
        v => Some(number(v).ok_or_else(|| bad("a bad exp"))?),
    };
    Ok(DumpItem {
        key,
        exp,
        cas: number(cas.ok_or_else(|| bad("no cas"))?).ok_or_else(|| bad("a bad cas"))?,
        size: number(size.ok_or_else(|| bad("no size"))?).ok_or_else(|| bad("a bad size"))?,
    })
}

/// Decimal digits as a number (no sign, no overflow).
fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Decodes `%XX` escapes (either case); every other byte stands for itself. `None` for a `%`
/// not followed by two hex digits.
pub fn percent_decode(encoded: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        if encoded[i] == b'%' {
            let hi = hex_digit(*encoded.get(i + 1)?)?;
            let lo = hex_digit(*encoded.get(i + 2)?)?;
            out.push((hi << 4) | lo);
            i += 3;
        } else {
            out.push(encoded[i]);
            i += 1;
        }
    }
    Some(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .map(|d| u8::try_from(d).expect("a hex digit is below 16"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Lines as memcached 1.6.18 writes them (taken from a real server).
    #[test]
    fn lines_of_memcached_1_6_18() {
        let item = parse_line(
            b"key=lego%3A00000000000000ab%3A1 exp=-1 la=1796137813 cas=1 fetch=no cls=1 size=85",
        )
        .expect("an item");
        assert_eq!(
            item,
            DumpItem {
                key: b"lego:00000000000000ab:1".to_vec(),
                exp: None,
                cas: 1,
                size: 85
            }
        );
        let lease = parse_line(
            b"key=lego%3A00000000000000ab%3Alease exp=1796137873 la=1796137813 cas=2 fetch=no \
              cls=1 size=95",
        )
        .expect("an item");
        assert_eq!(lease.exp, Some(1_796_137_873));
        // A literal "%20" in a key is itself escaped; UTF-8 arrives byte by byte.
        let key = |line: &[u8]| parse_line(line).expect("an item").key;
        assert_eq!(
            key(b"key=foo%2520bar exp=-1 la=1 cas=3 fetch=no cls=1 size=69"),
            b"foo%20bar"
        );
        assert_eq!(
            key(b"key=k%C3%a9 exp=-1 la=1 cas=4 fetch=yes cls=1 size=63"),
            "k\u{e9}".as_bytes()
        );
        // Fields in another order, and ones this parser does not know, are fine.
        assert_eq!(
            key(b"size=1 cas=0 flags=7 exp=5 key=x"),
            b"x",
            "order and unknown fields"
        );
    }

    #[test]
    fn lines_that_are_not_items() {
        for line in [
            &b""[..],
            b"END",
            b"BUSY currently processing crawler request",
            b"exp=-1 cas=1 size=1",
            b"key= exp=-1 cas=1 size=1",
            b"key=a exp=-2 cas=1 size=1",
            b"key=a exp=-1 cas=x size=1",
            b"key=a exp=-1 cas=1",
            b"key=a exp=-1 cas=1 size=99999999999999999999",
            b"key=a%4 exp=-1 cas=1 size=1",
            b"key=a%zz exp=-1 cas=1 size=1",
            b"key=a key=b exp=-1 cas=1 size=1",
        ] {
            assert!(
                parse_line(line).is_err(),
                "{:?} must not be an item",
                String::from_utf8_lossy(line)
            );
        }
    }

    /// memcached's encoding: every byte but the unreserved ones becomes `%XX`.
    fn uri_encode(key: &[u8]) -> String {
        key.iter()
            .map(|&b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    proptest! {
        #![proptest_config(crate::fuzz_support::config(256))]

        /// Any bytes: parsing never panics.
        #[test]
        fn fuzz_parse_line_takes_any_bytes(line in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_line(&line);
        }

        /// Any key memcached may hold, encoded as memcached encodes it, with any numbers:
        /// read back exactly.
        #[test]
        fn fuzz_items_round_trip(
            key in proptest::collection::vec(any::<u8>(), 1..250),
            exp in proptest::option::of(any::<u64>()),
            cas: u64,
            size: u64,
            la: u32,
        ) {
            let exp_text = exp.map_or("-1".to_owned(), |e| e.to_string());
            let line = format!(
                "key={} exp={exp_text} la={la} cas={cas} fetch=no cls=1 size={size}",
                uri_encode(&key)
            );
            let item = parse_line(line.as_bytes()).expect("an item");
            prop_assert_eq!(item, DumpItem { key, exp, cas, size });
        }
    }
}
