//! The safe layer the progress thread uses: [`Mpi`] exists only between `MPI_Init_thread` and
//! `MPI_Finalize`, on the thread that called them, and a [`Pending`] operation owns its
//! buffer until MPI reports it is done with it.
//!
//! rsmpi is used directly for what it wraps well (initialization, the world communicator and
//! its duplicate, ranks, the processor name, finalization on drop). Its non-blocking
//! operations borrow buffers for a lexical scope, which does not fit a polling loop that
//! keeps operations alive across iterations; those go through [`super::result`] here.

use std::ffi::c_int;
use std::marker::PhantomData;

use mpi::Threading;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{AsRaw, Communicator};

use super::error::MpiError;
use super::threading::MIN_THREAD_LEVEL;
use super::{result, sys};

/// Makes a type `!Send` and `!Sync` whatever the MPI handle types are (pointers in Open MPI,
/// integers in MPICH): MPI state must stay on the progress thread.
type NotSend = PhantomData<*const ()>;

/// MPI, initialized, seen from the progress thread. Dropping it frees our communicator and
/// calls `MPI_Finalize`; to skip finalization (requests still pending), forget it.
pub(crate) struct Mpi {
    // Field order is drop order: the communicator is freed before MPI is finalized.
    comm: SimpleCommunicator,
    _universe: Universe,
    threading: Threading,
    rank: usize,
    size: usize,
    _not_send: NotSend,
}

impl Mpi {
    /// `MPI_Init_thread` asking for `requested`, then a private duplicate of
    /// `MPI_COMM_WORLD` whose errors are returned rather than fatal. Collective over the
    /// world (`MPI_Comm_dup`).
    pub fn init(requested: Threading) -> Result<Mpi, MpiError> {
        let (universe, threading) =
            mpi::initialize_with_threading(requested).ok_or(MpiError::AlreadyInitialized)?;
        if threading < MIN_THREAD_LEVEL {
            // Dropping the universe finalizes MPI: this process cannot use it anyway.
            return Err(MpiError::ThreadSupport {
                provided: format!("{threading:?}"),
            });
        }
        let world = universe.world();
        // Ranks and sizes are non-negative by the standard.
        let rank = usize::try_from(world.rank()).unwrap_or(0);
        let size = usize::try_from(world.size()).unwrap_or(1);
        let comm = world.duplicate();
        // SAFETY: MPI is initialized, this is the thread that initialized it, and `comm` is
        // a live communicator we own.
        unsafe { result::set_errors_return(comm.as_raw())? };
        Ok(Mpi {
            comm,
            _universe: universe,
            threading,
            rank,
            size,
            _not_send: PhantomData,
        })
    }

    /// The thread level the library granted.
    pub fn threading(&self) -> Threading {
        self.threading
    }

    /// This process's rank in `MPI_COMM_WORLD`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes in `MPI_COMM_WORLD`.
    pub fn size(&self) -> usize {
        self.size
    }

    /// `MPI_Get_processor_name` (usually the host name).
    pub fn processor_name(&self) -> String {
        mpi::environment::processor_name()
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    fn rank_arg(&self, rank: usize) -> Result<c_int, MpiError> {
        match c_int::try_from(rank) {
            Ok(r) if rank < self.size => Ok(r),
            _ => Err(MpiError::InvalidArgument {
                detail: format!("rank {rank} is not in a world of {}", self.size),
            }),
        }
    }

    /// Starts sending all of `buf` to `dest` with `tag`; the [`Pending`] owns `buf` until
    /// the send completes.
    pub fn isend(&self, dest: usize, tag: c_int, buf: Vec<u8>) -> Result<Pending, MpiError> {
        let dest = self.rank_arg(dest)?;
        // SAFETY: MPI is alive and we are its thread (an `Mpi` exists, and it is !Send). The
        // heap block of `buf` does not move when the Vec is moved into the Pending, which
        // neither touches nor frees it before the request completes.
        let req = unsafe { result::isend(&buf, dest, tag, self.comm.as_raw())? };
        Ok(Pending::new(req, Some(buf)))
    }

    /// The next message addressed to us on our communicator, matched, if one is there.
    pub fn improbe(&self) -> Result<Option<Matched>, MpiError> {
        // SAFETY: MPI is alive and we are its thread; the communicator is live.
        let Some((msg, status)) = (unsafe { result::improbe(self.comm.as_raw())? }) else {
            return Ok(None);
        };
        // SAFETY: as above; `status` comes from the probe.
        let len = unsafe { result::get_count(&status)? };
        Ok(Some(Matched {
            msg,
            source: usize::try_from(status.MPI_SOURCE).unwrap_or(usize::MAX),
            tag: status.MPI_TAG,
            len,
            _not_send: PhantomData,
        }))
    }

    /// Starts receiving the matched message into the first `m.len` bytes of `buf` (grown if
    /// shorter, never shrunk); the [`Pending`] owns `buf` until the receive completes.
    pub fn imrecv(&self, mut m: Matched, mut buf: Vec<u8>) -> Result<Pending, MpiError> {
        if buf.len() < m.len {
            buf.resize(m.len, 0);
        }
        // SAFETY: MPI is alive and we are its thread; `m.msg` is matched and not received
        // yet (a Matched is consumed here). The heap block of `buf` does not move when the
        // Vec moves into the Pending, which neither touches nor frees it before the request
        // completes.
        let req = unsafe { result::imrecv(&mut buf[..m.len], &mut m.msg)? };
        Ok(Pending::new(req, Some(buf)))
    }

    /// Starts a broadcast of `buf` (sent from `root`, overwritten elsewhere).
    pub fn ibcast(&self, root: usize, mut buf: Vec<u8>) -> Result<Pending, MpiError> {
        let root = self.rank_arg(root)?;
        // SAFETY: as in `imrecv`: the Pending owns the heap block until completion.
        let req = unsafe { result::ibcast(&mut buf, root, self.comm.as_raw())? };
        Ok(Pending::new(req, Some(buf)))
    }

    /// Starts a barrier.
    pub fn ibarrier(&self) -> Result<Pending, MpiError> {
        // SAFETY: MPI is alive and we are its thread; the communicator is live.
        let req = unsafe { result::ibarrier(self.comm.as_raw())? };
        Ok(Pending::new(req, None))
    }

    /// `MPI_Abort` on the world. Returns only if MPI could not abort.
    pub fn abort(&self, code: c_int) -> c_int {
        // SAFETY: MPI is alive and we are its thread.
        unsafe { result::abort(code) }
    }
}

/// A probed message that no other probe or receive can match any more; receive it with
/// [`Mpi::imrecv`].
pub(crate) struct Matched {
    msg: sys::MPI_Message,
    /// The sending rank.
    pub source: usize,
    /// Its tag.
    pub tag: c_int,
    /// Its length in bytes.
    pub len: usize,
    _not_send: NotSend,
}

/// A started non-blocking operation and the buffer MPI reads or writes for it.
pub(crate) struct Pending {
    req: sys::MPI_Request,
    buf: Option<Vec<u8>>,
    done: bool,
    _not_send: NotSend,
}

impl Pending {
    fn new(req: sys::MPI_Request, buf: Option<Vec<u8>>) -> Pending {
        Pending {
            req,
            buf,
            done: false,
            _not_send: PhantomData,
        }
    }

    /// Whether the operation completed (testing it once more if not). `mpi` proves MPI is
    /// alive and that this is its thread.
    pub fn test(&mut self, mpi: &Mpi) -> Result<bool, MpiError> {
        let _ = mpi;
        if self.done {
            return Ok(true);
        }
        // SAFETY: MPI is alive and we are its thread (we hold `&Mpi`); `req` is live: it
        // was returned by a start call and has not completed (MPI frees it on completion,
        // after which `done` keeps us from testing it again).
        let status = unsafe { result::test(&mut self.req)? };
        self.done = status.is_some();
        Ok(self.done)
    }

    /// The buffer back, once [`Pending::test`] returned `true`; `None` before (or for a
    /// barrier).
    pub fn into_buf(mut self) -> Option<Vec<u8>> {
        if self.done { self.buf.take() } else { None }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            // MPI may still read or write this memory (the request is still pending, or its
            // test failed and its state is unknown). Freeing it could corrupt whatever the
            // allocator puts there next; leaking it is the safe choice, and it only happens
            // on failure paths.
            if let Some(buf) = self.buf.take() {
                std::mem::forget(buf);
            }
        }
    }
}
