//! NCCL transport (feature `cuda`): moves bytes between the GPUs of the ranks with NCCL's
//! point-to-point `ncclSend`/`ncclRecv`, layered like cudarc:
//!
//! * [`sys`] — the raw C entry points, opened at run time from `libnccl.so.2` or `libnccl.so`
//!   wherever they are (NCCL's pip wheels included; see the module for the search order), with
//!   every required symbol resolved up front so that a missing or old library is an error,
//!   never a panic.
//! * [`result`] — return codes as `Result`s ([`NcclError`]) and thin `unsafe` wrappers.
//! * [`safe`] — [`UniqueId`] and [`Comm`]: a non-blocking communicator that is `Send + Sync`,
//!   aborts on drop, and has a watchdog thread that polls `ncclCommGetAsyncError` and calls
//!   `ncclCommAbort` on an error, on cancellation, or when a watched wait passes its deadline.
//!
//! ```text
//! let id = if rank == 0 { UniqueId::new()? } else { UniqueId::from_bytes(&from_store)? };
//! let comm = Comm::init(&id, rank, world, CommOptions { .. }, bind_device)?;  // every rank
//! unsafe { comm.exchange(&[P2p::Send { ptr, bytes, peer: 0 }], stream, limit)? };
//! // record an event on `stream`; poll it inside `let _w = comm.watch(..)`, checking comm.check()
//! comm.finish(limit)?;
//! ```
//!
//! What bytes travel, and in which order, is the caller's business (axsave-core's GPU
//! executor): NCCL needs every send matched by a receive of the same size, posted in the same
//! order on both sides.

pub mod result;
pub mod safe;
pub mod sys;

pub use result::NcclError;
pub use safe::{Comm, CommOptions, P2p, UniqueId, WatchGuard};
