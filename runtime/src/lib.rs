//! lego's paging runtime: one virtual region registered with userfaultfd, a bounded DRAM cache
//! in front of a page store, and the allocator whose whole state lives inside that region.
//!
//! Layering (imports only go down):
//! - bottom: [`config`], [`stats`], [`logging`], [`uffd`] (the kernel interface only),
//!   [`io`] (the io_uring ring), [`heap`] (the allocator, which knows nothing of paging);
//! - [`seal`]: sealing values that leave the machine (the key file, AES-256-GCM);
//! - [`store`]: the `PageStore` trait and its backends; [`log`]: the durable heap's log
//!   (its format at the bottom, the writer and replay above it);
//! - [`cache`]: the page table, residency accounting and the choice of victims;
//! - [`pager`]: the threads that turn fault events into cache and store work (handlers,
//!   evictor) and the public `Runtime` that the preload library starts;
//! - [`seed`]: rebuilding a pool from the log (`lego replay --to`), above `log` and `store`;
//! - [`cli`]: the `lego` command-line tool.

pub mod cache;
pub mod cli;
pub mod config;
pub mod heap;
pub mod io;
pub mod log;
pub mod logging;
pub mod pager;
pub mod region;
pub mod seal;
pub mod seed;
pub mod stats;
pub mod store;
pub mod threads;
pub mod uffd;
pub mod watch;

#[cfg(test)]
mod fuzz_support;
#[cfg(test)]
pub(crate) mod test_support;

/// Size of one page of the managed region, in bytes. Every page-granular quantity in lego
/// (cache size, fetch and eviction batches, store offsets) is a multiple of it.
pub const PAGE_SIZE: usize = 4096;
