//! Transports that move tensor bytes from the rank that reads a piece to the rank that writes
//! the output file it belongs to.
//!
//! A transport knows nothing of file formats. It moves *runs* — `(file index, byte offset,
//! bytes)` — and hands each received run to a sink supplied by the writer (a positioned write
//! into a preallocated output file).
//!
//! * [`tcp`] — plain `std::net` TCP: a [`Receiver`] per writer rank, one [`Sender`] per
//!   connection to it. Needs nothing but an address published in the store.
//! * `mpi` (feature `mpi`) — MPI point-to-point messages for jobs started by an MPI
//!   launcher, with the same shape: an `MpiReceiver` per writer rank, an `MpiSender` per
//!   worker thread and writer, the same [`Sink`].

#[cfg(feature = "mpi")]
pub mod mpi;
pub mod tcp;

pub use tcp::*;
