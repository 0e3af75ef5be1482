//! A communicator that cannot hang the process, and the unique id that creates it.
//!
//! [`Comm`] owns a *non-blocking* NCCL communicator (`ncclCommInitRankConfig` with
//! `blocking = 0`, NCCL ≥ 2.14): no NCCL call made through it waits for a peer, they return
//! `ncclInProgress` instead and the communicator is polled. A watchdog thread polls
//! `ncclCommGetAsyncError` every [`CommOptions::tick`]; it calls `ncclCommAbort` when NCCL
//! reports an error (a peer died: `ncclRemoteError`, a socket broke: `ncclSystemError`), when
//! the caller says the run is cancelled ([`CommOptions::cancelled`]), or when a wait announced with [`Comm::watch`] sees no
//! progress for its limit. An abort also stops the communicator's kernels on the device, so
//! streams that waited on them drain and the process can exit. The caller's own waits see the
//! reason through [`Comm::check`].
//!
//! Every use of the raw handle goes through one mutex, so NCCL never sees two threads on the
//! communicator at once (NCCL communicators are not thread-safe), and an abort never races a
//! call being enqueued. The calls made under it do not block (non-blocking mode), so the lock
//! is held for microseconds.
//!
//! With an NCCL older than 2.14 the blocking `ncclCommInitRank` runs on a helper thread and is
//! given up after [`CommOptions::init_timeout`]; the transfers themselves are still watched.
//!
//! [`Comm`] is `Send + Sync`; dropping it aborts the communicator (unless [`Comm::finish`] shut
//! it down cleanly), ignoring errors: no panic, no wait on peers.

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::result::{self, NcclError, Status};
use super::sys::{self, Nccl, cudaStream_t, ncclComm_t, ncclUniqueId};

/// The 128 bytes rank 0 makes and every rank passes to [`Comm::init`].
#[derive(Clone, PartialEq, Eq)]
pub struct UniqueId([u8; 128]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The id holds rank 0's bootstrap address and a random magic: not for logs.
        f.write_str("UniqueId(..)")
    }
}

impl UniqueId {
    /// `ncclGetUniqueId`: on rank 0 only. This process then hosts NCCL's bootstrap root and
    /// must stay alive until every rank has joined.
    pub fn new() -> Result<UniqueId, NcclError> {
        let nccl = sys::load()?;
        let id = result::get_unique_id(nccl)?;
        Ok(UniqueId(id.internal.map(|c| c as u8)))
    }

    /// An id received from rank 0.
    pub fn from_bytes(b: &[u8]) -> Result<UniqueId, NcclError> {
        let a: [u8; 128] = b.try_into().map_err(|_| {
            NcclError::Invalid(format!("an NCCL unique id has 128 bytes, not {}", b.len()))
        })?;
        Ok(UniqueId(a))
    }

    /// The bytes, to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8; 128] {
        &self.0
    }

    fn raw(&self) -> ncclUniqueId {
        ncclUniqueId {
            internal: self.0.map(|b| b as std::ffi::c_char),
        }
    }
}

/// How a [`Comm`] is watched.
#[derive(Clone)]
pub struct CommOptions {
    /// How long every rank may take to join ([`Comm::init`]).
    pub init_timeout: Duration,
    /// How often the watchdog polls NCCL.
    pub tick: Duration,
    /// Says whether the run must stop (another part failed): the watchdog then aborts the
    /// communicator. Called from the watchdog thread every tick.
    pub cancelled: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for CommOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommOptions")
            .field("init_timeout", &self.init_timeout)
            .field("tick", &self.tick)
            .finish_non_exhaustive()
    }
}

impl Default for CommOptions {
    fn default() -> Self {
        CommOptions {
            init_timeout: Duration::from_secs(300),
            tick: Duration::from_millis(50),
            cancelled: Arc::new(|| false),
        }
    }
}

/// One point-to-point operation of a group ([`Comm::exchange`]). Addresses are device
/// addresses (`CUdeviceptr`) in the communicator's CUDA context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum P2p {
    /// Send `bytes` bytes from `ptr` to rank `peer`.
    Send {
        /// Device address of the data.
        ptr: u64,
        /// Length.
        bytes: usize,
        /// Destination rank.
        peer: usize,
    },
    /// Receive `bytes` bytes from rank `peer` into `ptr`.
    Recv {
        /// Device address of the buffer.
        ptr: u64,
        /// Length; must equal what the peer sends.
        bytes: usize,
        /// Source rank.
        peer: usize,
    },
}

/// The raw handle, which may move between threads (calls on it are serialised by a mutex).
struct RawComm(ncclComm_t);

// SAFETY: an NCCL communicator is not tied to the thread that made it: NCCL documents it may
// be used from any thread as long as calls are not concurrent, and ncclCommGetAsyncError /
// ncclCommAbort are meant to be called from a watchdog thread. `RawComm` is only reachable
// through `Shared::handle`'s mutex, which serialises every call.
unsafe impl Send for RawComm {}

/// What a wait announced with [`Comm::watch`] is, and since when nothing moved.
struct Watch {
    what: String,
    since: Instant,
    limit: Duration,
}

struct Shared {
    nccl: &'static Nccl,
    /// `None` once aborted or destroyed.
    handle: Mutex<Option<RawComm>>,
    /// Why the communicator was aborted.
    broken: Mutex<Option<NcclError>>,
    watch: Mutex<Option<Watch>>,
    stop: AtomicBool,
    opts: CommOptions,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data half-updated (each is a
    // single Option), so a poisoned lock is used as is.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Aborts (once) and records why; later calls see the first reason.
    fn abort_with(&self, handle: &mut Option<RawComm>, why: NcclError) {
        if let Some(raw) = handle.take() {
            // SAFETY: the handle is live (it was still in the slot) and is removed from the
            // slot here, under the lock, so nothing uses it afterwards.
            if let Err(e) = unsafe { result::comm_abort(self.nccl, raw.0) } {
                tracing::debug!("ncclCommAbort: {e}");
            }
            tracing::debug!("NCCL communicator aborted: {why}");
        }
        let mut b = lock(&self.broken);
        if b.is_none() {
            *b = Some(why);
        }
    }

    fn broken(&self) -> NcclError {
        lock(&self.broken)
            .clone()
            .unwrap_or_else(|| NcclError::Aborted("shut down".into()))
    }

    /// One watchdog tick: the cancel flag, NCCL's own error state, the deadline of the current
    /// wait. Returns false once the communicator is gone.
    fn tick(&self) -> bool {
        let mut h = lock(&self.handle);
        let Some(raw) = h.as_ref() else {
            return false;
        };
        let why = if (self.opts.cancelled)() {
            Some(NcclError::Cancelled)
        } else {
            // SAFETY: the handle is live (in the slot) and the lock serialises NCCL calls.
            match unsafe { result::comm_get_async_error(self.nccl, raw.0) } {
                Err(e) => Some(e),
                Ok(_) => lock(&self.watch).as_ref().and_then(|w| {
                    (w.since.elapsed() > w.limit).then(|| NcclError::Timeout {
                        what: w.what.clone(),
                        seconds: w.limit.as_secs(),
                    })
                }),
            }
        };
        if let Some(e) = why {
            self.abort_with(&mut h, e);
            return false;
        }
        true
    }
}

/// An NCCL communicator with its watchdog.
pub struct Comm {
    shared: Arc<Shared>,
    watchdog: Option<JoinHandle<()>>,
    rank: usize,
    size: usize,
}

/// Marks a wait as watched (see [`Comm::watch`]); the mark goes when this is dropped.
#[must_use = "the wait is watched only while the guard lives"]
pub struct WatchGuard<'a> {
    comm: &'a Comm,
}

impl WatchGuard<'_> {
    /// Something moved: the no-progress clock starts again.
    pub fn progress(&self) {
        if let Some(w) = lock(&self.comm.shared.watch).as_mut() {
            w.since = Instant::now();
        }
    }
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.comm.shared.watch) = None;
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Comm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl Comm {
    /// Joins the communicator of `size` ranks as `rank`, on the CUDA device current on this
    /// thread (bind the device's context first). Returns when every rank has joined; gives up
    /// after `opts.init_timeout`, or when `opts.cancelled` says so.
    ///
    /// `bind` is called first on any helper thread that makes NCCL calls for this (the
    /// blocking fallback for NCCL < 2.14 runs `ncclCommInitRank` on one), so that it sees the
    /// same current device.
    pub fn init(
        id: &UniqueId,
        rank: usize,
        size: usize,
        opts: CommOptions,
        bind: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    ) -> Result<Comm, NcclError> {
        let nccl = sys::load()?;
        if size == 0 || rank >= size || size > c_int::MAX as usize {
            return Err(NcclError::Invalid(format!("rank {rank} of {size}")));
        }
        let raw = match result::comm_init_rank_config(
            nccl,
            size as c_int,
            id.raw(),
            rank as c_int,
            false,
        )? {
            Some((comm, _)) => comm,
            None => blocking_init(nccl, id, rank, size, &opts, bind)?,
        };
        let shared = Arc::new(Shared {
            nccl,
            handle: Mutex::new(Some(RawComm(raw))),
            broken: Mutex::new(None),
            watch: Mutex::new(None),
            stop: AtomicBool::new(false),
            opts,
        });
        let s = shared.clone();
        let watchdog = std::thread::Builder::new()
            .name("axsave-nccl-watchdog".into())
            .spawn(move || {
                while !s.stop.load(Ordering::SeqCst) && s.tick() {
                    std::thread::sleep(s.opts.tick);
                }
            })
            .map_err(|e| NcclError::Invalid(format!("cannot start the NCCL watchdog: {e}")));
        let mut comm = Comm {
            shared,
            watchdog: None,
            rank,
            size,
        };
        comm.watchdog = Some(watchdog?);
        // A non-blocking init returns at once; joining finishes in the background.
        let limit = comm.shared.opts.init_timeout;
        comm.wait_idle(
            "waiting for every rank to join the NCCL communicator",
            limit,
        )?;
        Ok(comm)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Which NCCL library this process uses, and its version code.
    pub fn library() -> Result<(String, i32), NcclError> {
        let nccl = sys::load()?;
        Ok((nccl.path().to_string(), result::get_version(nccl)?))
    }

    /// `Err` with the reason once the communicator was aborted (by the watchdog or by
    /// [`Comm::abort`]); poll it in every wait that depends on NCCL.
    pub fn check(&self) -> Result<(), NcclError> {
        if lock(&self.shared.handle).is_none() {
            return Err(self.shared.broken());
        }
        Ok(())
    }

    /// Announces a wait on work that depends on NCCL (`what` names it in the error): while the
    /// guard lives, the watchdog aborts the communicator when [`WatchGuard::progress`] is not
    /// called for `limit`.
    pub fn watch(&self, what: impl Into<String>, limit: Duration) -> WatchGuard<'_> {
        *lock(&self.shared.watch) = Some(Watch {
            what: what.into(),
            since: Instant::now(),
            limit,
        });
        WatchGuard { comm: self }
    }

    /// Aborts the communicator now (its device operations stop), recording `why` for
    /// [`Comm::check`]. Does nothing if it is already gone.
    pub fn abort(&self, why: NcclError) {
        let mut h = lock(&self.shared.handle);
        self.shared.abort_with(&mut h, why);
    }

    /// Posts `ops` as one group (`ncclGroupStart`, the sends and receives in order,
    /// `ncclGroupEnd`) on `stream`, and returns once NCCL has enqueued them; the transfers then
    /// run on the stream. Operations to the same peer run in the order given; operations to
    /// different peers progress independently, so ranks that send to each other do not
    /// deadlock. Every peer must post the matching operations, with equal sizes, in the same
    /// order.
    ///
    /// `limit` bounds the wait for NCCL to set up connections (the first exchange with a peer
    /// connects to it).
    ///
    /// # Safety
    ///
    /// `stream` is a stream of the communicator's CUDA context. Every `ptr` is a device
    /// address in that context with `bytes` bytes valid, which stay allocated, and (for a send)
    /// unchanged, (for a receive) untouched by anything else, until the work enqueued on
    /// `stream` by this call has completed (record an event after it and wait for it), or the
    /// communicator was aborted.
    pub unsafe fn exchange(
        &self,
        ops: &[P2p],
        stream: cudaStream_t,
        limit: Duration,
    ) -> Result<(), NcclError> {
        if ops.is_empty() {
            return Ok(());
        }
        for op in ops {
            let (P2p::Send { peer, .. } | P2p::Recv { peer, .. }) = *op;
            if peer >= self.size {
                return Err(NcclError::Invalid(format!(
                    "peer {peer} in a world of {}",
                    self.size
                )));
            }
        }
        let nccl = self.shared.nccl;
        let status = {
            let mut h = lock(&self.shared.handle);
            let Some(raw) = h.as_ref() else {
                return Err(self.shared.broken());
            };
            let comm = raw.0;
            // SAFETY: group start/end bracket the calls below on this thread, under the lock.
            let code = unsafe { (nccl.group_start)() };
            result::check(nccl, "ncclGroupStart", code, Some(comm))?;
            let mut first_err = None;
            for op in ops {
                // SAFETY: the communicator is live (in the slot, under the lock); pointers and
                // stream are valid as this function's contract requires; peers were checked.
                let (call, code) = unsafe {
                    match *op {
                        P2p::Send { ptr, bytes, peer } => (
                            "ncclSend",
                            (nccl.send)(
                                ptr as *const std::ffi::c_void,
                                bytes,
                                sys::NCCL_UINT8,
                                peer as c_int,
                                comm,
                                stream,
                            ),
                        ),
                        P2p::Recv { ptr, bytes, peer } => (
                            "ncclRecv",
                            (nccl.recv)(
                                ptr as *mut std::ffi::c_void,
                                bytes,
                                sys::NCCL_UINT8,
                                peer as c_int,
                                comm,
                                stream,
                            ),
                        ),
                    }
                };
                if let Err(e) = result::check(nccl, call, code, Some(comm)) {
                    first_err = Some(e);
                    break;
                }
            }
            // The group is closed even after a failed call, so NCCL's per-thread group state
            // is not left open.
            // SAFETY: matches the ncclGroupStart above.
            let code = unsafe { (nccl.group_end)() };
            let end = result::check(nccl, "ncclGroupEnd", code, Some(comm));
            if let Some(e) = first_err.or(end.as_ref().err().cloned()) {
                // A half-posted group cannot be matched by the peers: abort so they fail too.
                self.shared.abort_with(&mut h, e.clone());
                return Err(e);
            }
            end?
        };
        if status == Status::InProgress {
            self.wait_idle("connecting to peers for an NCCL transfer", limit)?;
        }
        Ok(())
    }

    /// Polls `ncclCommGetAsyncError` until the communicator is idle (non-blocking calls have
    /// finished), it fails, or `limit` passes without that.
    fn wait_idle(&self, what: &str, limit: Duration) -> Result<(), NcclError> {
        let guard = self.watch(what, limit);
        let mut nap = Duration::from_micros(20);
        loop {
            {
                let mut h = lock(&self.shared.handle);
                let Some(raw) = h.as_ref() else {
                    return Err(self.shared.broken());
                };
                // SAFETY: live handle, serialised by the lock.
                match unsafe { result::comm_get_async_error(self.shared.nccl, raw.0) } {
                    Ok(Status::Done) => break,
                    Ok(Status::InProgress) => {}
                    Err(e) => {
                        self.shared.abort_with(&mut h, e.clone());
                        return Err(e);
                    }
                }
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(5));
        }
        drop(guard);
        Ok(())
    }

    /// Shuts the communicator down cleanly once all its work has completed
    /// (`ncclCommFinalize`, polled, then `ncclCommDestroy`); aborts it instead if that fails
    /// or takes longer than `limit`.
    pub fn finish(mut self, limit: Duration) -> Result<(), NcclError> {
        self.stop_watchdog();
        let nccl = self.shared.nccl;
        let mut h = lock(&self.shared.handle);
        let Some(raw) = h.take() else {
            return Err(self.shared.broken());
        };
        let deadline = Instant::now() + limit;
        // SAFETY: the handle was live and is now owned here alone (taken from the slot; the
        // watchdog has stopped); finalize is polled to completion before destroy.
        let finalized = unsafe {
            match result::comm_finalize(nccl, raw.0) {
                Ok(Status::Done) => Ok(()),
                Ok(Status::InProgress) => loop {
                    match result::comm_get_async_error(nccl, raw.0) {
                        Ok(Status::Done) => break Ok(()),
                        Ok(Status::InProgress) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Ok(Status::InProgress) => {
                            break Err(NcclError::Timeout {
                                what: "finalizing the NCCL communicator".into(),
                                seconds: limit.as_secs(),
                            });
                        }
                        Err(e) => break Err(e),
                    }
                },
                Err(e) => Err(e),
            }
        };
        match finalized {
            // SAFETY: finalized and idle, owned here; not used afterwards.
            Ok(()) => unsafe { result::comm_destroy(nccl, raw.0) },
            Err(e) => {
                // SAFETY: still live, owned here; not used afterwards.
                let _ = unsafe { result::comm_abort(nccl, raw.0) };
                Err(e)
            }
        }
    }

    fn stop_watchdog(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        self.stop_watchdog();
        let mut h = lock(&self.shared.handle);
        if h.is_some() {
            self.shared
                .abort_with(&mut h, NcclError::Aborted("dropped".into()));
        }
    }
}

/// NCCL < 2.14: `ncclCommInitRank` blocks until every rank joins and cannot be interrupted, so
/// it runs on a helper thread that is abandoned after the deadline (the process is failing by
/// then and exits soon after).
fn blocking_init(
    nccl: &'static Nccl,
    id: &UniqueId,
    rank: usize,
    size: usize,
    opts: &CommOptions,
    bind: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
) -> Result<ncclComm_t, NcclError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let raw_id = id.raw();
    std::thread::Builder::new()
        .name("axsave-nccl-init".into())
        .spawn(move || {
            let r = bind().map_err(NcclError::Invalid).and_then(|()| {
                result::comm_init_rank(nccl, size as c_int, raw_id, rank as c_int).map(RawComm)
            });
            let _ = tx.send(r);
        })
        .map_err(|e| NcclError::Invalid(format!("cannot start a thread: {e}")))?;
    let deadline = Instant::now() + opts.init_timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => return r.map(|c| c.0),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if (opts.cancelled)() {
                    return Err(NcclError::Cancelled);
                }
                if Instant::now() >= deadline {
                    return Err(NcclError::InitTimeout {
                        seconds: opts.init_timeout.as_secs(),
                    });
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(NcclError::Invalid("the NCCL init thread died".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_ids_travel_as_128_bytes() {
        let bytes: Vec<u8> = (0..128).map(|i| (i * 7) as u8).collect();
        let id = UniqueId::from_bytes(&bytes).unwrap();
        assert_eq!(id.as_bytes().as_slice(), bytes.as_slice());
        assert_eq!(id.raw().internal[5] as u8, 35);
        assert!(UniqueId::from_bytes(&bytes[..127]).is_err());
        assert_eq!(format!("{id:?}"), "UniqueId(..)");
    }

    /// Without a GPU there is no NCCL here, or an NCCL that cannot make a communicator: either
    /// way an error, never a panic or a hang.
    #[test]
    fn init_without_nccl_or_gpu_is_an_error() {
        let id = UniqueId::from_bytes(&[0u8; 128]).unwrap();
        let opts = CommOptions {
            init_timeout: Duration::from_secs(5),
            ..CommOptions::default()
        };
        match sys::load() {
            Err(e) => {
                eprintln!("no NCCL on this machine ({e})");
                let err = Comm::init(&id, 0, 1, opts, Arc::new(|| Ok(()))).unwrap_err();
                assert!(matches!(err, NcclError::Load(_)), "{err}");
            }
            Ok(n) => {
                eprintln!(
                    "skipping the no-NCCL half: NCCL found at {} (the GPU tests cover it)",
                    n.path()
                );
            }
        }
        let err = Comm::init(&id, 3, 2, CommOptions::default(), Arc::new(|| Ok(()))).unwrap_err();
        assert!(
            matches!(err, NcclError::Invalid(_) | NcclError::Load(_)),
            "{err}"
        );
    }
}
