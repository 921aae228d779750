//! Ctrl-C for long verbs: the first SIGINT sets a flag that the library checks at each layer
//! boundary (it then stops and writes nothing); a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // a second Ctrl-C: give up at once
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// Installs the SIGINT handler and returns the flag it sets, for
/// `quantlab::pipeline::run(job, Some(flag))`.
pub fn install() -> &'static AtomicBool {
    // SAFETY: the handler only touches an atomic and calls the async-signal-safe _exit.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
    &INTERRUPTED
}
