//! Socket helpers shared by both sides.

use std::io::{self, ErrorKind};
use std::net::TcpStream;
use std::time::Duration;

/// Shortest socket timeout (zero means "block forever" to the OS) and shortest `io_timeout`.
pub(crate) const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// Longest a blocked socket call waits before the loop around it looks at the cancel flag
/// and the progress deadline again.
const MAX_POLL: Duration = Duration::from_millis(250);

/// The socket timeout for a given `io_timeout`: short enough that cancellation is noticed
/// promptly and the deadline is not overshot by much.
pub(crate) fn poll_interval(io_timeout: Duration) -> Duration {
    io_timeout.min(MAX_POLL).max(MIN_TIMEOUT)
}

/// Settings every transport socket gets: blocking with short timeouts, no Nagle delay (frames
/// are written whole; the last one and the small replies must not wait for an ACK).
pub(crate) fn configure(stream: &TcpStream, poll: Duration) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(poll))?;
    stream.set_write_timeout(Some(poll))?;
    Ok(())
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
