//! What the runtime's unit tests share (tests only): a directory of their own for each test
//! ([`TestDir`]) and a small seeded generator ([`Rng`]) for reproducible data. The log's model
//! of the heap is in `log::test_support`, the fuzz properties' case counts and extreme values
//! in `fuzz_support`, the io_uring tests' helpers in `io::test_support`.
//!
//! Rules: nothing here is random without a seed, and nothing outlives its test (a
//! [`TestDir`] is removed when it is dropped, also when the test fails).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Directories made by this process so far, so that two never share a name.
static TEST_DIRS_MADE: AtomicU64 = AtomicU64::new(0);

/// A directory of its own for a test, in the system's temporary directory, removed (with
/// everything in it) when dropped.
pub struct TestDir(pub PathBuf);

impl TestDir {
    /// A new, empty directory whose name contains `name`, the process id and a number no
    /// other directory of this process has.
    pub fn new(name: &str) -> TestDir {
        let n = TEST_DIRS_MADE.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("lego-test-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("creating the test directory");
        TestDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny xorshift generator (13, 7, 17): the same seed gives the same numbers, so a test is
/// reproducible from its seed. The seed must not be 0 (the sequence would stay 0).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        assert_ne!(seed, 0, "a xorshift seed of 0 gives only zeros");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (which must not be 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_dirs_are_distinct_and_removed() {
        let a = TestDir::new("same");
        let b = TestDir::new("same");
        assert_ne!(a.path(), b.path());
        assert!(a.path().is_dir() && b.path().is_dir());
        let kept = a.path().to_path_buf();
        drop(a);
        assert!(!kept.exists());
    }

    #[test]
    fn rng_is_reproducible_from_its_seed() {
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..8).map(|_| r.next()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let mut r = Rng::new(3);
        assert!((0..100).all(|_| r.below(10) < 10));
    }
}
