//! Socket plumbing that the store (server and client) and the TCP transport (receiver and
//! sender) share: the accept loop of a server thread, connecting with retry and backoff, and
//! how an I/O error or a deadline is read.

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Shortest socket timeout (zero means "block forever" to the OS).
pub(crate) const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// Longest single `connect()` attempt, so one black-holed address does not eat the deadline.
pub(crate) const MAX_ATTEMPT: Duration = Duration::from_secs(5);

/// First wait between connection attempts; it doubles up to the caller's maximum.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);

/// How often an accept loop looks for new connections and for shutdown when idle.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// `now + d`, saturating far in the future instead of overflowing on absurd durations.
pub(crate) fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// A socket timeout expired (`SO_RCVTIMEO`/`SO_SNDTIMEO` read as `EAGAIN` on Unix, `TimedOut`
/// on Windows).
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// The peer is gone (closed, reset, or our side was shut down).
pub(crate) fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected
    )
}

/// Serves non-blocking `listeners` until `stopping` is set: each accepted connection goes to
/// `start`, which may hand back the thread serving it. Finished threads are reaped as it
/// goes. On stop the listeners are closed, `close_all` shuts the open connections down, and
/// every connection thread is joined before this returns. `what` names the server in the
/// log.
pub(crate) fn accept_loop(
    listeners: Vec<TcpListener>,
    stopping: &AtomicBool,
    what: &'static str,
    mut start: impl FnMut(TcpStream, SocketAddr) -> Option<JoinHandle<()>>,
    close_all: impl FnOnce(),
) {
    let mut handles: Vec<JoinHandle<()>> = Vec::new();
    while !stopping.load(Ordering::SeqCst) {
        let mut accepted = false;
        for l in &listeners {
            loop {
                match l.accept() {
                    Ok((stream, peer)) => {
                        accepted = true;
                        if let Some(h) = start(stream, peer) {
                            handles.push(h);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // E.g. EMFILE, or a connection reset before accept: try again later.
                        tracing::debug!(error = %e, "{what} accept failed");
                        break;
                    }
                }
            }
        }
        // Reap finished connection threads so the list does not grow with every connection.
        let (done, live): (Vec<_>, Vec<_>) = handles.into_iter().partition(|h| h.is_finished());
        for h in done {
            let _ = h.join();
        }
        handles = live;
        if !accepted {
            thread::sleep(ACCEPT_POLL);
        }
    }
    drop(listeners);
    close_all();
    for h in handles {
        let _ = h.join();
    }
}

/// Why [`connect_with_backoff`] gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GaveUp {
    /// The cancel flag was set.
    Cancelled,
    /// The deadline passed.
    TimedOut {
        /// How long it tried.
        waited: Duration,
        /// The last failure `attempt` reported.
        last_error: String,
    },
}

/// Calls `attempt` with the deadline until it succeeds, waiting 10 ms, then twice as long
/// each round up to `max_backoff`, between failures; gives up once `timeout` has passed or
/// `cancel` is set. `attempt` reports a failure as the message a timeout error will carry.
pub(crate) fn connect_with_backoff<T>(
    timeout: Duration,
    max_backoff: Duration,
    cancel: Option<&AtomicBool>,
    mut attempt: impl FnMut(Instant) -> Result<T, String>,
) -> Result<T, GaveUp> {
    let started = Instant::now();
    let deadline = deadline_after(timeout);
    let mut backoff = FIRST_BACKOFF;
    loop {
        if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
            return Err(GaveUp::Cancelled);
        }
        let last_error = match attempt(deadline) {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(GaveUp::TimedOut {
                waited: started.elapsed(),
                last_error,
            });
        }
        thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// How long one `connect()` may take before `deadline`: at most [`MAX_ATTEMPT`], at least
/// [`MIN_TIMEOUT`].
pub(crate) fn attempt_timeout(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .min(MAX_ATTEMPT)
        .max(MIN_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::sync::{Arc, Mutex};

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    #[test]
    fn connect_retries_until_a_listener_appears() {
        // Reserve a port, free it, and start listening on it a little later.
        let addr = TcpListener::bind(loopback()).unwrap().local_addr().unwrap();
        let late = thread::spawn(move || {
            thread::sleep(Duration::from_millis(150));
            let l = TcpListener::bind(addr).unwrap();
            let _ = l.accept().unwrap();
        });
        let mut tries = 0;
        let stream = connect_with_backoff(
            Duration::from_secs(10),
            Duration::from_millis(50),
            None,
            |d| {
                tries += 1;
                TcpStream::connect_timeout(&addr, attempt_timeout(d)).map_err(|e| e.to_string())
            },
        )
        .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), addr);
        assert!(
            tries > 1,
            "the first attempts must have failed, tried {tries} times"
        );
        late.join().unwrap();
    }

    #[test]
    fn connect_gives_up_at_the_deadline_with_the_last_error() {
        let started = Instant::now();
        let mut n = 0;
        let r: Result<(), GaveUp> = connect_with_backoff(
            Duration::from_millis(200),
            Duration::from_millis(40),
            None,
            |_| {
                n += 1;
                Err(format!("attempt {n} refused"))
            },
        );
        let Err(GaveUp::TimedOut { waited, last_error }) = r else {
            panic!("expected a timeout, got {r:?}");
        };
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(last_error, format!("attempt {n} refused"));
        assert!(
            n >= 3,
            "backoff capped at 40 ms allows several attempts, made {n}"
        );
    }

    #[test]
    fn connect_stops_when_cancelled() {
        let cancel = AtomicBool::new(false);
        let mut n = 0;
        let r: Result<(), GaveUp> = connect_with_backoff(
            Duration::from_secs(60),
            Duration::from_millis(10),
            Some(&cancel),
            |_| {
                n += 1;
                if n == 3 {
                    cancel.store(true, Ordering::SeqCst);
                }
                Err("refused".to_owned())
            },
        );
        assert_eq!(r, Err(GaveUp::Cancelled));
        assert_eq!(n, 3);
    }

    #[test]
    fn accept_loop_serves_every_connection_and_closes_them_on_stop() {
        let listener = TcpListener::bind(loopback()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stopping = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let server = {
            let stopping = Arc::clone(&stopping);
            let open = Arc::clone(&open);
            thread::spawn(move || {
                let registry = Arc::clone(&open);
                accept_loop(
                    vec![listener],
                    &stopping,
                    "test",
                    |stream, _peer| {
                        stream.set_nonblocking(false).unwrap();
                        registry.lock().unwrap().push(stream.try_clone().unwrap());
                        // Echo one byte, then wait for the peer or the shutdown.
                        Some(thread::spawn(move || {
                            let mut s = stream;
                            let mut b = [0u8; 1];
                            if s.read_exact(&mut b).is_ok() {
                                let _ = s.write_all(&b);
                                let _ = s.read(&mut b);
                            }
                        }))
                    },
                    || {
                        for s in open.lock().unwrap().iter() {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                    },
                );
            })
        };
        let mut clients: Vec<TcpStream> = (0..3u8)
            .map(|i| {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(&[i]).unwrap();
                let mut b = [0u8; 1];
                c.read_exact(&mut b).unwrap();
                assert_eq!(b[0], i);
                c
            })
            .collect();
        stopping.store(true, Ordering::SeqCst);
        // Returns only after the open connections were shut down and their threads joined.
        server.join().unwrap();
        for c in &mut clients {
            let mut b = [0u8; 1];
            assert_eq!(
                c.read(&mut b).unwrap_or(0),
                0,
                "the server closed the connection"
            );
        }
        assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err());
    }
}
