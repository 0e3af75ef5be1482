//! The sending side: [`MpiTransport`] (the shared handle) and [`MpiSender`] (one stream to
//! one writer rank).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::{Duration, Instant};

use super::error::MpiError;
use super::options::MpiOptions;
use super::receiver::{MpiReceiver, RecvShared};
use super::shared::{Command, CtxShared, Outgoing, POLL, Receiving, SendCompletions};
use super::wire::{self, DATA_TAG, END_TAG, Framer};
use crate::data_plane::SharedSink;
use crate::data_plane::error::RunError;

/// A handle on the MPI data plane of one transfer, from
/// [`MpiContext::transport`](super::MpiContext::transport). Cheap to clone, `Send` and `Sync`: each worker thread
/// makes its own [`MpiSender`]s from it. Every clone shares one budget of
/// [`MpiOptions::max_in_flight`] frames.
#[derive(Clone)]
pub struct MpiTransport {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Arc<CtxShared>,
    options: MpiOptions,
    send: Arc<SendShared>,
}

impl std::fmt::Debug for MpiTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiTransport")
            .field("rank", &self.inner.ctx.rank)
            .field("size", &self.inner.ctx.size)
            .field("options", &self.inner.options)
            .finish()
    }
}

impl MpiTransport {
    pub(crate) fn new(ctx: Arc<CtxShared>, options: MpiOptions) -> MpiTransport {
        let send = Arc::new(SendShared {
            book: Mutex::new(Book {
                free: options.max_in_flight,
                in_flight: 0,
                streams: HashMap::new(),
                last_completion: Instant::now(),
            }),
            changed: Condvar::new(),
            pool: Mutex::new(Vec::new()),
            pool_max: options.max_in_flight,
            buf_capacity: wire::max_frame_message(options.frame_bytes),
        });
        MpiTransport {
            inner: Arc::new(Inner { ctx, options, send }),
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.inner.ctx.rank
    }

    /// The number of processes.
    pub fn size(&self) -> usize {
        self.inner.ctx.size
    }

    /// The options every sender and receiver of this handle uses.
    pub fn options(&self) -> &MpiOptions {
        &self.inner.options
    }

    /// A new stream to rank `dest` (this rank included: MPI delivers to itself).
    pub fn sender(&self, dest: usize) -> Result<MpiSender, MpiError> {
        self.sender_with_cancel(dest, None)
    }

    /// [`MpiTransport::sender`], with a flag that, once set, makes the sender's calls return
    /// [`MpiError::Cancelled`] within a fraction of a second.
    pub fn sender_with_cancel(
        &self,
        dest: usize,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<MpiSender, MpiError> {
        let ctx = &self.inner.ctx;
        ctx.check_rank(dest, "destination rank")?;
        if ctx.is_gone() {
            return Err(MpiError::Gone);
        }
        let stream = ctx.next_stream.fetch_add(1, Ordering::Relaxed);
        self.inner
            .send
            .book()
            .streams
            .insert(stream, Stream::default());
        let o = &self.inner.options;
        Ok(MpiSender {
            inner: Arc::clone(&self.inner),
            dest,
            stream,
            cancel,
            framer: Framer::new(o.session, stream, o.frame_bytes, self.inner.send.take_buf()),
            broken: None,
        })
    }

    /// Starts receiving: from now on messages addressed to this rank go to `sink` (on a
    /// thread of the receiver's own), until the receiver is shut down or dropped. One
    /// receiver per context at a time. Setting `cancel` makes [`MpiReceiver::wait`] return
    /// [`MpiError::Cancelled`] and stops the sink calls.
    pub fn start_receiver(
        &self,
        sink: SharedSink,
        cancel: Arc<AtomicBool>,
    ) -> Result<MpiReceiver, MpiError> {
        let ctx = &self.inner.ctx;
        if ctx
            .receiving
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(MpiError::AlreadyReceiving);
        }
        let shared = Arc::new(RecvShared::new(self.inner.options.clone(), sink, cancel));
        let (tx, rx) = mpsc::channel();
        let receiver = match MpiReceiver::spawn(Arc::clone(ctx), Arc::clone(&shared), rx) {
            Ok(r) => r,
            Err(e) => {
                ctx.receiving.store(false, Ordering::SeqCst);
                return Err(e);
            }
        };
        // On failure the receiver's drop ends its thread and clears `receiving`.
        ctx.send(Command::StartReceiving(Receiving {
            shared,
            deliveries: tx,
        }))?;
        Ok(receiver)
    }

    /// Waits until every message any sender of this handle gave to MPI was sent (the
    /// requests completed), for at most `timeout`. Before dropping the context, this lets
    /// MPI finalize with nothing pending even after senders failed or were dropped.
    pub fn wait_idle(&self, timeout: Duration) -> Result<(), MpiError> {
        let send = &self.inner.send;
        let start = Instant::now();
        let mut book = send.book();
        while book.in_flight > 0 {
            if self.inner.ctx.is_gone() {
                return Err(MpiError::Gone);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(MpiError::Timeout {
                    dest: None,
                    during: "waiting for every send to complete",
                    timeout,
                });
            }
            book = send.wait(book, left.min(POLL));
        }
        Ok(())
    }

    /// Sends `bytes` as one message with `tag` to `dest`, outside any stream, and waits
    /// until it was sent. For tests that need a peer which breaks the protocol.
    #[doc(hidden)]
    pub fn send_raw(&self, dest: usize, tag: i32, bytes: Vec<u8>) -> Result<(), MpiError> {
        let s = self.sender(dest)?;
        let r = s.submit(tag, bytes, "sending a raw message").and_then(|b| {
            s.inner.send.recycle(b);
            s.wait_sent("waiting for a raw message to be sent")
        });
        drop(s);
        r
    }
}

/// Send-side bookkeeping shared by the senders of a transport and the progress thread.
pub(crate) struct SendShared {
    book: Mutex<Book>,
    changed: Condvar,
    /// Empty frame buffers for reuse.
    pool: Mutex<Vec<Vec<u8>>>,
    pool_max: usize,
    buf_capacity: usize,
}

struct Book {
    /// Send slots not taken.
    free: usize,
    /// Messages handed to the progress thread and not completed.
    in_flight: usize,
    streams: HashMap<u64, Stream>,
    /// When a send last completed: the measure of progress.
    last_completion: Instant,
}

#[derive(Default)]
struct Stream {
    outstanding: usize,
    error: Option<MpiError>,
    /// Its sender was dropped; forget the stream when its last send completes.
    dropped: bool,
}

impl SendShared {
    fn book(&self) -> MutexGuard<'_, Book> {
        // Every mutation completes under the lock, so a panic elsewhere leaves it consistent.
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Book>, d: Duration) -> MutexGuard<'a, Book> {
        self.changed
            .wait_timeout(g, d)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    fn take_buf(&self) -> Vec<u8> {
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.buf_capacity))
    }

    fn recycle(&self, mut buf: Vec<u8>) {
        if buf.capacity() < self.buf_capacity {
            return;
        }
        buf.clear();
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < self.pool_max {
            pool.push(buf);
        }
    }
}

impl SendCompletions for SendShared {
    /// Called by the progress thread when a send of `stream` completed (with its buffer) or
    /// failed.
    fn completed(&self, stream: u64, result: Result<Option<Vec<u8>>, MpiError>) {
        let buf = {
            let mut book = self.book();
            book.free += 1;
            book.in_flight = book.in_flight.saturating_sub(1);
            book.last_completion = Instant::now();
            let mut forget = false;
            if let Some(s) = book.streams.get_mut(&stream) {
                s.outstanding = s.outstanding.saturating_sub(1);
                if let Err(e) = &result {
                    s.error.get_or_insert_with(|| e.clone());
                }
                forget = s.dropped && s.outstanding == 0;
            }
            if forget {
                book.streams.remove(&stream);
            }
            result.ok().flatten()
        };
        self.changed.notify_all();
        if let Some(b) = buf {
            self.recycle(b);
        }
    }
}

/// One stream from this rank to one writer rank: frames runs and hands them to the progress
/// thread. `Send`, not shared: each worker thread has its own (several may exist per pair
/// of ranks).
///
/// Not delivered until the writer's [`MpiReceiver::wait`] says so; [`MpiSender::finish`]
/// means every message was handed over to MPI. Dropping a sender without finishing still
/// sends the frames already closed but no end message, so the writer's `wait` fails
/// ([`MpiError::Stalled`] naming this rank). After an error the sender is broken and every
/// later call returns the same error.
pub struct MpiSender {
    inner: Arc<Inner>,
    dest: usize,
    stream: u64,
    cancel: Option<Arc<AtomicBool>>,
    framer: Framer,
    broken: Option<MpiError>,
}

impl std::fmt::Debug for MpiSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiSender")
            .field("dest", &self.dest)
            .field("stream", &self.stream)
            .field("bytes_sent", &self.framer.bytes())
            .field("broken", &self.broken)
            .finish()
    }
}

impl MpiSender {
    /// The destination rank.
    pub fn dest(&self) -> usize {
        self.dest
    }

    /// Payload bytes handed to MPI so far (not counting the frame being filled).
    pub fn bytes_sent(&self) -> u64 {
        self.framer.bytes()
    }

    /// Queues `data` for offset `offset` of file `file`, handing a frame to MPI whenever
    /// `frame_bytes` are buffered (blocking while [`MpiOptions::max_in_flight`] frames are
    /// in flight). Runs larger than a frame are split; a run that continues the previous one
    /// in the same file is merged with it; empty runs are ignored. `data` is copied: the
    /// caller may reuse it as soon as this returns.
    pub fn push(&mut self, file: u32, offset: u64, data: &[u8]) -> Result<(), MpiError> {
        self.usable()?;
        if offset.checked_add(data.len() as u64).is_none() {
            // A caller's mistake, caught before anything is queued: the sender stays usable.
            return Err(MpiError::Run(RunError::InvalidRun {
                file,
                offset,
                len: data.len(),
            }));
        }
        let mut framer = std::mem::replace(&mut self.framer, Framer::new(0, 0, 1, Vec::new()));
        let r = framer.push(file, offset, data, &mut |m| {
            self.submit(DATA_TAG, m, "waiting for a free send slot")
        });
        self.framer = framer;
        self.note(r)
    }

    /// Hands the frame being filled to MPI.
    pub fn flush(&mut self) -> Result<(), MpiError> {
        self.usable()?;
        let r = self.close_frame();
        self.note(r)
    }

    /// Flushes, sends the end message (payload bytes and frame count of this stream) when
    /// anything was sent, and waits until every message of the stream was sent (the MPI
    /// requests completed). Returns the payload bytes sent.
    pub fn finish(mut self) -> Result<u64, MpiError> {
        self.usable()?;
        let r = self.finish_inner();
        self.note(r.as_ref().map(|_| ()).map_err(Clone::clone))?;
        r
    }

    fn finish_inner(&mut self) -> Result<u64, MpiError> {
        self.close_frame()?;
        let bytes = self.framer.bytes();
        if bytes == 0 {
            return Ok(0);
        }
        // Issued after the frames by the one progress thread, so MPI delivers it after them.
        let end = self.framer.end_message();
        self.submit(END_TAG, end, "waiting for a free send slot")?;
        self.wait_sent("waiting for its last messages to be sent")?;
        Ok(bytes)
    }

    fn close_frame(&mut self) -> Result<(), MpiError> {
        let mut framer = std::mem::replace(&mut self.framer, Framer::new(0, 0, 1, Vec::new()));
        let r = framer.close(&mut |m| self.submit(DATA_TAG, m, "waiting for a free send slot"));
        self.framer = framer;
        r
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    }

    /// Takes a send slot (waiting while none is free), hands `message` to the progress
    /// thread, and returns an empty buffer for the next frame.
    fn submit(
        &self,
        tag: i32,
        message: Vec<u8>,
        during: &'static str,
    ) -> Result<Vec<u8>, MpiError> {
        let send = &self.inner.send;
        let timeout = self.inner.options.io_timeout;
        let start = Instant::now();
        let mut book = send.book();
        loop {
            if self.cancelled() {
                return Err(MpiError::Cancelled);
            }
            if self.inner.ctx.is_gone() {
                return Err(MpiError::Gone);
            }
            if let Some(e) = book.streams.get(&self.stream).and_then(|s| s.error.clone()) {
                return Err(e);
            }
            if book.free > 0 {
                break;
            }
            let idle = start.elapsed().min(book.last_completion.elapsed());
            if idle >= timeout {
                return Err(MpiError::Timeout {
                    dest: Some(self.dest),
                    during,
                    timeout,
                });
            }
            book = send.wait(book, POLL.min(timeout - idle));
        }
        book.free -= 1;
        book.in_flight += 1;
        if let Some(s) = book.streams.get_mut(&self.stream) {
            s.outstanding += 1;
        }
        drop(book);
        let sent = self.inner.ctx.send(Command::Send(Outgoing {
            dest: self.dest,
            tag,
            buf: message,
            stream: self.stream,
            book: Arc::clone(send) as Arc<dyn SendCompletions>,
        }));
        if let Err(e) = sent {
            // Never reached MPI: give the slot back.
            send.completed(self.stream, Err(e.clone()));
            return Err(e);
        }
        Ok(send.take_buf())
    }

    /// Waits until no message of this stream is in flight.
    fn wait_sent(&self, during: &'static str) -> Result<(), MpiError> {
        let send = &self.inner.send;
        let timeout = self.inner.options.io_timeout;
        let start = Instant::now();
        let mut book = send.book();
        loop {
            let Some(s) = book.streams.get(&self.stream) else {
                return Ok(());
            };
            if let Some(e) = &s.error {
                return Err(e.clone());
            }
            if s.outstanding == 0 {
                return Ok(());
            }
            if self.cancelled() {
                return Err(MpiError::Cancelled);
            }
            if self.inner.ctx.is_gone() {
                return Err(MpiError::Gone);
            }
            let idle = start.elapsed().min(book.last_completion.elapsed());
            if idle >= timeout {
                return Err(MpiError::Timeout {
                    dest: Some(self.dest),
                    during,
                    timeout,
                });
            }
            book = send.wait(book, POLL.min(timeout - idle));
        }
    }

    fn usable(&self) -> Result<(), MpiError> {
        match &self.broken {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn note(&mut self, r: Result<(), MpiError>) -> Result<(), MpiError> {
        if let Err(e) = &r {
            self.broken = Some(e.clone());
        }
        r
    }
}

impl Drop for MpiSender {
    fn drop(&mut self) {
        let framer = std::mem::replace(&mut self.framer, Framer::new(0, 0, 1, Vec::new()));
        let send = &self.inner.send;
        send.recycle(framer.into_buf());
        let mut book = send.book();
        let forget = match book.streams.get_mut(&self.stream) {
            Some(s) if s.outstanding > 0 => {
                s.dropped = true;
                false
            }
            Some(_) => true,
            None => false,
        };
        if forget {
            book.streams.remove(&self.stream);
        }
    }
}
