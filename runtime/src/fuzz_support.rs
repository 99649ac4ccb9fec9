//! What the fuzz properties share (tests only): how many cases a run tries, and the extreme
//! values that mutations write into length, count and number fields.
//!
//! Each property has a default case count chosen so that all of them together take about a
//! minute in `cargo test --release`; `LEGO_FUZZ_CASES=N` runs N cases of every property
//! instead (a longer round: `LEGO_FUZZ_CASES=100000 cargo test --release -p lego-runtime
//! fuzz`). Failures are shrunk and their seeds kept in `runtime/proptest-regressions/`, which
//! proptest replays first on every later run.

use proptest::prelude::*;
use proptest::test_runner::Config;

/// The variable that sets the number of cases of every fuzz property.
pub const CASES_VAR: &str = "LEGO_FUZZ_CASES";

/// The proptest configuration of a fuzz property whose bounded CI pass runs `default_cases`.
pub fn config(default_cases: u32) -> Config {
    let cases = std::env::var(CASES_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default_cases);
    Config {
        cases,
        ..Config::default()
    }
}

/// A value a mutation writes over a field whose current value is `orig`: mostly the values
/// that break arithmetic and bounds (0, 1, `u32::MAX`, `u64::MAX`, 2^57, off by one), sometimes
/// any value.
#[derive(Debug, Clone, Copy)]
pub struct Extreme {
    pick: u8,
    raw: u64,
}

impl Extreme {
    pub fn apply(self, orig: u64) -> u64 {
        match self.pick % 14 {
            0 => 0,
            1 => 1,
            2 => orig.wrapping_add(1),
            3 => orig.wrapping_sub(1),
            4 => u32::MAX.into(),
            5 => u64::MAX,
            6 => u64::MAX - 1,
            7 => 1 << 57,
            8 => (1 << 57) - 4096,
            9 => 4096,
            10 => orig ^ (1 << (self.raw % 64)),
            11 => i64::MAX as u64,
            12 => 1 << 45,
            _ => self.raw,
        }
    }

    /// The raw random part, for choices that need one (which entry, which byte).
    pub fn raw(self) -> u64 {
        self.raw
    }
}

impl Arbitrary for Extreme {
    type Parameters = ();
    type Strategy = BoxedStrategy<Extreme>;

    fn arbitrary_with((): ()) -> Self::Strategy {
        (any::<u8>(), any::<u64>())
            .prop_map(|(pick, raw)| Extreme { pick, raw })
            .boxed()
    }
}
