//! The exported C symbols of the malloc family, with glibc's `__libc_*` aliases.
//!
//! Each function keeps the C contract of its glibc namesake: `errno` is `ENOMEM` when memory
//! runs out and `EINVAL` for a bad alignment; `free` never changes `errno`; a pointer lego never
//! handed out is counted and ignored by `free` (and reported as size 0 by
//! `malloc_usable_size`).

use libc::{c_int, c_void, size_t};

use super::{count_foreign_free, discard_pages, heap_for_caller, owner_of};
use lego_runtime::PAGE_SIZE;

fn set_errno(e: c_int) {
    // SAFETY: `__errno_location` returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = e };
}

fn get_errno() -> c_int {
    // SAFETY: as in `set_errno`.
    unsafe { *libc::__errno_location() }
}

fn out_of_memory(p: *mut u8) -> *mut c_void {
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p.cast()
}

/// # Safety
/// C `malloc` contract.
#[no_mangle]
pub unsafe extern "C" fn malloc(size: size_t) -> *mut c_void {
    out_of_memory(heap_for_caller().malloc(size))
}

/// # Safety
/// C `free` contract: `p` is null or was returned by this allocator and not freed since.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    let saved = get_errno();
    match owner_of(p.cast()) {
        Some(heap) => heap.free(p.cast(), discard_pages),
        None => count_foreign_free(),
    }
    set_errno(saved);
}

/// # Safety
/// C `calloc` contract.
#[no_mangle]
pub unsafe extern "C" fn calloc(n: size_t, size: size_t) -> *mut c_void {
    if n.checked_mul(size).is_none() {
        set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    }
    out_of_memory(heap_for_caller().calloc(n, size))
}

/// # Safety
/// C `realloc` contract.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: size_t) -> *mut c_void {
    if p.is_null() {
        // SAFETY: forwarding the same contract.
        return unsafe { malloc(size) };
    }
    match owner_of(p.cast()) {
        Some(heap) => {
            if size == 0 {
                heap.free(p.cast(), discard_pages);
                return std::ptr::null_mut();
            }
            out_of_memory(heap.realloc(p.cast(), size, discard_pages))
        }
        None => {
            // Its size is unknown, so its bytes cannot be carried over.
            count_foreign_free();
            set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// C `reallocarray` contract.
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: size_t, size: size_t) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: forwarding the same contract.
        Some(total) => unsafe { realloc(p, total) },
        None => {
            set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

fn aligned(align: usize, size: usize) -> *mut c_void {
    let heap = heap_for_caller();
    let p = if align <= 16 {
        heap.malloc(size)
    } else {
        heap.memalign(align, size)
    };
    out_of_memory(p)
}

/// # Safety
/// C `posix_memalign` contract: `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(
    out: *mut *mut c_void,
    align: size_t,
    size: size_t,
) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(std::mem::size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    let saved = get_errno();
    let p = aligned(align, size);
    set_errno(saved);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller passes a writable pointer slot.
    unsafe { *out = p };
    0
}

/// # Safety
/// C `aligned_alloc` contract.
#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: size_t, size: size_t) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    aligned(align, size)
}

/// # Safety
/// C `memalign` contract.
#[no_mangle]
pub unsafe extern "C" fn memalign(align: size_t, size: size_t) -> *mut c_void {
    // glibc rounds a non-power-of-two alignment up to the next power of two.
    let align = align.max(1).checked_next_power_of_two().unwrap_or(0);
    if align == 0 {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    aligned(align, size)
}

/// # Safety
/// C `valloc` contract.
#[no_mangle]
pub unsafe extern "C" fn valloc(size: size_t) -> *mut c_void {
    aligned(PAGE_SIZE, size)
}

/// # Safety
/// C `pvalloc` contract.
#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: size_t) -> *mut c_void {
    match size.max(1).checked_next_multiple_of(PAGE_SIZE) {
        Some(rounded) => aligned(PAGE_SIZE, rounded),
        None => {
            set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// C `malloc_usable_size` contract.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> size_t {
    if p.is_null() {
        return 0;
    }
    match owner_of(p.cast()) {
        Some(heap) => heap.usable_size(p.cast()),
        None => 0,
    }
}

// glibc's internal names for the same functions: some programs and libraries call them
// directly, and they must not reach glibc's own allocator with lego's pointers.

/// # Safety
/// As `malloc`.
#[no_mangle]
pub unsafe extern "C" fn __libc_malloc(size: size_t) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { malloc(size) }
}

/// # Safety
/// As `free`.
#[no_mangle]
pub unsafe extern "C" fn __libc_free(p: *mut c_void) {
    // SAFETY: same contract.
    unsafe { free(p) }
}

/// # Safety
/// As `calloc`.
#[no_mangle]
pub unsafe extern "C" fn __libc_calloc(n: size_t, size: size_t) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { calloc(n, size) }
}

/// # Safety
/// As `realloc`.
#[no_mangle]
pub unsafe extern "C" fn __libc_realloc(p: *mut c_void, size: size_t) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { realloc(p, size) }
}

/// # Safety
/// As `memalign`.
#[no_mangle]
pub unsafe extern "C" fn __libc_memalign(align: size_t, size: size_t) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { memalign(align, size) }
}

/// # Safety
/// As `valloc`.
#[no_mangle]
pub unsafe extern "C" fn __libc_valloc(size: size_t) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { valloc(size) }
}

/// # Safety
/// As `pvalloc`.
#[no_mangle]
pub unsafe extern "C" fn __libc_pvalloc(size: size_t) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { pvalloc(size) }
}

/// `long lego_checkpoint(void)`: see `preload/include/lego.h`.
#[no_mangle]
pub extern "C" fn lego_checkpoint() -> libc::c_long {
    let rt = match super::RUNTIME.get() {
        Some(rt) if !super::DETACHED.load(std::sync::atomic::Ordering::Relaxed) => rt,
        _ => {
            set_errno(libc::ENOTSUP);
            return -1;
        }
    };
    match rt.checkpoint() {
        Ok(epoch) => libc::c_long::try_from(epoch).unwrap_or(libc::c_long::MAX),
        Err(lego_runtime::pager::EpochError::NoLog) => {
            set_errno(libc::ENOTSUP);
            -1
        }
        Err(
            lego_runtime::pager::EpochError::Failed(_)
            | lego_runtime::pager::EpochError::Stopped(_),
        ) => {
            set_errno(libc::EIO);
            -1
        }
    }
}

/// `void *lego_root(void)`: see `preload/include/lego.h`.
#[no_mangle]
pub extern "C" fn lego_root() -> *mut c_void {
    match super::user_heap() {
        Some(h) => h.root().cast(),
        None => std::ptr::null_mut(),
    }
}

/// `void lego_set_root(void *p)`: see `preload/include/lego.h`.
#[no_mangle]
pub extern "C" fn lego_set_root(p: *mut c_void) {
    if let Some(h) = super::user_heap() {
        h.set_root(p.cast());
    }
}
