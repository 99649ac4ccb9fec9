//! Fuzzing of the configuration parsers (tests only): every raw-value parser (sizes and
//! percentages, counts, `LEGO_BACKEND`, `LEGO_STATS`, `LEGO_LOG_LEVEL`, `LEGO_FAULT_INJECT`,
//! `LEGO_SYNC`, `/proc/meminfo`) and the whole [`Config`] from an arbitrary environment on an
//! arbitrary machine, with random text and with mutations of the documented examples.
//!
//! What every property asserts: no panic; an accepted value round-trips (the size, plan or
//! backend written out parses back to itself); a rejected one is a [`ConfigError`] (or
//! [`SizeError`]) whose message is one line that names the variable and quotes the value; an
//! accepted `Config` keeps every documented bound. Case counts: see [`crate::fuzz_support`]
//! (`LEGO_FUZZ_CASES=N` runs N cases of each property).

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::backend::parse_backend;
use super::parse::parse_meminfo_total;
use super::*;
use crate::fuzz_support::{config as cases, Extreme};

/// Characters sizes, counts and plans are made of, and a few that they are not.
const ALPHABET: &[char] = &[
    '0', '1', '2', '5', '9', '.', 'k', 'K', 'm', 'M', 'g', 'G', 't', 'T', 'i', 'I', 'b', 'B', '%',
    ' ', '\t', ':', '=', '/', '-', '+', 'e', 'a', 'f', 'r', 'x', 'é', '\u{a0}', '\u{0}',
];

/// A string of up to 24 characters of [`ALPHABET`].
fn alphabet_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(ALPHABET), 0..24)
        .prop_map(|cs| cs.into_iter().collect())
}

/// `base` with a few characters replaced, inserted or removed.
fn mutated(base: String) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        (
            0u8..3,
            any::<proptest::sample::Index>(),
            proptest::sample::select(ALPHABET),
        ),
        0..3,
    )
    .prop_map(move |edits| {
        let mut cs: Vec<char> = base.chars().collect();
        for (op, at, c) in edits {
            let i = at.index(cs.len() + 1);
            match op {
                0 if i < cs.len() => cs[i] = c,
                1 => cs.insert(i, c),
                _ if i < cs.len() => {
                    cs.remove(i);
                }
                _ => {}
            }
        }
        cs.into_iter().collect()
    })
}

/// Values worth trying for any variable: its documented example and default-like values,
/// mutated; numbers at the edges of every bound; random text.
fn value() -> impl Strategy<Value = String> {
    let seeds: Vec<String> = SETTINGS
        .iter()
        .map(|s| s.example.to_owned())
        .chain(
            [
                "0",
                "1",
                "15",
                "16",
                "256",
                "257",
                "1024",
                "1025",
                "9",
                "10",
                "3600000",
                "3600001",
                "16777216",
                "16777217",
                "18446744073709551615",
                "18446744073709551616",
                "64T",
                "64TiB",
                "65T",
                "16M",
                "15.99M",
                "100%",
                "101%",
                "0.5%",
                "1%",
                "file:",
                "file:/",
                "file:rel",
                "s3://b",
                "fetch:eio:after=0",
                "store:ENOSPC:after=18446744073709551615",
                "fetch:eio:after=-1",
                "OFF",
                "Trace",
                "none",
                "FDATASYNC",
                "x.json",
                ".json",
                "  ",
                "",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        )
        .collect();
    prop_oneof![
        4 => proptest::sample::select(seeds).prop_flat_map(mutated),
        2 => alphabet_text(),
        1 => any::<String>(),
        1 => any::<u64>().prop_map(|n| n.to_string()),
    ]
}

/// A variable name: one lego reads (mostly), or another.
fn name() -> impl Strategy<Value = String> {
    let names: Vec<String> = SETTINGS
        .iter()
        .map(|s| s.name.to_owned())
        .chain([vars::TMPDIR.to_owned(), "LEGO_OTHER".to_owned()])
        .collect();
    proptest::sample::select(names)
}

fn host() -> impl Strategy<Value = Host> {
    (
        prop_oneof![Just(0u64), Just(16 * GIB), Just(u64::MAX), any::<u64>()],
        prop_oneof![Just(0usize), Just(1), Just(8), Just(1000), any::<usize>()],
    )
        .prop_map(|(total_ram_bytes, online_cpus)| Host {
            total_ram_bytes,
            online_cpus,
        })
}

fn config_of(env: &BTreeMap<String, String>, host: Host) -> Result<Config, ConfigError> {
    Config::from_lookup_on(|name| env.get(name).cloned(), host)
}

/// Every bound the settings document, for a `Config` that was accepted.
fn check_config(c: &Config) -> Result<(), TestCaseError> {
    prop_assert!(c.heap_bytes <= HEAP_BYTES_MAX && c.heap_bytes.is_multiple_of(PAGE_BYTES));
    prop_assert!(c.cache_bytes >= CACHE_BYTES_MIN && c.cache_bytes <= c.heap_bytes);
    prop_assert!(c.cache_bytes.is_multiple_of(PAGE_BYTES));
    prop_assert!((HANDLER_THREADS_MIN..=HANDLER_THREADS_MAX).contains(&c.handler_threads));
    prop_assert!((EVICT_BATCH_PAGES_MIN..=EVICT_BATCH_PAGES_MAX).contains(&c.evict_batch_pages));
    match &c.backend {
        BackendSpec::File { dir } => prop_assert!(dir.is_absolute()),
        BackendSpec::Memcached { servers } => {
            prop_assert!(!servers.is_empty() && servers.iter().all(|s| s.contains(':')))
        }
    }
    if let Some(log) = &c.log {
        // `None` is LEGO_FLUSH_MS=manual.
        prop_assert!(log
            .flush_ms
            .is_none_or(|ms| (FLUSH_MS_MIN as u64..=FLUSH_MS_MAX as u64).contains(&ms)));
        prop_assert!((FLUSH_PAGES_MIN..=FLUSH_PAGES_MAX).contains(&log.flush_pages));
        prop_assert!(log.log_max_bytes.is_none_or(|m| m >= LOG_MAX_BYTES_MIN));
    }
    prop_assert!(!c.to_string().is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(cases(40_000))]

    /// Any text as a size, on any machine: a positive size, or an error that quotes it.
    #[test]
    fn fuzz_sizes_parse_or_quote_the_text(
        text in prop_oneof![alphabet_text(), any::<String>(), value()],
        ram in prop_oneof![Just(0u64), Just(16 * GIB), Just(u64::MAX), any::<u64>()],
    ) {
        match parse_size(&text, ram) {
            Ok(bytes) => prop_assert!(bytes > 0),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.starts_with(&format!("{text:?}")), "{}", msg);
                prop_assert!(!msg.contains('\n') || text.contains('\n'), "{}", msg);
            }
        }
    }

    /// Sizes written out parse back: whole numbers with every suffix (or too large), the
    /// fractions of a suffix, and percentages of RAM.
    #[test]
    fn fuzz_sizes_round_trip(
        n in prop_oneof![1u64..10_000, any::<u64>().prop_map(|n| n.max(1))],
        suffix in proptest::sample::select(vec![
            ("", 1u64), ("b", 1), ("K", KIB), ("kib", KIB), ("KB", KIB), ("M", MIB), ("MiB", MIB),
            ("g", GIB), ("GB", GIB), ("T", TIB), ("tib", TIB),
        ]),
        fraction in 0u64..1_000_000_000,
        digits in 1usize..=9,
        percent in 1u64..=100,
        ram in prop_oneof![1u64..200, 1u64..],
        space in any::<bool>(),
    ) {
        let (suffix, unit) = suffix;
        let gap = if space { " " } else { "" };
        let text = format!("{n}{gap}{suffix}");
        match n.checked_mul(unit) {
            Some(bytes) => prop_assert_eq!(parse_size(&text, ram), Ok(bytes)),
            None => {
                let too_large = matches!(parse_size(&text, ram), Err(SizeError::TooLarge { .. }));
                prop_assert!(too_large);
            }
        }
        if unit > 1 && n < 1_000_000 {
            let f = fraction % 10u64.pow(digits as u32);
            let text = format!("{n}.{f:0digits$}{suffix}");
            let exact = (u128::from(n) * 10u128.pow(digits as u32) + u128::from(f))
                * u128::from(unit)
                / 10u128.pow(digits as u32);
            prop_assert_eq!(parse_size(&text, ram), Ok(u64::try_from(exact).expect("small")));
        }
        let expected = u64::try_from(u128::from(ram) * u128::from(percent) / 100).expect("fits");
        let share = parse_size(&format!("{percent}%"), ram);
        if expected == 0 {
            prop_assert!(matches!(share, Err(SizeError::Zero { .. })), "{:?}", share);
        } else {
            prop_assert_eq!(share, Ok(expected));
        }
    }

    /// The whole configuration from any environment on any machine: a `Config` within every
    /// bound, or one line that names a variable; empty values and names lego does not read
    /// change nothing.
    #[test]
    fn fuzz_config_from_any_environment(
        env in proptest::collection::btree_map(name(), value(), 0..8),
        host in host(),
    ) {
        let result = config_of(&env, host);
        match &result {
            Ok(c) => check_config(c)?,
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(!msg.is_empty());
                prop_assert!(msg.contains("LEGO_") || msg.contains(vars::TMPDIR), "{}", msg);
                let quoted_newline = env.values().any(|v| v.contains('\n') || v.contains('\r'));
                prop_assert!(!msg.contains('\n') || quoted_newline, "{}", msg);
            }
        }
        let known: Vec<&str> = SETTINGS.iter().map(|s| s.name).chain([vars::TMPDIR]).collect();
        let plain: BTreeMap<String, String> = env
            .iter()
            .filter(|(k, v)| known.contains(&k.as_str()) && !v.trim().is_empty())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        prop_assert_eq!(config_of(&plain, host), result);
    }

    /// Fault plans (errno or delay, once or not), backends and /proc/meminfo written out parse back to themselves; any
    /// other text is refused with the value quoted.
    #[test]
    fn fuzz_plans_backends_and_meminfo(
        store in any::<bool>(),
        enospc in any::<bool>(),
        upper in any::<bool>(),
        after in any::<Extreme>(),
        dir in "(/[a-zA-Z0-9._ -]{0,8}){1,3}",
        text in value(),
        kib in any::<u64>(),
        once in any::<bool>(),
        delay in proptest::option::of(1u64..=FAULT_DELAY_MS_MAX),
    ) {
        let op = if store { "store" } else { "fetch" };
        let errno = if enospc { "enospc" } else { "eio" };
        let n = after.apply(100);
        let effect = delay.map_or(errno.to_owned(), |ms| format!("delay={ms}"));
        let tail = if once { ":once" } else { "" };
        let mut plan = format!("{op}:{effect}:after={n}{tail}");
        if upper {
            plan = plan.to_uppercase().replace("AFTER", "after");
        }
        prop_assert_eq!(
            parse_fault_plan(&plan),
            Ok(Injection::Store(FaultPlan {
                op: if store { FaultOp::Store } else { FaultOp::Fetch },
                after_pages: n,
                effect: match delay {
                    Some(ms) => FaultEffect::Delay { ms },
                    None => FaultEffect::Errno(if enospc { libc::ENOSPC } else { libc::EIO }),
                },
                once,
            }))
        );
        let backend = format!("file:{dir}");
        let spec = parse_backend(&backend);
        prop_assert_eq!(spec.as_ref().map(ToString::to_string), Ok(backend.clone()));

        for (parsed, name) in [
            (parse_fault_plan(&text).err(), vars::FAULT_INJECT),
            (parse_backend(&text).err(), vars::BACKEND),
            (parse_stats(&text).err(), vars::STATS),
            (parse_log_level(&text).err(), vars::LOG_LEVEL),
        ] {
            if let Some(e) = parsed {
                let msg = e.to_string();
                prop_assert!(msg.starts_with(&format!("{name}={text:?}")), "{}", msg);
            }
        }
        prop_assert_eq!(
            parse_meminfo_total(&format!("MemTotal:  {kib} kB\n")),
            kib.checked_mul(KIB)
        );
        // Any text as /proc/meminfo: a size only if it has a MemTotal line in kB.
        if let Some(bytes) = parse_meminfo_total(&text) {
            prop_assert!(text.contains("MemTotal:") && bytes.is_multiple_of(KIB));
        }
    }
}
