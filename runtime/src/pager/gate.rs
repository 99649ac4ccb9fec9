//! A gate that the runtime's threads pass through to do work, and that `fork` closes: closing
//! waits until nobody is inside, and keeps everyone out until it is opened again. Unlike a
//! `RwLock` guard, the closed state is not tied to a scope, because `pthread_atfork` splits
//! closing and opening over two callbacks.

use std::sync::{Condvar, Mutex};

pub(crate) struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

struct GateState {
    inside: usize,
    closed: bool,
}

pub(crate) struct Pass<'a> {
    gate: &'a Gate,
}

impl Gate {
    pub(crate) fn new() -> Gate {
        Gate {
            state: Mutex::new(GateState {
                inside: 0,
                closed: false,
            }),
            changed: Condvar::new(),
        }
    }

    /// Waits until the gate is open, then enters it until the returned pass is dropped.
    pub(crate) fn enter(&self) -> Pass<'_> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.closed {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.inside += 1;
        Pass { gate: self }
    }

    /// Closes the gate and waits until everybody inside has left.
    pub(crate) fn close(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.closed {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.closed = true;
        while s.inside > 0 {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Opens the gate and enters it at once: nobody can close it in between.
    pub(crate) fn open_and_enter(&self) -> Pass<'_> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.closed = false;
        s.inside += 1;
        self.changed.notify_all();
        Pass { gate: self }
    }

    /// True while the gate is closed or closing: someone inside who is about to wait for
    /// another runtime thread (which cannot enter now) must leave instead.
    pub(crate) fn is_closing(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed
    }

    pub(crate) fn open(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.closed = false;
        self.changed.notify_all();
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.state.lock().unwrap_or_else(|e| e.into_inner());
        s.inside -= 1;
        if s.inside == 0 {
            self.gate.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn close_waits_for_passes_and_blocks_new_ones() {
        let gate = Arc::new(Gate::new());
        let pass = gate.enter();
        let g2 = Arc::clone(&gate);
        let closer = std::thread::spawn(move || g2.close());
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!closer.is_finished(), "close must wait for the pass");
        drop(pass);
        closer.join().expect("closer thread");
        let g3 = Arc::clone(&gate);
        let enterer = std::thread::spawn(move || drop(g3.enter()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!enterer.is_finished(), "enter must wait while closed");
        gate.open();
        enterer.join().expect("enterer thread");
    }
}
