//! The receiving side: [`MpiReceiver`], its sink thread, and the accounting of streams.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::error::MpiError;
use super::options::MpiOptions;
use super::shared::{Command, CtxShared, Delivery, POLL, ReceiveSlots};
use super::wire::{self, DATA_TAG, Decoded, END_TAG, End};
use crate::data_plane::ReceiveStats;
use crate::data_plane::clock::ProgressClock;
use crate::data_plane::error::RunError;
use crate::data_plane::sink::{SharedSink, deliver};

/// How long stopping a receiver waits for the progress thread to confirm that no more
/// messages will be delivered; it answers within one loop iteration unless it is gone.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The receiving side of the transport on a writer rank
/// ([`MpiTransport::start_receiver`](super::MpiTransport::start_receiver)). Dropping it
/// stops receiving.
pub struct MpiReceiver {
    ctx: Arc<CtxShared>,
    shared: Arc<RecvShared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MpiReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiReceiver")
            .field("rank", &self.ctx.rank)
            .field("options", &self.shared.options)
            .finish()
    }
}

impl MpiReceiver {
    pub(crate) fn spawn(
        ctx: Arc<CtxShared>,
        shared: Arc<RecvShared>,
        deliveries: mpsc::Receiver<Delivery>,
    ) -> Result<MpiReceiver, MpiError> {
        let s = Arc::clone(&shared);
        let c = Arc::clone(&ctx);
        let thread = thread::Builder::new()
            .name("axsave-mpi-sink".into())
            .spawn(move || sink_loop(&s, &c, &deliveries))
            .map_err(|e| MpiError::Spawn {
                source: Arc::new(e),
            })?;
        Ok(MpiReceiver {
            ctx,
            shared,
            thread: Some(thread),
        })
    }

    /// Blocks until `expected_bytes` payload bytes in total have been handed to the sink and
    /// every stream that sent data has ended with a matching end message.
    ///
    /// Fails with the first error the receiver hit (a sink error, a malformed message, more
    /// bytes than expected, an end whose totals do not match), with
    /// [`MpiError::Cancelled`] when the cancel flag is set, or with [`MpiError::Stalled`]
    /// when nothing arrived for [`MpiOptions::io_timeout`] while data was missing or a
    /// stream unfinished. May be called again; it returns the same error.
    pub fn wait(&self, expected_bytes: u64) -> Result<ReceiveStats, MpiError> {
        let shared = &self.shared;
        let mut st = shared.state();
        st.expected = Some(expected_bytes);
        // Quiet time before this call does not count: the caller may have been busy with its
        // own work while its peers were busy with theirs.
        let called = Instant::now();
        let timeout = shared.options.io_timeout;
        loop {
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if shared.cancel.load(Ordering::SeqCst) {
                return Err(MpiError::Cancelled);
            }
            if st.ledger.claimed > expected_bytes {
                return Err(MpiError::Run(RunError::TooManyBytes {
                    expected: expected_bytes,
                    received: st.ledger.claimed,
                    rank: None,
                }));
            }
            if st.ledger.complete(expected_bytes) {
                return Ok(st.stats());
            }
            if self.ctx.is_gone() {
                return Err(MpiError::Gone);
            }
            let idle = shared.idle_for().min(called.elapsed());
            if idle >= timeout {
                return Err(MpiError::Stalled {
                    idle,
                    received: st.ledger.handled,
                    expected: expected_bytes,
                    open: st.ledger.open(),
                });
            }
            st = shared
                .changed
                .wait_timeout(st, POLL.min(timeout - idle))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// What has been received so far.
    pub fn stats(&self) -> ReceiveStats {
        self.shared.state().stats()
    }

    /// Stops receiving (messages that arrive later stay queued in MPI, for a later receiver
    /// to drop as strays) and joins the sink thread, waiting for a sink call in progress.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        let (ack, acked) = mpsc::channel();
        if self.ctx.send(Command::StopReceiving(ack)).is_ok() {
            let _ = acked.recv_timeout(STOP_WAIT);
        }
        // The sink thread leaves once the progress thread dropped its channel, or once it
        // sees the stop with the progress thread gone.
        let _ = thread.join();
        self.ctx.receiving.store(false, Ordering::SeqCst);
    }
}

impl Drop for MpiReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Shared by the receiver, its sink thread, and the progress thread.
pub(crate) struct RecvShared {
    pub options: MpiOptions,
    sink: SharedSink,
    cancel: Arc<AtomicBool>,
    stopping: AtomicBool,
    /// Messages being received or waiting for the sink.
    in_use: AtomicUsize,
    /// Receive buffers for reuse.
    pool: Mutex<Vec<Vec<u8>>>,
    /// When a message last arrived or was handled.
    progress: ProgressClock,
    state: Mutex<State>,
    changed: Condvar,
}

impl RecvShared {
    pub fn new(options: MpiOptions, sink: SharedSink, cancel: Arc<AtomicBool>) -> RecvShared {
        RecvShared {
            options,
            sink,
            cancel,
            stopping: AtomicBool::new(false),
            in_use: AtomicUsize::new(0),
            pool: Mutex::new(Vec::new()),
            progress: ProgressClock::new(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every mutation completes under the lock, so a panic elsewhere leaves it consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn recycle(&self, buf: Vec<u8>) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < self.options.max_in_flight {
            pool.push(buf);
        }
    }

    fn idle_for(&self) -> Duration {
        self.progress.idle_for()
    }
}

impl ReceiveSlots for RecvShared {
    fn frame_bytes(&self) -> usize {
        self.options.frame_bytes
    }

    /// Whether the progress thread may start receiving one more message.
    fn has_room(&self) -> bool {
        self.in_use.load(Ordering::SeqCst) < self.options.max_in_flight
    }

    fn claim_slot(&self) {
        self.in_use.fetch_add(1, Ordering::SeqCst);
    }

    fn release(&self) {
        self.in_use.fetch_sub(1, Ordering::SeqCst);
    }

    fn take_buf(&self) -> Vec<u8> {
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default()
    }

    fn touch(&self) {
        self.progress.touch();
    }

    /// Records the first failure and wakes [`MpiReceiver::wait`].
    fn fail(&self, e: MpiError) {
        let mut st = self.state();
        if st.error.is_none() {
            tracing::debug!(error = %e, "MPI receiver failed");
            st.error = Some(e);
        }
        drop(st);
        self.changed.notify_all();
    }
}

/// The receiver's bookkeeping.
#[derive(Default)]
struct State {
    expected: Option<u64>,
    ledger: Ledger,
    /// Well-formed messages of another session, dropped.
    rejected: usize,
    /// The first failure; later ones are consequences or equally fatal.
    error: Option<MpiError>,
}

impl State {
    fn stats(&self) -> ReceiveStats {
        ReceiveStats {
            bytes: self.ledger.handled,
            bytes_by_rank: self.ledger.by_rank.clone(),
            connections: self.ledger.ended,
            rejected: self.rejected,
        }
    }
}

/// Byte and stream accounting, apart from MPI and the sink so it can be tested alone.
#[derive(Debug, Default)]
struct Ledger {
    /// Bytes of frames that passed the checks and are being or have been handed to the sink.
    claimed: u64,
    /// Bytes the sink accepted.
    handled: u64,
    by_rank: BTreeMap<usize, u64>,
    /// Per (rank, stream): bytes and frames handled, and whether its end arrived.
    streams: HashMap<(usize, u64), Tally>,
    ended: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    bytes: u64,
    frames: u64,
    ended: bool,
}

impl Ledger {
    /// Reserves a frame's bytes before they reach the sink, so a sender with a wrong plan
    /// cannot write past what this rank expects.
    fn claim(&mut self, rank: usize, n: u64, expected: Option<u64>) -> Result<(), MpiError> {
        let claimed = self.claimed.saturating_add(n);
        if let Some(expected) = expected {
            if claimed > expected {
                return Err(MpiError::Run(RunError::TooManyBytes {
                    expected,
                    received: claimed,
                    rank: Some(rank),
                }));
            }
        }
        self.claimed = claimed;
        Ok(())
    }

    /// A claimed frame of `stream` whose runs the sink accepted.
    fn handled(&mut self, rank: usize, stream: u64, n: u64) -> Result<(), MpiError> {
        let t = self.streams.entry((rank, stream)).or_default();
        if t.ended {
            return Err(MpiError::Malformed {
                rank,
                detail: format!("a frame of stream {stream} after its end"),
            });
        }
        t.bytes += n;
        t.frames += 1;
        self.handled += n;
        *self.by_rank.entry(rank).or_default() += n;
        Ok(())
    }

    /// A stream's end: its totals must match what arrived, since MPI delivers a stream's
    /// frames before its end.
    fn end(&mut self, rank: usize, end: End) -> Result<(), MpiError> {
        let t = self.streams.entry((rank, end.stream)).or_default();
        if t.ended {
            return Err(MpiError::Malformed {
                rank,
                detail: format!("a second end of stream {}", end.stream),
            });
        }
        if t.bytes != end.bytes || t.frames != end.frames {
            return Err(MpiError::CountMismatch {
                rank,
                stream: end.stream,
                announced_bytes: end.bytes,
                announced_frames: end.frames,
                received_bytes: t.bytes,
                received_frames: t.frames,
            });
        }
        t.ended = true;
        self.ended += 1;
        Ok(())
    }

    /// Ranks of streams that sent data but not their end, one entry per stream.
    fn open(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .streams
            .iter()
            .filter(|(_, t)| !t.ended)
            .map(|(&(rank, _), _)| rank)
            .collect();
        v.sort_unstable();
        v
    }

    fn complete(&self, expected: u64) -> bool {
        self.handled == expected
            && self.claimed == self.handled
            && self.streams.values().all(|t| t.ended)
    }
}

/// The sink thread: handles deliveries in arrival order until the progress thread drops the
/// channel (or is gone while the receiver stops).
fn sink_loop(shared: &RecvShared, ctx: &CtxShared, deliveries: &mpsc::Receiver<Delivery>) {
    let mut runs = Vec::new();
    loop {
        let d = match deliveries.recv_timeout(POLL) {
            Ok(d) => d,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if shared.stopping.load(Ordering::SeqCst) && ctx.is_gone() {
                    return;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let discard = shared.stopping.load(Ordering::SeqCst)
            || shared.cancel.load(Ordering::SeqCst)
            || shared.state().error.is_some();
        // After a failure, messages are received and dropped so that senders finish rather
        // than wait for a receiver that will not take their data.
        if !discard {
            if let Err(e) = handle(shared, &d, &mut runs) {
                shared.fail(e);
            }
        }
        shared.recycle(d.buf);
        shared.release();
        shared.touch();
        shared.changed.notify_all();
    }
}

/// Checks one message and hands its runs to the sink.
fn handle(shared: &RecvShared, d: &Delivery, runs: &mut Vec<(u64, u32)>) -> Result<(), MpiError> {
    let msg = &d.buf[..d.len];
    let session = shared.options.session;
    let malformed = |detail: String| MpiError::Malformed {
        rank: d.from,
        detail,
    };
    match d.tag {
        DATA_TAG => {
            let v = match wire::decode_frame(msg, session, shared.options.frame_bytes, runs)
                .map_err(malformed)?
            {
                Decoded::Ours(v) => v,
                Decoded::Stray => {
                    shared.state().rejected += 1;
                    return Ok(());
                }
            };
            let n = v.payload.len() as u64;
            {
                let mut st = shared.state();
                let expected = st.expected;
                st.ledger.claim(d.from, n, expected)?;
            }
            let mut at = 0usize;
            for &(offset, len) in runs.iter() {
                let data = &v.payload[at..at + len as usize];
                at += len as usize;
                let result = deliver(&*shared.sink, d.from, v.file, offset, data);
                if let Err(message) = result {
                    return Err(MpiError::Run(RunError::Sink {
                        rank: d.from,
                        file: v.file,
                        offset,
                        len: u64::from(len),
                        message,
                    }));
                }
            }
            shared.state().ledger.handled(d.from, v.stream, n)
        }
        END_TAG => match wire::decode_end(msg, session).map_err(malformed)? {
            Decoded::Ours(end) => shared.state().ledger.end(d.from, end),
            Decoded::Stray => {
                shared.state().rejected += 1;
                Ok(())
            }
        },
        // The progress thread only receives messages with our tags.
        tag => Err(malformed(format!("a message with unknown tag {tag}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(stream: u64, bytes: u64, frames: u64) -> End {
        End {
            stream,
            bytes,
            frames,
        }
    }

    #[test]
    fn a_transfer_is_complete_when_every_byte_arrived_and_every_stream_ended() {
        let mut l = Ledger::default();
        assert!(l.complete(0));
        l.claim(1, 10, Some(25)).unwrap();
        l.handled(1, 7, 10).unwrap();
        l.claim(2, 15, Some(25)).unwrap();
        l.handled(2, 7, 15).unwrap();
        assert!(!l.complete(25), "streams still open");
        assert_eq!(l.open(), vec![1, 2]);
        l.end(1, end(7, 10, 1)).unwrap();
        l.end(2, end(7, 15, 1)).unwrap();
        assert!(l.complete(25));
        assert_eq!(l.ended, 2);
        assert_eq!(l.by_rank, BTreeMap::from([(1, 10), (2, 15)]));
    }

    #[test]
    fn mismatched_ends_excess_bytes_and_late_frames_are_errors() {
        let mut l = Ledger::default();
        l.claim(1, 10, None).unwrap();
        l.handled(1, 3, 10).unwrap();
        let e = l.end(1, end(3, 11, 1)).unwrap_err();
        assert!(
            matches!(
                e,
                MpiError::CountMismatch {
                    rank: 1,
                    stream: 3,
                    announced_bytes: 11,
                    received_bytes: 10,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = l.end(1, end(4, 5, 1)).unwrap_err();
        assert!(
            matches!(
                e,
                MpiError::CountMismatch {
                    received_bytes: 0,
                    ..
                }
            ),
            "{e:?}"
        );

        let mut l = Ledger::default();
        l.claim(1, 10, Some(10)).unwrap();
        let e = l.claim(2, 1, Some(10)).unwrap_err();
        assert!(
            matches!(
                e,
                MpiError::Run(RunError::TooManyBytes {
                    expected: 10,
                    received: 11,
                    rank: Some(2)
                })
            ),
            "{e:?}"
        );
        l.handled(1, 3, 10).unwrap();
        l.end(1, end(3, 10, 1)).unwrap();
        assert!(matches!(
            l.handled(1, 3, 1),
            Err(MpiError::Malformed { .. })
        ));
        assert!(matches!(
            l.end(1, end(3, 10, 1)),
            Err(MpiError::Malformed { .. })
        ));
    }
}
