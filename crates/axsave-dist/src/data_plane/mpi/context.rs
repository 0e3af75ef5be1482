//! [`MpiContext`]: MPI for this process, owned by the progress thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mpi::Threading;

use super::error::MpiError;
use super::options::MpiOptions;
use super::progress;
use super::result;
use super::sender::MpiTransport;
use super::shared::{Collective, CollectiveOp, Command, CtxShared};
use super::threading::MIN_THREAD_LEVEL;

/// Whether [`MpiContext::init`] was called in this process.
static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// How long [`MpiContext::broadcast`] and [`MpiContext::barrier`] wait by default.
const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long dropping a context waits for sends in flight to complete before it gives up on
/// finalizing MPI.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long dropping a context waits for the progress thread (which includes
/// `MPI_Finalize`, a collective over the job) before it leaves it behind.
const DEFAULT_FINALIZE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`MpiContext::abort`] lets the progress thread make the call under
/// `MPI_THREAD_SERIALIZED` before the process exits by itself.
const ABORT_WAIT: Duration = Duration::from_secs(5);

/// MPI for this process: initialized by [`MpiContext::init`], finalized when dropped.
///
/// `Send` and `Sync`: every method takes `&self`, and hands its work to the progress thread.
/// Collectives ([`broadcast`](Self::broadcast), [`barrier`](Self::barrier)) must be called
/// in the same order on every rank, as in MPI.
///
/// `MPI_Finalize` is collective in practice (Open MPI waits for every process), so ranks
/// should synchronize before dropping their contexts; a drop waits at most the finalize
/// timeout ([`set_finalize_timeout`](Self::set_finalize_timeout)) and then returns, leaving
/// the progress thread to finish on its own.
pub struct MpiContext {
    shared: Arc<CtxShared>,
    processor_name: String,
    threading: Threading,
    collective_timeout: Duration,
    finalize_timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MpiContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiContext")
            .field("rank", &self.shared.rank)
            .field("size", &self.shared.size)
            .field("processor_name", &self.processor_name)
            .field("threading", &self.threading)
            .finish()
    }
}

impl MpiContext {
    /// Initializes MPI (`MPI_Init_thread`, asking for `MPI_THREAD_MULTIPLE`) on a new
    /// progress thread. Collective: every rank of the job calls it. Fails when it was called
    /// before in this process (MPI can be initialized once), when other code initialized MPI,
    /// or when the library grants less than [`MIN_THREAD_LEVEL`] (MPI is then finalized
    /// again, and cannot be used by this process).
    pub fn init() -> Result<MpiContext, MpiError> {
        Self::init_with_thread_level(Threading::Multiple)
    }

    /// [`MpiContext::init`], asking the library for `requested` thread support instead of
    /// `MPI_THREAD_MULTIPLE` (some MPI builds are slower in MULTIPLE mode, and this crate
    /// does not need it); at least [`MIN_THREAD_LEVEL`].
    pub fn init_with_thread_level(requested: Threading) -> Result<MpiContext, MpiError> {
        if requested < MIN_THREAD_LEVEL {
            return Err(MpiError::InvalidArgument {
                detail: format!(
                    "thread level {requested:?} requested, at least {MIN_THREAD_LEVEL:?} needed"
                ),
            });
        }
        // MPI can be initialized once per process; a second try must not even touch MPI
        // from a second thread.
        if INITIALIZED.swap(true, Ordering::SeqCst) {
            return Err(MpiError::AlreadyInitialized);
        }
        let (init_tx, init_rx) = mpsc::channel();
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let gone = Arc::new(AtomicBool::new(false));
        let g = Arc::clone(&gone);
        let thread = thread::Builder::new()
            .name("axsave-mpi".into())
            .spawn(move || progress::thread_main(requested, init_tx, cmd_rx, g))
            .map_err(|e| MpiError::Spawn {
                source: Arc::new(e),
            })?;
        // MPI_Init_thread returns (or aborts the process); a closed channel means the
        // thread died before reporting.
        let info = match init_rx.recv() {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(MpiError::Gone);
            }
        };
        tracing::debug!(
            rank = info.rank,
            size = info.size,
            host = %info.processor_name,
            threading = ?info.threading,
            "MPI initialized"
        );
        Ok(MpiContext {
            shared: Arc::new(CtxShared::new(&info, cmd_tx, gone)),
            processor_name: info.processor_name,
            threading: info.threading,
            collective_timeout: DEFAULT_COLLECTIVE_TIMEOUT,
            finalize_timeout: DEFAULT_FINALIZE_TIMEOUT,
            thread: Some(thread),
        })
    }

    /// This process's rank in `MPI_COMM_WORLD`.
    pub fn rank(&self) -> usize {
        self.shared.rank
    }

    /// The number of processes in `MPI_COMM_WORLD`.
    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// `MPI_Get_processor_name`: usually the host name.
    pub fn processor_name(&self) -> &str {
        &self.processor_name
    }

    /// The thread level the MPI library granted (at least [`MIN_THREAD_LEVEL`]).
    pub fn thread_level(&self) -> Threading {
        self.threading
    }

    /// How long a collective may take before it fails with
    /// [`MpiError::CollectiveTimeout`] (default five minutes).
    pub fn set_collective_timeout(&mut self, timeout: Duration) {
        self.collective_timeout = timeout;
    }

    /// How long dropping the context waits for `MPI_Finalize` (default two minutes).
    pub fn set_finalize_timeout(&mut self, timeout: Duration) {
        self.finalize_timeout = timeout;
    }

    /// `MPI_Bcast` of a byte string of any length up to
    /// [`MAX_BROADCAST_BYTES`](super::MAX_BROADCAST_BYTES) from `root`: the root passes
    /// `Some(value)`, the others `None` (ignored if given); every rank gets the value. If the
    /// root passes `None` or too much, every rank gets an error instead.
    pub fn broadcast(&self, root: usize, value: Option<&[u8]>) -> Result<Vec<u8>, MpiError> {
        self.shared.check_rank(root, "broadcast root")?;
        let value = if root == self.rank() {
            value.map(<[u8]>::to_vec)
        } else {
            None
        };
        self.collective(CollectiveOp::Broadcast { root, value })
    }

    /// `MPI_Barrier` over the world.
    pub fn barrier(&self) -> Result<(), MpiError> {
        self.collective(CollectiveOp::Barrier).map(|_| ())
    }

    fn collective(&self, op: CollectiveOp) -> Result<Vec<u8>, MpiError> {
        let (reply, answer) = mpsc::channel();
        self.shared.send(Command::Collective(Collective {
            op,
            timeout: self.collective_timeout,
            reply,
        }))?;
        // The progress thread answers by the deadline; if it dies the channel closes.
        answer.recv().unwrap_or(Err(MpiError::Gone))
    }

    /// A handle on the data plane with these options, for senders and a receiver. Cloneable
    /// and `Send`: give one to each worker thread.
    pub fn transport(&self, options: MpiOptions) -> Result<MpiTransport, MpiError> {
        options.validate()?;
        Ok(MpiTransport::new(Arc::clone(&self.shared), options))
    }

    /// `MPI_Abort(MPI_COMM_WORLD, code)`: the launcher kills every process of the job, this
    /// one included, and exits with a failure status. For a rank that cannot recover and
    /// must not leave its peers waiting. Never returns: if MPI cannot abort, the process
    /// exits with `code` (or 1 if `code` is 0), which the launcher also treats as a failure
    /// of the job.
    pub fn abort(&self, code: i32) -> ! {
        tracing::error!(code, rank = self.rank(), "aborting the MPI job");
        let exit = if code == 0 { 1 } else { code };
        if self.threading == Threading::Multiple && !self.shared.is_gone() {
            // SAFETY: MPI is initialized and not finalized (the progress thread, which would
            // finalize it, is still running, and only this context's drop stops it), and
            // under MPI_THREAD_MULTIPLE any thread may call MPI at any time.
            unsafe { result::abort(code) };
        } else if self.shared.send(Command::Abort(code)).is_ok() {
            // The progress thread makes the call between two of its own calls.
            let start = Instant::now();
            while start.elapsed() < ABORT_WAIT && !self.shared.is_gone() {
                thread::sleep(Duration::from_millis(10));
            }
        }
        std::process::exit(exit)
    }
}

impl Drop for MpiContext {
    fn drop(&mut self) {
        let _ = self.shared.send(Command::Shutdown(DEFAULT_SHUTDOWN_GRACE));
        let Some(thread) = self.thread.take() else {
            return;
        };
        let start = Instant::now();
        while !thread.is_finished() {
            if start.elapsed() >= self.finalize_timeout {
                tracing::warn!(
                    waited = ?start.elapsed(),
                    "MPI finalization did not finish; leaving it to the process exit"
                );
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = thread.join();
    }
}
