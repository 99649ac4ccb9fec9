//! `LEGO_BACKEND`: which page store holds evicted pages ([`BackendSpec`]), the grammar of its
//! value, and the default when it is unset (`file:$TMPDIR`, or `file:/tmp`).
//!
//! A value is `SCHEME:REST`. Every scheme lego knows is one row of [`SCHEMES`]: its name, the
//! form error messages show, and the function that turns `REST` into a [`BackendSpec`]. A new
//! scheme (say `memcached://HOST:PORT[,HOST:PORT...]`, whose `REST` is `//HOST:PORT...`) is one
//! row there and one variant of [`BackendSpec`]; the error for an unknown scheme lists the
//! forms of every row.
//!
//! Rules: parsing checks the value's form only (an absolute directory, ...); nothing here
//! touches the file system or the network. That is for the store when it opens.

use std::fmt;
use std::path::{Path, PathBuf};

use super::error::ConfigError;

/// Which page store holds evicted pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// A private O_DIRECT file created under `dir` (an absolute path).
    File {
        /// Directory in which the store creates its private directory and file.
        dir: PathBuf,
    },
    /// A pool of memcached servers, `HOST:PORT` each (resolved when the store opens).
    Memcached {
        /// The servers, in the order given.
        servers: Vec<String>,
    },
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::File { dir } => write!(f, "file:{}", dir.display()),
            BackendSpec::Memcached { servers } => write!(f, "memcached://{}", servers.join(",")),
        }
    }
}

/// One scheme of `LEGO_BACKEND`.
struct Scheme {
    /// What comes before the first ':' ("file").
    name: &'static str,
    /// The whole value's expected form, as error messages show it ("file:DIR").
    form: &'static str,
    /// Turns what follows `NAME:` into a spec; gets the whole value too, for its errors.
    parse: fn(rest: &str, value: &str) -> Result<BackendSpec, ConfigError>,
}

/// Every scheme lego knows, in the order error messages list them.
const SCHEMES: &[Scheme] = &[
    Scheme {
        name: "file",
        form: "file:DIR",
        parse: parse_file,
    },
    Scheme {
        name: "memcached",
        form: "memcached://HOST:PORT[,HOST:PORT...]",
        parse: parse_memcached,
    },
];

/// Most servers one pool names.
pub const MEMCACHED_SERVERS_MAX: usize = 64;

/// The expected forms of every scheme, as error messages show them ("file:DIR").
pub(super) fn known_forms() -> String {
    let forms: Vec<&str> = SCHEMES.iter().map(|s| s.form).collect();
    forms.join(", ")
}

/// Parses a `LEGO_BACKEND` value (also what `lego pool` is given).
pub fn parse_backend(value: &str) -> Result<BackendSpec, ConfigError> {
    let unknown = || ConfigError::UnknownBackend {
        value: value.to_owned(),
    };
    let (name, rest) = value.split_once(':').ok_or_else(unknown)?;
    let scheme = SCHEMES
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(unknown)?;
    (scheme.parse)(rest, value)
}

/// `file:DIR`: DIR must be an absolute path.
fn parse_file(rest: &str, value: &str) -> Result<BackendSpec, ConfigError> {
    let dir = Path::new(rest);
    if rest.is_empty() || !dir.is_absolute() {
        return Err(ConfigError::BackendDirNotAbsolute {
            value: value.to_owned(),
        });
    }
    Ok(BackendSpec::File {
        dir: dir.to_path_buf(),
    })
}

/// `memcached://HOST:PORT[,HOST:PORT...]`: each server a host (a name, an IPv4 address or a
/// bracketed IPv6 one) and a port from 1 to 65535, at most [`MEMCACHED_SERVERS_MAX`], none twice.
fn parse_memcached(rest: &str, value: &str) -> Result<BackendSpec, ConfigError> {
    let bad = |problem: &'static str| ConfigError::BackendServers {
        value: value.to_owned(),
        problem,
    };
    let list = rest
        .strip_prefix("//")
        .ok_or_else(|| bad("the servers follow memcached://"))?;
    let mut servers: Vec<String> = Vec::new();
    for server in list.split(',') {
        let (host, port) = server
            .rsplit_once(':')
            .ok_or_else(|| bad("every server needs HOST:PORT"))?;
        let host_ok = !host.is_empty()
            && (host.starts_with('[') && host.ends_with(']')
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
        if !host_ok {
            return Err(bad("a host is a name or an address"));
        }
        if !port.bytes().all(|b| b.is_ascii_digit()) || !matches!(port.parse::<u16>(), Ok(1..)) {
            return Err(bad("a port is a number from 1 to 65535"));
        }
        if servers.iter().any(|s| s == server) {
            return Err(bad("a server is named twice"));
        }
        servers.push(server.to_owned());
    }
    if servers.len() > MEMCACHED_SERVERS_MAX {
        return Err(bad("at most 64 servers"));
    }
    Ok(BackendSpec::Memcached { servers })
}

/// The backend of a run: the one set, or else a file store under `TMPDIR` (which must then be
/// absolute), or else under `/tmp`.
pub(super) fn resolve(
    set: Option<BackendSpec>,
    tmpdir: Option<String>,
) -> Result<BackendSpec, ConfigError> {
    match (set, tmpdir) {
        (Some(backend), _) => Ok(backend),
        (None, Some(tmpdir)) => {
            if !Path::new(&tmpdir).is_absolute() {
                return Err(ConfigError::TmpdirNotAbsolute { value: tmpdir });
            }
            Ok(BackendSpec::File {
                dir: PathBuf::from(tmpdir),
            })
        }
        (None, None) => Ok(BackendSpec::File {
            dir: PathBuf::from("/tmp"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_has_a_name_a_form_that_starts_with_it_and_a_distinct_name() {
        for (i, s) in SCHEMES.iter().enumerate() {
            assert!(!s.name.is_empty() && !s.name.contains(':'), "{}", s.name);
            assert!(s.form.starts_with(&format!("{}:", s.name)), "{}", s.form);
            assert!(SCHEMES[..i].iter().all(|t| t.name != s.name), "{}", s.name);
        }
        assert_eq!(
            known_forms(),
            "file:DIR, memcached://HOST:PORT[,HOST:PORT...]"
        );
    }

    #[test]
    fn unknown_schemes_list_the_known_forms() {
        for value in ["redis:x", "nocolon", ":/tmp", "FILE:/tmp"] {
            let e = parse_backend(value).expect_err(value);
            assert_eq!(
                e.to_string(),
                format!(
                    "LEGO_BACKEND={value:?} is not a known backend: expected one of file:DIR, \
                     memcached://HOST:PORT[,HOST:PORT...]"
                )
            );
        }
    }

    #[test]
    fn memcached_pools_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_backend("memcached://10.0.0.5:11211,cache-2:11212,[::1]:11213"),
            Ok(BackendSpec::Memcached {
                servers: vec![
                    "10.0.0.5:11211".into(),
                    "cache-2:11212".into(),
                    "[::1]:11213".into()
                ]
            })
        );
        for (value, why) in [
            (
                "memcached:10.0.0.5:11211",
                "the servers follow memcached://",
            ),
            ("memcached://", "every server needs HOST:PORT"),
            ("memcached://host", "every server needs HOST:PORT"),
            ("memcached://:11211", "a host is a name or an address"),
            ("memcached://a b:1", "a host is a name or an address"),
            ("memcached://h:0", "a port is a number from 1 to 65535"),
            ("memcached://h:70000", "a port is a number from 1 to 65535"),
            ("memcached://h:1,h:1", "a server is named twice"),
        ] {
            let e = parse_backend(value).expect_err(value);
            assert!(e.to_string().contains(why), "{value}: {e}");
            assert!(e.to_string().contains("LEGO_BACKEND"), "{value}: {e}");
        }
    }
}
