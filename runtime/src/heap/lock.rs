//! The heap's lock: one `AtomicU32` that lives inside the heap region, spins briefly, then
//! sleeps on a futex.
//!
//! It must not allocate (it guards the allocator), must be valid when all-zero (a fresh region
//! reads as zero) and must be resettable after `fork` or a restore, when no thread of the new
//! process can be holding it. States: 0 free, 1 held, 2 held with possible sleepers.

use std::sync::atomic::{AtomicU32, Ordering};

/// Rounds of busy-waiting before a contended locker goes to sleep. Critical sections are a few
/// dozen instructions, so a short spin usually wins; on 2 vCPUs a long one only burns the CPU
/// the holder needs.
const SPIN_ROUNDS_MAX: u32 = 64;

const FREE: u32 = 0;
const HELD: u32 = 1;
const CONTENDED: u32 = 2;

#[repr(transparent)]
pub(crate) struct RawLock {
    state: AtomicU32,
}

impl RawLock {
    /// A free lock (for locks outside a heap image; those inside start as zeroed memory).
    pub const fn new() -> RawLock {
        RawLock {
            state: AtomicU32::new(FREE),
        }
    }

    #[inline]
    pub fn lock(&self) {
        if self
            .state
            .compare_exchange_weak(FREE, HELD, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
    }

    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0;
        loop {
            let s = self.state.load(Ordering::Relaxed);
            if s == FREE
                && self
                    .state
                    .compare_exchange_weak(FREE, HELD, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
            if s == CONTENDED || spins >= SPIN_ROUNDS_MAX {
                break;
            }
            std::hint::spin_loop();
            spins += 1;
        }
        // From here on the lock is taken as CONTENDED, so whoever holds it next wakes a
        // sleeper on unlock even if this thread was the only one waiting.
        while self.state.swap(CONTENDED, Ordering::Acquire) != FREE {
            futex_wait(&self.state, CONTENDED);
        }
    }

    #[inline]
    pub fn unlock(&self) {
        if self.state.swap(FREE, Ordering::Release) == CONTENDED {
            futex_wake_one(&self.state);
        }
    }

    /// Marks the lock free without waking anyone: only for a process in which no thread can
    /// hold it (the child after `fork`, a heap image opened after a restore).
    pub fn reset(&self) {
        self.state.store(FREE, Ordering::Release);
    }

    #[cfg(test)]
    pub fn is_held(&self) -> bool {
        self.state.load(Ordering::Relaxed) != FREE
    }
}

fn futex_wait(word: &AtomicU32, expected: u32) {
    // SAFETY: FUTEX_WAIT only reads the aligned u32 behind `word`, which outlives the call;
    // a null timeout means "no timeout". Spurious returns (EAGAIN, EINTR) are fine: the caller
    // re-checks the state in a loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

fn futex_wake_one(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE does not touch memory; it only uses the address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::UnsafeCell;
    use std::sync::Arc;

    struct Counter {
        lock: RawLock,
        value: UnsafeCell<u64>,
    }
    // SAFETY: `value` is only touched with `lock` held.
    unsafe impl Sync for Counter {}

    #[test]
    fn excludes_under_contention() {
        let c = Arc::new(Counter {
            lock: RawLock {
                state: AtomicU32::new(0),
            },
            value: 0.into(),
        });
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..50_000 {
                        c.lock.lock();
                        // SAFETY: the lock is held.
                        unsafe { *c.value.get() += 1 };
                        c.lock.unlock();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("counter thread panicked");
        }
        assert!(!c.lock.is_held());
        // SAFETY: all other threads are joined.
        assert_eq!(unsafe { *c.value.get() }, 200_000);
    }
}
