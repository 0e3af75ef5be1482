//! The ranks' output: each line a rank prints goes to the launcher's stdout or stderr, with a
//! prefix where one is asked for (`[rank r] `; see the crate's doc), as one write under the
//! stream's lock.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest line forwarded in one piece; a longer one (a progress bar redrawn with `\r`, binary
/// output) is cut into several lines so a reader thread's memory stays bounded.
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// Which of the launcher's streams a child's stream goes to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// Writes one whole line (prefix and newline included) while holding the stream's
    /// lock, so lines from other threads cannot land inside it.
    fn write_line(self, line: &[u8]) -> io::Result<()> {
        match self {
            Stream::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line)?;
                // Shown now, not when a buffer fills: the point is to watch the ranks.
                out.flush()
            }
            Stream::Stderr => io::stderr().lock().write_all(line),
        }
    }
}

/// Forwards `src` to `sink` line by line, each after `prefix` (which may be empty), until `src` ends. If the launcher's
/// stream is closed (`axsave launch … | head`), the rest is read and dropped, so that a rank
/// does not fail on a full pipe over something that only concerns what is displayed.
pub(crate) fn forward(src: impl Read, prefix: &[u8], sink: Stream) {
    let mut line_buf = Vec::with_capacity(256);
    let mut writable = true;
    // A read error on a pipe from a child is not expected; ending the forwarding is all
    // there is to do about it.
    let _ = for_each_line(src, |line| {
        if !writable {
            return;
        }
        line_buf.clear();
        line_buf.extend_from_slice(prefix);
        line_buf.extend_from_slice(line);
        line_buf.push(b'\n');
        writable = sink.write_line(&line_buf).is_ok();
    });
}

/// Reads `src` to its end and calls `f` with each line, without its `\n` (a `\r` before it is
/// kept). A last line without a newline counts as a line; lines longer than [`MAX_LINE`] are
/// given in pieces of `MAX_LINE` bytes.
pub(crate) fn for_each_line(src: impl Read, mut f: impl FnMut(&[u8])) -> io::Result<()> {
    let mut src = BufReader::with_capacity(MAX_LINE, src);
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let buf = match src.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !pending.is_empty() {
                    f(&pending);
                }
                return Err(e);
            }
        };
        if buf.is_empty() {
            break;
        }
        let room = MAX_LINE - pending.len();
        let window = &buf[..buf.len().min(room)];
        let used = match window.iter().position(|&b| b == b'\n') {
            Some(i) if pending.is_empty() => {
                f(&window[..i]);
                i + 1
            }
            Some(i) => {
                pending.extend_from_slice(&window[..i]);
                f(&pending);
                pending.clear();
                i + 1
            }
            None => {
                pending.extend_from_slice(window);
                if pending.len() == MAX_LINE {
                    f(&pending);
                    pending.clear();
                }
                window.len()
            }
        };
        src.consume(used);
    }
    if !pending.is_empty() {
        f(&pending);
    }
    Ok(())
}

/// Waits until every output thread has finished (the channel disconnects) or `timeout` passed.
pub(crate) fn drain_output(done: &mpsc::Receiver<()>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match done.recv_timeout(left) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::debug!("output still open after the ranks exited; not waiting for it");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(input: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for_each_line(input, |l| out.push(l.to_vec())).unwrap();
        out
    }

    #[test]
    fn splits_lines_and_keeps_a_last_partial_line() {
        assert_eq!(
            lines_of(b"a\nbb\n\nccc"),
            vec![b"a".to_vec(), b"bb".to_vec(), vec![], b"ccc".to_vec()]
        );
        assert_eq!(lines_of(b"x\r\n"), vec![b"x\r".to_vec()]);
        assert!(lines_of(b"").is_empty());
    }

    #[test]
    fn passes_non_utf8_bytes_through() {
        assert_eq!(
            lines_of(b"\xff\xfe\n\x80"),
            vec![b"\xff\xfe".to_vec(), b"\x80".to_vec()]
        );
    }

    /// A reader that hands out one byte per read, as a slow pipe may.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some((&b, rest)) = self.0.split_first() else {
                return Ok(0);
            };
            buf[0] = b;
            self.0 = rest;
            Ok(1)
        }
    }

    #[test]
    fn joins_lines_that_arrive_in_pieces() {
        let mut out = Vec::new();
        for_each_line(Trickle(b"hello\nwor\nld"), |l| out.push(l.to_vec())).unwrap();
        assert_eq!(
            out,
            vec![b"hello".to_vec(), b"wor".to_vec(), b"ld".to_vec()]
        );
    }

    #[test]
    fn cuts_overlong_lines() {
        let mut input = vec![b'x'; MAX_LINE * 2 + 10];
        input.extend_from_slice(b"\nend\n");
        let lines = lines_of(&input);
        let lens: Vec<usize> = lines.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![MAX_LINE, MAX_LINE, 10, 3]);
    }
}
