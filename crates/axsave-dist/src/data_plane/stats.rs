//! What a receiver has received, whichever transport carried it.

use std::collections::BTreeMap;

/// What a receiver has received (returned by `wait` and `stats` of the TCP and MPI
/// receivers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Payload bytes handed to the sink, which returned success.
    pub bytes: u64,
    /// The same, per sender rank (ranks that sent nothing are absent).
    pub bytes_by_rank: BTreeMap<usize, u64>,
    /// Connections (TCP) or streams (MPI) that ended with a valid end marker.
    pub connections: usize,
    /// Connections or messages turned away at the start (not our protocol, another session
    /// or version).
    pub rejected: usize,
}
