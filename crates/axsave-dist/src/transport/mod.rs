//! Transports that move tensor bytes from the rank that reads a piece to the rank that writes
//! the output file it belongs to.
//!
//! A transport knows nothing of file formats. It moves *runs* — `(file index, byte offset,
//! bytes)` — and hands each received run to a sink supplied by the writer (a positioned write
//! into a preallocated output file).
//!
//! * [`tcp`] — plain `std::net` TCP: a [`Receiver`] per writer rank, one [`Sender`] per
//!   connection to it. Needs nothing but an address published in the store.

pub mod tcp;

pub use tcp::*;
