//! MPI transport (feature `mpi`): the same data plane as [`tcp`](super::tcp), over MPI
//! point-to-point messages, for jobs started by `mpirun`/`srun --mpi`; plus the few
//! collectives the bootstrap needs (rank 0 broadcasts the address of the store it hosts, so
//! no `MASTER_ADDR` is needed).
//!
//! ```text
//! let ctx = MpiContext::init()?;                       // once per process, every rank
//! let addr = ctx.broadcast(0, (ctx.rank() == 0).then_some(b"10.0.0.1:29500".as_slice()))?;
//! let net = ctx.transport(MpiOptions { session, ..MpiOptions::default() })?;
//! let rx = net.start_receiver(sink, cancel)?;         // writer ranks
//! let mut tx = net.sender(writer_rank)?;               // per worker thread and writer
//! tx.push(file, offset, bytes)?; tx.finish()?;
//! rx.wait(expected_bytes)?;
//! ```
//!
//! # Threads and ownership
//!
//! [`MpiContext::init`] starts one thread, the *progress thread* (`axsave-mpi`). That thread
//! calls `MPI_Init_thread`, so it is MPI's "main thread"; it owns rsmpi's `Universe` and the
//! communicator (both `!Send` handles stay on it), makes **every** MPI call of the process
//! after that, and calls `MPI_Finalize` when the context is dropped. Everything else talks to
//! it through a channel: [`MpiSender`]s hand it finished frames, the [`MpiReceiver`]
//! registers a sink, [`MpiContext::broadcast`] and [`MpiContext::barrier`] queue a
//! collective and wait for its answer. Correctness therefore never depends on
//! `MPI_THREAD_MULTIPLE`: one thread at a time calls MPI, which even `MPI_THREAD_FUNNELED`
//! would allow. We ask for MULTIPLE (or what [`MpiContext::init_with_thread_level`] asks)
//! and require at least SERIALIZED ([`MIN_THREAD_LEVEL`]); the only call made off the
//! progress thread is `MPI_Abort`, and only when the library granted MULTIPLE (otherwise the
//! progress thread makes it). rsmpi's handles never leave the progress thread: the types
//! that hold them there are `!Send` by construction, whatever the MPI library's handle
//! types are. What callers hold ([`MpiContext`], [`MpiTransport`], [`MpiReceiver`],
//! [`MpiSender`]) holds only channels, counters and buffers, and is `Send`.
//!
//! The progress thread never blocks inside MPI. It loops: take commands, start sends
//! (`MPI_Isend`), test the sends in flight (`MPI_Test`), probe for incoming messages
//! (`MPI_Improbe`, any source, any tag, then `MPI_Imrecv` into a buffer sized from the probed
//! count), test the receives in flight, and advance the one collective in progress
//! (`MPI_Ibcast`/`MPI_Ibarrier`). Sends and receives thus progress together, so a rank that
//! is a reader and a writer at once cannot deadlock against a peer doing the same. When an
//! iteration finds nothing to do the thread naps (20 µs growing to 1 ms, woken at once by a
//! command), so an idle context costs next to no CPU.
//!
//! A receiver's sink runs on its own thread (`axsave-mpi-sink`), fed in arrival order, so a
//! slow positioned write does not stall MPI progress; the sink is called from that one
//! thread only.
//!
//! # Wire format
//!
//! All messages travel on a private duplicate of `MPI_COMM_WORLD` (so no other MPI user in
//! the process can match them), as `MPI_UINT8_T` arrays, one message per frame. Integers are
//! little-endian. The sender's rank is the message's MPI source.
//!
//! **Frame** (tag [`DATA_TAG`]): a 40-byte header, the payload, then the run table (after
//! the payload so a sender fills the payload in place and appends the table when the frame
//! closes):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `AXMF` |
//! | 4 | protocol version, [`MPI_PROTOCOL_VERSION`] |
//! | 8 | session ([`MpiOptions::session`]) |
//! | 8 | stream: which [`MpiSender`] of the sending rank |
//! | 4 | file index |
//! | 4 | run count `n`, 1 ..= [`MAX_RUNS_PER_FRAME`] |
//! | 8 | payload length `p`, 1 ..= [`MpiOptions::frame_bytes`] |
//! | p | payload: the runs' bytes back to back in table order |
//! | 12 × n | run table: `u64` offset in the file, `u32` length (≥ 1) |
//!
//! The message must be exactly `40 + p + 12n` bytes and the run lengths must add up to `p`.
//! A frame is at most `40 + frame_bytes + 12 × min(65536, frame_bytes)` bytes, under 2^31
//! for every allowed `frame_bytes` (≤ 1 GiB), so MPI's `int` count always suffices: runs
//! longer than a frame are split over several frames, and a message that would still exceed
//! `i32::MAX` bytes is refused with [`MpiError::TooLarge`] rather than truncated.
//!
//! **End** (tag [`END_TAG`], 40 bytes): magic `AXME`, version, session, stream, then the
//! `u64` payload bytes and the `u64` frames this stream sent. Sent by [`MpiSender::finish`]
//! after the stream's last frame, and only when the stream sent something.
//!
//! The receiver probes with `MPI_ANY_TAG`, so MPI's non-overtaking rule (messages from one
//! sender on one communicator match in the order they were sent, and all of a process's
//! sends are issued by its one progress thread) delivers a stream's frames before its end
//! message; the sink thread handles messages in probe order. The end's totals are checked
//! against what arrived ([`MpiError::CountMismatch`]). A message of another session (a stray
//! from an earlier transfer on this communicator) is dropped and counted in
//! [`ReceiveStats::rejected`](super::ReceiveStats::rejected); any other violation is
//! [`MpiError::Malformed`]. [`ReceiveStats::connections`](super::ReceiveStats::connections)
//! counts the streams that ended.
//!
//! # Flow control, memory, timeouts
//!
//! A transport ([`MpiContext::transport`], all clones of the handle together; one per
//! transfer) has at most [`MpiOptions::max_in_flight`] frames queued for or inside
//! `MPI_Isend`: a sender that closes a frame takes a slot first and blocks (polling cancel
//! and the deadline) while all are taken. On the receiving side at most as many messages are
//! being received or waiting for the sink; the progress thread probes for no more until the
//! sink thread catches up, so a slow sink holds the senders back instead of filling memory.
//! Each live [`MpiSender`] also holds the frame it is filling. Buffers are recycled, so
//! after warm-up no frame is allocated or zeroed again.
//!
//! The send slots bound memory only for messages MPI cannot buffer by itself: a message
//! under the library's eager limit (4 KiB for Open MPI's shared memory, 64 KiB for its TCP
//! path) completes at the sender before any receive is posted, and waits in the receiving
//! process's memory. Keep `frame_bytes` well above that (the default is 1 MiB), and start
//! the receiver before its peers send much.
//!
//! No MPI wait blocks: every wait is a poll that checks the cancel flag and the deadline.
//! *No progress for [`MpiOptions::io_timeout`]* is an error: a sender waiting for a send slot
//! or for its last frames ([`MpiError::Timeout`]), a receiver waiting for bytes or for a
//! stream's end ([`MpiError::Stalled`]). Collectives time out after
//! [`MpiContext::set_collective_timeout`]; since MPI cannot withdraw a started collective,
//! the context then refuses further collectives ([`MpiError::Broken`]) and the caller should
//! [`MpiContext::abort`].
//!
//! Unlike TCP there is no acknowledgement: [`MpiSender::finish`] returning `Ok` means every
//! frame and the end message were handed over to MPI (the requests completed), not that the
//! writer's sink accepted them. Delivery is confirmed by the writer's
//! [`MpiReceiver::wait`] and reported through the store. A receiver that failed keeps
//! receiving and discarding, so its senders finish instead of hanging.
//!
//! A peer that dies is not reported by MPI: in Open MPI's default mode `mpirun` notices the
//! dead process and kills the whole job. [`MpiContext::abort`] is how a rank that cannot
//! recover takes the job down itself.

mod context;
mod error;
mod options;
mod progress;
mod receiver;
mod result;
mod safe;
mod sender;
mod shared;
mod sys;
mod threading;
mod wire;

pub use super::limits::{MAX_FRAME_BYTES, MAX_RUNS_PER_FRAME};
pub use context::MpiContext;
pub use error::MpiError;
/// MPI thread support levels (rsmpi's), for [`MpiContext::init_with_thread_level`].
pub use mpi::Threading;
pub use options::{MAX_IN_FLIGHT, MpiOptions};
pub use receiver::MpiReceiver;
pub use sender::{MpiSender, MpiTransport};
pub use threading::MIN_THREAD_LEVEL;
pub use wire::{DATA_TAG, END_TAG, MAX_BROADCAST_BYTES, MPI_PROTOCOL_VERSION};

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}

    #[test]
    fn handles_can_move_between_threads() {
        // MPI's own handles stay on the progress thread; what callers hold can travel.
        send_sync::<MpiContext>();
        send_sync::<MpiTransport>();
        send_sync::<MpiReceiver>();
        send::<MpiSender>();
        send_sync::<MpiError>();
    }

    #[test]
    fn options_out_of_range_are_refused() {
        let ok = MpiOptions::default();
        ok.validate().unwrap();
        for bad in [
            MpiOptions {
                frame_bytes: 0,
                ..ok.clone()
            },
            MpiOptions {
                frame_bytes: MAX_FRAME_BYTES + 1,
                ..ok.clone()
            },
            MpiOptions {
                io_timeout: Duration::ZERO,
                ..ok.clone()
            },
            MpiOptions {
                max_in_flight: 0,
                ..ok.clone()
            },
            MpiOptions {
                max_in_flight: MAX_IN_FLIGHT + 1,
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(MpiError::InvalidOptions { .. })),
                "{bad:?}"
            );
        }
        MpiOptions {
            frame_bytes: MAX_FRAME_BYTES,
            max_in_flight: MAX_IN_FLIGHT,
            ..ok
        }
        .validate()
        .unwrap();
    }
}
