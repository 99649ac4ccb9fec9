//! The durable heap's settings: `LEGO_LOG_DIR` and its companions `LEGO_FLUSH_MS`,
//! `LEGO_FLUSH_PAGES`, `LEGO_SYNC` and `LEGO_LOG_MAX` ([`LogSettings`]).
//!
//! Rules: the companions tune a log, so setting one without `LEGO_LOG_DIR` is an error, not
//! something silently ignored; `LEGO_FLUSH_MS=manual` rules out `LEGO_FLUSH_PAGES` (it would
//! start the automatic epochs that manual mode promises not to take).

use std::path::PathBuf;

use super::error::ConfigError;
use super::parse::lookup;
use super::settings::vars;
use super::{
    check_count, Raw, FLUSH_MS_DEFAULT, FLUSH_MS_MAX, FLUSH_MS_MIN, FLUSH_PAGES_MAX,
    FLUSH_PAGES_MIN, LOG_MAX_BYTES_MIN, PAGE_BYTES,
};

/// Settings of the durable heap's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// The log directory (`LEGO_LOG_DIR`).
    pub dir: PathBuf,
    /// Longest time between epochs, in milliseconds (`LEGO_FLUSH_MS`); `None` for
    /// `LEGO_FLUSH_MS=manual`: epochs only at `lego_checkpoint()` and at exit.
    pub flush_ms: Option<u64>,
    /// Dirty pages that start an epoch early (`LEGO_FLUSH_PAGES`).
    pub flush_pages: usize,
    /// Whether epochs wait for the disk (`LEGO_SYNC`).
    pub sync: LogSync,
    /// Log size that triggers a compaction, in bytes (`LEGO_LOG_MAX`); `None`: follow the
    /// heap's live size.
    pub log_max_bytes: Option<u64>,
}

/// `LEGO_SYNC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSync {
    /// `fdatasync` before and after each commit record.
    Fdatasync,
    /// Never wait for the disk.
    None,
}

/// `LEGO_FLUSH_MS` as parsed.
#[derive(Debug, Clone)]
pub(super) enum FlushMs {
    Every(Raw<usize>),
    Manual,
}

/// The log's settings after parsing each variable on its own (sizes and counts are parsed by
/// the caller, with the others).
#[derive(Debug, Clone, Default)]
pub(super) struct RawLog {
    pub dir: Option<String>,
    pub flush_ms: Option<FlushMs>,
    pub flush_pages: Option<Raw<usize>>,
    pub sync: Option<LogSync>,
    pub max_bytes: Option<Raw<u64>>,
}

/// Parses `LEGO_FLUSH_MS`: `manual` (any case) or a whole number, checked against its bounds
/// later.
pub(super) fn parse_flush_ms(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<FlushMs>, ConfigError> {
    Ok(match lookup(get, vars::FLUSH_MS) {
        Some(text) if text.eq_ignore_ascii_case("manual") => Some(FlushMs::Manual),
        Some(text) => match text.parse::<usize>() {
            Ok(value) => Some(FlushMs::Every(Raw { text, value })),
            Err(_) => return Err(ConfigError::FlushMs { value: text }),
        },
        None => None,
    })
}

/// Parses `LEGO_SYNC` (any case).
pub(super) fn parse_sync(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<LogSync>, ConfigError> {
    lookup(get, vars::SYNC)
        .map(|v| match v.to_ascii_lowercase().as_str() {
            "fdatasync" => Ok(LogSync::Fdatasync),
            "none" => Ok(LogSync::None),
            _ => Err(ConfigError::Sync { value: v }),
        })
        .transpose()
}

/// The log's settings, with defaults (`LEGO_FLUSH_PAGES` defaults to a quarter of the cache
/// of `cache_bytes`), or `None` without `LEGO_LOG_DIR`.
pub(super) fn validate(raw: RawLog, cache_bytes: u64) -> Result<Option<LogSettings>, ConfigError> {
    let Some(dir) = raw.dir else {
        let set = [
            (vars::FLUSH_MS, raw.flush_ms.is_some()),
            (vars::FLUSH_PAGES, raw.flush_pages.is_some()),
            (vars::SYNC, raw.sync.is_some()),
            (vars::LOG_MAX, raw.max_bytes.is_some()),
        ];
        if let Some((name, _)) = set.iter().find(|(_, set)| *set) {
            return Err(ConfigError::NeedsLogDir { name });
        }
        return Ok(None);
    };
    let flush_pages_set = raw.flush_pages.is_some();
    let flush_pages = match raw.flush_pages {
        Some(pages) => check_count(
            pages,
            vars::FLUSH_PAGES,
            "pages",
            FLUSH_PAGES_MIN,
            FLUSH_PAGES_MAX,
        )?,
        None => usize::try_from(cache_bytes / PAGE_BYTES / 4)
            .unwrap_or(FLUSH_PAGES_MAX)
            .clamp(FLUSH_PAGES_MIN, FLUSH_PAGES_MAX),
    };
    let log_max_bytes = match raw.max_bytes {
        Some(max) if max.value < LOG_MAX_BYTES_MIN => {
            return Err(ConfigError::LogMaxTooSmall {
                shown: max.shown(),
                bytes: max.value,
            })
        }
        other => other.map(|max| max.value),
    };
    let flush_ms = match raw.flush_ms {
        Some(FlushMs::Every(ms)) if (FLUSH_MS_MIN..=FLUSH_MS_MAX).contains(&ms.value) => {
            Some(ms.value as u64)
        }
        Some(FlushMs::Every(ms)) => return Err(ConfigError::FlushMs { value: ms.text }),
        Some(FlushMs::Manual) => {
            if flush_pages_set {
                return Err(ConfigError::ManualWithFlushPages);
            }
            None
        }
        None => Some(FLUSH_MS_DEFAULT as u64),
    };
    Ok(Some(LogSettings {
        dir: PathBuf::from(dir),
        flush_ms,
        flush_pages,
        sync: raw.sync.unwrap_or(LogSync::Fdatasync),
        log_max_bytes,
    }))
}
