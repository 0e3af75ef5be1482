//! The sending side: one connection to one writer rank.

use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::net::{self, is_disconnect, is_timeout, poll_interval};
use super::wire::{self, Hello, MAX_RUNS_PER_FRAME, PROTOCOL_VERSION, REPLY_HEADER_LEN, REPLY_OK};
use super::{TcpOptions, TransportError};
use crate::data_plane::error::RunError;
use crate::net::{GaveUp, attempt_timeout, connect_with_backoff};

/// Longest wait between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(250);
/// How long to look for the receiver's reason after it broke the connection: it is either in
/// our receive buffer already or lost.
const LAST_WORDS: Duration = Duration::from_millis(500);

/// One connection from this rank to one writer rank's [`TcpReceiver`](super::TcpReceiver). Several
/// may exist per pair of ranks (one per worker thread).
///
/// Not delivered until [`TcpSender::finish`] returns `Ok`. Dropping a sender without finishing
/// closes the connection, which the receiver reports as this rank having died. After any
/// error the sender is broken and every later call returns the same error.
#[derive(Debug)]
pub struct TcpSender {
    link: Link,
    frame: Frame,
    /// Payload bytes written to the socket.
    sent: u64,
    broken: Option<TransportError>,
}

/// The socket and what is needed to time and cancel calls on it.
#[derive(Debug)]
struct Link {
    stream: TcpStream,
    peer: SocketAddr,
    io_timeout: Duration,
    cancel: Option<Arc<AtomicBool>>,
}

/// The frame being filled.
struct Frame {
    file: u32,
    runs: Vec<(u64, u32)>,
    payload: Vec<u8>,
    limit: usize,
    /// Encoded header and run table, rebuilt for every frame.
    head: Vec<u8>,
}

impl TcpSender {
    /// Connects to the receiver at `addr` as `my_rank`, retrying until
    /// [`TcpOptions::io_timeout`] (a receiver publishes its address only after listening, so
    /// retries only cover a slow start), and exchanges the hello.
    pub fn connect(
        addr: SocketAddr,
        my_rank: usize,
        options: &TcpOptions,
    ) -> Result<TcpSender, TransportError> {
        Self::connect_with_cancel(addr, my_rank, options, None)
    }

    /// [`TcpSender::connect`], with a flag that, once set, makes this sender's calls (this one
    /// included) return [`TransportError::Cancelled`] within a fraction of a second.
    pub fn connect_with_cancel(
        addr: SocketAddr,
        my_rank: usize,
        options: &TcpOptions,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<TcpSender, TransportError> {
        options.validate()?;
        let poll = poll_interval(options.io_timeout);
        let stream = open(addr, options.io_timeout, cancel.as_deref())?;
        let mut link = Link {
            stream,
            peer: addr,
            io_timeout: options.io_timeout,
            cancel,
        };
        net::configure(&link.stream, poll).map_err(|e| link.io(e, "connecting"))?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            flags: 0,
            session: options.session,
            rank: my_rank as u64,
            frame_bytes: options.frame_bytes as u64,
            token: options.token,
        }
        .encode();
        link.write_all(&mut [IoSlice::new(&hello)], "sending the hello")?;
        match link.read_reply("waiting for the hello reply") {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                return Err(TransportError::Rejected { peer: addr, reason });
            }
            // A receiver that does not like our magic closes without a word.
            Err(TransportError::Closed { .. }) => {
                return Err(TransportError::NotTransport {
                    peer: addr,
                    detail: "it closed the connection on our hello".to_owned(),
                });
            }
            Err(e) => return Err(e),
        }
        Ok(TcpSender {
            link,
            frame: Frame {
                file: 0,
                runs: Vec::new(),
                payload: Vec::with_capacity(options.frame_bytes),
                limit: options.frame_bytes,
                head: Vec::new(),
            },
            sent: 0,
            broken: None,
        })
    }

    /// Queues `data` for offset `offset` of file `file`, sending a frame whenever
    /// `frame_bytes` are buffered. Runs larger than a frame are split; a run that continues
    /// the previous one in the same file is merged with it; empty runs are ignored. Whole
    /// frames of a large run are sent straight from `data`, without a copy.
    pub fn push(&mut self, file: u32, offset: u64, data: &[u8]) -> Result<(), TransportError> {
        self.usable()?;
        if data.is_empty() {
            return Ok(());
        }
        if offset.checked_add(data.len() as u64).is_none() {
            // A caller's mistake, caught before anything is queued: the sender stays usable.
            return Err(TransportError::Run(RunError::InvalidRun {
                file,
                offset,
                len: data.len(),
            }));
        }
        let result = self.push_inner(file, offset, data);
        self.note(result)
    }

    /// Sends what is buffered.
    pub fn flush(&mut self) -> Result<(), TransportError> {
        self.usable()?;
        let result = self.send_frame();
        self.note(result)
    }

    /// Flushes, sends the end marker carrying the payload bytes this connection sent, and
    /// waits for the receiver's acknowledgement that every byte was handed to its sink
    /// without error. Returns that byte count. Only then is the data delivered.
    pub fn finish(mut self) -> Result<u64, TransportError> {
        self.usable()?;
        let result = self.finish_inner();
        let _ = self.link.stream.shutdown(Shutdown::Both);
        result
    }

    /// Payload bytes written to the socket so far (not counting what is still buffered).
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }

    /// The receiver's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.link.peer
    }

    fn finish_inner(&mut self) -> Result<u64, TransportError> {
        self.send_frame()?;
        let end = wire::encode_end(self.sent);
        self.link
            .write_all(&mut [IoSlice::new(&end)], "sending the end marker")?;
        match self.link.read_reply("waiting for the acknowledgement")? {
            Ok(()) => Ok(self.sent),
            Err(message) => Err(TransportError::Remote {
                peer: self.link.peer,
                message,
            }),
        }
    }

    fn push_inner(
        &mut self,
        file: u32,
        mut offset: u64,
        mut data: &[u8],
    ) -> Result<(), TransportError> {
        if !self.frame.runs.is_empty() && self.frame.file != file {
            self.send_frame()?;
        }
        while !data.is_empty() {
            if self.frame.runs.is_empty() && data.len() >= self.frame.limit {
                let (now, rest) = data.split_at(self.frame.limit);
                self.send_direct(file, offset, now)?;
                data = rest;
                offset += now.len() as u64;
                continue;
            }
            let n = self.frame.space().min(data.len());
            let (now, rest) = data.split_at(n);
            self.frame.append(file, offset, now);
            data = rest;
            offset += n as u64;
            if self.frame.is_full() {
                self.send_frame()?;
            }
        }
        Ok(())
    }

    /// Sends the buffered frame, if any.
    fn send_frame(&mut self) -> Result<(), TransportError> {
        if self.frame.runs.is_empty() {
            return Ok(());
        }
        let f = &mut self.frame;
        f.head.clear();
        wire::encode_frame_head(&mut f.head, f.file, &f.runs, f.payload.len() as u64);
        self.link.check_receiver()?;
        self.link.write_all(
            &mut [IoSlice::new(&f.head), IoSlice::new(&f.payload)],
            "sending a frame",
        )?;
        self.sent += f.payload.len() as u64;
        f.runs.clear();
        f.payload.clear();
        Ok(())
    }

    /// Sends one frame holding one run taken straight from the caller's buffer.
    fn send_direct(&mut self, file: u32, offset: u64, data: &[u8]) -> Result<(), TransportError> {
        let f = &mut self.frame;
        f.head.clear();
        // `data` is at most `frame_bytes` ≤ MAX_FRAME_BYTES < 2^32.
        wire::encode_frame_head(
            &mut f.head,
            file,
            &[(offset, data.len() as u32)],
            data.len() as u64,
        );
        self.link.check_receiver()?;
        self.link.write_all(
            &mut [IoSlice::new(&f.head), IoSlice::new(data)],
            "sending a frame",
        )?;
        self.sent += data.len() as u64;
        Ok(())
    }

    fn usable(&self) -> Result<(), TransportError> {
        match &self.broken {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Marks the sender broken on error: the stream may hold half a frame.
    fn note(&mut self, result: Result<(), TransportError>) -> Result<(), TransportError> {
        if let Err(e) = &result {
            self.broken = Some(e.clone());
            let _ = self.link.stream.shutdown(Shutdown::Both);
        }
        result
    }
}

impl std::fmt::Debug for Frame {
    // Not derived: the payload may be a megabyte of bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("file", &self.file)
            .field("runs", &self.runs.len())
            .field("buffered", &self.payload.len())
            .field("limit", &self.limit)
            .finish()
    }
}

impl Frame {
    fn space(&self) -> usize {
        self.limit - self.payload.len()
    }

    fn is_full(&self) -> bool {
        self.payload.len() >= self.limit || self.runs.len() >= MAX_RUNS_PER_FRAME
    }

    /// Adds a run; the caller has flushed a frame of another file and checked the space.
    fn append(&mut self, file: u32, offset: u64, data: &[u8]) {
        self.file = file;
        // Fits: the frame holds at most `limit` ≤ MAX_FRAME_BYTES < 2^32 bytes.
        let len = data.len() as u32;
        match self.runs.last_mut() {
            Some((o, l)) if *o + u64::from(*l) == offset => *l += len,
            _ => self.runs.push((offset, len)),
        }
        self.payload.extend_from_slice(data);
    }
}

impl Link {
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    }

    /// Writes every byte of `bufs`; fails after `io_timeout` without progress.
    fn write_all(
        &mut self,
        mut bufs: &mut [IoSlice<'_>],
        during: &'static str,
    ) -> Result<(), TransportError> {
        let mut last = Instant::now();
        while bufs.iter().any(|b| !b.is_empty()) {
            if self.cancelled() {
                return Err(TransportError::Cancelled);
            }
            match self.stream.write_vectored(bufs) {
                Ok(0) => return Err(self.broken_off(during)),
                Ok(n) => {
                    IoSlice::advance_slices(&mut bufs, n);
                    last = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    if last.elapsed() >= self.io_timeout {
                        return Err(self.timeout(during));
                    }
                }
                Err(e) if is_disconnect(&e) => return Err(self.broken_off(during)),
                Err(e) => return Err(self.io(e, during)),
            }
        }
        Ok(())
    }

    /// Before each frame: has the receiver sent anything? It only speaks early to refuse our
    /// data (its sink failed, or it found the data wrong), and then discards the rest, so
    /// stop at once and report its reason.
    fn check_receiver(&mut self) -> Result<(), TransportError> {
        let during = "sending a frame";
        self.stream
            .set_nonblocking(true)
            .map_err(|e| self.io(e, during))?;
        let mut b = [0u8; 1];
        let peeked = self.stream.peek(&mut b);
        self.stream
            .set_nonblocking(false)
            .map_err(|e| self.io(e, during))?;
        match peeked {
            Ok(0) => Err(TransportError::Closed {
                peer: self.peer,
                during,
            }),
            Ok(_) => Err(self.early_reply(during)),
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(e) if is_disconnect(&e) => Err(TransportError::Closed {
                peer: self.peer,
                during,
            }),
            Err(e) => Err(self.io(e, during)),
        }
    }

    /// The receiver spoke out of turn: read its reason.
    fn early_reply(&mut self, during: &'static str) -> TransportError {
        match self.read_reply(during) {
            Ok(Err(message)) => TransportError::Remote {
                peer: self.peer,
                message,
            },
            Ok(Ok(())) => TransportError::NotTransport {
                peer: self.peer,
                detail: "an acknowledgement arrived before the end marker".to_owned(),
            },
            Err(e) => e,
        }
    }

    /// After the receiver broke the connection: its reason if it left one, else `Closed`.
    fn broken_off(&mut self, during: &'static str) -> TransportError {
        let closed = TransportError::Closed {
            peer: self.peer,
            during,
        };
        let saved = self.io_timeout;
        self.io_timeout = LAST_WORDS.min(saved);
        let words = self.read_reply(during);
        self.io_timeout = saved;
        match words {
            Ok(Err(message)) => TransportError::Remote {
                peer: self.peer,
                message,
            },
            _ => closed,
        }
    }

    /// Reads one reply: `Ok(Ok(()))` for OK, `Ok(Err(message))` for an error reply.
    fn read_reply(&mut self, during: &'static str) -> Result<Result<(), String>, TransportError> {
        let mut h = [0u8; REPLY_HEADER_LEN];
        self.read_full(&mut h, during)?;
        let (code, len) =
            wire::decode_reply_header(&h).map_err(|detail| TransportError::NotTransport {
                peer: self.peer,
                detail,
            })?;
        let mut message = vec![0u8; len];
        self.read_full(&mut message, during)?;
        if code == REPLY_OK {
            Ok(Ok(()))
        } else {
            Ok(Err(String::from_utf8_lossy(&message).into_owned()))
        }
    }

    fn read_full(&mut self, buf: &mut [u8], during: &'static str) -> Result<(), TransportError> {
        let mut got = 0;
        let mut last = Instant::now();
        while got < buf.len() {
            if self.cancelled() {
                return Err(TransportError::Cancelled);
            }
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(TransportError::Closed {
                        peer: self.peer,
                        during,
                    });
                }
                Ok(n) => {
                    got += n;
                    last = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    if last.elapsed() >= self.io_timeout {
                        return Err(self.timeout(during));
                    }
                }
                Err(e) if is_disconnect(&e) => {
                    return Err(TransportError::Closed {
                        peer: self.peer,
                        during,
                    });
                }
                Err(e) => return Err(self.io(e, during)),
            }
        }
        Ok(())
    }

    fn timeout(&self, during: &'static str) -> TransportError {
        TransportError::Timeout {
            peer: self.peer,
            during,
            timeout: self.io_timeout,
        }
    }

    fn io(&self, e: io::Error, during: &'static str) -> TransportError {
        TransportError::Io {
            peer: self.peer,
            during,
            source: Arc::new(e),
        }
    }
}

/// Connects with retry and backoff until `timeout`.
fn open(
    addr: SocketAddr,
    timeout: Duration,
    cancel: Option<&AtomicBool>,
) -> Result<TcpStream, TransportError> {
    connect_with_backoff(timeout, MAX_BACKOFF, cancel, |deadline| {
        TcpStream::connect_timeout(&addr, attempt_timeout(deadline)).map_err(|e| e.to_string())
    })
    .map_err(|gave_up| match gave_up {
        GaveUp::Cancelled => TransportError::Cancelled,
        GaveUp::TimedOut { waited, last_error } => TransportError::Connect {
            addr,
            waited,
            last_error,
        },
    })
}
