//! One way to stop a run: a [`Cancel`] is raised once, with the first reason given (a signal,
//! another part's failure), and every thread of the run looks at it. Transports that watch a
//! plain flag get [`Cancel::flag`], raised with it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::error::{CoreError, Result};

/// Why a run was cancelled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelReason {
    /// This process received a signal (its number).
    Signal(i32),
    /// Another part of the run failed first (another rank, a silent peer, the store); the
    /// message says which.
    Failure(String),
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    flag: Arc<AtomicBool>,
    reason: Mutex<Option<CancelReason>>,
}

/// A run's cancellation: a flag every thread checks, and the reason it was raised for.
/// Clones share it.
#[derive(Clone, Debug, Default)]
pub struct Cancel {
    inner: Arc<Inner>,
}

impl Cancel {
    /// A cancellation not raised yet.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Raises it. The first reason is kept; later ones are ignored.
    pub fn cancel(&self, reason: CancelReason) {
        let mut r = self.inner.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.inner.flag.store(true, Ordering::SeqCst);
    }

    /// Whether it was raised (with a reason, or through [`Cancel::flag`] by a part that stops
    /// its siblings).
    pub fn is_cancelled(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }

    /// The first reason given, if any.
    pub fn reason(&self) -> Option<CancelReason> {
        self.inner
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The failure message, when another part's failure raised it.
    pub fn failure(&self) -> Option<String> {
        match self.reason() {
            Some(CancelReason::Failure(m)) => Some(m),
            _ => None,
        }
    }

    /// The signal number, when a signal raised it.
    pub fn signal(&self) -> Option<i32> {
        match self.reason() {
            Some(CancelReason::Signal(signal)) => Some(signal),
            _ => None,
        }
    }

    /// `Err(Cancelled)` once raised.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            return Err(CoreError::Cancelled);
        }
        Ok(())
    }

    /// The flag itself, for code that watches an `AtomicBool` (the executor, the transports).
    /// Raising it directly cancels without a reason.
    pub fn flag(&self) -> &Arc<AtomicBool> {
        &self.inner.flag
    }

    /// What a cancelled run reports: the signal as [`CoreError::Interrupted`], another part's
    /// failure as its message, `err` otherwise.
    pub fn explain(&self, err: CoreError) -> CoreError {
        match (err, self.reason()) {
            (CoreError::Cancelled, Some(CancelReason::Failure(m))) => CoreError::Remote(m),
            (_, Some(CancelReason::Signal(signal))) => CoreError::Interrupted { signal },
            (e, _) => e,
        }
    }

    pub(crate) fn downgrade(&self) -> Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn upgrade(w: &Weak<Inner>) -> Option<Cancel> {
        w.upgrade().map(|inner| Cancel { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins_and_raises_the_flag() {
        let c = Cancel::new();
        assert!(!c.is_cancelled());
        assert!(c.check().is_ok());
        let seen_by_a_transport = c.flag().clone();
        c.cancel(CancelReason::Failure("rank 2 failed: disk full".into()));
        c.cancel(CancelReason::Signal(15));
        assert!(c.is_cancelled());
        assert!(seen_by_a_transport.load(Ordering::SeqCst));
        assert!(matches!(c.check(), Err(CoreError::Cancelled)));
        assert_eq!(c.failure().as_deref(), Some("rank 2 failed: disk full"));
        assert_eq!(c.signal(), None, "the failure came first");
        // Clones share it.
        assert_eq!(c.clone().reason(), c.reason());
    }

    #[test]
    fn a_cancelled_run_says_why() {
        let c = Cancel::new();
        assert_eq!(c.explain(CoreError::Cancelled).to_string(), "cancelled");
        c.cancel(CancelReason::Failure(
            "rank 1 has not been heard from".into(),
        ));
        assert_eq!(
            c.explain(CoreError::Cancelled).to_string(),
            "rank 1 has not been heard from"
        );
        // An error of this rank's own stays itself.
        assert!(matches!(
            c.explain(CoreError::Internal("x".into())),
            CoreError::Internal(_)
        ));
        let s = Cancel::new();
        s.cancel(CancelReason::Signal(libc::SIGTERM));
        assert_eq!((s.signal(), s.failure()), (Some(libc::SIGTERM), None));
        assert!(matches!(
            s.explain(CoreError::Internal("x".into())),
            CoreError::Interrupted { signal } if signal == libc::SIGTERM
        ));
    }

    #[test]
    fn raising_the_flag_alone_cancels_without_a_reason() {
        let c = Cancel::new();
        c.flag().store(true, Ordering::SeqCst);
        assert!(c.is_cancelled());
        assert_eq!(c.reason(), None);
        assert_eq!(c.explain(CoreError::Cancelled).to_string(), "cancelled");
    }

    #[test]
    fn a_weak_handle_does_not_keep_it_alive() {
        let c = Cancel::new();
        let w = c.downgrade();
        assert!(Cancel::upgrade(&w).is_some());
        drop(c);
        assert!(Cancel::upgrade(&w).is_none());
    }
}
