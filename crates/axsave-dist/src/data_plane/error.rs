//! Failures the TCP and MPI transports share: a run that cannot be queued, a sink that
//! refused a run, more bytes than the plan expects. Each transport's error wraps them
//! ([`TransportError::Run`](super::TransportError::Run), `MpiError::Run`).

use thiserror::Error;

/// A run could not be queued or delivered, whichever transport carried it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RunError {
    /// A pushed run would end past byte `u64::MAX`; nothing was queued.
    #[error("a run of {len} bytes at offset {offset} of file {file} would end past 2^64")]
    InvalidRun {
        /// File index.
        file: u32,
        /// Offset given.
        offset: u64,
        /// Its length.
        len: usize,
    },
    /// The sink returned an error (or panicked) for a run.
    #[error(
        "writing {len} bytes at offset {offset} of file {file} from sender rank {rank} failed: {message}"
    )]
    Sink {
        /// The sender's rank.
        rank: usize,
        /// File index.
        file: u32,
        /// Offset of the run.
        offset: u64,
        /// Length of the run.
        len: u64,
        /// The sink's message.
        message: String,
    },
    /// More payload bytes arrived than the receiver's `wait` expects: the plans of the ranks
    /// disagree.
    #[error("{received} payload bytes arrived, more than the {expected} expected{}",
        .rank.map_or(String::new(), |r| format!(" (the excess from sender rank {r})")))]
    TooManyBytes {
        /// Bytes expected in total.
        expected: u64,
        /// Bytes that arrived (or were about to be handed to the sink).
        received: u64,
        /// The rank whose frame went over, when known.
        rank: Option<usize>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_run_and_the_rank() {
        let e = RunError::Sink {
            rank: 3,
            file: 1,
            offset: 40,
            len: 8,
            message: "disk full".into(),
        };
        assert_eq!(
            e.to_string(),
            "writing 8 bytes at offset 40 of file 1 from sender rank 3 failed: disk full"
        );
        let e = RunError::TooManyBytes {
            expected: 10,
            received: 12,
            rank: Some(2),
        };
        assert_eq!(
            e.to_string(),
            "12 payload bytes arrived, more than the 10 expected (the excess from sender rank 2)"
        );
    }
}
