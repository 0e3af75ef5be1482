//! The data plane: transports that move tensor bytes from the rank that reads a piece to the
//! rank that writes the output file it belongs to.
//!
//! A transport knows nothing of file formats. It moves *runs* — `(file index, byte offset,
//! bytes)` — and hands each received run to a sink supplied by the writer (a positioned write
//! into a preallocated output file).
//!
//! * [`tcp`] — plain `std::net` TCP: a [`TcpReceiver`] per writer rank, one [`TcpSender`] per
//!   connection to it. Needs nothing but an address published in the store.
//! * `mpi` (feature `mpi`) — MPI point-to-point messages for jobs started by an MPI
//!   launcher, with the same shape: an `MpiReceiver` per writer rank, an `MpiSender` per
//!   worker thread and writer, the same [`Sink`].
//! * `nccl` (feature `cuda`) — NCCL point-to-point between the ranks' GPUs; the library is
//!   opened at run time.
//!
//! [`DataPlane`] ([`plane`]) is the one face of TCP and MPI: the rest of the program opens
//! senders and a receiver through it without naming the transport. `DevicePlane` (`device`,
//! feature `cuda`) is the face of NCCL: rounds of matched sends and receives of device buffers,
//! which axsave-core's GPU executor schedules without naming NCCL.
//!
//! What the TCP and MPI transports share sits beside them: the [`Sink`] they write into
//! ([`sink`]), the [`ReceiveStats`] they report ([`stats`]) and the frame limits
//! ([`limits`]).

mod clock;
#[cfg(feature = "cuda")]
pub mod device;
pub mod error;
pub mod limits;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod plane;
mod runs;
pub mod sink;
pub mod stats;
pub mod tcp;

/// Whether this build has the MPI transport (feature `mpi`). Whether a run can use it also
/// depends on how it was launched; see axsave-core's `transport::mpi_available`.
pub const MPI_BUILT: bool = cfg!(feature = "mpi");

#[cfg(feature = "cuda")]
pub use device::{DeviceOp, DevicePlane, DevicePlaneError, DevicePlaneId, DevicePlaneOptions};
pub use error::RunError;
pub use limits::{MAX_FRAME_BYTES, MAX_RUNS_PER_FRAME};
pub use plane::{DataPlane, DataPlaneError, PlaneReceiver, PlaneSender};
pub use sink::{SharedSink, Sink, SinkError, sink_fn};
pub use stats::ReceiveStats;
pub use tcp::{PROTOCOL_VERSION, TOKEN_LEN, TcpOptions, TcpReceiver, TcpSender, TransportError};
