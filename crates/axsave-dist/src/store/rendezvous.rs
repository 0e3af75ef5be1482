//! Coordination helpers on a [`StoreClient`]: a barrier, a byte broadcast, and a failure flag
//! any rank can raise and every rank watches.
//!
//! All keys live under the client's namespace (see [`StoreClient::with_namespace`]):
//! `barrier/<name>/arrived`, `barrier/<name>/done`, `bcast/<key>`, `bcast/<key>/<i>`, and
//! [`FAILURE_KEY`]. Long waits look at the failure flag every [`FAILURE_POLL`], so a rank that
//! reports a failure releases everyone waiting instead of leaving them to their deadline.

use std::time::{Duration, Instant};

use thiserror::Error;

use super::client::{StoreClient, StoreError};
use crate::net::deadline_after;

/// Key of the failure flag (under the client's namespace).
pub const FAILURE_KEY: &str = "failure";

/// How often a long wait checks the failure flag.
pub const FAILURE_POLL: Duration = Duration::from_secs(1);

/// Longest failure message kept in the store; longer ones are cut at a character boundary.
pub const MAX_FAILURE_MESSAGE: usize = 4096;

/// The first failure some rank reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The rank that reported it.
    pub rank: usize,
    /// What it said.
    pub message: String,
}

/// Why a coordination step failed.
#[derive(Debug, Error)]
pub enum CoordError {
    /// The store itself failed (connection lost, limits, ...).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another rank reported a failure while we waited (or before).
    #[error("rank {rank} failed: {message}")]
    PeerFailed {
        /// The rank that failed.
        rank: usize,
        /// Its message.
        message: String,
    },
    /// The deadline passed before the keys appeared: some rank is missing or stuck.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        waited: Duration,
    },
    /// More ranks arrived at a barrier than the world has: the barrier name was reused or
    /// ranks disagree on the world size.
    #[error("{arrived} ranks arrived at barrier {name:?} of a world of {world_size}")]
    BarrierOverrun {
        /// The barrier.
        name: String,
        /// Arrivals counted.
        arrived: i64,
        /// The expected world size.
        world_size: usize,
    },
    /// The failure flag holds something [`report_failure`] did not write.
    #[error("failure record {raw:?} is malformed")]
    BadFailureRecord {
        /// What the store held.
        raw: String,
    },
    /// A broadcast header or its chunks do not fit together (written by something else, or
    /// the same key broadcast twice).
    #[error("broadcast {key:?} is malformed: {detail}")]
    BadBroadcast {
        /// The broadcast key.
        key: String,
        /// What is wrong.
        detail: String,
    },
}

/// Waits until all `keys` exist, giving up early with [`CoordError::PeerFailed`] when some rank
/// reports a failure, and with [`CoordError::Timeout`] at `deadline`.
pub fn wait_watching_failure(
    client: &mut StoreClient,
    keys: &[&str],
    deadline: Instant,
) -> Result<(), CoordError> {
    let started = Instant::now();
    loop {
        if let Some(f) = check_failure(client)? {
            return Err(CoordError::PeerFailed {
                rank: f.rank,
                message: f.message,
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(CoordError::Timeout {
                what: format!("store keys {keys:?}"),
                waited: started.elapsed(),
            });
        }
        let slice_end = deadline.min(now + FAILURE_POLL);
        match client.wait(keys, slice_end) {
            Ok(()) => return Ok(()),
            // Loop: look at the failure flag, then at the deadline.
            Err(StoreError::WaitTimeout { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Blocks until `world_size` ranks have entered the barrier `name` (each name once per run).
pub fn barrier(
    client: &mut StoreClient,
    name: &str,
    world_size: usize,
    deadline: Instant,
) -> Result<(), CoordError> {
    let done = format!("barrier/{name}/done");
    let arrived = client.add(&format!("barrier/{name}/arrived"), 1)?;
    let overrun = || CoordError::BarrierOverrun {
        name: name.to_owned(),
        arrived,
        world_size,
    };
    let count = usize::try_from(arrived).map_err(|_| overrun())?;
    if count > world_size {
        return Err(overrun());
    }
    if count == world_size {
        // The last rank in opens the barrier for everyone.
        client.set(&done, b"1")?;
    }
    wait_watching_failure(client, &[&done], deadline).map_err(|e| match e {
        CoordError::Timeout { waited, .. } => CoordError::Timeout {
            what: format!("barrier {name:?} ({world_size} ranks)"),
            waited,
        },
        other => other,
    })
}

/// Publishes `value` under `key` for [`receive_broadcast`], in chunks of at most the client's
/// `max_value_len` so it fits torch's libuv limit whatever its size. Call on one rank only.
pub fn broadcast_bytes(
    client: &mut StoreClient,
    key: &str,
    value: &[u8],
) -> Result<(), CoordError> {
    let chunk = client.options().max_value_len.max(1);
    let chunks: Vec<&[u8]> = value.chunks(chunk).collect();
    for (i, c) in chunks.iter().enumerate() {
        client.set(&format!("bcast/{key}/{i}"), c)?;
    }
    // The header goes last: once readers see it, every chunk is there.
    let header = format!("{} {}", chunks.len(), value.len());
    client.set(&format!("bcast/{key}"), header.as_bytes())?;
    Ok(())
}

/// Waits (up to `deadline`, watching the failure flag) for a [`broadcast_bytes`] of `key` and
/// returns the value.
pub fn receive_broadcast(
    client: &mut StoreClient,
    key: &str,
    deadline: Instant,
) -> Result<Vec<u8>, CoordError> {
    let header_key = format!("bcast/{key}");
    wait_watching_failure(client, &[&header_key], deadline).map_err(|e| match e {
        CoordError::Timeout { waited, .. } => CoordError::Timeout {
            what: format!("broadcast {key:?}"),
            waited,
        },
        other => other,
    })?;
    let bad = |detail: String| CoordError::BadBroadcast {
        key: key.to_owned(),
        detail,
    };
    let header = client.get(&header_key, deadline)?;
    let text = String::from_utf8_lossy(&header);
    let (n, len) = text
        .split_once(' ')
        .and_then(|(n, len)| Some((n.parse::<usize>().ok()?, len.parse::<usize>().ok()?)))
        .ok_or_else(|| bad(format!("header {text:?}")))?;
    let mut value = Vec::with_capacity(len.min(1 << 20));
    for i in 0..n {
        let c = client.get(&format!("bcast/{key}/{i}"), deadline)?;
        if value.len() + c.len() > len {
            return Err(bad(format!("chunks exceed the announced {len} bytes")));
        }
        value.extend_from_slice(&c);
    }
    if value.len() != len {
        return Err(bad(format!(
            "{} bytes in chunks, header says {len}",
            value.len()
        )));
    }
    Ok(value)
}

/// Raises the failure flag for `rank` unless another rank raised it first, and returns the
/// failure now recorded (ours or the earlier one).
pub fn report_failure(
    client: &mut StoreClient,
    rank: usize,
    message: &str,
) -> Result<Failure, CoordError> {
    let mut cut = message.len().min(MAX_FAILURE_MESSAGE);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let record = format!("{rank}\n{}", &message[..cut]);
    // Empty `expected` on a missing key stores the record; an existing record is kept.
    let now = client.compare_set(FAILURE_KEY, b"", record.as_bytes())?;
    parse_failure(&now)
}

/// The failure recorded so far, if any.
pub fn check_failure(client: &mut StoreClient) -> Result<Option<Failure>, CoordError> {
    if !client.check(&[FAILURE_KEY])? {
        return Ok(None);
    }
    // The key exists, so the WAIT inside get returns at once.
    let deadline = deadline_after(client.options().io_timeout);
    let raw = client.get(FAILURE_KEY, deadline)?;
    parse_failure(&raw).map(Some)
}

fn parse_failure(raw: &[u8]) -> Result<Failure, CoordError> {
    let text = String::from_utf8_lossy(raw);
    let bad = || CoordError::BadFailureRecord {
        raw: text.to_string(),
    };
    let (rank, message) = text.split_once('\n').ok_or_else(bad)?;
    let rank = rank.parse().map_err(|_| bad())?;
    Ok(Failure {
        rank,
        message: message.to_owned(),
    })
}
