//! SIGTERM, SIGINT and SIGHUP (a Slurm time limit, Ctrl-C, `scancel`, a launcher stopping its
//! ranks) cancel a save the way a failure does: the binary's signal thread calls [`raise`],
//! which sets every cancel flag registered with [`watch`]; the save's own error path then
//! removes the run's temporaries (and, multi-rank, tells the other ranks), and the process
//! exits 128 + the signal number.
//!
//! As a backstop for a save stuck where no flag is looked at (connecting to a store that does
//! not answer), [`abandon`] removes the temporaries of every run registered with
//! [`register_run`] itself and exits; the binary calls it after a grace period, or at once on a
//! second signal. It never removes files while a run is committing (renaming its temporaries
//! into place, which takes milliseconds): it waits for the commit to end first.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use crate::cancel::{self, Cancel, CancelReason};
use crate::error::{CoreError, Result};

/// The first signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

struct Run {
    id: u64,
    dir: PathBuf,
    tag: String,
    committing: bool,
}

struct State {
    flags: Vec<Weak<cancel::Inner>>,
    runs: Vec<Run>,
    next_id: u64,
}

static STATE: Mutex<State> = Mutex::new(State {
    flags: Vec::new(),
    runs: Vec::new(),
    next_id: 0,
});

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The signal that interrupted this process, if one did.
pub fn received() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `Err(Interrupted)` once a signal came.
pub fn check() -> Result<()> {
    match received() {
        Some(signal) => Err(CoreError::Interrupted { signal }),
        None => Ok(()),
    }
}

/// Records `sig` (the first one only) and cancels every watched run with it. Returns whether it
/// was the first.
pub fn raise(sig: i32) -> bool {
    let first = SIGNAL
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    let mut st = state();
    st.flags.retain(|f| match Cancel::upgrade(f) {
        Some(c) => {
            c.cancel(CancelReason::Signal(sig));
            true
        }
        None => false,
    });
    first
}

/// Has `cancel` raised with the signal when one comes (at once if one came already).
pub fn watch(cancel: &Cancel) {
    let mut st = state();
    if let Some(sig) = received() {
        cancel.cancel(CancelReason::Signal(sig));
    }
    st.flags.retain(|f| f.strong_count() > 0);
    st.flags.push(cancel.downgrade());
}

/// A run whose temporaries [`abandon`] removes; unregistered when dropped.
#[derive(Debug)]
pub struct RunGuard {
    id: u64,
}

/// Registers run `tag` writing into `dir`, before it creates anything there. Fails if a signal
/// came already (nothing is created then).
pub fn register_run(dir: &Path, tag: &str) -> Result<RunGuard> {
    let mut st = state();
    check()?;
    let id = st.next_id;
    st.next_id += 1;
    st.runs.push(Run {
        id,
        dir: dir.to_path_buf(),
        tag: tag.to_string(),
        committing: false,
    });
    Ok(RunGuard { id })
}

impl RunGuard {
    /// Runs the commit `f`, during which [`abandon`] waits instead of removing files. Fails
    /// without running `f` if a signal came already.
    pub fn commit<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.set_committing(true)?;
        let r = f();
        let _ = self.set_committing(false);
        r
    }

    fn set_committing(&self, on: bool) -> Result<()> {
        let mut st = state();
        if on {
            check()?;
        }
        if let Some(r) = st.runs.iter_mut().find(|r| r.id == self.id) {
            r.committing = on;
        }
        Ok(())
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        state().runs.retain(|r| r.id != self.id);
    }
}

/// The backstop: waits for a commit in progress to end (up to a few seconds), removes the
/// temporaries and sharded-mode markers of every registered run, and exits 128 + `sig`.
pub fn abandon(sig: i32) -> ! {
    let until = Instant::now() + Duration::from_secs(5);
    let st = loop {
        let st = state();
        if !st.runs.iter().any(|r| r.committing) || Instant::now() >= until {
            break st;
        }
        drop(st);
        std::thread::sleep(Duration::from_millis(20));
    };
    for r in &st.runs {
        crate::output::remove_run_temps(&r.dir, &r.tag);
        let _ = std::fs::remove_file(r.dir.join(crate::output::marker_name(&r.tag)));
        // The output lock, when this process holds it (its record names this run).
        let lock = r.dir.join(crate::lock::LOCK_NAME);
        if std::fs::read_to_string(&lock).is_ok_and(|l| l.contains(&format!("tag={}\n", r.tag))) {
            let _ = std::fs::remove_file(&lock);
        }
    }
    eprintln!(
        "axsave: interrupted by {}: the save was cancelled{}",
        signal_name(sig),
        if st.runs.is_empty() {
            ""
        } else {
            " and its temporaries removed"
        }
    );
    // The lock stays held until the exit, so no other thread can register or commit a run.
    std::process::exit(128 + sig)
}

pub use crate::error::signal_name;
