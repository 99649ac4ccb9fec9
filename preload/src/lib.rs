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
mod mmap;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use lego_runtime::config::Config;
use lego_runtime::heap::Heap;
use lego_runtime::pager::{Runtime, STATS};
use lego_runtime::region::{self, Region};
use lego_runtime::stats::Counter;

/// Address space reserved for the internal heap. It holds the runtime's page table (a few bytes
/// per heap page, touched only as the heap grows), buffers and thread bookkeeping; nothing of
/// it is committed until touched.
const INTERNAL_HEAP_BYTES: usize = 8 << 30;

/// Where the user heap's region goes when that range is free: 32 TiB, above where x86-64
/// Linux puts the program's `brk` heap and below its top-down `mmap` area and PIE executables
/// (about 93 TiB) for every heap lego accepts (up to 8 TiB); clear of AddressSanitizer's shadow (below 16 TiB).
const HEAP_BASE_PREFERRED: usize = 0x2000_0000_0000;

/// Exit status when a `LEGO_*` setting is wrong.
const EXIT_BAD_SETTING: i32 = 2;
/// Exit status when the runtime cannot start (permissions, kernel).
const EXIT_CANNOT_START: i32 = 3;

const UNINIT: u8 = 0;
const BUSY: u8 = 1;
const READY: u8 = 2;
/// The user heap is being restored from an image (`LEGO_RESTORE`): its region is reserved,
/// but it can be opened only once the runtime serves faults (in the constructor). Until then
/// every allocation comes from the internal heap.
const RESTORING: u8 = 3;

/// The durable heap's variables. Once this process holds the log (or restored the image),
/// they are removed from its environment, so that programs it `exec`s run with an ordinary
/// heap instead of competing for the same log directory or restoring the same image.
const DURABLE_VARS: [&str; 6] = [
    lego_runtime::config::vars::LOG_DIR,
    lego_runtime::config::vars::FLUSH_MS,
    lego_runtime::config::vars::FLUSH_PAGES,
    lego_runtime::config::vars::SYNC,
    lego_runtime::config::vars::LOG_MAX,
    lego_runtime::config::vars::RESTORE,
];

static INTERNAL_STATE: AtomicU8 = AtomicU8::new(UNINIT);
static INTERNAL_HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
static INTERNAL_BASE: AtomicUsize = AtomicUsize::new(0);

static USER_STATE: AtomicU8 = AtomicU8::new(UNINIT);
static USER_HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
static USER_BASE: AtomicUsize = AtomicUsize::new(0);
static USER_LEN: AtomicUsize = AtomicUsize::new(0);

static CONFIG: OnceLock<Config> = OnceLock::new();
/// The image being restored and the region reserved for it, between `user_heap` (which
/// reserves the region) and the constructor (which starts the runtime on it).
static RESTORING_FROM: Mutex<Option<(Region, lego_runtime::pager::RestoreFrom)>> = Mutex::new(None);
static RUNTIME: RuntimeSlot = RuntimeSlot(AtomicPtr::new(std::ptr::null_mut()));
/// The key of `LEGO_KEY_FILE`, loaded (and checked) with the configuration, before `main`;
/// taken by the start, which seals the pool's values under it, and dropped (zeroed) then.
static SEAL_KEY: Mutex<Option<lego_runtime::seal::SealKey>> = Mutex::new(None);
/// The statistics published while the program runs (`LEGO_PUBLISH`).
static PUBLISHER: OnceLock<lego_runtime::watch::Publisher> = OnceLock::new();
/// The metrics endpoint (`LEGO_METRICS`).
static METRICS: OnceLock<lego_runtime::watch::metrics::Metrics> = OnceLock::new();
/// The process that started the runtime; a forked child is not it.
static OWNER_PID: AtomicI32 = AtomicI32::new(0);
/// Set in a forked child: its copy of the region is ordinary memory, served by nobody.
static DETACHED: AtomicBool = AtomicBool::new(false);
/// Set in a forked child that runs a runtime of its own (a served fork): its exit removes only
/// what that runtime made (the inherited publisher, metrics and log are the parent's).
static CHILD_RUNTIME: AtomicBool = AtomicBool::new(false);

/// The runtime of this process: set once at start, and replaced in a served fork's child by
/// the child's own (the inherited one is the parent's, and is never used or dropped there).
/// Runtimes are leaked: they live as long as the process.
struct RuntimeSlot(AtomicPtr<Runtime>);

impl RuntimeSlot {
    fn get(&self) -> Option<&'static Runtime> {
        let p = self.0.load(Ordering::Acquire);
        // SAFETY: a published runtime is leaked (never freed), so the reference lives for ever.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// Publishes the runtime (once: a second one is dropped).
    fn set(&self, rt: Runtime) {
        let p = Box::into_raw(Box::new(rt));
        if self
            .0
            .compare_exchange(std::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // SAFETY: `p` was never published, so this is its only owner.
            drop(unsafe { Box::from_raw(p) });
        }
    }

    /// In a served fork's child (one thread): the child's runtime from now on.
    fn replace_in_child(&self, rt: Box<Runtime>) {
        self.0.store(Box::into_raw(rt), Ordering::Release);
    }
}

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
        // Threads that exit give their caches back (two heaps: room is guaranteed).
        heap.flush_caches_at_thread_exit(discard_pages);
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
#[inline]
fn user_heap() -> Option<&'static Heap> {
    match published_user_heap() {
        Some(h) => Some(h),
        None => create_user_heap(),
    }
}

/// The slow path of [`user_heap`], kept out of line so that every `malloc` does not pay for
/// its frame.
#[cold]
#[inline(never)]
fn create_user_heap() -> Option<&'static Heap> {
    if let Some(h) = published_user_heap() {
        return Some(h);
    }
    match USER_STATE.compare_exchange(UNINIT, BUSY, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            internal_heap();
            lego_runtime::logging::install_panic_hook();
            let config = match Config::from_env() {
                Ok(c) => c,
                Err(e) => die(EXIT_BAD_SETTING, &format!("lego: {e}")),
            };
            if let Some(path) = &config.key_file {
                load_key(path);
            }
            if let Some(path) = &config.restore {
                reserve_for_restore(&config, path);
                let _ = CONFIG.set(config);
                USER_STATE.store(RESTORING, Ordering::Release);
                return None;
            }
            let len = usize::try_from(config.heap_bytes).unwrap_or(usize::MAX);
            // The same address in every run, so that an image of this heap can be restored
            // at it (ASLR would put an anonymous mapping elsewhere each time); anywhere if
            // something already sits there.
            let region = match Region::reserve(len, Some(HEAP_BASE_PREFERRED))
                .or_else(|_| Region::reserve(len, None))
            {
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
            let _ = CONFIG.set(config);
            publish_user_heap(heap, region);
            Some(heap)
        }
        // The thread that is creating the heap allocates while it does (reading the
        // configuration): those allocations come from the internal heap. So does everything
        // before a restored heap is open.
        Err(BUSY) | Err(RESTORING) => None,
        Err(_) => {
            spin_until_ready(&USER_STATE);
            // SAFETY: READY is stored after the pointer is published.
            Some(unsafe { &*USER_HEAP.load(Ordering::Acquire) })
        }
    }
}

/// Makes `heap` the user heap: from now on the program allocates from it.
fn publish_user_heap(heap: &'static Heap, region: Region) {
    // Freed memory kept for reuse counts against the cache like live memory: an eighth of the
    // cache at most.
    let cache = CONFIG
        .get()
        .map_or(0, |c| usize::try_from(c.cache_bytes).unwrap_or(usize::MAX));
    heap.set_retain_bytes((cache / 8).min(lego_runtime::heap::RETAIN_BYTES_DEFAULT));
    // A program holding many big blocks keeps up to half as many bytes of freed ones, within
    // the same eighth of the cache.
    heap.set_retain_max_bytes(cache / 8);
    heap.flush_caches_at_thread_exit(discard_pages);
    USER_BASE.store(region.base, Ordering::Release);
    USER_LEN.store(region.len, Ordering::Release);
    USER_HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
    USER_STATE.store(READY, Ordering::Release);
}

/// `LEGO_KEY_FILE`: reads and checks the key file, or stops the program with a message that
/// names the variable and the file (never a byte of the key).
fn load_key(path: &std::path::Path) {
    match lego_runtime::seal::SealKey::load(path) {
        Ok(key) => *SEAL_KEY.lock().unwrap_or_else(|e| e.into_inner()) = Some(key),
        Err(e) => die(
            EXIT_BAD_SETTING,
            &format!(
                "lego: {}: {}",
                lego_runtime::config::vars::KEY_FILE,
                lego_runtime::logging::error_chain(&e)
            ),
        ),
    }
}

/// `LEGO_RESTORE`: opens the image and reserves its region at the address it had, or stops
/// the program with a message.
fn reserve_for_restore(config: &Config, path: &std::path::Path) {
    let var = lego_runtime::config::vars::RESTORE;
    let image = match lego_runtime::pager::open_restore(config, path) {
        Ok(img) => img,
        Err(e) if e.is_setting() => die(
            EXIT_BAD_SETTING,
            &format!("lego: {}", lego_runtime::logging::error_chain(&e)),
        ),
        Err(e) => die(
            EXIT_CANNOT_START,
            &format!("lego: {var}: {}", lego_runtime::logging::error_chain(&e)),
        ),
    };
    let info = image.region();
    let (base, len) = (info.base as usize, info.len as usize);
    if config.cache_bytes > info.len {
        die(
            EXIT_BAD_SETTING,
            &format!(
                "lego: {var}: the image's heap is {len} bytes, smaller than LEGO_CACHE_SIZE ({} bytes); set LEGO_CACHE_SIZE to at most {len}",
                config.cache_bytes
            ),
        );
    }
    let region = match Region::reserve(len, Some(base)) {
        Ok(r) => r,
        Err(e) => die(
            EXIT_CANNOT_START,
            &format!(
                "lego: {var}: the heap of {} must be mapped at {base:#x}, where it was, but {e} (is another allocator or a sanitizer using that address? run without address-space layout changes such as a different LD_PRELOAD order)",
                path.display()
            ),
        ),
    };
    *RESTORING_FROM.lock().unwrap_or_else(|e| e.into_inner()) = Some((region, image));
}

/// The heap that serves a call made on this thread now.
#[inline]
fn heap_for_caller() -> &'static Heap {
    if lego_runtime::threads::is_runtime_thread() {
        return internal_heap();
    }
    match user_heap() {
        Some(h) => h,
        None if USER_STATE.load(Ordering::Acquire) == RESTORING => internal_heap(),
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
    // SAFETY: the allocator gives back pages of a freed run, which no live block overlaps.
    unsafe { region::drop_pages(addr as usize, len) };
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
    let restoring = user_heap().is_none() && USER_STATE.load(Ordering::Acquire) == RESTORING;
    let Some(config) = CONFIG.get() else {
        return;
    };
    lego_runtime::logging::init(config.log_level);
    let (region, image) = if restoring {
        match RESTORING_FROM
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            Some((region, image)) => (region, Some(image)),
            None => return,
        }
    } else {
        let region = Region {
            base: USER_BASE.load(Ordering::Acquire),
            len: USER_LEN.load(Ordering::Acquire),
        };
        if region.base == 0 {
            return;
        }
        (region, None)
    };
    // SAFETY: getpid has no preconditions.
    OWNER_PID.store(unsafe { libc::getpid() }, Ordering::Relaxed);
    let quiesce = lego_runtime::pager::Quiesce {
        hold: hold_user_heap,
        release: release_user_heap,
    };
    // Before the runtime's threads exist (`setenv` and `getenv` racing on other threads is
    // undefined behaviour in glibc). If the start fails the process ends here anyway.
    if config.log.is_some() || config.restore.is_some() {
        for var in DURABLE_VARS {
            std::env::remove_var(var);
        }
    }
    let key = SEAL_KEY.lock().unwrap_or_else(|e| e.into_inner()).take();
    match Runtime::start(config, region, image, Some(quiesce), key.as_ref()) {
        Ok(rt) => RUNTIME.set(rt),
        Err(e) => die(
            EXIT_CANNOT_START,
            &format!("lego: {}", lego_runtime::logging::error_chain(&e)),
        ),
    }
    // The pool keeps the heap's own key (derived from this one); the file's is zeroed now.
    drop(key);
    if restoring {
        // The runtime serves the region now: opening the heap faults its header in from the
        // image.
        // SAFETY: the region was reserved at the image's address for this heap alone and
        // holds exactly what the image holds (served on fault); it stays mapped.
        let heap = match unsafe { Heap::open(region.base as *mut u8, region.len) } {
            Ok(h) => h,
            Err(e) => {
                // Restored from a pool: the heap goes back to it (seeded again), not lapsing.
                if let Some(rt) = RUNTIME.get() {
                    rt.give_back_restored_heap();
                }
                die(
                    EXIT_CANNOT_START,
                    &format!(
                        "lego: {}: the image holds no usable heap: {e}",
                        lego_runtime::config::vars::RESTORE
                    ),
                )
            }
        };
        publish_user_heap(heap, region);
        reapply_protections(heap);
    }
    start_watching(config);
    // SAFETY: the handlers are plain `extern "C"` functions that live as long as the library.
    unsafe {
        libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child));
        libc::atexit(lego_exit);
    }
}

/// A restored heap's served mappings get their protections back (the image holds their
/// bytes; the kernel's protections were the old process's) and their marks in the table.
fn reapply_protections(heap: &'static Heap) {
    let Some(rt) = RUNTIME.get() else {
        return;
    };
    heap.for_each_mapping(|addr, len, prot| {
        rt.mark_mapped(addr, len, true);
        // A piece of unknown protection (a split that found no descriptor) stays read-write.
        if prot != lego_runtime::heap::PROT_RW && prot <= 7 {
            if let Err(e) = rt.protect(addr, len, i32::from(prot)) {
                stderr_line(&format!(
                    "lego: warning: the restored mapping at {addr:#x}+{len:#x} keeps read-write: mprotect failed (errno {e})"
                ));
            }
        }
    });
}

/// Publishes the statistics while the program runs and serves the metrics, as configured.
/// Neither stops the program: a failure is one warning on stderr.
fn start_watching(config: &Config) {
    let source = || -> lego_runtime::watch::Source {
        Box::new(|| match RUNTIME.get() {
            Some(rt) => full_snapshot(rt),
            None => STATS.snapshot(),
        })
    };
    if config.publish {
        let pid = OWNER_PID.load(Ordering::Relaxed).unsigned_abs();
        let program = std::fs::read_to_string("/proc/self/comm")
            .map(|s| s.trim_end().to_owned())
            .unwrap_or_default();
        let dir = lego_runtime::watch::publish_dir();
        match lego_runtime::watch::Publisher::start(&dir, pid, program, source()) {
            Ok(p) => {
                let _ = PUBLISHER.set(p);
            }
            Err(e) => stderr_line(&format!(
                "lego: warning: the statistics are not published ({}=off hides this): {}",
                lego_runtime::config::vars::PUBLISH,
                lego_runtime::logging::error_chain(&e)
            )),
        }
    }
    if let Some(addr) = &config.metrics {
        match lego_runtime::watch::metrics::serve(addr, source()) {
            Ok(m) => {
                let _ = METRICS.set(m);
            }
            Err(e) => stderr_line(&format!(
                "lego: warning: {}",
                lego_runtime::logging::error_chain(&e)
            )),
        }
    }
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = lego_init;

/// Before an epoch cut (on the flusher thread): takes the user heap's locks.
fn hold_user_heap() -> bool {
    match published_user_heap() {
        Some(h) => {
            h.prepare_fork();
            true
        }
        None => false,
    }
}

/// After an epoch cut: gives them back.
fn release_user_heap() {
    if let Some(h) = published_user_heap() {
        h.after_fork_parent();
    }
}

/// The user heap if it is open (never creates it: the flusher is a runtime thread).
#[inline]
fn published_user_heap() -> Option<&'static Heap> {
    let p = USER_HEAP.load(Ordering::Acquire);
    // SAFETY: once published, the heap lives in a region that is never unmapped.
    (!p.is_null()).then(|| unsafe { &*p })
}

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
    if CONFIG.get().and_then(|c| c.panic_injection) == Some("fork") {
        // Testing hook (LEGO_FAULT_INJECT=panic:fork): a panic with every lock of the internal
        // heap held must end the process with one line, not hang in a hook that allocates.
        panic!("injected panic inside fork() (LEGO_FAULT_INJECT=panic:fork)");
    }
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
    // The user heap's locks live in the region: a page of them that was evicted is served to
    // the child by the parent's lego-fork until the child's runtime runs.
    if let Some(h) = user_heap() {
        h.after_fork_child();
    }
    let (Some(rt), Some(config)) = (RUNTIME.get(), CONFIG.get()) else {
        DETACHED.store(true, Ordering::Relaxed);
        return;
    };
    match rt.after_fork_child(config) {
        // The child's copy of the region lost its userfaultfd registration; every evicted
        // page was brought back before the fork, so it is complete, and from now on ordinary
        // memory.
        Ok(lego_runtime::pager::ForkedChild::Detached) => DETACHED.store(true, Ordering::Relaxed),
        Ok(lego_runtime::pager::ForkedChild::Served(child)) => {
            RUNTIME.replace_in_child(child);
            CHILD_RUNTIME.store(true, Ordering::Relaxed);
        }
        // Its evicted pages cannot be served: it must not run on and read zeros.
        Err(e) => die(
            EXIT_CANNOT_START,
            &format!(
                "lego: a forked child cannot start its runtime, so it exits: {}",
                lego_runtime::logging::error_chain(&e)
            ),
        ),
    }
}

/// Every statistic of the process now: the counters, what the runtime and the store report,
/// and the heaps' addresses and sizes (for the report at exit and the published ones).
fn full_snapshot(rt: &Runtime) -> lego_runtime::stats::StatsSnapshot {
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
    if let Some(h) = published_user_heap() {
        snap.extra
            .push(("heap_top_bytes".into(), h.top_bytes().to_string()));
        snap.extra
            .push(("heap_in_use_bytes".into(), h.bytes_in_use().to_string()));
    }
    snap.extra.push((
        "internal_heap_in_use_bytes".into(),
        internal_heap().bytes_in_use().to_string(),
    ));
    snap
}

extern "C" fn lego_exit() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != OWNER_PID.load(Ordering::Relaxed) {
        // A served fork's child removes the store it made; the rest is the parent's.
        if CHILD_RUNTIME.load(Ordering::Relaxed) {
            if let Some(rt) = RUNTIME.get() {
                rt.at_exit();
            }
        }
        return;
    }
    let (Some(config), Some(rt)) = (CONFIG.get(), RUNTIME.get()) else {
        return;
    };
    // A normal exit logs the heap's final state: replay then gives it, not the last periodic
    // epoch. (Other threads may still run; like any epoch it is a consistent cut.)
    if config.log.is_some() {
        if let Err(e) = rt.checkpoint() {
            stderr_line(&format!(
                "lego: the final epoch at exit was not logged: {e}"
            ));
        }
    }
    if let Some(p) = PUBLISHER.get() {
        p.finish();
    }
    if let Some(m) = METRICS.get() {
        m.finish();
    }
    rt.at_exit();
    if config.stats == lego_runtime::config::StatsSink::Off {
        return;
    }
    let snap = full_snapshot(rt);
    if let Err(e) = lego_runtime::stats::report(&snap, &config.stats) {
        stderr_line(&format!("lego: cannot write the statistics: {e}"));
    }
}
