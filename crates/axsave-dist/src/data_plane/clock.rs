//! When a receiver last made progress, shared by its threads without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The time of the last progress, as milliseconds since the clock was made: an atomic rather
/// than part of a receiver's locked state, because it is touched on every read.
pub(crate) struct ProgressClock {
    base: Instant,
    ms: AtomicU64,
}

impl ProgressClock {
    /// A clock whose last progress is now.
    pub(crate) fn new() -> Self {
        ProgressClock {
            base: Instant::now(),
            ms: AtomicU64::new(0),
        }
    }

    /// Records progress now.
    pub(crate) fn touch(&self) {
        let ms = self.base.elapsed().as_millis();
        self.ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// How long since the last progress.
    pub(crate) fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}
