//! The memcached pool's settings: `LEGO_REDUNDANCY` (or `LEGO_REPLICAS`), `LEGO_REPLICATION`,
//! `LEGO_ADAPTIVE_FREE` and `LEGO_TIMEOUT_MS` ([`PoolSettings`]).
//!
//! Rules: they tune a pool, so setting one with another backend is an error, not something
//! silently ignored; a pool cannot keep more copies than it has servers, nor a stripe of more
//! values than it has servers; an erasure-coded pool writes pessimistically only.

use super::backend::BackendSpec;
use super::error::ConfigError;
use super::parse::lookup;
use super::settings::vars;
use super::{check_count, Raw};

/// Most copies of a page a pool keeps.
pub const REPLICAS_MAX: usize = 8;
/// Default share of the pool's memory below which adaptive replication turns optimistic, in
/// percent.
pub const ADAPTIVE_FREE_PERCENT_DEFAULT: usize = 20;
/// Bounds of `LEGO_ADAPTIVE_FREE`, in percent.
pub const ADAPTIVE_FREE_PERCENT_MIN: usize = 1;
pub const ADAPTIVE_FREE_PERCENT_MAX: usize = 90;
/// Default bound on every connect, read and write to a server, in milliseconds.
pub const TIMEOUT_MS_DEFAULT: usize = 2000;
/// Bounds of `LEGO_TIMEOUT_MS`, in milliseconds.
pub const TIMEOUT_MS_MIN: usize = 10;
pub const TIMEOUT_MS_MAX: usize = 60_000;

/// Data pages of an erasure-coded stripe allowed (`rs:K+M`: K divides a placement group).
pub const CODE_DATA_ALLOWED: [usize; 4] = [2, 4, 8, 16];
/// Bounds of the parity pages of a stripe (`rs:K+M`).
pub const CODE_PARITY_MIN: usize = 1;
pub const CODE_PARITY_MAX: usize = 4;

/// The shape of an erasure code (`LEGO_REDUNDANCY=rs:K+M`): stripes of `data` pages and
/// `parity` parity pages, on `data + parity` distinct servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeShape {
    pub data: usize,
    pub parity: usize,
}

/// What `LEGO_REDUNDANCY` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Redundancy {
    Replicas(usize),
    Code(CodeShape),
}

/// How the copies of a page are written (`LEGO_REPLICATION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// A write-back completes when every copy is acknowledged.
    Pessimistic,
    /// A write-back completes when the first copy is acknowledged; the others follow from a
    /// bounded queue that keeps the bytes until they are.
    Optimistic,
    /// Pessimistic while the pool has room, optimistic when its free memory is scarce.
    Adaptive,
}

impl Replication {
    pub fn name(self) -> &'static str {
        match self {
            Replication::Pessimistic => "pessimistic",
            Replication::Optimistic => "optimistic",
            Replication::Adaptive => "adaptive",
        }
    }
}

/// Settings of a memcached pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Copies of every page, on distinct servers (`LEGO_REPLICAS`).
    pub replicas: usize,
    /// How the copies are written (`LEGO_REPLICATION`).
    pub replication: Replication,
    /// Free share of the pool's memory, in percent, below which adaptive replication turns
    /// optimistic (`LEGO_ADAPTIVE_FREE`).
    pub adaptive_free_percent: u8,
    /// Bound on every connect, read and write, in milliseconds (`LEGO_TIMEOUT_MS`).
    pub timeout_ms: u64,
    /// Erasure coding instead of copies (`LEGO_REDUNDANCY=rs:K+M`); `replicas` is then 1.
    pub code: Option<CodeShape>,
}

impl Default for PoolSettings {
    fn default() -> PoolSettings {
        PoolSettings {
            replicas: 1,
            replication: Replication::Adaptive,
            adaptive_free_percent: ADAPTIVE_FREE_PERCENT_DEFAULT as u8,
            timeout_ms: TIMEOUT_MS_DEFAULT as u64,
            code: None,
        }
    }
}

/// The pool's settings as parsed, before they are checked against the backend.
#[derive(Debug, Clone, Default)]
pub(super) struct RawPool {
    pub replicas: Option<Raw<usize>>,
    pub replication: Option<Replication>,
    pub adaptive_free: Option<Raw<usize>>,
    pub timeout_ms: Option<Raw<usize>>,
    pub redundancy: Option<Raw<Redundancy>>,
}

/// Parses `LEGO_REDUNDANCY`: `replicas:N` or `rs:K+M` (any case), the numbers checked against
/// their bounds and the servers later.
pub(super) fn parse_redundancy(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<Raw<Redundancy>>, ConfigError> {
    let Some(text) = lookup(get, vars::REDUNDANCY) else {
        return Ok(None);
    };
    let lower = text.to_ascii_lowercase();
    let number = |s: &str| s.parse::<usize>().ok();
    let value = if let Some(n) = lower.strip_prefix("replicas:") {
        number(n).map(Redundancy::Replicas)
    } else if let Some(code) = lower.strip_prefix("rs:") {
        code.split_once('+').and_then(|(k, m)| {
            Some(Redundancy::Code(CodeShape {
                data: number(k)?,
                parity: number(m)?,
            }))
        })
    } else {
        None
    };
    match value {
        Some(value) => Ok(Some(Raw { text, value })),
        None => Err(ConfigError::Redundancy { value: text }),
    }
}

/// Parses `LEGO_REPLICATION` (any case).
pub(super) fn parse_replication(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<Replication>, ConfigError> {
    lookup(get, vars::REPLICATION)
        .map(|v| match v.to_ascii_lowercase().as_str() {
            "pessimistic" => Ok(Replication::Pessimistic),
            "optimistic" => Ok(Replication::Optimistic),
            "adaptive" => Ok(Replication::Adaptive),
            _ => Err(ConfigError::Replication { value: v }),
        })
        .transpose()
}

/// Parses `LEGO_ADAPTIVE_FREE`: a whole number of percent, with or without `%`, checked
/// against its bounds later.
pub(super) fn parse_adaptive_free(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<Raw<usize>>, ConfigError> {
    let Some(text) = lookup(get, vars::ADAPTIVE_FREE) else {
        return Ok(None);
    };
    match text.strip_suffix('%').unwrap_or(&text).parse::<usize>() {
        Ok(value) => Ok(Some(Raw { text, value })),
        Err(_) => Err(ConfigError::Count {
            name: vars::ADAPTIVE_FREE,
            value: text,
            unit: "percent",
            min: ADAPTIVE_FREE_PERCENT_MIN,
            max: ADAPTIVE_FREE_PERCENT_MAX,
        }),
    }
}

/// The pool's settings with defaults, checked against the backend they tune.
pub(super) fn validate(raw: RawPool, backend: &BackendSpec) -> Result<PoolSettings, ConfigError> {
    let BackendSpec::Memcached { servers } = backend else {
        let set = [
            (vars::REPLICAS, raw.replicas.is_some()),
            (vars::REPLICATION, raw.replication.is_some()),
            (vars::ADAPTIVE_FREE, raw.adaptive_free.is_some()),
            (vars::TIMEOUT_MS, raw.timeout_ms.is_some()),
            (vars::REDUNDANCY, raw.redundancy.is_some()),
        ];
        if let Some((name, _)) = set.iter().find(|(_, set)| *set) {
            return Err(ConfigError::NeedsPool { name });
        }
        return Ok(PoolSettings::default());
    };
    let mut pool = PoolSettings::default();
    let replicas = match (&raw.redundancy, raw.replicas) {
        (None, replicas) => replicas,
        (Some(r), None) => match r.value {
            Redundancy::Replicas(n) => Some(Raw {
                text: r.text.clone(),
                value: n,
            }),
            Redundancy::Code(shape) => {
                pool.code = Some(check_code(&r.text, shape, servers.len())?);
                None
            }
        },
        (Some(r), Some(replicas)) => {
            if r.value != Redundancy::Replicas(replicas.value) {
                return Err(ConfigError::RedundancyConflict {
                    redundancy: r.text.clone(),
                    replicas: replicas.text,
                });
            }
            Some(replicas)
        }
    };
    if let Some(replicas) = replicas {
        let name = if raw.redundancy.is_some() {
            vars::REDUNDANCY
        } else {
            vars::REPLICAS
        };
        let setting = raw
            .redundancy
            .as_ref()
            .map_or_else(|| replicas.text.clone(), |r| r.text.clone());
        pool.replicas = check_count(replicas, name, "copies", 1, REPLICAS_MAX)?;
        if pool.replicas > servers.len() {
            return Err(ConfigError::ReplicasAboveServers {
                name,
                setting,
                servers: servers.len(),
            });
        }
    }
    if let Some(replication) = raw.replication {
        pool.replication = replication;
    }
    if pool.code.is_some() {
        // Parity is written with its data: no queue of copies to write later (yet).
        match raw.replication {
            None | Some(Replication::Pessimistic) => pool.replication = Replication::Pessimistic,
            Some(mode) => {
                return Err(ConfigError::CodeNeedsPessimistic {
                    redundancy: raw
                        .redundancy
                        .map(|r| r.text)
                        .expect("a code comes from LEGO_REDUNDANCY"),
                    mode: mode.name(),
                })
            }
        }
    }
    if let Some(free) = raw.adaptive_free {
        let percent = check_count(
            free,
            vars::ADAPTIVE_FREE,
            "percent",
            ADAPTIVE_FREE_PERCENT_MIN,
            ADAPTIVE_FREE_PERCENT_MAX,
        )?;
        pool.adaptive_free_percent = u8::try_from(percent).expect("at most 90");
    }
    if let Some(ms) = raw.timeout_ms {
        let ms = check_count(
            ms,
            vars::TIMEOUT_MS,
            "milliseconds",
            TIMEOUT_MS_MIN,
            TIMEOUT_MS_MAX,
        )?;
        pool.timeout_ms = ms as u64;
    }
    Ok(pool)
}

/// Checks an erasure code's shape against its bounds and the pool's `servers`.
fn check_code(text: &str, shape: CodeShape, servers: usize) -> Result<CodeShape, ConfigError> {
    if !CODE_DATA_ALLOWED.contains(&shape.data)
        || !(CODE_PARITY_MIN..=CODE_PARITY_MAX).contains(&shape.parity)
    {
        return Err(ConfigError::CodeShape {
            value: text.to_owned(),
        });
    }
    if shape.data + shape.parity > servers {
        return Err(ConfigError::CodeAboveServers {
            value: text.to_owned(),
            values: shape.data + shape.parity,
            servers,
        });
    }
    Ok(shape)
}
