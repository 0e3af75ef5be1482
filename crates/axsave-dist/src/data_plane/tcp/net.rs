//! Socket helpers shared by both sides.

use std::io;
use std::net::TcpStream;
use std::time::Duration;

pub(crate) use crate::net::{MIN_TIMEOUT, is_disconnect, is_timeout};

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
