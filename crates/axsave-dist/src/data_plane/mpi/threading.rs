//! The thread support this transport needs from the MPI library.

use mpi::Threading;

/// The least thread support accepted from the MPI library. Only the progress thread calls
/// MPI, so even `Funneled` would do in principle; `Serialized` is required so that MPI makes
/// no assumption about which thread that is.
pub const MIN_THREAD_LEVEL: Threading = Threading::Serialized;
