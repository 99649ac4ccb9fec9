//! The part of memcached's meta protocol lego speaks (memcached 1.6.10 or newer): requests
//! encoded into a buffer, replies parsed from one. Pure: no I/O, so it is tested and fuzzed
//! on its own.
//!
//! Requests: `mg KEY v q O<opaque>` (get the value; quiet: a miss sends nothing),
//! `ms KEY LEN q O<opaque>` + data (set; quiet: success sends nothing), `md KEY q O<opaque>`
//! (delete; quiet), and `mn` (no-op: its `MN` reply ends a pipeline, so every reply before it
//! belongs to a request before it). Replies are matched to requests by their opaque token.
//! For leases and garbage collection: `ms KEY LEN T<ttl> O<opaque>` (a value that expires;
//! not quiet, so `HD` or `NS` always answers),
//! `mg KEY T<ttl> O<opaque>` (touch: a new time to live in place, no memory taken; `HD` if
//! the key is there, `EN` if not) and
//! `md KEY C<cas> q O<opaque>` (delete only the value a dump saw: `EX` if it changed since,
//! `NF` if it is gone; quiet memcached still sends both, only `HD` is left out).
//! For claiming a seeded heap's lease (compare and swap): `mg KEY c t v O<opaque>` (the value,
//! its CAS token and time to live left: `VA LEN c<cas> t<ttl>`, `t-1` for none; or `EN`), `ms KEY LEN C<cas> [T<ttl>] O<opaque>`
//! (set only while the CAS token is still `cas`: `HD`, or `EX` changed, `NF` gone, `NS`) and
//! `md KEY C<cas> O<opaque>` (`HD`, `EX` or `NF`).
//!
//! Rules: a reply is parsed only from complete lines; anything malformed is an error, never a
//! guess; a value's length is bounded by [`VALUE_BYTES_MAX`].

use std::io::Write as _;

use thiserror::Error;

/// Longest key memcached accepts, in bytes.
pub const KEY_BYTES_MAX: usize = 250;
/// Largest value lego reads, in bytes (a page and its header, with room to spare).
pub const VALUE_BYTES_MAX: usize = 64 * 1024;
/// Longest reply line lego reads before the value, in bytes.
pub const LINE_BYTES_MAX: usize = 1024;
/// Longest time to live memcached takes as relative, in seconds (30 days); a larger `T` is
/// read as an absolute Unix time.
pub const TTL_S_MAX: u32 = 30 * 24 * 3600;

/// Errors of parsing a reply.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("the server sent a malformed reply line: {line:?}")]
    Malformed { line: String },
    #[error("the server sent a value of {len} bytes; at most {VALUE_BYTES_MAX} are accepted")]
    ValueTooLarge { len: usize },
    #[error("the server sent a reply line longer than {LINE_BYTES_MAX} bytes")]
    LineTooLong,
    #[error("the server reports an error: {line}")]
    Server { line: String },
    #[error("the server rejects the request: {line}")]
    Client { line: String },
    #[error("the server is busy with another request of this kind: {line}")]
    Busy { line: String },
}

impl ProtocolError {
    /// Whether trying again (or elsewhere) may help: a server error (out of memory, busy) may
    /// pass; a rejected request or a malformed reply will not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ProtocolError::Server { .. } | ProtocolError::Busy { .. }
        )
    }
}

/// Appends `mg KEY v q O<opaque>\r\n`.
pub fn get(out: &mut Vec<u8>, key: &str, opaque: u32) {
    debug_assert!(valid_key(key));
    let _ = write!(out, "mg {key} v q O{opaque}\r\n");
}

/// Appends `ms KEY LEN q O<opaque>\r\n` and the value.
pub fn set(out: &mut Vec<u8>, key: &str, value: &[u8], opaque: u32) {
    set_parts(out, key, &[value], opaque);
}

/// [`set`] of the value made of `parts` one after another, copied once, straight into `out`.
pub fn set_parts(out: &mut Vec<u8>, key: &str, parts: &[&[u8]], opaque: u32) {
    debug_assert!(valid_key(key));
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let _ = write!(out, "ms {key} {len} q O{opaque}\r\n");
    for part in parts {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

/// [`set`] of a value of `len` bytes that `fill` appends to `out` (so that it is made in
/// place, as a page is sealed). `fill` returns whether it made the value; when it did not,
/// `out` is left as it was and false is returned.
pub fn set_with(
    out: &mut Vec<u8>,
    key: &str,
    len: usize,
    opaque: u32,
    fill: impl FnOnce(&mut Vec<u8>) -> bool,
) -> bool {
    debug_assert!(valid_key(key));
    let start = out.len();
    let _ = write!(out, "ms {key} {len} q O{opaque}\r\n");
    let value_at = out.len();
    if !fill(out) {
        out.truncate(start);
        return false;
    }
    assert_eq!(
        out.len() - value_at,
        len,
        "the value is as long as its header says"
    );
    out.extend_from_slice(b"\r\n");
    true
}

/// Appends `md KEY q O<opaque>\r\n`.
pub fn delete(out: &mut Vec<u8>, key: &str, opaque: u32) {
    debug_assert!(valid_key(key));
    let _ = write!(out, "md {key} q O{opaque}\r\n");
}

/// Appends `ms KEY LEN T<ttl_s> O<opaque>\r\n` and the value: a value memcached drops
/// `ttl_s` seconds (1 to [`TTL_S_MAX`]) after this set. Not quiet: `HD` (stored) or `NS`
/// always answers.
pub fn set_expiring(out: &mut Vec<u8>, key: &str, value: &[u8], ttl_s: u32, opaque: u32) {
    debug_assert!(valid_key(key));
    debug_assert!((1..=TTL_S_MAX).contains(&ttl_s), "ttl {ttl_s} s");
    out.extend_from_slice(format!("ms {key} {} T{ttl_s} O{opaque}\r\n", value.len()).as_bytes());
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `mg KEY T<ttl_s> O<opaque>\r\n`: gives the value a new time to live of `ttl_s`
/// seconds (1 to [`TTL_S_MAX`]) without rewriting it. Not quiet: `HD` if it is there, `EN`
/// if not.
pub fn touch(out: &mut Vec<u8>, key: &str, ttl_s: u32, opaque: u32) {
    debug_assert!(valid_key(key));
    debug_assert!((1..=TTL_S_MAX).contains(&ttl_s), "ttl {ttl_s} s");
    out.extend_from_slice(format!("mg {key} T{ttl_s} O{opaque}\r\n").as_bytes());
}

/// Appends `md KEY C<cas> q O<opaque>\r\n`: deletes the value only while its CAS token is
/// still `cas` (the one a metadump showed). `EX` answers if it changed, `NF` if it is gone.
pub fn delete_if(out: &mut Vec<u8>, key: &str, cas: u64, opaque: u32) {
    debug_assert!(valid_key(key));
    out.extend_from_slice(format!("md {key} C{cas} q O{opaque}\r\n").as_bytes());
}

/// Appends `mg KEY c t v O<opaque>\r\n`: the value, its CAS token and its time to live left
/// ([`Reply::ValueCas`]). Not quiet: `EN` if the key is not there.
pub fn get_cas(out: &mut Vec<u8>, key: &str, opaque: u32) {
    debug_assert!(valid_key(key));
    out.extend_from_slice(format!("mg {key} c t v O{opaque}\r\n").as_bytes());
}

/// Appends `ms KEY LEN C<cas> [T<ttl_s>] O<opaque>\r\n` and the value: stored only while the
/// value's CAS token is still `cas`, never expiring without `ttl_s`. Not quiet: `HD` (stored),
/// `EX` (changed since), `NF` (gone) or `NS`.
pub fn set_if(
    out: &mut Vec<u8>,
    key: &str,
    value: &[u8],
    cas: u64,
    ttl_s: Option<u32>,
    opaque: u32,
) {
    debug_assert!(valid_key(key));
    let ttl = match ttl_s {
        Some(t) => {
            debug_assert!((1..=TTL_S_MAX).contains(&t), "ttl {t} s");
            format!(" T{t}")
        }
        None => String::new(),
    };
    out.extend_from_slice(format!("ms {key} {} C{cas}{ttl} O{opaque}\r\n", value.len()).as_bytes());
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `md KEY C<cas> O<opaque>\r\n`: [`delete_if`], not quiet (`HD` when deleted).
pub fn delete_if_answered(out: &mut Vec<u8>, key: &str, cas: u64, opaque: u32) {
    debug_assert!(valid_key(key));
    out.extend_from_slice(format!("md {key} C{cas} O{opaque}\r\n").as_bytes());
}

/// Appends `mn\r\n`, the end of a pipeline.
pub fn noop(out: &mut Vec<u8>) {
    out.extend_from_slice(b"mn\r\n");
}

/// Whether memcached accepts `key`: 1 to 250 printable bytes without spaces.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= KEY_BYTES_MAX && key.bytes().all(|b| b.is_ascii_graphic())
}

/// One reply of a pipeline.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `VA`: the value of a get, with its request's opaque token.
    Value { opaque: u32, data: &'a [u8] },
    /// `VA` with a `c<cas>` flag: the value of a [`get_cas`], its CAS token and the seconds
    /// it has left to live (`t<ttl>`; `None` when it never expires, `t-1`, or was not asked).
    ValueCas {
        opaque: u32,
        cas: u64,
        ttl_s: Option<u32>,
        data: &'a [u8],
    },
    /// `HD`: success (only sent where not quiet: never for lego's requests, but accepted).
    Stored { opaque: Option<u32> },
    /// `NS`, `NF`, `EX`: a set not stored or a key not found, with its opaque token.
    NotDone { opaque: Option<u32> },
    /// `EN`: a miss (only sent where not quiet).
    Miss { opaque: Option<u32> },
    /// `MN`: the end of the pipeline.
    End,
}

/// Parses one reply from the start of `buf`. `Ok(None)`: more bytes are needed. Otherwise
/// the reply and how many bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply<'_>, usize)>, ProtocolError> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > LINE_BYTES_MAX {
            Err(ProtocolError::LineTooLong)
        } else {
            Ok(None)
        };
    };
    if nl > LINE_BYTES_MAX {
        return Err(ProtocolError::LineTooLong);
    }
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let line = std::str::from_utf8(&buf[..line_end]).map_err(|_| malformed(&buf[..line_end]))?;
    let taken = nl + 1;
    let mut words = line.split(' ');
    let code = words.next().unwrap_or("");
    // The words after the code, walked without collecting them (one reply per page read).
    let flags = words;
    let opaque = opaque_of(flags.clone(), line)?;
    let reply = match code {
        "VA" => {
            let len: usize = flags
                .clone()
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| malformed(line.as_bytes()))?;
            if len > VALUE_BYTES_MAX {
                return Err(ProtocolError::ValueTooLarge { len });
            }
            let end = taken + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(malformed(line.as_bytes()));
            }
            let opaque = opaque.ok_or_else(|| malformed(line.as_bytes()))?;
            let data = &buf[taken..end];
            let reply = match cas_of(flags.clone().skip(1), line)? {
                Some(cas) => Reply::ValueCas {
                    opaque,
                    cas,
                    ttl_s: ttl_of(flags.skip(1), line)?,
                    data,
                },
                None => Reply::Value { opaque, data },
            };
            return Ok(Some((reply, end + 2)));
        }
        "HD" => Reply::Stored { opaque },
        "NS" | "NF" | "EX" => Reply::NotDone { opaque },
        "EN" => Reply::Miss { opaque },
        "MN" => Reply::End,
        _ if line.starts_with("SERVER_ERROR") => {
            return Err(ProtocolError::Server { line: line.into() })
        }
        _ if line.starts_with("CLIENT_ERROR") || line == "ERROR" => {
            return Err(ProtocolError::Client { line: line.into() })
        }
        _ => return Err(malformed(line.as_bytes())),
    };
    Ok(Some((reply, taken)))
}

/// The `O<opaque>` flag among a reply's flags, if present.
fn opaque_of<'a>(
    flags: impl Iterator<Item = &'a str>,
    line: &str,
) -> Result<Option<u32>, ProtocolError> {
    for f in flags {
        if let Some(token) = f.strip_prefix('O') {
            return token
                .parse()
                .map(Some)
                .map_err(|_| malformed(line.as_bytes()));
        }
    }
    Ok(None)
}

/// The `c<cas>` flag among a reply's flags, if present.
fn cas_of<'a>(
    mut flags: impl Iterator<Item = &'a str>,
    line: &str,
) -> Result<Option<u64>, ProtocolError> {
    match flags.find_map(|f| f.strip_prefix('c')) {
        Some(token) => token
            .parse()
            .map(Some)
            .map_err(|_| malformed(line.as_bytes())),
        None => Ok(None),
    }
}

/// The `t<ttl>` flag among a reply's flags: `None` when absent or `t-1` (never expires).
fn ttl_of<'a>(
    mut flags: impl Iterator<Item = &'a str>,
    line: &str,
) -> Result<Option<u32>, ProtocolError> {
    match flags.find_map(|f| f.strip_prefix('t')) {
        Some("-1") | None => Ok(None),
        Some(token) => token
            .parse()
            .map(Some)
            .map_err(|_| malformed(line.as_bytes())),
    }
}

fn malformed(line: &[u8]) -> ProtocolError {
    ProtocolError::Malformed {
        line: String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_are_encoded_as_memcached_expects() {
        let mut out = Vec::new();
        get(&mut out, "lego:1:2", 7);
        set(&mut out, "k", b"abc", 8);
        delete(&mut out, "k", 9);
        noop(&mut out);
        assert_eq!(
            out,
            b"mg lego:1:2 v q O7\r\nms k 3 q O8\r\nabc\r\nmd k q O9\r\nmn\r\n".as_slice()
        );
        assert!(valid_key("lego:abc:12"));
        assert!(!valid_key("has space") && !valid_key("") && !valid_key(&"k".repeat(251)));
    }

    #[test]
    fn expiring_sets_and_conditional_deletes_are_encoded_as_memcached_expects() {
        let mut out = Vec::new();
        set_expiring(&mut out, "lego:1:lease", b"pid=7", 60, 1);
        set_expiring(&mut out, "k", b"", 1, 2);
        delete_if(&mut out, "lego:1:2", 18_446_744_073_709_551_615, 3);
        touch(&mut out, "lego:1:lease", TTL_S_MAX, 4);
        assert_eq!(
            out,
            b"ms lego:1:lease 5 T60 O1\r\npid=7\r\nms k 0 T1 O2\r\n\r\n\
              md lego:1:2 C18446744073709551615 q O3\r\nmg lego:1:lease T2592000 O4\r\n"
                .as_slice()
        );
        // What they are answered with.
        let (r, _) = parse(b"NS O1\r\n").expect("valid").expect("whole");
        assert_eq!(r, Reply::NotDone { opaque: Some(1) });
        let (r, _) = parse(b"HD O2\r\n").expect("valid").expect("whole");
        assert_eq!(r, Reply::Stored { opaque: Some(2) });
        let (r, _) = parse(b"EX O3\r\n").expect("valid").expect("whole");
        assert_eq!(r, Reply::NotDone { opaque: Some(3) });
        let (r, _) = parse(b"EN O4\r\n").expect("valid").expect("whole");
        assert_eq!(r, Reply::Miss { opaque: Some(4) });
        assert!(ProtocolError::Busy {
            line: "BUSY".into()
        }
        .is_transient());
    }

    #[test]
    fn compare_and_swap_requests_are_encoded_and_answered() {
        let mut out = Vec::new();
        get_cas(&mut out, "lego:1:lease", 1);
        set_if(&mut out, "lego:1:lease", b"ab", 77, None, 2);
        set_if(&mut out, "lego:1:lease", b"", 78, Some(60), 3);
        delete_if_answered(&mut out, "lego:1:lease", 79, 4);
        assert_eq!(
            out,
            b"mg lego:1:lease c t v O1\r\nms lego:1:lease 2 C77 O2\r\nab\r\n\
              ms lego:1:lease 0 C78 T60 O3\r\n\r\nmd lego:1:lease C79 O4\r\n"
                .as_slice()
        );
        let (r, n) = parse(b"VA 2 c123 t-1 O1\r\nab\r\n")
            .expect("valid")
            .expect("whole");
        assert_eq!(
            (r, n),
            (
                Reply::ValueCas {
                    opaque: 1,
                    cas: 123,
                    ttl_s: None,
                    data: b"ab"
                },
                22
            )
        );
        // Flags in another order, and a value without a CAS token.
        let (r, _) = parse(b"VA 2 O1 t59 c9\r\nab\r\n")
            .expect("valid")
            .expect("whole");
        assert!(matches!(
            r,
            Reply::ValueCas {
                cas: 9,
                ttl_s: Some(59),
                ..
            }
        ));
        let (r, _) = parse(b"VA 2 O1\r\nab\r\n").expect("valid").expect("whole");
        assert!(matches!(r, Reply::Value { .. }));
        assert!(parse(b"VA 2 cx O1\r\nab\r\n").is_err());
    }

    #[test]
    fn replies_parse_whole_or_ask_for_more() {
        let buf = b"VA 3 O7\r\nabc\r\nNS O8\r\nMN\r\n";
        let (r, n) = parse(buf).expect("valid").expect("whole");
        assert_eq!(
            r,
            Reply::Value {
                opaque: 7,
                data: b"abc"
            }
        );
        let (r, m) = parse(&buf[n..]).expect("valid").expect("whole");
        assert_eq!(r, Reply::NotDone { opaque: Some(8) });
        let (r, _) = parse(&buf[n + m..]).expect("valid").expect("whole");
        assert_eq!(r, Reply::End);
        for cut in 0..n {
            assert_eq!(parse(&buf[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn errors_are_errors() {
        let e = parse(b"SERVER_ERROR out of memory storing object\r\n").expect_err("server");
        assert!(e.is_transient());
        let e = parse(b"CLIENT_ERROR bad data chunk\r\n").expect_err("client");
        assert!(!e.is_transient());
        assert!(parse(b"VA x O1\r\n").is_err());
        assert!(parse(b"VA 3 O1\r\nabcXY").is_err());
        assert!(parse(b"HELLO\r\n").is_err());
        assert_eq!(
            parse(b"VA 999999 O1\r\n"),
            Err(ProtocolError::ValueTooLarge { len: 999_999 })
        );
        assert_eq!(parse(&[b'x'; 2000]), Err(ProtocolError::LineTooLong));
    }

    proptest! {
        #![proptest_config(crate::fuzz_support::config(256))]

        /// Any bytes: parsing never panics, and what it takes is within the buffer.
        #[test]
        fn fuzz_parse_takes_any_bytes(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, taken))) = parse(&buf) {
                prop_assert!(taken <= buf.len());
            }
        }

        /// A value round-trips through a reply whatever its bytes.
        #[test]
        fn fuzz_values_round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000), opaque: u32) {
            let mut buf = format!("VA {} O{opaque}\r\n", data.len()).into_bytes();
            buf.extend_from_slice(&data);
            buf.extend_from_slice(b"\r\n");
            let (r, taken) = parse(&buf).expect("valid").expect("whole");
            prop_assert_eq!(taken, buf.len());
            prop_assert_eq!(r, Reply::Value { opaque, data: &data });
        }

        /// Any valid key, value and time to live: the request is one line of five words (with
        /// the key, the length, the TTL and the opaque token) and then exactly the value and
        /// its line end, whatever bytes the value holds.
        #[test]
        fn fuzz_expiring_sets_frame_any_value(
            key in "[!-~]{1,250}",
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            ttl_s in 1..=TTL_S_MAX,
            opaque: u32,
        ) {
            let mut out = Vec::new();
            set_expiring(&mut out, &key, &data, ttl_s, opaque);
            let nl = out.iter().position(|&b| b == b'\n').expect("a line");
            let line = std::str::from_utf8(&out[..nl - 1]).expect("text");
            let words: Vec<&str> = line.split(' ').collect();
            let len = data.len().to_string();
            let ttl = format!("T{ttl_s}");
            let token = format!("O{opaque}");
            prop_assert_eq!(
                words,
                vec!["ms", key.as_str(), len.as_str(), ttl.as_str(), token.as_str()]
            );
            prop_assert_eq!(&out[nl + 1..out.len() - 2], &data[..]);
            prop_assert_eq!(&out[out.len() - 2..], b"\r\n");
        }
    }
}
