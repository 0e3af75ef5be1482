//! What the progress thread and the handles around it share: the context's state, the
//! commands it takes, and what it needs of a receiver and of the senders' bookkeeping. A
//! leaf: it imports nothing else of this folder but the error, so the progress thread, the
//! sender and the receiver all depend on it and not on each other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use mpi::Threading;

use super::error::MpiError;

/// Longest a blocked call sleeps before it looks at the cancel flag and the deadline again.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// What the rest of the process learns from the progress thread once MPI is up.
pub(crate) struct Info {
    pub rank: usize,
    pub size: usize,
    pub processor_name: String,
    pub threading: Threading,
}

/// State shared by the context, its transports and the progress thread.
pub(crate) struct CtxShared {
    pub rank: usize,
    pub size: usize,
    commands: mpsc::Sender<Command>,
    /// Set when the progress thread has left its loop (shut down, or failed).
    pub gone: Arc<AtomicBool>,
    /// Whether a receiver is registered (one at a time).
    pub receiving: AtomicBool,
    /// Source of stream ids, unique within this process.
    pub next_stream: AtomicU64,
}

impl CtxShared {
    pub fn new(info: &Info, commands: mpsc::Sender<Command>, gone: Arc<AtomicBool>) -> CtxShared {
        CtxShared {
            rank: info.rank,
            size: info.size,
            commands,
            gone,
            receiving: AtomicBool::new(false),
            next_stream: AtomicU64::new(1),
        }
    }

    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    /// Hands a command to the progress thread.
    pub fn send(&self, c: Command) -> Result<(), MpiError> {
        if self.is_gone() {
            return Err(MpiError::Gone);
        }
        self.commands.send(c).map_err(|_| MpiError::Gone)
    }

    /// Checks a rank argument.
    pub fn check_rank(&self, rank: usize, what: &str) -> Result<(), MpiError> {
        if rank >= self.size {
            return Err(MpiError::InvalidArgument {
                detail: format!("{what} {rank} is not in a world of {}", self.size),
            });
        }
        Ok(())
    }
}

/// A request to the progress thread.
pub(crate) enum Command {
    /// Start sending a message (its slot is already taken).
    Send(Outgoing),
    /// Queue a collective.
    Collective(Collective),
    /// Start probing and receiving for this receiver.
    StartReceiving(Receiving),
    /// Stop receiving; answer on the channel once no more deliveries will be made.
    StopReceiving(mpsc::Sender<()>),
    /// `MPI_Abort` with this code.
    Abort(i32),
    /// Finish what is in flight (for at most the grace period), then finalize.
    Shutdown(Duration),
}

/// A message for `MPI_Isend` and who to tell when it completed.
pub(crate) struct Outgoing {
    pub dest: usize,
    pub tag: i32,
    pub buf: Vec<u8>,
    pub stream: u64,
    pub book: Arc<dyn SendCompletions>,
}

/// A collective and where its answer goes.
pub(crate) struct Collective {
    pub op: CollectiveOp,
    pub timeout: Duration,
    pub reply: mpsc::Sender<Result<Vec<u8>, MpiError>>,
}

/// Which collective.
pub(crate) enum CollectiveOp {
    Barrier,
    Broadcast { root: usize, value: Option<Vec<u8>> },
}

/// A registered receiver: where its messages go.
pub(crate) struct Receiving {
    pub shared: Arc<dyn ReceiveSlots>,
    pub deliveries: mpsc::Sender<Delivery>,
}

/// A received message on its way from the progress thread to the sink thread.
pub(crate) struct Delivery {
    pub from: usize,
    pub tag: i32,
    /// Holds the message in its first `len` bytes.
    pub buf: Vec<u8>,
    pub len: usize,
}

/// What the progress thread needs of a registered receiver.
pub(crate) trait ReceiveSlots: Send + Sync {
    /// The largest frame payload the receiver accepts.
    fn frame_bytes(&self) -> usize;
    /// Whether the progress thread may start receiving one more message.
    fn has_room(&self) -> bool;
    /// One more message is being received.
    fn claim_slot(&self);
    /// A message was handed on or dropped.
    fn release(&self);
    /// A buffer to receive into.
    fn take_buf(&self) -> Vec<u8>;
    /// Something arrived.
    fn touch(&self);
    /// Records the receiver's first failure.
    fn fail(&self, e: MpiError);
}

/// What the progress thread tells the senders' bookkeeping.
pub(crate) trait SendCompletions: Send + Sync {
    /// A send of `stream` completed (with its buffer back) or failed.
    fn completed(&self, stream: u64, result: Result<Option<Vec<u8>>, MpiError>);
}
