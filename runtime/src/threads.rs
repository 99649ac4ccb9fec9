//! Which threads belong to the runtime, and how they are started.
//!
//! The runtime's threads (fault handlers, the evictor) must never allocate from the managed
//! heap: a handler that faults on the heap it serves waits for itself. Rust code allocates from
//! the internal heap anyway, but glibc allocates on a thread's behalf too: `pthread_create`
//! allocates the new thread's TLS vector with `calloc`, and registering a thread-local
//! destructor allocates its list entry. The preload's `malloc` asks [`is_runtime_thread`] and
//! serves such calls from the internal heap.
//!
//! Threads are started with `pthread_create` and a start routine that marks the thread before
//! anything else runs on it (`std::thread::spawn` runs its spawn hooks first, which register a
//! thread-local destructor and so allocate before our code could mark the thread).

use std::cell::Cell;
use std::sync::OnceLock;

/// The thread whose start fails on purpose (`LEGO_FAULT_INJECT=spawn:THREAD`, a testing hook).
static FAILING_SPAWN: OnceLock<&'static str> = OnceLock::new();

/// Makes every later [`spawn`] of the thread named `name` fail with `EAGAIN`, as when the
/// system is out of threads (testing hook; set once, at start).
pub fn fail_spawns_of(name: &'static str) {
    let _ = FAILING_SPAWN.set(name);
}

thread_local! {
    static RUNTIME_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Stack size of a runtime thread, in bytes: handlers keep their buffers on the internal heap.
pub const RUNTIME_THREAD_STACK_BYTES: usize = 512 * 1024;

/// True on the runtime's own threads, and on any thread while it is spawning one of them.
pub fn is_runtime_thread() -> bool {
    RUNTIME_THREAD.with(|f| f.get())
}

type Body = Box<dyn FnOnce() + Send + 'static>;

extern "C" fn start(arg: *mut libc::c_void) -> *mut libc::c_void {
    RUNTIME_THREAD.with(|f| f.set(true));
    // SAFETY: `arg` is the `Box<Body>` leaked by `spawn` for this thread alone.
    let body: Box<Body> = unsafe { Box::from_raw(arg.cast::<Body>()) };
    body();
    std::ptr::null_mut()
}

/// Starts a detached runtime thread named `name` running `body`. Allocations made by glibc for
/// it, on this thread while spawning and on the new thread for all its life, come from the
/// internal heap.
pub fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    if FAILING_SPAWN.get() == Some(&name) {
        return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
    }
    let was = RUNTIME_THREAD.with(|f| f.replace(true));
    let result = spawn_marked(name, Box::new(body));
    RUNTIME_THREAD.with(|f| f.set(was));
    result
}

fn spawn_marked(name: &str, body: Body) -> std::io::Result<()> {
    let arg = Box::into_raw(Box::new(body));
    // SAFETY: plain pthread calls on a local attribute object; `start` takes ownership of `arg`
    // only if the thread is created, otherwise it is reclaimed below.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstacksize(&mut attr, RUNTIME_THREAD_STACK_BYTES);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        let mut tid: libc::pthread_t = 0;
        let rc = libc::pthread_create(&mut tid, &attr, start, arg.cast());
        libc::pthread_attr_destroy(&mut attr);
        if rc != 0 {
            drop(Box::from_raw(arg));
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // Thread names are at most 15 bytes plus the NUL.
        let mut buf = [0u8; 16];
        let n = name.len().min(15);
        buf[..n].copy_from_slice(&name.as_bytes()[..n]);
        libc::pthread_setname_np(tid, buf.as_ptr().cast());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawned_threads_are_marked_and_the_spawner_is_restored() {
        let (tx, rx) = std::sync::mpsc::channel();
        spawn("lego-test", move || {
            tx.send(is_runtime_thread()).expect("send");
        })
        .expect("spawn");
        assert!(rx.recv().expect("recv"));
        assert!(!is_runtime_thread());
    }
}
