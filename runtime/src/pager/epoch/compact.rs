//! Keeping the log bounded: after a commit, the log is compacted into a checkpoint once its
//! current generation is larger than `LEGO_LOG_MAX` (by default a multiple of the heap's live
//! size, at least [`LOG_MAX_BYTES_FLOOR`]). The format of compaction is the log's
//! (`LogWriter::compact_within`); this is only when and with which limit.
//!
//! Rules: runs on the flusher thread with the writer's lock held, never during a cut.

use super::super::{Shared, STATS};
use super::report;
use crate::config::LogSettings;
use crate::log::LogWriter;
use crate::stats::Counter;
use crate::PAGE_SIZE;

/// Smallest log size that triggers a compaction when `LEGO_LOG_MAX` is unset, in bytes.
const LOG_MAX_BYTES_FLOOR: u64 = 64 << 20;
/// Multiple of the heap's live size the log may reach when `LEGO_LOG_MAX` is unset.
const LOG_MAX_LIVE_MULTIPLE: u64 = 4;

/// After an epoch: compacts the log once it is larger than `LEGO_LOG_MAX` (by default a
/// multiple of the heap's live size).
pub(super) fn maybe_compact(sh: &Shared, writer: &mut LogWriter, settings: &LogSettings) {
    let limit = log_limit(sh, settings);
    if writer.log_bytes() <= limit {
        return;
    }
    match writer.compact_within(limit) {
        Ok(epoch) => {
            STATS.add(Counter::LogCompactions, 1);
            log::info!(
                "the log outgrew {limit} bytes: compacted into a checkpoint at epoch {epoch}, now {} bytes",
                writer.log_bytes()
            );
        }
        Err(e) => {
            report("compacting the log", &crate::logging::error_chain(&e));
        }
    }
}

/// The size of the log's current generation above which it is compacted: `LEGO_LOG_MAX`, or a
/// multiple of the heap's live size (the previous generation, kept for recovery, is not
/// counted: the directory holds up to about twice this).
pub(super) fn log_limit(sh: &Shared, settings: &LogSettings) -> u64 {
    settings.log_max_bytes.unwrap_or_else(|| {
        // Counted by the table as states change, not by walking it under the lock.
        let live = sh.cache.lock().live() as u64;
        (live * PAGE_SIZE as u64 * LOG_MAX_LIVE_MULTIPLE).max(LOG_MAX_BYTES_FLOOR)
    })
}
