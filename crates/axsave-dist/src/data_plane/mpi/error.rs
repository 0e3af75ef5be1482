//! Why an MPI operation failed.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::data_plane::error::RunError;

use super::threading::MIN_THREAD_LEVEL;

/// Why an MPI operation failed.
///
/// Cloneable so that a receiver's first failure can be returned by every
/// [`MpiReceiver::wait`](super::MpiReceiver::wait) and a broken [`MpiSender`](super::MpiSender) can repeat its error.
#[derive(Debug, Clone, Error)]
pub enum MpiError {
    /// MPI is already initialized in this process (by another [`MpiContext`](super::MpiContext) or other code),
    /// or was finalized: it can be initialized once per process.
    #[error("MPI is already initialized (or was finalized) in this process")]
    AlreadyInitialized,
    /// The MPI library grants less thread support than [`MIN_THREAD_LEVEL`].
    #[error(
        "the MPI library provides thread level {provided}, this program needs at least {MIN_THREAD_LEVEL:?}"
    )]
    ThreadSupport {
        /// What it provides.
        provided: String,
    },
    /// An MPI call returned an error code (only possible on our communicator, which returns
    /// errors instead of aborting).
    #[error("{function} failed with MPI error {code}: {message}")]
    Call {
        /// The MPI function.
        function: &'static str,
        /// Its return code.
        code: i32,
        /// `MPI_Error_string` of it.
        message: String,
    },
    /// [`MpiOptions`](super::MpiOptions) out of range.
    #[error("invalid MPI transport options: {detail}")]
    InvalidOptions {
        /// What is wrong.
        detail: String,
    },
    /// An argument out of range: a rank not in the world, a broadcast root without a value.
    #[error("invalid argument: {detail}")]
    InvalidArgument {
        /// What is wrong.
        detail: String,
    },
    /// A message or broadcast is longer than MPI's `int` count or our limit allows.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The broadcast root refused to broadcast (it had no value, or one too large); every
    /// rank gets this error so none waits for data that will not come.
    #[error("broadcast from rank {root} failed at the root: {detail}")]
    Broadcast {
        /// The root.
        root: usize,
        /// Why.
        detail: String,
    },
    /// A thread could not be started.
    #[error("cannot start an MPI transport thread: {source}")]
    Spawn {
        /// The error.
        source: Arc<io::Error>,
    },
    /// The progress thread is gone: the context is shutting down, or the thread failed.
    #[error("the MPI progress thread is gone (context shut down or failed)")]
    Gone,
    /// A collective did not complete in time: a rank did not join (it died, hangs, or calls
    /// collectives in another order).
    #[error("MPI {what} did not complete within {timeout:?}: a rank did not join")]
    CollectiveTimeout {
        /// `barrier` or `broadcast`.
        what: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// An earlier collective failed and may still be pending inside MPI, so the ranks can no
    /// longer agree on collectives; abort.
    #[error("MPI collectives are unusable after an earlier failure: {detail}")]
    Broken {
        /// The earlier failure.
        detail: String,
    },
    /// [`MpiTransport::start_receiver`](super::MpiTransport::start_receiver) while this context already has a live receiver.
    #[error("this MPI context already has a running receiver")]
    AlreadyReceiving,
    /// The cancel flag was set (by another part of this process, usually because another
    /// rank or thread failed).
    #[error("the transfer was cancelled")]
    Cancelled,
    /// A run could not be queued or delivered (the failures both transports share).
    #[error(transparent)]
    Run(#[from] RunError),
    /// A sender made no progress for [`MpiOptions::io_timeout`](super::MpiOptions::io_timeout): no send of this process
    /// completed, so the writer is not receiving (hung, dead, or not started).
    #[error("no progress sending{} for {timeout:?} while {during}",
        .dest.map_or(String::new(), |d| format!(" to rank {d}")))]
    Timeout {
        /// The destination rank, when one sender timed out.
        dest: Option<usize>,
        /// What the sender was doing.
        during: &'static str,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// A message that the protocol does not allow.
    #[error("malformed message from rank {rank}: {detail}")]
    Malformed {
        /// The sending rank.
        rank: usize,
        /// What was wrong.
        detail: String,
    },
    /// A stream's end message announced other totals than arrived from it.
    #[error(
        "rank {rank} stream {stream} announced {announced_bytes} bytes in {announced_frames} frames at its end, but {received_bytes} bytes in {received_frames} frames arrived"
    )]
    CountMismatch {
        /// The sending rank.
        rank: usize,
        /// Its stream.
        stream: u64,
        /// Bytes in the end message.
        announced_bytes: u64,
        /// Frames in the end message.
        announced_frames: u64,
        /// Bytes that arrived.
        received_bytes: u64,
        /// Frames that arrived.
        received_frames: u64,
    },
    /// Nothing arrived for [`MpiOptions::io_timeout`](super::MpiOptions::io_timeout) while bytes were missing or streams
    /// unfinished: a sender hangs, died, or never got its share of the plan.
    #[error(
        "nothing arrived for {idle:?}: {received} of {expected} bytes received; ranks with unfinished streams: {open:?}"
    )]
    Stalled {
        /// How long nothing arrived.
        idle: Duration,
        /// Bytes received so far.
        received: u64,
        /// Bytes expected.
        expected: u64,
        /// Ranks of the streams that sent data but not their end (one entry per stream).
        open: Vec<usize>,
    },
}
