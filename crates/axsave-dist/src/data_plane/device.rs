//! [`DevicePlane`]: the data plane between the ranks' GPUs (feature `cuda`), the device
//! counterpart of [`DataPlane`](super::DataPlane).
//!
//! [`DataPlane`](super::DataPlane) moves runs of host bytes into a writer's sink, and either
//! side may send whenever it has data. Between GPUs the bytes sit in device buffers and travel
//! in *rounds*: every rank posts, on one of its CUDA streams, the sends and receives the shared
//! schedule gives it ([`DeviceOp`]), each send matched by the peer's receive of the same size
//! in the same order. That different shape is why this is a face of its own. The GPU executor
//! (axsave-core's `gpu`) drives it and names only what is here; NCCL (the [`nccl`](super::nccl)
//! module) carries it, the one device transport there is.
//!
//! ```text
//! let id = if rank == 0 { DevicePlaneId::new()? } else { DevicePlaneId::from_hex(&from_rank_0)? };
//! let plane = DevicePlane::join(&id, rank, world, DevicePlaneOptions { .. }, bind)?;
//! unsafe { plane.exchange(&[DeviceOp::Send { ptr, bytes, peer: 0 }], stream, limit)? };
//! // record an event on `stream`; poll it inside `let _w = plane.watch(..)`, checking plane.check()
//! plane.finish(limit)?;
//! ```
//!
//! A plane cannot hang the process: a watchdog ends it when a peer fails, when the run is
//! cancelled, or when a watched wait makes no progress (see [`nccl::safe`](super::nccl::safe)).

use std::ffi::c_void;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::nccl::{Comm, NcclError, UniqueId};

/// How a plane is joined and watched: how long every rank may take to join, how often the
/// watchdog looks, and the run's cancellation.
pub use super::nccl::CommOptions as DevicePlaneOptions;
/// One send or receive of a round: device addresses (`CUdeviceptr`) in the plane's CUDA
/// context, a length, a peer rank.
pub use super::nccl::P2p as DeviceOp;
/// A watched wait (see [`DevicePlane::watch`]): the no-progress clock runs while it lives.
pub use super::nccl::WatchGuard as DeviceWatch;

/// Why the device plane failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DevicePlaneError {
    /// The run was cancelled (another part failed); the plane was aborted.
    #[error("cancelled; the GPU data plane was aborted")]
    Cancelled,
    /// NCCL failed: a call, a peer, a timeout, or the library could not be opened.
    #[error("NCCL: {0}")]
    Nccl(NcclError),
}

impl DevicePlaneError {
    /// Whether a watched wait made no progress within its limit (the watchdog aborted the
    /// plane), as opposed to a failed call, a failed peer or a cancellation.
    pub fn is_timeout(&self) -> bool {
        matches!(self, DevicePlaneError::Nccl(NcclError::Timeout { .. }))
    }
}

impl From<NcclError> for DevicePlaneError {
    fn from(e: NcclError) -> Self {
        match e {
            NcclError::Cancelled => DevicePlaneError::Cancelled,
            e => DevicePlaneError::Nccl(e),
        }
    }
}

/// The id every rank joins a plane with: rank 0 makes it, the others receive it (as the hex
/// text [`DevicePlaneId::to_hex`] writes) through the store or MPI.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DevicePlaneId(UniqueId);

impl DevicePlaneId {
    /// A new id, on rank 0 only. This process then hosts the transport's bootstrap and must
    /// stay alive until every rank has joined.
    pub fn new() -> Result<Self, DevicePlaneError> {
        Ok(DevicePlaneId(UniqueId::new()?))
    }

    /// The id as text, to publish to the other ranks.
    pub fn to_hex(&self) -> String {
        self.0
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// An id published by rank 0 ([`DevicePlaneId::to_hex`]); an error when the text is not
    /// one.
    pub fn from_hex(s: &str) -> Result<Self, DevicePlaneError> {
        let bytes: Option<Vec<u8>> = (0..s.len())
            .step_by(2)
            .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect();
        let bytes = bytes.ok_or_else(|| {
            DevicePlaneError::Nccl(NcclError::Invalid(format!(
                "a GPU data plane id is hex text, not {:?}",
                s.chars().take(16).collect::<String>()
            )))
        })?;
        Ok(DevicePlaneId(UniqueId::from_bytes(&bytes)?))
    }
}

/// The GPUs' data plane of one run: every rank's handle on it.
#[derive(Debug)]
pub struct DevicePlane {
    comm: Comm,
}

impl DevicePlane {
    /// The version of the NCCL that carries the plane on this machine and where it was
    /// opened from (`2.28.3 (/path/libnccl.so.2)`); an error, saying why, when there is none.
    pub fn library() -> Result<String, DevicePlaneError> {
        let (path, code) = Comm::library()?;
        Ok(format!("{} ({path})", nccl_version(code)))
    }

    /// Joins the plane of `size` ranks as `rank`, on the CUDA device current on this thread
    /// (bind the device's context first). Returns when every rank has joined; gives up after
    /// `opts.init_timeout`, or when `opts.cancelled` says so. `bind` makes the same device
    /// current on a helper thread, should one join for this one.
    pub fn join(
        id: &DevicePlaneId,
        rank: usize,
        size: usize,
        opts: DevicePlaneOptions,
        bind: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    ) -> Result<Self, DevicePlaneError> {
        Ok(DevicePlane {
            comm: Comm::init(&id.0, rank, size, opts, bind)?,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// `Err` with the reason once the plane was aborted; poll it in every wait that depends
    /// on a peer.
    pub fn check(&self) -> Result<(), DevicePlaneError> {
        Ok(self.comm.check()?)
    }

    /// Announces a wait on work that depends on peers (`what` names it in the error): while
    /// the guard lives, the plane is aborted when [`DeviceWatch::progress`] is not called for
    /// `limit`.
    pub fn watch(&self, what: impl Into<String>, limit: Duration) -> DeviceWatch<'_> {
        self.comm.watch(what, limit)
    }

    /// Aborts the plane because the run was cancelled: its device operations stop, and the
    /// peers fail at once.
    pub fn cancel(&self) {
        self.comm.abort(NcclError::Cancelled);
    }

    /// Aborts the plane because this rank failed (`why`, kept for [`DevicePlane::check`]).
    pub fn abort(&self, why: impl Into<String>) {
        self.comm.abort(NcclError::Aborted(why.into()));
    }

    /// Posts `ops` as one group on `stream` and returns once they are enqueued; the transfers
    /// then run on the stream. Operations to one peer run in the order given, to different
    /// peers independently (ranks that send to each other do not deadlock). Every peer must
    /// post the matching operations, with equal sizes, in the same order. `limit` bounds the
    /// wait for connections to be set up (the first exchange with a peer makes them).
    ///
    /// # Safety
    ///
    /// As [`Comm::exchange`]: `stream` (a `CUstream`) belongs to the plane's CUDA context, and
    /// every `ptr` is a device address in it with `bytes` bytes valid that stay allocated and
    /// (a send) unchanged, (a receive) untouched by anything else, until the work enqueued on
    /// `stream` has completed or the plane was aborted.
    pub unsafe fn exchange(
        &self,
        ops: &[DeviceOp],
        stream: *mut c_void,
        limit: Duration,
    ) -> Result<(), DevicePlaneError> {
        // SAFETY: the caller upholds Comm::exchange's contract, which this one repeats.
        Ok(unsafe { self.comm.exchange(ops, stream, limit) }?)
    }

    /// Shuts the plane down cleanly once all its work has completed; aborts it instead if
    /// that fails or takes longer than `limit`.
    pub fn finish(self, limit: Duration) -> Result<(), DevicePlaneError> {
        Ok(self.comm.finish(limit)?)
    }
}

/// `22105` → `2.21.5` (NCCL ≥ 2.9 codes; older ones are `major*1000 + minor*100 + patch`).
pub fn nccl_version(code: i32) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, (code / 100) % 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, (code / 100) % 10, code % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_the_hex_round_trip() {
        let bytes: Vec<u8> = (0..128).map(|i| (i * 7 + 3) as u8).collect();
        let id = DevicePlaneId(UniqueId::from_bytes(&bytes).unwrap());
        let hex = id.to_hex();
        assert_eq!(hex.len(), 256);
        assert_eq!(DevicePlaneId::from_hex(&hex).unwrap(), id);
    }

    #[test]
    fn a_malformed_id_is_an_error() {
        for bad in ["zz", "abc", "", &"ab".repeat(127), &"ab".repeat(129)] {
            let e = DevicePlaneId::from_hex(bad).unwrap_err();
            assert!(
                matches!(e, DevicePlaneError::Nccl(NcclError::Invalid(_))),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn cancellation_is_its_own_error() {
        assert_eq!(
            DevicePlaneError::from(NcclError::Cancelled),
            DevicePlaneError::Cancelled
        );
        let e = DevicePlaneError::from(NcclError::Aborted("rank 1 failed".into()));
        assert_eq!(
            e.to_string(),
            "NCCL: the NCCL communicator was aborted: rank 1 failed"
        );
        assert!(!e.is_timeout() && !DevicePlaneError::Cancelled.is_timeout());
        let stuck = DevicePlaneError::from(NcclError::Timeout {
            what: "waiting for round 3".into(),
            seconds: 5,
        });
        assert!(stuck.is_timeout(), "{stuck}");
    }

    #[test]
    fn versions_read_as_nccl_prints_them() {
        assert_eq!(nccl_version(22803), "2.28.3");
        assert_eq!(nccl_version(22105), "2.21.5");
        assert_eq!(nccl_version(23003), "2.30.3");
        assert_eq!(nccl_version(2708), "2.7.8");
    }

    /// A rank outside the world is refused before anything is joined (or NCCL is missing
    /// here): an error through the face, never a panic.
    #[test]
    fn a_rank_outside_the_world_is_an_error() {
        let id = DevicePlaneId(UniqueId::from_bytes(&[0u8; 128]).unwrap());
        let opts = DevicePlaneOptions::default();
        let err = DevicePlane::join(&id, 3, 2, opts, Arc::new(|| Ok(()))).unwrap_err();
        assert!(
            matches!(
                err,
                DevicePlaneError::Nccl(NcclError::Invalid(_) | NcclError::Load(_))
            ),
            "{err}"
        );
    }
}
