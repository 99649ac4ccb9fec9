//! `LEGO_FAULT_INJECT`, a testing hook: a [`FaultPlan`] for the page store (which operation
//! fails or misbehaves, after how many pages, and how), a runtime thread whose start fails
//! (`spawn:THREAD`), or a point where the shim panics (`panic:fork`).
//!
//! This module only parses; the store seam (`store::faulty`), the epoch's read-back and the
//! runtime's threads act on what it returns. Rules: a plan that is set but wrong is refused,
//! never ignored (a test that believes it injects a fault must not pass because nothing
//! happened).

use super::error::ConfigError;

/// Fault injection for tests: which store operation fails, after how many successful pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// The operation that fails.
    pub op: FaultOp,
    /// How many pages of that operation succeed before every later call fails.
    pub after_pages: u64,
    /// What a failing call does.
    pub effect: FaultEffect,
}

/// What an injected store fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultEffect {
    /// The call fails with this errno (`libc::EIO` or `libc::ENOSPC`).
    Errno(i32),
    /// The call succeeds, but every page it reads comes back with one byte changed (a store
    /// that hands back a damaged or foreign copy). Fetches only.
    Corrupt,
}

/// The runtime threads whose start `LEGO_FAULT_INJECT=spawn:THREAD` can make fail.
pub const SPAWN_FAULT_THREADS: &[&str] = &["lego-logwrite", "lego-flush", "lego-evict"];
/// Where `LEGO_FAULT_INJECT=panic:POINT` can make the shim panic.
pub const PANIC_FAULT_POINTS: &[&str] = &["fork"];

/// A page store operation that fault injection can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// Reading pages back from the store.
    Fetch,
    /// Writing evicted pages to the store.
    Store,
    /// Reading evicted pages back from the store for an epoch of the log (the program's own
    /// fetches are not touched): the epoch's read-back seam on its own.
    ReadBack,
}

/// The errno names `LEGO_FAULT_INJECT` accepts.
const FAULT_ERRNOS: &[(&str, i32)] = &[("eio", libc::EIO), ("enospc", libc::ENOSPC)];

/// What `LEGO_FAULT_INJECT` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Injection {
    Store(FaultPlan),
    Spawn(&'static str),
    Panic(&'static str),
}

pub(super) fn parse_fault_plan(value: &str) -> Result<Injection, ConfigError> {
    let fail = |problem: &'static str| ConfigError::FaultPlan {
        value: value.to_owned(),
        problem,
    };
    // `spawn:THREAD` and `panic:POINT` name one of a fixed list.
    let named = |list: &[&'static str], name: &str| list.iter().copied().find(|&n| n == name);
    if let Some(thread) = value.strip_prefix("spawn:") {
        return named(SPAWN_FAULT_THREADS, thread)
            .map(Injection::Spawn)
            .ok_or_else(|| fail("unknown thread"));
    }
    if let Some(point) = value.strip_prefix("panic:") {
        return named(PANIC_FAULT_POINTS, point)
            .map(Injection::Panic)
            .ok_or_else(|| fail("unknown panic point"));
    }
    let mut parts = value.split(':');
    let (Some(op), Some(errno), Some(after), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(fail("it needs exactly three parts separated by ':'"));
    };
    let op = if op.eq_ignore_ascii_case("fetch") {
        FaultOp::Fetch
    } else if op.eq_ignore_ascii_case("store") {
        FaultOp::Store
    } else if op.eq_ignore_ascii_case("readback") {
        FaultOp::ReadBack
    } else {
        return Err(fail("unknown operation"));
    };
    let effect = if errno.eq_ignore_ascii_case("corrupt") {
        if op == FaultOp::Store {
            return Err(fail("only fetched pages can come back corrupt"));
        }
        FaultEffect::Corrupt
    } else {
        FAULT_ERRNOS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(errno))
            .map(|&(_, errno)| FaultEffect::Errno(errno))
            .ok_or_else(|| fail("unknown errno"))?
    };
    let after_pages = after
        .strip_prefix("after=")
        .ok_or_else(|| fail("the third part must be after=N"))?
        .parse::<u64>()
        .map_err(|_| fail("N must be a whole number of pages"))?;
    Ok(Injection::Store(FaultPlan {
        op,
        after_pages,
        effect,
    }))
}
