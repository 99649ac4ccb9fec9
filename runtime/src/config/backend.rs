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
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::File { dir } => write!(f, "file:{}", dir.display()),
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
const SCHEMES: &[Scheme] = &[Scheme {
    name: "file",
    form: "file:DIR",
    parse: parse_file,
}];

/// The expected forms of every scheme, as error messages show them ("file:DIR").
pub(super) fn known_forms() -> String {
    let forms: Vec<&str> = SCHEMES.iter().map(|s| s.form).collect();
    forms.join(", ")
}

/// Parses a `LEGO_BACKEND` value.
pub(super) fn parse_backend(value: &str) -> Result<BackendSpec, ConfigError> {
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
        assert_eq!(known_forms(), "file:DIR");
    }

    #[test]
    fn unknown_schemes_list_the_known_forms() {
        for value in ["redis:x", "nocolon", ":/tmp", "FILE:/tmp"] {
            let e = parse_backend(value).expect_err(value);
            assert_eq!(
                e.to_string(),
                format!("LEGO_BACKEND={value:?} is not a known backend: expected one of file:DIR")
            );
        }
    }
}
