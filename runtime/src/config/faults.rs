//! `LEGO_FAULT_INJECT`, a testing hook: a [`FaultPlan`] for the page store (which operation
//! fails or misbehaves, after how many pages, how, and whether only once:
//! `OP:EFFECT:after=N[:once]` with EFFECT an errno, `corrupt` or `delay=MS`), a runtime thread whose start fails
//! (`spawn:THREAD`), a point where the shim panics (`panic:fork`), or a point where the
//! runtime waits before it goes on (`stall:POINT:MS`, to widen a race window).
//!
//! This module only parses; the store seam (`store::faulty`), the epoch's read-back and the
//! runtime's threads act on what it returns. Rules: a plan that is set but wrong is refused,
//! never ignored (a test that believes it injects a fault must not pass because nothing
//! happened).

use super::error::ConfigError;

/// Longest delay a `delay=MS` plan adds to a call, in milliseconds (one minute): a test that
/// wants a slow store wants it slow, not hung.
pub const FAULT_DELAY_MS_MAX: u64 = 60_000;

// The refusal of an out-of-range delay names the bound as "60000".
const _: () = assert!(FAULT_DELAY_MS_MAX == 60_000);

/// Fault injection for tests: which store operation misbehaves, after how many good pages,
/// how, and whether only once. `OP:EFFECT:after=N[:once]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// The operation that fails.
    pub op: FaultOp,
    /// How many pages of that operation succeed before the effect starts.
    pub after_pages: u64,
    /// What a failing call does.
    pub effect: FaultEffect,
    /// `:once`: only the call that reaches page `after_pages + 1` gets the effect (that page
    /// fails, comes back changed or is delayed, once); every later call works again. `false`
    /// (the default): every later call gets it too.
    pub once: bool,
}

/// What an injected store fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultEffect {
    /// The call fails with this errno (`libc::EIO` or `libc::ENOSPC`).
    Errno(i32),
    /// The call succeeds, but every page it reads past the budget (only the first one with
    /// `once`) comes back with one byte changed (a store that hands back a damaged or foreign
    /// copy). Fetches only.
    Corrupt,
    /// The call succeeds, but only after waiting `ms` milliseconds (a slow or stalled store),
    /// from 1 to [`FAULT_DELAY_MS_MAX`]. Fetch and store only.
    Delay {
        /// The wait, in milliseconds.
        ms: u64,
    },
}

/// The runtime threads whose start `LEGO_FAULT_INJECT=spawn:THREAD` can make fail.
pub const SPAWN_FAULT_THREADS: &[&str] = &[
    "lego-logwrite",
    "lego-flush",
    "lego-evict",
    "lego-discard",
    "lego-pool",
];
/// Where `LEGO_FAULT_INJECT=panic:POINT` can make the shim panic.
pub const PANIC_FAULT_POINTS: &[&str] = &["fork"];
/// Where `LEGO_FAULT_INJECT=stall:POINT:MS` makes the runtime wait: `snapshot`, a fault
/// handler that copies pages back from an epoch's snapshot, after it claimed them.
pub const STALL_FAULT_POINTS: &[&str] = &["snapshot"];

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
    Stall(Stall),
}

/// `stall:POINT:MS`: the runtime waits `ms` milliseconds (1 to [`FAULT_DELAY_MS_MAX`]) each
/// time it reaches `point` (one of [`STALL_FAULT_POINTS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    pub point: &'static str,
    pub ms: u64,
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
    if let Some(rest) = value.strip_prefix("stall:") {
        let (point, ms) = rest
            .split_once(':')
            .ok_or_else(|| fail("a stall needs a point and a time: stall:POINT:MS"))?;
        let point = named(STALL_FAULT_POINTS, point).ok_or_else(|| fail("unknown stall point"))?;
        let ms = ms
            .parse::<u64>()
            .ok()
            .filter(|ms| (1..=FAULT_DELAY_MS_MAX).contains(ms))
            .ok_or_else(|| fail("MS must be a whole number of milliseconds from 1 to 60000"))?;
        return Ok(Injection::Stall(Stall { point, ms }));
    }
    let parts: Vec<&str> = value.split(':').collect();
    let (op, effect, after, once) = match parts[..] {
        [op, effect, after] => (op, effect, after, false),
        [op, effect, after, once] if once.eq_ignore_ascii_case("once") => (op, effect, after, true),
        _ => {
            return Err(fail(
                "it needs exactly three parts separated by ':', or four ending in once",
            ))
        }
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
    let effect = if effect.eq_ignore_ascii_case("corrupt") {
        if op == FaultOp::Store {
            return Err(fail("only fetched pages can come back corrupt"));
        }
        FaultEffect::Corrupt
    } else if let Some(ms) = strip_prefix_ignore_case(effect, "delay=") {
        if op == FaultOp::ReadBack {
            return Err(fail("only fetch and store can be delayed"));
        }
        let ms = ms
            .parse::<u64>()
            .ok()
            .filter(|ms| (1..=FAULT_DELAY_MS_MAX).contains(ms))
            .ok_or_else(|| fail("MS must be a whole number of milliseconds from 1 to 60000"))?;
        FaultEffect::Delay { ms }
    } else {
        FAULT_ERRNOS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(effect))
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
        once,
    }))
}

/// `text` without `prefix`, compared ASCII-case-insensitively, or `None` when it does not
/// start with it.
fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}
