//! A thread per rank that keeps the run honest: it beats a heartbeat in the store, watches the
//! heartbeats of the ranks it depends on and the failure flag, and reports progress. When
//! anything goes wrong it raises `cancel`, so every blocking step of the rank gives up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axsave_dist::StoreClient;

use crate::cancel::{Cancel, CancelReason};
use axsave_dist::store::CoordError;
use axsave_dist::store::rendezvous::{check_failure, report_failure};

/// How often the watchdog wakes up.
const TICK: Duration = Duration::from_millis(500);

/// State shared between a rank's threads and its watchdog.
#[derive(Default)]
pub struct Shared {
    /// Raised when the run must stop, with the first reason (shared with transports that
    /// watch its flag, and with the signal handler).
    pub cancel: Cancel,
    /// Bytes this rank has handed to writers (its own files or peers).
    pub local_written: AtomicU64,
    /// Where the watchdog puts the bytes written by all ranks, as last read from the store.
    pub progress: Arc<super::Progress>,
}

impl Shared {
    /// Cancels the run because of `why` (another part's failure), unless it was cancelled
    /// for another reason first.
    pub fn fail(&self, why: String) {
        self.cancel.cancel(CancelReason::Failure(why));
    }

    /// The failure that cancelled the run, if one did.
    pub fn failure(&self) -> Option<String> {
        self.cancel.failure()
    }

    /// After this rank's run ended in `error`: tells the other ranks why through the store (the
    /// signal that cancelled the run, else the error), unless the error only echoes a failure
    /// another rank reported first. Best effort: a store that is gone cannot be told, and the
    /// others' watchdogs notice the silence instead.
    pub fn announce(&self, client: &mut StoreClient, rank: usize, error: &crate::error::CoreError) {
        use crate::error::CoreError;
        let interrupted = self.cancel.signal();
        let msg = match interrupted {
            Some(signal) => CoreError::Interrupted { signal }.to_string(),
            None => error.to_string(),
        };
        if interrupted.is_some()
            || (!matches!(error, CoreError::Cancelled) && self.failure().is_none())
        {
            let _ = report_failure(client, rank, &msg);
        }
    }
}

/// Rank 0's store server at the end of a run, once this rank's own connections are closed: gives
/// the other ranks a moment (5 s, or `timeout` if shorter) to read the last keys and leave, then
/// stops it.
pub fn close_server(server: Option<axsave_dist::StoreServer>, timeout: Duration) {
    if let Some(s) = server {
        let _ = s.wait_for_disconnects(Instant::now() + Duration::from_secs(5).min(timeout));
        s.shutdown();
    }
}

/// The running watchdog.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching. `watch` lists the ranks whose silence for `timeout` fails the run (rank 0
    /// watches everyone; the others watch rank 0).
    pub fn start(
        mut client: StoreClient,
        rank: usize,
        watch: Vec<usize>,
        timeout: Duration,
        shared: Arc<Shared>,
    ) -> Watchdog {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut last_seen: Vec<(usize, i64, Instant)> =
                watch.iter().map(|&r| (r, -1, Instant::now())).collect();
            let mut reported = 0u64;
            while !s.load(Ordering::SeqCst) {
                let tick = (|| -> Result<(), CoordError> {
                    client.add(&format!("hb/{rank}"), 1)?;
                    let local = shared.local_written.load(Ordering::Relaxed);
                    let total = client.add("progress", (local - reported) as i64)?;
                    reported = local;
                    // Never backwards: the commit sets the whole total once every rank is done,
                    // before the last counts reach the store.
                    shared
                        .progress
                        .done
                        .fetch_max(total.max(0) as u64, Ordering::Relaxed);
                    if let Some(f) = check_failure(&mut client)?
                        && f.rank != rank
                    {
                        shared.fail(format!("rank {} failed: {}", f.rank, f.message));
                    }
                    for (r, value, since) in &mut last_seen {
                        let v = client.add(&format!("hb/{r}"), 0)?;
                        if v != *value {
                            *value = v;
                            *since = Instant::now();
                        } else if since.elapsed() > timeout {
                            let why = format!(
                                "rank {r} has not been heard from for {}s (killed or hung?)",
                                timeout.as_secs()
                            );
                            let _ = report_failure(&mut client, rank, &why);
                            shared.fail(why);
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = tick {
                    shared.fail(format!(
                        "lost the rendezvous store ({e}); the rank hosting it (rank 0) may have died"
                    ));
                    break;
                }
                // Parked rather than asleep, so that `stop` wakes it at once.
                std::thread::park_timeout(TICK);
            }
        });
        Watchdog {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.halt();
    }
}
