//! Stopping with the process that started axsave. A parent that runs axsave as a helper (the
//! Python API's `axsave.save`) sets [`PARENT_PID_VAR`] to its own pid; the binary then asks
//! Linux for SIGTERM when that parent dies, even by SIGKILL, so the save is cancelled as on
//! Ctrl-C (temporaries removed, the other ranks told) instead of running on, unwatched, until
//! its timeouts. `axsave launch` does the same for its ranks without the variable.
//!
//! Linux ties the signal to the parent *thread* that started the process: the caller must start
//! axsave from a thread that lives as long as the save (the Python API waits on that thread).

use std::ffi::OsStr;

/// The variable a parent sets to its pid to have axsave stop when it dies.
pub const PARENT_PID_VAR: &str = "AXSAVE_PARENT_PID";

/// Why axsave cannot follow its parent.
#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    /// The variable holds something other than a process id.
    #[error("{PARENT_PID_VAR}={value:?} is not a process id")]
    NotAPid {
        /// What it holds.
        value: String,
    },
    /// The parent died before axsave could ask to follow it.
    #[error("the process that started axsave ({PARENT_PID_VAR}={pid}) is gone: nothing is saved")]
    Gone {
        /// The parent's pid, as the variable says.
        pid: u32,
    },
    /// The kernel refused the request.
    #[error("cannot ask for a signal when the parent process dies: {0}")]
    Prctl(std::io::Error),
}

/// When [`PARENT_PID_VAR`] is set: arranges SIGTERM for this process when that parent dies
/// and checks that it is still this process's parent. Returns whether it did (never off Linux).
/// Call it first thing, before anything is written.
pub fn follow_parent() -> Result<bool, ParentError> {
    match std::env::var_os(PARENT_PID_VAR) {
        None => Ok(false),
        Some(v) => arm(parse_pid(&v)?),
    }
}

/// The pid a [`PARENT_PID_VAR`] value names (a positive decimal number, spaces around allowed).
fn parse_pid(v: &OsStr) -> Result<u32, ParentError> {
    let text = v.to_string_lossy();
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|&p| p > 1)
        .ok_or_else(|| ParentError::NotAPid {
            value: text.into_owned(),
        })
}

#[cfg(target_os = "linux")]
fn arm(pid: u32) -> Result<bool, ParentError> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and reads no memory of this process.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } != 0 {
        return Err(ParentError::Prctl(std::io::Error::last_os_error()));
    }
    // SAFETY: getppid has no preconditions and cannot fail.
    let parent = unsafe { libc::getppid() };
    // The parent died before the request (this process was handed to another): the signal
    // will never come.
    if u32::try_from(parent).ok() != Some(pid) {
        return Err(ParentError::Gone { pid });
    }
    Ok(true)
}

#[cfg(not(target_os = "linux"))]
fn arm(_pid: u32) -> Result<bool, ParentError> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_are_positive_numbers() {
        assert_eq!(parse_pid(OsStr::new("4242")).unwrap(), 4242);
        assert_eq!(parse_pid(OsStr::new(" 17\n")).unwrap(), 17);
        for bad in ["", "abc", "-5", "0", "1", "12x"] {
            let e = parse_pid(OsStr::new(bad)).unwrap_err();
            assert!(matches!(e, ParentError::NotAPid { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains(PARENT_PID_VAR), "{e}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn only_the_actual_parent_is_followed() {
        // (Arming on a test thread is harmless: the signal would come only if cargo died.)
        let me = std::process::id();
        assert!(matches!(arm(me), Err(ParentError::Gone { pid }) if pid == me));
        assert!(arm(std::os::unix::process::parent_id()).unwrap());
    }
}
