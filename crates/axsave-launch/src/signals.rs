//! SIGINT, SIGTERM and SIGHUP handling: the handler only records the signal; the supervisor
//! loop picks it up on its next poll and forwards it.

use std::io;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

/// How many of the handled signals arrived.
static COUNT: AtomicU32 = AtomicU32::new(0);
/// The last one that arrived.
static LAST: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Lock-free atomics are async-signal-safe; nothing else is done here.
    LAST.store(sig, Ordering::SeqCst);
    COUNT.fetch_add(1, Ordering::SeqCst);
}

/// Replaces the default action (die) of SIGINT, SIGTERM and SIGHUP with [`on_signal`].
/// Caught signals are reset to their default in exec'd children, so the ranks are not
/// affected.
pub(crate) fn install() -> io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the `sigaction` struct is zero-initialised (a valid value for this plain C
        // struct) and then filled in; the handler is an `extern "C" fn(c_int)` that only
        // touches atomics, which is async-signal-safe. SA_RESTART makes system calls
        // interrupted by the signal (the output threads' reads) resume instead of failing.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// (signals received so far, the last of them).
pub(crate) fn received() -> (u32, i32) {
    let count = COUNT.load(Ordering::SeqCst);
    (count, LAST.load(Ordering::SeqCst))
}
