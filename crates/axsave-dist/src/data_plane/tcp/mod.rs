//! TCP transport: blocking `std::net` sockets, one thread per accepted connection.
//!
//! A writer rank runs one [`TcpReceiver`]: it listens, publishes [`TcpReceiver::local_addr`] in the
//! store, [`starts`](TcpReceiver::start) serving with a *sink* that performs positioned writes, and
//! [`waits`](TcpReceiver::wait) until every byte the plan sends it has been written. A reading rank
//! opens a [`TcpSender`] to each writer it has data for (several per writer when several worker
//! threads send), [`pushes`](TcpSender::push) runs, and [`finishes`](TcpSender::finish): only the
//! receiver's acknowledgement, which comes after its sink handled every byte, means delivered.
//!
//! # Wire format
//!
//! Every integer is little-endian. The sender speaks first and streams; the receiver answers
//! exactly twice: once after the hello, once after the end marker (or once, early, in place of
//! the final answer when something failed).
//!
//! **Hello** (sender → receiver, 72 bytes, first on the connection):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `AXSVTCP\0` |
//! | 4 | protocol version, [`PROTOCOL_VERSION`] |
//! | 4 | flags, must be 0 |
//! | 8 | session token ([`TcpOptions::session`]) |
//! | 8 | sender rank |
//! | 8 | the sender's [`TcpOptions::frame_bytes`]: no frame payload will exceed it |
//! | 32 | job token ([`TcpOptions::token`]), compared in constant time |
//!
//! A wrong magic closes the connection without an answer (whatever connected does not speak
//! this protocol). A wrong version, session, job token or flags, or a frame size above the receiver's
//! own, gets an error reply, then the connection is closed. Either way the connection counts
//! as rejected ([`ReceiveStats::rejected`]) and nothing else: a stray connection never fails
//! the run. Otherwise the receiver answers OK and the sender may stream.
//!
//! **Frame** (sender → receiver, any number):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `AXFR` |
//! | 4 | file index |
//! | 4 | run count `n`, 1 ..= [`MAX_RUNS_PER_FRAME`] |
//! | 8 | payload length `p`, 1 ..= the frame size announced in the hello |
//! | 12 × n | run table: `u64` offset in the file, `u32` length (≥ 1) |
//! | p | payload: the runs' bytes, back to back in table order |
//!
//! The lengths in the table must add up to `p`, and no run may end past `u64::MAX`. All runs
//! of a frame belong to the same file.
//!
//! **End** (sender → receiver, last, 12 bytes): magic `AXEN`, then the `u64` total of payload
//! bytes this connection sent. The receiver checks it against what it received.
//!
//! **Reply** (receiver → sender): magic `AXRP`, a `u8` code (0 OK, 1 error), a `u32` message
//! length (at most 4 KiB) and the UTF-8 message (empty for OK). After the end marker an OK
//! reply means every byte of the connection was handed to the sink, which returned success.
//! When a frame fails (malformed, the sink failed, more bytes than expected) the receiver sends
//! the error reply at once, stops writing, and discards whatever else arrives, so the sender
//! learns the reason at its next frame or at [`TcpSender::finish`] rather than from a reset.
//!
//! # Timeouts, failures, cancellation
//!
//! Sockets use short read/write timeouts and loop, so a blocked call notices a cancel flag and
//! measures progress. *No progress for [`TcpOptions::io_timeout`]* is an error:
//! * on a [`TcpSender`], when a write makes no headway (the receiver stopped reading) or a reply
//!   does not come;
//! * on a receiving connection, when a message stops arriving half way (the sender hangs);
//! * in [`TcpReceiver::wait`], when no byte arrived on any connection while data is still missing
//!   or a connection is still open (checked a little later than the above, so that a
//!   connection's own, more precise error wins). Between messages a connection may be idle (its sender is
//!   busy elsewhere), so executors whose senders may legitimately go quiet longer than that
//!   must raise `io_timeout`.
//!
//! A peer process that dies closes its sockets, which the other side sees at once: a receiver
//! reports [`TransportError::SenderDied`] naming the rank, a sender [`TransportError::Closed`].
//! A [`TcpSender`] dropped without [`TcpSender::finish`] looks exactly like a dead sender.
//!
//! # Memory and throughput
//!
//! A sender buffers at most one frame (`frame_bytes` of payload plus its table); a run that
//! fills whole frames by itself is sent straight from the caller's slice without a copy. A
//! receiving connection holds at most one frame, sized by what actually arrives, and every
//! length read from the wire is checked against the limits before anything is allocated.
//! Header, table and payload go out in one vectored write; `TCP_NODELAY` is set so the last
//! frame and the replies are not held back. Socket buffer sizes are left to the kernel's
//! autotuning (std cannot set them; on Linux autotuning reaches several MiB).
//!
//! Vectored writes use `writev`, which raises `SIGPIPE` on a closed connection unless the
//! signal is ignored; Rust binaries ignore it before `main`, so this matters only to hosts that
//! embed the library in a non-Rust process.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::error::RunError;

mod net;
mod receiver;
mod sender;
mod wire;

pub use super::limits::{MAX_FRAME_BYTES, MAX_RUNS_PER_FRAME};
pub use super::stats::ReceiveStats;
pub use receiver::TcpReceiver;
pub use sender::TcpSender;
pub use wire::{PROTOCOL_VERSION, TOKEN_LEN};

/// Options of one transfer, identical on every rank of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpOptions {
    /// A token every rank of one run shares (from the rendezvous). Connections that present
    /// another one are rejected, so a leftover sender of an earlier run cannot write into this
    /// run's files.
    pub session: u64,
    /// Proof of membership: a random secret rank 0 (or the launcher) gave every rank through
    /// a private channel (`axsave launch`'s environment, an MPI broadcast). A connection
    /// without it is turned away, so a process that can reach the port but is not part of the
    /// job cannot write into the output.
    pub token: [u8; TOKEN_LEN],
    /// Largest frame payload a sender buffers before sending, and the largest a receiver
    /// accepts. Bounds memory on both sides; 1 ..= [`MAX_FRAME_BYTES`].
    pub frame_bytes: usize,
    /// No progress on a socket for this long means the peer is dead or hung: an error instead
    /// of a hang. Also bounds how long [`TcpSender::connect`] retries.
    pub io_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            session: 0,
            token: [0; TOKEN_LEN],
            frame_bytes: 1024 * 1024,
            io_timeout: Duration::from_secs(60),
        }
    }
}

impl TcpOptions {
    /// Checks that the options are usable; every constructor calls it.
    pub fn validate(&self) -> Result<(), TransportError> {
        if self.frame_bytes == 0 || self.frame_bytes > MAX_FRAME_BYTES {
            return Err(TransportError::InvalidOptions {
                detail: format!(
                    "frame_bytes is {}, it must be 1 ..= {MAX_FRAME_BYTES}",
                    self.frame_bytes
                ),
            });
        }
        if self.io_timeout < net::MIN_TIMEOUT {
            return Err(TransportError::InvalidOptions {
                detail: format!(
                    "io_timeout is {:?}, it must be at least {:?}",
                    self.io_timeout,
                    net::MIN_TIMEOUT
                ),
            });
        }
        Ok(())
    }
}

/// Why a transfer failed.
///
/// Cloneable so that the first failure a receiver records can be returned by every
/// [`TcpReceiver::wait`] call and a broken [`TcpSender`] can repeat its error.
#[derive(Debug, Clone, Error)]
pub enum TransportError {
    /// [`TcpOptions`] out of range.
    #[error("invalid TCP transport options: {detail}")]
    InvalidOptions {
        /// What is wrong.
        detail: String,
    },
    /// Binding or configuring the listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: Arc<io::Error>,
    },
    /// A transport thread could not be started (out of threads or memory).
    #[error("cannot start a transport thread: {source}")]
    Spawn {
        /// The error.
        source: Arc<io::Error>,
    },
    /// [`TcpReceiver::start`] was called twice.
    #[error("the transport receiver was already started")]
    AlreadyStarted,
    /// [`TcpReceiver::wait`] was called before [`TcpReceiver::start`].
    #[error("the transport receiver was not started")]
    NotStarted,
    /// No connection could be made within [`TcpOptions::io_timeout`]: nothing listens there,
    /// the host is unreachable, or a firewall drops the packets.
    #[error("could not connect to the receiver at {addr} within {waited:?}: {last_error}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// How long we tried.
        waited: Duration,
        /// The last failure seen.
        last_error: String,
    },
    /// The receiver refused the hello: another session or protocol version, or a frame size
    /// above its limit (the ranks disagree on their options).
    #[error("the receiver at {peer} rejected the connection: {reason}")]
    Rejected {
        /// The receiver's address.
        peer: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// What answered at that address is not an axsave transport receiver.
    #[error("the peer at {peer} does not speak axsave's TCP transport: {detail}")]
    NotTransport {
        /// The address.
        peer: SocketAddr,
        /// What was wrong.
        detail: String,
    },
    /// The receiver closed the connection without telling why: its process died, or it shut
    /// down or was cancelled.
    #[error("the receiver at {peer} closed the connection while {during} (it died or gave up)")]
    Closed {
        /// The receiver's address.
        peer: SocketAddr,
        /// What the sender was doing.
        during: &'static str,
    },
    /// The receiver reported a failure in place of an acknowledgement (its sink failed, it
    /// got more bytes than expected, or it found our data malformed).
    #[error("the receiver at {peer} reported an error: {message}")]
    Remote {
        /// The receiver's address.
        peer: SocketAddr,
        /// Its message.
        message: String,
    },
    /// No progress on the connection for [`TcpOptions::io_timeout`]: the receiver is hung
    /// (not reading) or unreachable.
    #[error(
        "no progress with the receiver at {peer} for {timeout:?} while {during}: it is hung or unreachable"
    )]
    Timeout {
        /// The receiver's address.
        peer: SocketAddr,
        /// What the sender was doing.
        during: &'static str,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// Another socket error.
    #[error("I/O error with {peer} while {during}: {source}")]
    Io {
        /// The peer's address.
        peer: SocketAddr,
        /// What was going on.
        during: &'static str,
        /// The error.
        source: Arc<io::Error>,
    },
    /// The cancel flag was set (by another part of this process, usually because another
    /// rank or thread failed).
    #[error("the transfer was cancelled")]
    Cancelled,
    /// A run could not be queued or delivered (the failures both transports share).
    #[error(transparent)]
    Run(#[from] RunError),
    /// A sender closed its connection without the end marker: its process died, or it
    /// dropped its [`TcpSender`] without finishing.
    #[error("sender rank {rank} ({peer}) {detail}: it died or gave up")]
    SenderDied {
        /// The sender's rank.
        rank: usize,
        /// Its address.
        peer: SocketAddr,
        /// What happened.
        detail: String,
    },
    /// A sender stopped in the middle of a message for [`TcpOptions::io_timeout`]: it is hung
    /// or unreachable.
    #[error(
        "sender rank {rank} ({peer}) sent nothing for {timeout:?} in the middle of a message: it is hung or unreachable"
    )]
    SenderHung {
        /// The sender's rank.
        rank: usize,
        /// Its address.
        peer: SocketAddr,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// A sender that passed the hello then sent something the protocol does not allow.
    #[error("malformed data from sender rank {rank} ({peer}): {detail}")]
    Malformed {
        /// The sender's rank.
        rank: usize,
        /// Its address.
        peer: SocketAddr,
        /// What was wrong.
        detail: String,
    },
    /// A sender's end marker announced a different byte total than arrived on its
    /// connection.
    #[error(
        "sender rank {rank} ({peer}) announced {announced} bytes at its end but {received} arrived"
    )]
    CountMismatch {
        /// The sender's rank.
        rank: usize,
        /// Its address.
        peer: SocketAddr,
        /// The total in the end marker.
        announced: u64,
        /// What this connection delivered.
        received: u64,
    },
    /// Nothing arrived on any connection for [`TcpOptions::io_timeout`] while bytes were
    /// still missing or connections still open: a sender is hung, died before connecting, or
    /// never got its share of the plan.
    #[error(
        "nothing arrived for {idle:?}: {received} of {expected} bytes received; sender ranks with unfinished connections: {open:?}"
    )]
    Stalled {
        /// How long nothing arrived.
        idle: Duration,
        /// Bytes received so far.
        received: u64,
        /// Bytes expected.
        expected: u64,
        /// Ranks of the connections that are open and not finished (one entry per
        /// connection).
        open: Vec<usize>,
    },
}
