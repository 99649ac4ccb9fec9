//! liblego.so: the malloc family and start-up, for `LD_PRELOAD`.
//!
//! Two heaps live in this process. The user's heap is one large region reserved with
//! `MAP_NORESERVE` and, once the constructor has run, served by the paging runtime through
//! userfaultfd; every allocation of the program comes from it. The internal heap is a separate,
//! ordinary region that serves the runtime's own allocations (Rust's global allocator here) and
//! anything glibc allocates on a runtime thread's behalf: a fault handler must never fault on
//! the heap it serves.
//!
//! Rules: nothing here may unwind (the crate is built with `panic = "abort"`); allocation works
//! before the constructor has run (ld.so and other libraries' constructors allocate first) and
//! on threads that existed before it; `free` keeps `errno`; a pointer this library never handed
//! out is counted and ignored.
//!
//! This is one of the few leaf modules with FFI: the exported symbols and their C contracts.

mod exports;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use lego_runtime::config::Config;
use lego_runtime::heap::Heap;
use lego_runtime::pager::{Runtime, STATS};
use lego_runtime::region::{self, Region};
use lego_runtime::stats::Counter;

/// Address space reserved for the internal heap. It holds the runtime's page table (a few bytes
/// per heap page, touched only as the heap grows), buffers and thread bookkeeping; nothing of
/// it is committed until touched.
const INTERNAL_HEAP_BYTES: usize = 8 << 30;

/// Exit status when a `LEGO_*` setting is wrong.
const EXIT_BAD_SETTING: i32 = 2;
/// Exit status when the runtime cannot start (permissions, kernel).
const EXIT_CANNOT_START: i32 = 3;

const UNINIT: u8 = 0;
const BUSY: u8 = 1;
const READY: u8 = 2;

static INTERNAL_STATE: AtomicU8 = AtomicU8::new(UNINIT);
static INTERNAL_HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
static INTERNAL_BASE: AtomicUsize = AtomicUsize::new(0);

static USER_STATE: AtomicU8 = AtomicU8::new(UNINIT);
static USER_HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
static USER_BASE: AtomicUsize = AtomicUsize::new(0);
static USER_LEN: AtomicUsize = AtomicUsize::new(0);

static CONFIG: OnceLock<Config> = OnceLock::new();
static RUNTIME: OnceLock<Runtime> = OnceLock::new();
/// The process that started the runtime; a forked child is not it.
static OWNER_PID: AtomicI32 = AtomicI32::new(0);
/// Set in a forked child: its copy of the region is ordinary memory, served by nobody.
static DETACHED: AtomicBool = AtomicBool::new(false);

/// Writes `msg` and a newline to stderr with one `write(2)`, allocating nothing from the heap.
fn stderr_line(msg: &str) {
    lego_runtime::logging::write_stderr_line(msg);
}

fn die(status: i32, msg: &str) -> ! {
    stderr_line(msg);
    // SAFETY: `_exit` ends the process at once; nothing of this process runs afterwards.
    unsafe { libc::_exit(status) }
}

fn spin_until_ready(state: &AtomicU8) {
    while state.load(Ordering::Acquire) != READY {
        std::thread::yield_now();
    }
}

/// The internal heap, created on first use.
fn internal_heap() -> &'static Heap {
    let p = INTERNAL_HEAP.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: once published, the heap lives in a region that is never unmapped.
        return unsafe { &*p };
    }
    if INTERNAL_STATE
        .compare_exchange(UNINIT, BUSY, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        let region = match Region::reserve(INTERNAL_HEAP_BYTES, None) {
            Ok(r) => r,
            // No internal heap yet, so no formatted message: only a fixed text.
            Err(_) => die(
                EXIT_CANNOT_START,
                "lego: cannot reserve address space for the internal heap",
            ),
        };
        // SAFETY: the region is fresh, page-aligned, zeroed and owned by this heap alone.
        let heap = match unsafe { Heap::create(region.base as *mut u8, region.len) } {
            Ok(h) => h,
            Err(_) => die(EXIT_CANNOT_START, "lego: cannot format the internal heap"),
        };
        INTERNAL_BASE.store(region.base, Ordering::Release);
        INTERNAL_HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
        INTERNAL_STATE.store(READY, Ordering::Release);
        return heap;
    }
    spin_until_ready(&INTERNAL_STATE);
    // SAFETY: READY is stored after the pointer is published.
    unsafe { &*INTERNAL_HEAP.load(Ordering::Acquire) }
}

/// The user's heap, created on first use (which reads and checks the configuration: a bad
/// setting ends the process here, before `main`).
fn user_heap() -> Option<&'static Heap> {
    let p = USER_HEAP.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: once published, the heap lives in a region that is never unmapped.
        return Some(unsafe { &*p });
    }
    match USER_STATE.compare_exchange(UNINIT, BUSY, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            internal_heap();
            let config = match Config::from_env() {
                Ok(c) => c,
                Err(e) => die(EXIT_BAD_SETTING, &format!("lego: {e}")),
            };
            let len = usize::try_from(config.heap_bytes).unwrap_or(usize::MAX);
            let region = match Region::reserve(len, None) {
                Ok(r) => r,
                Err(e) => die(EXIT_CANNOT_START, &format!("lego: {e} (LEGO_HEAP_SIZE)")),
            };
            // SAFETY: the region is fresh, page-aligned, zeroed and owned by this heap alone.
            let heap = match unsafe { Heap::create(region.base as *mut u8, region.len) } {
                Ok(h) => h,
                Err(e) => die(
                    EXIT_CANNOT_START,
                    &format!("lego: cannot format the heap: {e}"),
                ),
            };
            // Freed memory kept for reuse counts against the cache like live memory: an
            // eighth of the cache at most.
            let cache = usize::try_from(config.cache_bytes).unwrap_or(usize::MAX);
            heap.set_retain_bytes((cache / 8).min(lego_runtime::heap::RETAIN_BYTES_DEFAULT));
            let _ = CONFIG.set(config);
            USER_BASE.store(region.base, Ordering::Release);
            USER_LEN.store(region.len, Ordering::Release);
            USER_HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
            USER_STATE.store(READY, Ordering::Release);
            Some(heap)
        }
        // The thread that is creating the heap allocates while it does (reading the
        // configuration): those allocations come from the internal heap.
        Err(BUSY) => None,
        Err(_) => {
            spin_until_ready(&USER_STATE);
            // SAFETY: READY is stored after the pointer is published.
            Some(unsafe { &*USER_HEAP.load(Ordering::Acquire) })
        }
    }
}

/// The heap that serves a call made on this thread now.
fn heap_for_caller() -> &'static Heap {
    if lego_runtime::threads::is_runtime_thread() {
        return internal_heap();
    }
    match user_heap() {
        Some(h) => h,
        None => {
            // Another thread is creating the user heap; wait for it unless it is this one.
            if USER_STATE.load(Ordering::Acquire) == BUSY && CONFIG.get().is_none() {
                internal_heap()
            } else {
                spin_until_ready(&USER_STATE);
                // SAFETY: READY is stored after the pointer is published.
                unsafe { &*USER_HEAP.load(Ordering::Acquire) }
            }
        }
    }
}

fn in_user_region(p: usize) -> bool {
    let base = USER_BASE.load(Ordering::Acquire);
    base != 0 && p >= base && p - base < USER_LEN.load(Ordering::Acquire)
}

fn in_internal_region(p: usize) -> bool {
    let base = INTERNAL_BASE.load(Ordering::Acquire);
    base != 0 && p >= base && p - base < INTERNAL_HEAP_BYTES
}

/// The heap that owns `p`, or `None` for a pointer lego never handed out.
fn owner_of(p: *mut u8) -> Option<&'static Heap> {
    let a = p as usize;
    if in_user_region(a) {
        // SAFETY: the user region is published only after its heap.
        return Some(unsafe { &*USER_HEAP.load(Ordering::Acquire) });
    }
    if in_internal_region(a) {
        return Some(internal_heap());
    }
    None
}

/// Gives freed pages back. On the user region the runtime does it (`Runtime::discard`: the
/// pages are moved out and forgotten in the store too, with no event round trip); elsewhere,
/// and in a forked child, `MADV_DONTNEED`.
fn discard_pages(addr: *mut u8, len: usize) {
    if !DETACHED.load(Ordering::Relaxed) && in_user_region(addr as usize) {
        if let Some(rt) = RUNTIME.get() {
            rt.discard(addr as usize, len);
            return;
        }
    }
    region::drop_pages(addr as usize, len);
}

fn count_foreign_free() {
    STATS.add(Counter::ForeignFrees, 1);
}

/// Rust's allocator inside liblego.so: the internal heap, never the user's.
struct InternalAlloc;

// SAFETY: every method forwards to the internal heap, which returns blocks of at least the
// requested size and alignment, or null.
unsafe impl GlobalAlloc for InternalAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let heap = internal_heap();
        let p = if layout.align() <= 16 {
            heap.malloc(layout.size())
        } else {
            heap.memalign(layout.align(), layout.size())
        };
        debug_assert!(
            !in_user_region(p as usize),
            "runtime allocation inside the user heap"
        );
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let heap = internal_heap();
        if layout.align() <= 16 {
            heap.calloc(1, layout.size())
        } else {
            let p = heap.memalign(layout.align(), layout.size());
            if !p.is_null() {
                // SAFETY: `p` is a fresh block of at least `layout.size()` bytes.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
            }
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        internal_heap().free(ptr, discard_pages);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let heap = internal_heap();
        if layout.align() <= 16 {
            return heap.realloc(ptr, new_size, discard_pages);
        }
        let q = heap.memalign(layout.align(), new_size);
        if !q.is_null() {
            // SAFETY: both blocks are live and at least min(old, new) bytes long.
            unsafe { std::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size)) };
            heap.free(ptr, discard_pages);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: InternalAlloc = InternalAlloc;

/// The constructor: reads the configuration (through the heap), starts the runtime.
extern "C" fn lego_init() {
    let Some(_) = user_heap() else {
        return;
    };
    let Some(config) = CONFIG.get() else {
        return;
    };
    lego_runtime::logging::init(config.log_level);
    let region = Region {
        base: USER_BASE.load(Ordering::Acquire),
        len: USER_LEN.load(Ordering::Acquire),
    };
    // SAFETY: getpid has no preconditions.
    OWNER_PID.store(unsafe { libc::getpid() }, Ordering::Relaxed);
    match Runtime::start(config, region) {
        Ok(rt) => {
            let _ = RUNTIME.set(rt);
        }
        Err(e) => die(EXIT_CANNOT_START, &format!("lego: {e}")),
    }
    // SAFETY: the handlers are plain `extern "C"` functions that live as long as the library.
    unsafe {
        libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child));
        libc::atexit(lego_exit);
    }
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = lego_init;

extern "C" fn fork_prepare() {
    if DETACHED.load(Ordering::Relaxed) {
        return;
    }
    // Order matters: the user heap's locks live in the region and may fault, so they are taken
    // while the handlers still serve faults; then the runtime stops its threads and brings
    // every evicted page back; the internal heap (which that work allocates from) comes last.
    if let Some(h) = user_heap() {
        h.prepare_fork();
    }
    if let Some(rt) = RUNTIME.get() {
        rt.prepare_fork();
    }
    internal_heap().prepare_fork();
}

extern "C" fn fork_parent() {
    if DETACHED.load(Ordering::Relaxed) {
        return;
    }
    internal_heap().after_fork_parent();
    if let Some(h) = user_heap() {
        h.after_fork_parent();
    }
    if let Some(rt) = RUNTIME.get() {
        rt.after_fork_parent();
    }
}

extern "C" fn fork_child() {
    if DETACHED.load(Ordering::Relaxed) {
        return;
    }
    internal_heap().after_fork_child();
    if let Some(h) = user_heap() {
        h.after_fork_child();
    }
    // The child's copy of the region lost its userfaultfd registration; every evicted page
    // was brought back before the fork, so it is complete, and from now on ordinary memory.
    DETACHED.store(true, Ordering::Relaxed);
}

extern "C" fn lego_exit() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != OWNER_PID.load(Ordering::Relaxed) {
        return;
    }
    let (Some(config), Some(rt)) = (CONFIG.get(), RUNTIME.get()) else {
        return;
    };
    rt.at_exit();
    if config.stats == lego_runtime::config::StatsSink::Off {
        return;
    }
    let mut snap = STATS.snapshot();
    snap.extra.extend(rt.describe());
    let base = USER_BASE.load(Ordering::Relaxed);
    snap.extra
        .push(("region_base".into(), format!("{base:#x}")));
    snap.extra.push((
        "region_len".into(),
        USER_LEN.load(Ordering::Relaxed).to_string(),
    ));
    snap.extra.push((
        "internal_heap_base".into(),
        format!("{:#x}", INTERNAL_BASE.load(Ordering::Relaxed)),
    ));
    snap.extra
        .push(("internal_heap_len".into(), INTERNAL_HEAP_BYTES.to_string()));
    if let Some(h) = user_heap() {
        snap.extra
            .push(("heap_top_bytes".into(), h.top_bytes().to_string()));
        snap.extra
            .push(("heap_in_use_bytes".into(), h.bytes_in_use().to_string()));
    }
    snap.extra.push((
        "internal_heap_in_use_bytes".into(),
        internal_heap().bytes_in_use().to_string(),
    ));
    if let Err(e) = lego_runtime::stats::report(&snap, &config.stats) {
        stderr_line(&format!("lego: cannot write the statistics: {e}"));
    }
}
