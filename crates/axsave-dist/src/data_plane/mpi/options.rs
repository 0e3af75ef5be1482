//! The options of an MPI transfer.

use std::time::Duration;

use super::error::MpiError;
use crate::data_plane::limits::MAX_FRAME_BYTES;

/// Largest [`MpiOptions::max_in_flight`].
pub const MAX_IN_FLIGHT: usize = 4096;

/// Options of one transfer, identical on every rank of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpiOptions {
    /// A token every rank of one run shares. Messages of another session (left over from an
    /// earlier transfer on the same communicator) are dropped and counted, never written.
    pub session: u64,
    /// Largest frame payload a sender buffers before sending, and the largest a receiver
    /// accepts; 1 ..= [`MAX_FRAME_BYTES`].
    pub frame_bytes: usize,
    /// No progress for this long while waiting is an error instead of a hang.
    pub io_timeout: Duration,
    /// Most frames the transport (all clones of one [`MpiTransport`](super::MpiTransport)) has queued for or
    /// inside `MPI_Isend` at once, and most messages its receiver has being received or
    /// waiting for the sink; 1 ..= [`MAX_IN_FLIGHT`].
    /// Memory is about `2 × max_in_flight × frame_bytes`, plus a frame per live sender.
    pub max_in_flight: usize,
}

impl Default for MpiOptions {
    fn default() -> Self {
        MpiOptions {
            session: 0,
            frame_bytes: 1024 * 1024,
            io_timeout: Duration::from_secs(60),
            max_in_flight: 8,
        }
    }
}

impl MpiOptions {
    /// Checks that the options are usable; [`MpiContext::transport`](super::MpiContext::transport) calls it.
    pub fn validate(&self) -> Result<(), MpiError> {
        if self.frame_bytes == 0 || self.frame_bytes > MAX_FRAME_BYTES {
            return Err(MpiError::InvalidOptions {
                detail: format!(
                    "frame_bytes is {}, it must be 1 ..= {MAX_FRAME_BYTES}",
                    self.frame_bytes
                ),
            });
        }
        if self.io_timeout < Duration::from_millis(1) {
            return Err(MpiError::InvalidOptions {
                detail: format!(
                    "io_timeout is {:?}, it must be at least 1 ms",
                    self.io_timeout
                ),
            });
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_IN_FLIGHT {
            return Err(MpiError::InvalidOptions {
                detail: format!(
                    "max_in_flight is {}, it must be 1 ..= {MAX_IN_FLIGHT}",
                    self.max_in_flight
                ),
            });
        }
        Ok(())
    }
}
