//! The receiving side: a listener, an accept thread, one thread per connection.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::net::{self, is_disconnect, is_timeout, poll_interval};
use super::wire::{
    self, END_LEN, END_MAGIC, FRAME_HEADER_LEN, FRAME_MAGIC, FrameHeader, HELLO_LEN, Hello,
};
use super::{ReceiveStats, TcpOptions, TransportError};
use crate::data_plane::clock::ProgressClock;
use crate::data_plane::error::RunError;
use crate::data_plane::sink::{SharedSink, deliver};
use crate::net::deadline_after;

/// Most simultaneous connections; further ones are closed at once. A run needs one per
/// sending worker thread per peer; this only stops a flood of strays from spawning threads
/// without end.
const MAX_CONNECTIONS: usize = 4096;

/// The receiving side of the transport, one per writer rank. Dropping it shuts it down.
pub struct TcpReceiver {
    addr: SocketAddr,
    options: TcpOptions,
    /// Until [`TcpReceiver::start`] takes it.
    listener: Option<TcpListener>,
    /// From [`TcpReceiver::start`] on.
    shared: Option<Arc<Shared>>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TcpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpReceiver")
            .field("addr", &self.addr)
            .field("options", &self.options)
            .field("started", &self.shared.is_some())
            .finish()
    }
}

impl TcpReceiver {
    /// Listens on `bind` (port 0 picks a free port). Connections queue in the kernel until
    /// [`TcpReceiver::start`]; publish [`TcpReceiver::local_addr`] (with a routable host when
    /// `bind` is a wildcard address) for the senders.
    pub fn listen(bind: SocketAddr, options: TcpOptions) -> Result<TcpReceiver, TransportError> {
        options.validate()?;
        let err = |e: io::Error| TransportError::Bind {
            addr: bind,
            source: Arc::new(e),
        };
        let listener = TcpListener::bind(bind).map_err(err)?;
        // Polled, so the accept thread can notice shutdown without a wake-up connection.
        listener.set_nonblocking(true).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        Ok(TcpReceiver {
            addr,
            options,
            listener: Some(listener),
            shared: None,
            accept: None,
        })
    }

    /// The address listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts serving in background threads (one per accepted connection) and returns. Each
    /// received run goes to `sink`. Setting `cancel` makes every connection close and
    /// [`TcpReceiver::wait`] return [`TransportError::Cancelled`].
    pub fn start(
        &mut self,
        sink: SharedSink,
        cancel: Arc<AtomicBool>,
    ) -> Result<(), TransportError> {
        let listener = self.listener.take().ok_or(TransportError::AlreadyStarted)?;
        let shared = Arc::new(Shared {
            options: self.options.clone(),
            poll: poll_interval(self.options.io_timeout),
            sink,
            cancel,
            stopping: AtomicBool::new(false),
            progress: ProgressClock::new(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        let s = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("axsave-tcp-accept".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| TransportError::Spawn {
                source: Arc::new(e),
            })?;
        self.shared = Some(shared);
        self.accept = Some(accept);
        Ok(())
    }

    /// Blocks until `expected_bytes` payload bytes in total have been handed to the sink and
    /// every connection that passed the hello has ended with a valid end marker.
    ///
    /// Fails with the first error any connection hit (a sink error, malformed data, a sender
    /// that died or hung, more bytes than expected), with [`TransportError::Cancelled`] when
    /// the cancel flag is set, or with [`TransportError::Stalled`] when nothing arrived for
    /// [`TcpOptions::io_timeout`] (plus up to half a second) while data was missing or a
    /// connection open. May be called again; it returns the same error.
    ///
    /// A sender that has nothing for this receiver should not connect: a connection that
    /// arrives after `wait` returned is served only until [`TcpReceiver::shutdown`].
    pub fn wait(&self, expected_bytes: u64) -> Result<ReceiveStats, TransportError> {
        let shared = self.shared.as_ref().ok_or(TransportError::NotStarted)?;
        let mut st = shared.state();
        st.expected = Some(expected_bytes);
        // Quiet time before this call does not count: the caller may have been busy with its
        // own work while its peers were busy with theirs.
        let called = Instant::now();
        loop {
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if shared.cancel.load(Ordering::SeqCst) {
                return Err(TransportError::Cancelled);
            }
            if st.claimed > expected_bytes {
                return Err(TransportError::Run(RunError::TooManyBytes {
                    expected: expected_bytes,
                    received: st.claimed,
                    rank: None,
                }));
            }
            if st.handled == expected_bytes && st.claimed == st.handled && st.open.is_empty() {
                return Ok(st.stats());
            }
            let idle = shared.idle_for().min(called.elapsed());
            // A little over io_timeout, so that a connection thread that sees its own sender
            // hang (it checks once per poll interval) reports that, more precise, error first.
            let timeout = self.options.io_timeout.saturating_add(2 * shared.poll);
            if idle >= timeout {
                return Err(TransportError::Stalled {
                    idle,
                    received: st.handled,
                    expected: expected_bytes,
                    open: st.open.values().copied().collect(),
                });
            }
            let nap = shared.poll.min(timeout - idle).max(net::MIN_TIMEOUT);
            st = shared
                .changed
                .wait_timeout(st, nap)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// What has been received so far (all zero before [`TcpReceiver::start`]).
    pub fn stats(&self) -> ReceiveStats {
        self.shared
            .as_ref()
            .map_or_else(ReceiveStats::default, |s| s.state().stats())
    }

    /// Stops accepting, closes every connection and joins every thread. Waits for sink calls
    /// in progress to return.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.stopping.store(true, Ordering::SeqCst);
        }
        if let Some(accept) = self.accept.take() {
            // The accept thread closes and joins the connection threads before it returns.
            let _ = accept.join();
        }
    }
}

impl Drop for TcpReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bookkeeping shared by [`TcpReceiver::wait`] and the connection threads.
#[derive(Debug, Default)]
struct State {
    /// Set by [`TcpReceiver::wait`]; from then on frames that would exceed it are refused before
    /// they reach the sink.
    expected: Option<u64>,
    /// Bytes of frames that passed the checks and are being or have been handed to the sink.
    claimed: u64,
    /// Bytes the sink accepted.
    handled: u64,
    by_rank: BTreeMap<usize, u64>,
    /// Connections past the hello and not yet ended, by id: their rank.
    open: BTreeMap<u64, usize>,
    finished: usize,
    rejected: usize,
    /// The first failure; later ones are consequences or equally fatal.
    error: Option<TransportError>,
}

impl State {
    fn stats(&self) -> ReceiveStats {
        ReceiveStats {
            bytes: self.handled,
            bytes_by_rank: self.by_rank.clone(),
            connections: self.finished,
            rejected: self.rejected,
        }
    }
}

struct Shared {
    options: TcpOptions,
    poll: Duration,
    sink: SharedSink,
    cancel: Arc<AtomicBool>,
    stopping: AtomicBool,
    /// When a byte last arrived on any connection.
    progress: ProgressClock,
    state: Mutex<State>,
    changed: Condvar,
    /// A handle on every open connection, to shut them down on stop.
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic on another thread must not wedge the receiver; every mutation of the state
        // completes under the lock, so it stays consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, TcpStream>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn should_stop(&self) -> bool {
        self.stopping.load(Ordering::SeqCst) || self.cancel.load(Ordering::SeqCst)
    }

    fn touch(&self) {
        self.progress.touch();
    }

    fn idle_for(&self) -> Duration {
        self.progress.idle_for()
    }

    /// Records the first failure and wakes [`TcpReceiver::wait`].
    fn fail(&self, e: TransportError) {
        let mut st = self.state();
        if st.error.is_none() {
            st.error = Some(e);
        }
        drop(st);
        self.changed.notify_all();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    crate::net::accept_loop(
        vec![listener],
        &shared.stopping,
        "transport",
        |stream, peer| start_connection(stream, peer, &shared),
        || {
            for stream in shared.conns().values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        },
    );
}

fn start_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Option<JoinHandle<()>> {
    if shared.conns().len() >= MAX_CONNECTIONS {
        tracing::debug!(%peer, "transport connection refused: too many connections");
        shared.state().rejected += 1;
        return None;
    }
    let setup = || -> io::Result<TcpStream> {
        // Accepted sockets inherit non-blocking mode from the listener on some systems.
        net::configure(&stream, shared.poll)?;
        stream.try_clone()
    };
    let registry = match setup() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "transport connection setup failed");
            return None;
        }
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared.conns().insert(id, registry);
    let s = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("axsave-tcp-recv".into())
        .spawn(move || {
            let mut conn = Conn {
                id,
                stream,
                peer,
                rank: 0,
                shared: &s,
            };
            conn.serve();
            s.state().open.remove(&id);
            s.changed.notify_all();
            if let Some(st) = s.conns().remove(&id) {
                let _ = st.shutdown(Shutdown::Both);
            }
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "cannot start a transport connection thread");
            if let Some(st) = shared.conns().remove(&id) {
                let _ = st.shutdown(Shutdown::Both);
            }
            None
        }
    }
}

/// Where a read that failed at its first byte means the sender closed without its end marker.
const BETWEEN_MESSAGES: &str = "between messages";

/// How a read ended short of filling its buffer.
enum ReadEnd {
    /// The peer closed after `got` bytes of this read.
    Eof {
        got: usize,
    },
    /// No progress for `io_timeout` (or the hello deadline passed).
    Hung,
    /// Shutdown or cancel.
    Stopped,
    Io(io::Error),
}

/// How a connection ended, when not cleanly.
enum Stop {
    /// Shutdown, cancel or a rejected hello: nothing to record.
    Quiet,
    /// A failure of the run; `reply` when the connection is still intact, so the sender can
    /// be told why.
    Failed { error: TransportError, reply: bool },
}

/// Reusable buffers of one connection; hold at most one frame.
#[derive(Default)]
struct Buffers {
    table: Vec<u8>,
    runs: Vec<(u64, u32)>,
    payload: Vec<u8>,
}

struct Conn<'a> {
    id: u64,
    stream: TcpStream,
    peer: SocketAddr,
    /// Valid once the hello is accepted.
    rank: usize,
    shared: &'a Shared,
}

impl Conn<'_> {
    fn serve(&mut self) {
        match self.handshake().and_then(|()| self.messages()) {
            Ok(()) | Err(Stop::Quiet) => {}
            Err(Stop::Failed { error, reply }) => {
                tracing::debug!(peer = %self.peer, rank = self.rank, error = %error, "transport connection failed");
                let message = error.to_string();
                self.shared.fail(error);
                if reply {
                    self.refuse(&message);
                }
            }
        }
    }

    /// Reads and checks the hello; registers the connection as open when it is accepted.
    fn handshake(&mut self) -> Result<(), Stop> {
        let mut b = [0u8; HELLO_LEN];
        let deadline = deadline_after(self.shared.options.io_timeout);
        if let Err(e) = self.read_full(&mut b, true, Some(deadline)) {
            if !matches!(e, ReadEnd::Stopped) {
                self.reject(None);
            }
            return Err(Stop::Quiet);
        }
        let Some(hello) = Hello::decode(&b) else {
            self.reject(None);
            return Err(Stop::Quiet);
        };
        let o = &self.shared.options;
        match hello.check(o.session, &o.token, o.frame_bytes) {
            Ok(rank) => self.rank = rank,
            Err(reason) => {
                self.reject(Some(&reason));
                return Err(Stop::Quiet);
            }
        }
        // Registered before the OK goes out, so that `wait` cannot see the sender's data
        // missing and its connection absent at the same time.
        self.shared.state().open.insert(self.id, self.rank);
        if let Err(e) = self.write_reply(Ok(())) {
            // Its sender never learns it was accepted, so its `connect` fails and its rank
            // reports the failure; this connection sent nothing and owes nothing.
            tracing::debug!(peer = %self.peer, error = %e, "transport hello reply failed");
            self.shared.state().open.remove(&self.id);
            return Err(Stop::Quiet);
        }
        Ok(())
    }

    /// Counts a turned-away connection; tells it why when it spoke our protocol.
    fn reject(&mut self, reason: Option<&str>) {
        tracing::debug!(peer = %self.peer, reason = reason.unwrap_or("not our protocol"), "transport connection rejected");
        self.shared.state().rejected += 1;
        if let Some(r) = reason {
            let _ = self.write_reply(Err(r));
        }
    }

    fn messages(&mut self) -> Result<(), Stop> {
        let mut bufs = Buffers::default();
        let mut received: u64 = 0;
        loop {
            let mut magic = [0u8; 4];
            self.read_full(&mut magic, true, None)
                .map_err(|e| self.read_failed(e, BETWEEN_MESSAGES))?;
            if magic == FRAME_MAGIC {
                received += self.frame(&mut bufs)?;
            } else if magic == END_MAGIC {
                let mut b = [0u8; END_LEN - 4];
                self.read_full(&mut b, false, None)
                    .map_err(|e| self.read_failed(e, "in its end marker"))?;
                let announced = u64::from_le_bytes(b);
                if announced != received {
                    return Err(Stop::Failed {
                        error: TransportError::CountMismatch {
                            rank: self.rank,
                            peer: self.peer,
                            announced,
                            received,
                        },
                        reply: true,
                    });
                }
                // Acknowledge first, then count the connection finished: once `wait` sees it
                // finished, the owner may shut the receiver down, which would cut off an
                // acknowledgement not yet written (the sender then failed with "closed the
                // connection while waiting for the acknowledgement"). Every byte is with the
                // sink already; if the sender is gone it finds out by itself (its finish fails)
                // and reports for its own rank.
                if let Err(e) = self.write_reply(Ok(())) {
                    tracing::debug!(peer = %self.peer, rank = self.rank, error = %e, "transport acknowledgement failed");
                }
                let mut st = self.shared.state();
                st.open.remove(&self.id);
                st.finished += 1;
                drop(st);
                self.shared.changed.notify_all();
                return Ok(());
            } else {
                return Err(self.malformed(format!(
                    "message starts with {magic:02x?}, neither a frame nor an end marker"
                )));
            }
        }
    }

    /// Reads the rest of a frame, hands its runs to the sink; returns its payload length.
    fn frame(&mut self, bufs: &mut Buffers) -> Result<u64, Stop> {
        let mut h = [0u8; FRAME_HEADER_LEN - 4];
        self.read_full(&mut h, false, None)
            .map_err(|e| self.read_failed(e, "in a frame header"))?;
        let header = FrameHeader::decode(&h);
        let (table_len, payload_len) = header
            .check(self.shared.options.frame_bytes)
            .map_err(|d| self.malformed(d))?;

        bufs.table.resize(table_len, 0);
        self.read_full(&mut bufs.table, false, None)
            .map_err(|e| self.read_failed(e, "in a run table"))?;
        wire::decode_run_table(&bufs.table, header.payload, &mut bufs.runs)
            .map_err(|d| self.malformed(d))?;

        // Grown to the largest frame seen and never shrunk, so it is zeroed once, not per
        // frame.
        if bufs.payload.len() < payload_len {
            bufs.payload.resize(payload_len, 0);
        }
        let payload = &mut bufs.payload[..payload_len];
        read_full(&self.stream, self.shared, payload, false, None)
            .map_err(|e| self.read_failed(e, "in a frame payload"))?;

        let n = header.payload;
        self.claim(n)?;
        let mut at = 0usize;
        for &(offset, len) in &bufs.runs {
            let data = &bufs.payload[at..at + len as usize];
            at += len as usize;
            let result = deliver(&*self.shared.sink, self.rank, header.file, offset, data);
            if let Err(message) = result {
                return Err(Stop::Failed {
                    error: TransportError::Run(RunError::Sink {
                        rank: self.rank,
                        file: header.file,
                        offset,
                        len: u64::from(len),
                        message,
                    }),
                    reply: true,
                });
            }
        }
        let mut st = self.shared.state();
        st.handled += n;
        *st.by_rank.entry(self.rank).or_default() += n;
        drop(st);
        self.shared.touch();
        self.shared.changed.notify_all();
        Ok(n)
    }

    /// Reserves `n` bytes of the expected total before they reach the sink, so a sender with
    /// a wrong plan cannot write past what this rank expects.
    fn claim(&self, n: u64) -> Result<(), Stop> {
        let mut st = self.shared.state();
        let claimed = st.claimed.saturating_add(n);
        if let Some(expected) = st.expected {
            if claimed > expected {
                return Err(Stop::Failed {
                    error: TransportError::Run(RunError::TooManyBytes {
                        expected,
                        received: claimed,
                        rank: Some(self.rank),
                    }),
                    reply: true,
                });
            }
        }
        st.claimed = claimed;
        Ok(())
    }

    fn malformed(&self, detail: String) -> Stop {
        Stop::Failed {
            error: TransportError::Malformed {
                rank: self.rank,
                peer: self.peer,
                detail,
            },
            reply: true,
        }
    }

    fn read_failed(&self, e: ReadEnd, place: &str) -> Stop {
        let died = |detail: String| Stop::Failed {
            error: TransportError::SenderDied {
                rank: self.rank,
                peer: self.peer,
                detail,
            },
            reply: false,
        };
        match e {
            ReadEnd::Stopped => Stop::Quiet,
            ReadEnd::Eof { got: 0 } if place == BETWEEN_MESSAGES => {
                died("closed its connection without the end marker".to_owned())
            }
            ReadEnd::Eof { .. } => died(format!("closed its connection {place}")),
            ReadEnd::Io(e) if is_disconnect(&e) => {
                died(format!("reset its connection {place} ({e})"))
            }
            ReadEnd::Hung => Stop::Failed {
                error: TransportError::SenderHung {
                    rank: self.rank,
                    peer: self.peer,
                    timeout: self.shared.options.io_timeout,
                },
                reply: false,
            },
            ReadEnd::Io(e) => Stop::Failed {
                error: TransportError::Io {
                    peer: self.peer,
                    during: "receiving",
                    source: Arc::new(e),
                },
                reply: false,
            },
        }
    }

    fn read_full(
        &mut self,
        buf: &mut [u8],
        idle_ok: bool,
        deadline: Option<Instant>,
    ) -> Result<(), ReadEnd> {
        read_full(&self.stream, self.shared, buf, idle_ok, deadline)
    }

    /// Writes a reply within `io_timeout`.
    fn write_reply(&mut self, result: Result<(), &str>) -> io::Result<()> {
        let bytes = wire::encode_reply(result);
        let mut rest = &bytes[..];
        let mut last = Instant::now();
        while !rest.is_empty() {
            match self.stream.write(rest) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    rest = &rest[n..];
                    last = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    if self.shared.should_stop() || last.elapsed() >= self.shared.options.io_timeout
                    {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Tells the sender why its data was refused, then discards what it still sends until it
    /// hangs up (it notices the reply at its next frame or at its end). Closing at once
    /// instead would reset the connection and could destroy the reply before it is read.
    fn refuse(&mut self, message: &str) {
        if self.write_reply(Err(message)).is_err() {
            return;
        }
        let _ = self.stream.shutdown(Shutdown::Write);
        let mut sink = vec![0u8; 64 * 1024];
        let mut last = Instant::now();
        loop {
            match self.stream.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => last = Instant::now(),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {}
                Err(_) => return,
            }
            if self.shared.should_stop() || last.elapsed() >= self.shared.options.io_timeout {
                return;
            }
        }
    }
}

/// Fills `buf`, looping over short socket timeouts to watch for shutdown, cancel and lack of
/// progress. With `idle_ok`, waiting before the first byte is not limited by `io_timeout`
/// (a connection may rest between messages); once a byte of `buf` arrived the rest must
/// follow without a pause of `io_timeout`. `deadline`, when given, bounds the whole read.
fn read_full(
    mut stream: &TcpStream,
    shared: &Shared,
    buf: &mut [u8],
    idle_ok: bool,
    deadline: Option<Instant>,
) -> Result<(), ReadEnd> {
    let mut got = 0;
    let mut last = Instant::now();
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(ReadEnd::Eof { got }),
            Ok(n) => {
                got += n;
                last = Instant::now();
                shared.touch();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(ReadEnd::Io(e)),
        }
        if shared.should_stop() {
            return Err(ReadEnd::Stopped);
        }
        match deadline {
            Some(d) if got < buf.len() && Instant::now() >= d => return Err(ReadEnd::Hung),
            None if !(idle_ok && got == 0)
                && got < buf.len()
                && last.elapsed() >= shared.options.io_timeout =>
            {
                return Err(ReadEnd::Hung);
            }
            _ => {}
        }
    }
    Ok(())
}
