//! The exported `mmap` family (`LEGO_MMAP=1`): large private anonymous mappings are served
//! from the user heap's region as `KIND_MAPPED` page runs, paged like the heap; everything
//! else goes to the kernel.
//!
//! What is served (docs/DESIGN.md, "Anonymous mappings"): `MAP_PRIVATE | MAP_ANONYMOUS` of at
//! least `LEGO_MMAP_MIN` bytes, without `MAP_GROWSDOWN`, `MAP_STACK`, `MAP_HUGETLB`,
//! `MAP_32BIT`, `MAP_LOCKED`; any protection; the hint address is ignored. Once a range is
//! inside the region, lego alone handles it: `munmap` discards the pages and returns them to
//! the page heap (the region stays mapped, so a use after `munmap` reads zeros instead of
//! raising `SIGSEGV`); `mremap` shrinks, grows in place or copies to a new run; `madvise`
//! `DONTNEED`/`FREE` discard (reads zeros afterwards; `MADV_FREE` never reaches the kernel,
//! which would leave the page present behind the table's back); `mprotect` is the kernel's
//! plus the pager's `PINNED` flag. The kernel's `munmap`, `mremap` and `mmap(MAP_FIXED)` are
//! never used on the region: they would unregister or move parts of it.
//!
//! The real functions are the raw system calls (`lego_runtime::region::sys_*`), not libc's
//! symbols found with `dlsym(RTLD_NEXT)`: `dlsym` may allocate, and this code runs before
//! the constructor (ld.so and other libraries' constructors map memory too). Until lego is
//! ready (the user heap and the runtime are up, or this is a forked child whose region is
//! ordinary memory), or with `LEGO_MMAP` off, every call passes through unchanged.
//!
//! `mremap` is variadic in C (the new address comes only with `MREMAP_FIXED`); it is defined
//! here with five arguments, which the x86-64 and arm64 Linux calling conventions pass in the
//! same registers as the variadic form: the fifth is read only when `MREMAP_FIXED` says the
//! caller passed it.
//!
//! Nothing here may allocate from the user heap (it may run inside the program's allocator,
//! or with the runtime's locks held): the messages are rate-limited `log` lines, formatted on
//! the stack.

use libc::{c_int, c_void, off_t, size_t};
use std::sync::atomic::{AtomicBool, Ordering};

use lego_runtime::heap::{Heap, MapError, PROT_RW};
use lego_runtime::pager::STATS;
use lego_runtime::region;
use lego_runtime::stats::Counter;
use lego_runtime::PAGE_SIZE;

use super::{discard_pages, published_user_heap, CONFIG, DETACHED, RUNTIME, USER_BASE, USER_LEN};

/// Flags that keep a mapping ordinary memory.
const UNSERVED_FLAGS: c_int = libc::MAP_GROWSDOWN
    | libc::MAP_STACK
    | libc::MAP_HUGETLB
    | libc::MAP_32BIT
    | libc::MAP_LOCKED
    | libc::MAP_SYNC;
/// Every protection bit a served mapping may have.
const PROT_ANY: c_int = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
/// `MADV_DONTNEED_LOCKED` (Linux 5.18), missing from older `libc` crates.
const MADV_DONTNEED_LOCKED: c_int = 24;

/// Smallest pinned range [`say_pinned`] mentions, in bytes: a JIT's page flips are not news.
const PINNED_SAID_BYTES_MIN: usize = 1 << 20;
/// Said once: a mapping stayed ordinary for want of room in the region.
static NO_ROOM_SAID: AtomicBool = AtomicBool::new(false);

fn set_errno(e: c_int) {
    // SAFETY: `__errno_location` returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = e };
}

fn fail_ptr(e: c_int) -> *mut c_void {
    set_errno(e);
    libc::MAP_FAILED
}

fn fail_int(e: c_int) -> c_int {
    set_errno(e);
    -1
}

/// The C return of a call that returns 0 or -1: what lego served (`Some(0)` or `Some(errno)`),
/// or, when lego does not serve it (`None`), the kernel's answer to `pass_on`.
fn int_return(served: Option<c_int>, pass_on: impl FnOnce() -> Result<(), c_int>) -> c_int {
    match served.map_or_else(pass_on, |e| if e == 0 { Ok(()) } else { Err(e) }) {
        Ok(()) => 0,
        Err(e) => fail_int(e),
    }
}

/// The user heap when lego serves mappings now: `LEGO_MMAP=1`, the heap published and either
/// the runtime serving it or this a forked child (its region is ordinary memory).
///
/// Never on lego's own threads: they pass every call to the kernel (their mappings are
/// lego's, outside the region), and must not touch the heap, whose pages may be evicted.
fn serving() -> Option<&'static Heap> {
    let config = CONFIG.get()?;
    if !config.mmap || lego_runtime::threads::is_runtime_thread() {
        return None;
    }
    let heap = published_user_heap()?;
    (RUNTIME.get().is_some() || DETACHED.load(Ordering::Relaxed)).then_some(heap)
}

/// The runtime, unless this is a detached child (whose region no runtime serves).
fn runtime() -> Option<&'static lego_runtime::pager::Runtime> {
    if DETACHED.load(Ordering::Relaxed) {
        return None;
    }
    RUNTIME.get()
}

/// How `[addr, addr+len)` lies against the user region.
#[derive(PartialEq, Eq)]
enum Place {
    Outside,
    Inside,
    Straddles,
}

/// Reads only the region's bounds kept outside it (never the heap's header, whose page may be
/// evicted: this also runs on lego's own threads, which must never fault on the heap).
fn place(_heap: &Heap, addr: usize, len: usize) -> Place {
    let base = USER_BASE.load(Ordering::Acquire);
    let region_end = base + USER_LEN.load(Ordering::Acquire);
    let end = addr.saturating_add(len.max(1));
    if base == 0 || end <= base || addr >= region_end {
        Place::Outside
    } else if addr >= base && end <= region_end {
        Place::Inside
    } else {
        Place::Straddles
    }
}

fn page_len(len: usize) -> Option<usize> {
    len.checked_next_multiple_of(PAGE_SIZE)
}

/// Applies `prot` to a region range: through the runtime (which pins what is not
/// read-write), or the kernel's call in a detached child.
fn protect(addr: usize, len: usize, prot: c_int) -> Result<(), c_int> {
    match runtime() {
        Some(rt) => rt.protect(addr, len, prot),
        // SAFETY: the program's own protection change on memory it owns.
        None => unsafe { region::sys_mprotect(addr, len, prot) },
    }
}

/// Gives back the pages of a served range, which then read as zeros.
fn discard_range(heap: &Heap, addr: usize, len: usize) {
    let all_rw = heap.mapping_prot(addr, len) == Ok(PROT_RW);
    match runtime() {
        Some(rt) if !all_rw => rt.discard_pinned(addr, len),
        _ => discard_pages(addr as *mut u8, len),
    }
}

fn mark_mapped(addr: usize, len: usize, on: bool) {
    if let Some(rt) = runtime() {
        rt.mark_mapped(addr, len, on);
    }
}

/// Whether `mmap` with these arguments asks for a mapping lego serves.
fn servable(len: usize, prot: c_int, flags: c_int) -> bool {
    let Some(config) = CONFIG.get() else {
        return false;
    };
    flags & libc::MAP_TYPE == libc::MAP_PRIVATE
        && flags & libc::MAP_ANONYMOUS != 0
        && flags & UNSERVED_FLAGS == 0
        && prot & !PROT_ANY == 0
        && len as u64 >= config.mmap_min_bytes
}

/// `mmap`: `None` passes the call to the kernel.
fn serve_mmap(addr: usize, len: usize, prot: c_int, flags: c_int) -> Option<Result<usize, c_int>> {
    let heap = serving()?;
    if len == 0 {
        return None;
    }
    let fixed = flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0;
    if fixed {
        let len = page_len(len)?;
        match place(heap, addr, len) {
            Place::Outside => return None,
            Place::Straddles => {
                lego_runtime::warn_limited!(
                    "mmap(MAP_FIXED) at {addr:#x}+{len:#x} overlaps lego's heap region: refused (EINVAL)"
                );
                return Some(Err(libc::EINVAL));
            }
            Place::Inside => {}
        }
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Some(Err(libc::EINVAL));
        }
        if flags & libc::MAP_FIXED_NOREPLACE != 0 {
            // The region is mapped everywhere: the kernel's answer.
            return Some(Err(libc::EEXIST));
        }
        if !servable(usize::MAX, prot, flags) || !heap.is_mapped(addr, len) {
            lego_runtime::warn_limited!(
                "mmap(MAP_FIXED) at {addr:#x}+{len:#x} inside lego's heap region, not over a served mapping of the same kind: refused (EINVAL)"
            );
            return Some(Err(libc::EINVAL));
        }
        // In place: new zero pages with the asked protection.
        if let Err(e) = replace_in_place(heap, addr, len, prot) {
            return Some(Err(e));
        }
        return Some(Ok(addr));
    }
    if !servable(len, prot, flags) {
        return None;
    }
    let len = page_len(len)?;
    // The mapping's `prot` goes in its span (a `PROT_*` value fits in a byte: `servable`).
    let span_prot = u8::try_from(prot).ok()?;
    let Some(p) = heap.map_pages(len, span_prot, discard_pages) else {
        if !NO_ROOM_SAID.swap(true, Ordering::Relaxed) {
            log::info!(
                "the heap region has no room for a mapping of {len} bytes: it and others like it stay ordinary memory (a larger LEGO_HEAP_SIZE would serve them)"
            );
        }
        return None;
    };
    let at = p as usize;
    if prot != libc::PROT_READ | libc::PROT_WRITE {
        if let Err(e) = protect(at, len, prot) {
            unmap(heap, at, len);
            return Some(Err(e));
        }
        say_pinned(at, len, prot);
    }
    mark_mapped(at, len, true);
    STATS.add(Counter::MappingsServed, 1);
    STATS.add(Counter::MappedBytes, len as u64);
    Some(Ok(at))
}

/// Says at `info` (rate-limited; ranges of [`PINNED_SAID_BYTES_MIN`] or more) that a range's
/// pages are pinned: they stay resident, over
/// the cache if need be, until they are read-write again.
fn say_pinned(addr: usize, len: usize, prot: c_int) {
    if prot != libc::PROT_READ | libc::PROT_WRITE && len >= PINNED_SAID_BYTES_MIN {
        lego_runtime::log_limited!(
            log::Level::Info, lego_runtime::logging::LIMITED_MESSAGES_PER_SECOND;
            "{len} bytes at {addr:#x} are not read-write (prot {prot:#x}): pinned, resident and never evicted while they stay so"
        );
    }
}

/// `mmap(MAP_FIXED)` over a served range: its pages are discarded and given `prot`.
fn replace_in_place(heap: &Heap, addr: usize, len: usize, prot: c_int) -> Result<(), c_int> {
    discard_range(heap, addr, len);
    let span_prot = u8::try_from(prot).map_err(|_| libc::EINVAL)?;
    protect(addr, len, prot)?;
    let _ = heap.protect_pages(addr, len, span_prot);
    Ok(())
}

/// Unmaps a served range (every page of it mapped): the pieces leave use, the protection goes
/// back to read-write, the pages are discarded and returned to the page heap.
fn unmap(heap: &Heap, addr: usize, len: usize) -> c_int {
    let u = match heap.unmap_begin(addr, len) {
        Ok(u) => u,
        Err(MapError::NoRoom { .. }) => return libc::ENOMEM,
        Err(_) => return libc::EINVAL,
    };
    if u.protected {
        if let Err(e) = protect(u.addr, u.len, libc::PROT_READ | libc::PROT_WRITE) {
            // The pieces stay out of use (limbo) rather than handing out pages the program
            // cannot write: a leak of address space, said once per call.
            lego_runtime::warn_limited!(
                "munmap of {:#x}+{:#x}: restoring read-write failed (errno {e}); the range is not reused",
                u.addr,
                u.len
            );
            return 0;
        }
    }
    discard_pages(u.addr as *mut u8, u.len);
    mark_mapped(u.addr, u.len, false);
    heap.unmap_finish(u);
    0
}

/// `munmap`: `None` passes the call to the kernel.
fn serve_munmap(addr: usize, len: usize) -> Option<c_int> {
    let heap = serving()?;
    let plen = page_len(len)?;
    match place(heap, addr, plen) {
        Place::Outside => return None,
        Place::Straddles => return Some(libc::EINVAL),
        Place::Inside => {}
    }
    if len == 0 || !addr.is_multiple_of(PAGE_SIZE) {
        return Some(libc::EINVAL);
    }
    if !heap.is_mapped(addr, plen) {
        lego_runtime::warn_limited!(
            "munmap of {addr:#x}+{plen:#x}: lego's heap pages, not a served mapping: refused (EINVAL)"
        );
        return Some(libc::EINVAL);
    }
    Some(unmap(heap, addr, plen))
}

/// `madvise`: `None` passes the call to the kernel.
fn serve_madvise(addr: usize, len: usize, advice: c_int) -> Option<c_int> {
    let heap = serving()?;
    let plen = page_len(len)?;
    if len == 0 || place(heap, addr, plen) != Place::Inside || !heap.is_mapped(addr, plen) {
        // Outside the region, or the heap's own pages: the kernel, as without LEGO_MMAP.
        return None;
    }
    if !addr.is_multiple_of(PAGE_SIZE) {
        return Some(libc::EINVAL);
    }
    match advice {
        libc::MADV_DONTNEED | MADV_DONTNEED_LOCKED | libc::MADV_FREE => {
            discard_range(heap, addr, plen);
            Some(0)
        }
        // The kernel's answer for private anonymous memory.
        libc::MADV_REMOVE => Some(libc::EINVAL),
        // Everything else (WILLNEED, SEQUENTIAL, HUGEPAGE, MERGEABLE, COLD, PAGEOUT, and, until
        // fork serves children, DONTFORK and WIPEONFORK) succeeds without effect: passing it
        // to the kernel would split the region's VMA.
        _ => Some(0),
    }
}

/// `mprotect`: `None` passes the call to the kernel.
fn serve_mprotect(addr: usize, len: usize, prot: c_int) -> Option<c_int> {
    let heap = serving()?;
    let plen = page_len(len)?;
    if len == 0 || place(heap, addr, plen) != Place::Inside {
        return None;
    }
    if !addr.is_multiple_of(PAGE_SIZE) {
        return Some(libc::EINVAL);
    }
    // Inside the region, served or not: the pager must pin what is not read-write.
    if let Err(e) = protect(addr, plen, prot) {
        return Some(e);
    }
    say_pinned(addr, plen, prot);
    if heap.is_mapped(addr, plen) {
        let span_prot = u8::try_from(prot & PROT_ANY).unwrap_or(PROT_RW);
        let _ = heap.protect_pages(addr, plen, span_prot);
    }
    Some(0)
}

/// `mremap`: `None` passes the call to the kernel.
fn serve_mremap(
    old: usize,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: usize,
) -> Option<Result<usize, c_int>> {
    let heap = serving()?;
    let fixed = flags & libc::MREMAP_FIXED != 0;
    let old_place = place(heap, old, old_len);
    let new_place = if fixed {
        place(heap, new_addr, new_len)
    } else {
        Place::Outside
    };
    if old_place == Place::Outside && new_place == Place::Outside {
        return None;
    }
    if old_place != Place::Inside {
        // A kernel mapping moved into (or across) the region.
        return Some(Err(libc::EINVAL));
    }
    let maymove = flags & libc::MREMAP_MAYMOVE != 0;
    let dontunmap = flags & libc::MREMAP_DONTUNMAP != 0;
    let (Some(old_len), Some(new_len)) = (page_len(old_len), page_len(new_len)) else {
        return Some(Err(libc::EINVAL));
    };
    if !old.is_multiple_of(PAGE_SIZE)
        || old_len == 0
        || new_len == 0
        || (fixed && !maymove)
        || (dontunmap && (!maymove || old_len != new_len))
    {
        return Some(Err(libc::EINVAL));
    }
    let prot = match heap.mapping_prot(old, old_len) {
        Ok(p) => p,
        Err(_) => return Some(Err(libc::EFAULT)),
    };
    if !fixed && !dontunmap {
        if new_len == old_len {
            return Some(Ok(old));
        }
        if new_len < old_len {
            let e = unmap(heap, old + new_len, old_len - new_len);
            return Some(if e == 0 { Ok(old) } else { Err(e) });
        }
        match heap.grow_in_place(old, old_len, new_len, discard_pages) {
            Ok(p) => {
                let tail = old + old_len;
                let extra = new_len - old_len;
                if p != PROT_RW {
                    if let Err(e) = protect(tail, extra, c_int::from(p)) {
                        let _ = unmap(heap, tail, extra);
                        return Some(Err(e));
                    }
                }
                mark_mapped(tail, extra, true);
                STATS.add(Counter::MappedBytes, extra as u64);
                return Some(Ok(old));
            }
            Err(_) if !maymove => return Some(Err(libc::ENOMEM)),
            Err(_) => {}
        }
    }
    Some(move_mapping(
        heap,
        old,
        old_len,
        new_len,
        prot,
        fixed.then_some(new_addr),
        dontunmap,
    ))
}

/// The moving `mremap`: a new run (or the served range at `to`) gets the old bytes, copied
/// through the cache (evicted pages are fetched as they are read), then the old range is
/// unmapped (or, with `MREMAP_DONTUNMAP`, discarded and left mapped, reading zeros).
fn move_mapping(
    heap: &Heap,
    old: usize,
    old_len: usize,
    new_len: usize,
    prot: u8,
    to: Option<usize>,
    dontunmap: bool,
) -> Result<usize, c_int> {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let dst = match to {
        Some(at) => {
            if !at.is_multiple_of(PAGE_SIZE) || place(heap, at, new_len) != Place::Inside {
                return Err(libc::EINVAL);
            }
            if at < old + old_len && old < at + new_len {
                return Err(libc::EINVAL);
            }
            if !heap.is_mapped(at, new_len) {
                lego_runtime::warn_limited!(
                    "mremap(MREMAP_FIXED) to {at:#x}+{new_len:#x}: inside lego's heap region but not over a served mapping: refused (EINVAL)"
                );
                return Err(libc::EINVAL);
            }
            replace_in_place(heap, at, new_len, rw)?;
            at
        }
        None => {
            let p = heap
                .map_pages(new_len, PROT_RW, discard_pages)
                .ok_or(libc::ENOMEM)?;
            mark_mapped(p as usize, new_len, true);
            p as usize
        }
    };
    if prot != PROT_RW {
        // The copy reads the old pages: they must be readable for the moment.
        protect(old, old_len, rw)?;
        let _ = heap.protect_pages(old, old_len, PROT_RW);
    }
    // SAFETY: `[old, old+old_len)` and `[dst, dst+new_len)` are served mappings of this
    // program, read-write now, disjoint (a new run, or a target checked not to overlap); the
    // program's `mremap` hands the old bytes over, so nothing else uses them meanwhile.
    unsafe {
        std::ptr::copy_nonoverlapping(old as *const u8, dst as *mut u8, old_len.min(new_len));
    }
    if prot != PROT_RW {
        protect(dst, new_len, c_int::from(prot))?;
        let _ = heap.protect_pages(dst, new_len, prot);
    }
    if new_len > old_len {
        STATS.add(Counter::MappedBytes, (new_len - old_len) as u64);
    }
    if dontunmap {
        discard_range(heap, old, old_len);
        if prot != PROT_RW {
            protect(old, old_len, c_int::from(prot))?;
            let _ = heap.protect_pages(old, old_len, prot);
        }
    } else {
        let e = unmap(heap, old, old_len);
        if e != 0 {
            return Err(e);
        }
    }
    Ok(dst)
}

/// # Safety
/// C `mmap` contract.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    match serve_mmap(addr as usize, len, prot, flags) {
        Some(Ok(p)) => p as *mut c_void,
        Some(Err(e)) => fail_ptr(e),
        // SAFETY: the program's own call, passed on unchanged.
        None => match unsafe { region::sys_mmap(addr as usize, len, prot, flags, fd, offset) } {
            Ok(p) => p as *mut c_void,
            Err(e) => fail_ptr(e),
        },
    }
}

/// # Safety
/// C `mmap64` contract (the same call on 64-bit Linux).
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    // SAFETY: forwarding the same contract.
    unsafe { mmap(addr, len, prot, flags, fd, offset) }
}

/// # Safety
/// C `munmap` contract.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    match serve_munmap(addr as usize, len) {
        Some(0) => 0,
        Some(e) => fail_int(e),
        // SAFETY: the program's own call, passed on unchanged.
        None => match unsafe { region::sys_munmap(addr as usize, len) } {
            Ok(()) => 0,
            Err(e) => fail_int(e),
        },
    }
}

/// # Safety
/// C `mremap` contract; `new_addr` is read only with `MREMAP_FIXED` (see the module doc).
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let target = if flags & libc::MREMAP_FIXED != 0 {
        new_addr as usize
    } else {
        0
    };
    match serve_mremap(old as usize, old_len, new_len, flags, target) {
        Some(Ok(p)) => p as *mut c_void,
        Some(Err(e)) => fail_ptr(e),
        None => {
            // SAFETY: the program's own call, passed on unchanged.
            match unsafe { region::sys_mremap(old as usize, old_len, new_len, flags, target) } {
                Ok(p) => p as *mut c_void,
                Err(e) => fail_ptr(e),
            }
        }
    }
}

/// # Safety
/// C `madvise` contract.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: size_t, advice: c_int) -> c_int {
    int_return(serve_madvise(addr as usize, len, advice), || {
        // SAFETY: the program's own call, passed on unchanged.
        unsafe { region::sys_madvise(addr as usize, len, advice) }
    })
}

/// # Safety
/// C `mprotect` contract.
#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: size_t, prot: c_int) -> c_int {
    int_return(serve_mprotect(addr as usize, len, prot), || {
        // SAFETY: the program's own call, passed on unchanged.
        unsafe { region::sys_mprotect(addr as usize, len, prot) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_flags() {
        assert_eq!(UNSERVED_FLAGS & libc::MAP_ANONYMOUS, 0);
        assert_eq!(UNSERVED_FLAGS & libc::MAP_PRIVATE, 0);
        assert_eq!(UNSERVED_FLAGS & libc::MAP_NORESERVE, 0);
        assert_eq!(UNSERVED_FLAGS & libc::MAP_POPULATE, 0);
    }
}
