//! Byte layout of the transport's messages (described in the [module documentation](super)),
//! and the checks on everything read from the wire.

pub(crate) use crate::data_plane::limits::MAX_RUNS_PER_FRAME;
pub(crate) use crate::data_plane::runs::{RUN_ENTRY_LEN, decode_run_table, u32_at, u64_at};

/// Version in the hello; a receiver rejects any other.
pub const PROTOCOL_VERSION: u32 = 2;

pub(crate) const HELLO_MAGIC: [u8; 8] = *b"AXSVTCP\0";
pub(crate) const HELLO_LEN: usize = 72;
/// Length of the job token in the hello.
pub const TOKEN_LEN: usize = 32;
pub(crate) const FRAME_MAGIC: [u8; 4] = *b"AXFR";
pub(crate) const END_MAGIC: [u8; 4] = *b"AXEN";
pub(crate) const REPLY_MAGIC: [u8; 4] = *b"AXRP";
/// Magic included.
pub(crate) const FRAME_HEADER_LEN: usize = 20;
/// Magic included.
pub(crate) const END_LEN: usize = 12;
/// Magic, code and message length.
pub(crate) const REPLY_HEADER_LEN: usize = 9;
/// Longest reply message; longer ones are cut (at a character boundary) before sending.
pub(crate) const MAX_REPLY_MESSAGE: usize = 4096;
pub(crate) const REPLY_OK: u8 = 0;
pub(crate) const REPLY_ERROR: u8 = 1;

/// The first message on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub version: u32,
    pub flags: u32,
    pub session: u64,
    pub rank: u64,
    pub frame_bytes: u64,
    pub token: [u8; TOKEN_LEN],
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(&HELLO_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.session.to_le_bytes());
        b[24..32].copy_from_slice(&self.rank.to_le_bytes());
        b[32..40].copy_from_slice(&self.frame_bytes.to_le_bytes());
        b[40..72].copy_from_slice(&self.token);
        b
    }

    /// `None` when the magic is wrong: whatever sent it does not speak this protocol.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Option<Hello> {
        if b[0..8] != HELLO_MAGIC {
            return None;
        }
        Some(Hello {
            version: u32_at(b, 8),
            flags: u32_at(b, 12),
            session: u64_at(b, 16),
            rank: u64_at(b, 24),
            frame_bytes: u64_at(b, 32),
            token: b[40..72].try_into().unwrap_or([0; TOKEN_LEN]),
        })
    }

    /// Why a receiver with these settings must turn this hello away, if it must. The rank is
    /// returned as `usize` when accepted.
    pub fn check(
        &self,
        session: u64,
        token: &[u8; TOKEN_LEN],
        max_frame: usize,
    ) -> Result<usize, String> {
        if self.version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {} is not supported (this receiver speaks {PROTOCOL_VERSION})",
                self.version
            ));
        }
        if self.flags != 0 {
            return Err(format!("unknown hello flags {:#x}", self.flags));
        }
        if self.session != session {
            return Err(format!(
                "session token {:#018x} belongs to another run (this run's is {session:#018x})",
                self.session
            ));
        }
        if !same_token(&self.token, token) {
            return Err(
                "wrong job token: the connection does not come from a rank of this job".into(),
            );
        }
        if self.frame_bytes == 0 || self.frame_bytes > max_frame as u64 {
            return Err(format!(
                "frame size {} exceeds this receiver's {max_frame} (the ranks' options differ)",
                self.frame_bytes
            ));
        }
        usize::try_from(self.rank).map_err(|_| format!("rank {} is out of range", self.rank))
    }
}

/// Compares two tokens in time that does not depend on where they differ, so that a peer
/// cannot find the token byte by byte from how fast it is turned away.
pub(crate) fn same_token(a: &[u8; TOKEN_LEN], b: &[u8; TOKEN_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A frame header after its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub file: u32,
    pub runs: u32,
    pub payload: u64,
}

impl FrameHeader {
    pub fn decode(b: &[u8; FRAME_HEADER_LEN - 4]) -> FrameHeader {
        FrameHeader {
            file: u32_at(b, 0),
            runs: u32_at(b, 4),
            payload: u64_at(b, 8),
        }
    }

    /// Checks the lengths against the limits before anything is allocated for them; returns
    /// the sizes of the run table and the payload.
    pub fn check(&self, max_payload: usize) -> Result<(usize, usize), String> {
        let runs = self.runs as usize;
        if runs == 0 || runs > MAX_RUNS_PER_FRAME {
            return Err(format!(
                "frame with {} runs (1 ..= {MAX_RUNS_PER_FRAME} allowed)",
                self.runs
            ));
        }
        if self.payload == 0 || self.payload > max_payload as u64 {
            return Err(format!(
                "frame payload of {} bytes (1 ..= {max_payload} allowed)",
                self.payload
            ));
        }
        // Both bounded above, so neither multiplication nor conversion can overflow.
        Ok((runs * RUN_ENTRY_LEN, self.payload as usize))
    }
}

/// Appends a frame's header and run table to `out`.
pub(crate) fn encode_frame_head(out: &mut Vec<u8>, file: u32, runs: &[(u64, u32)], payload: u64) {
    out.reserve(FRAME_HEADER_LEN + runs.len() * RUN_ENTRY_LEN);
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&file.to_le_bytes());
    // The sender never puts more than MAX_RUNS_PER_FRAME runs in a frame.
    out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload.to_le_bytes());
    for &(offset, len) in runs {
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
}

pub(crate) fn encode_end(total: u64) -> [u8; END_LEN] {
    let mut b = [0u8; END_LEN];
    b[0..4].copy_from_slice(&END_MAGIC);
    b[4..12].copy_from_slice(&total.to_le_bytes());
    b
}

pub(crate) fn encode_reply(result: Result<(), &str>) -> Vec<u8> {
    let (code, message) = match result {
        Ok(()) => (REPLY_OK, ""),
        Err(m) => (REPLY_ERROR, truncate(m, MAX_REPLY_MESSAGE)),
    };
    let mut b = Vec::with_capacity(REPLY_HEADER_LEN + message.len());
    b.extend_from_slice(&REPLY_MAGIC);
    b.push(code);
    // Bounded by MAX_REPLY_MESSAGE.
    b.extend_from_slice(&(message.len() as u32).to_le_bytes());
    b.extend_from_slice(message.as_bytes());
    b
}

/// Parses a reply header: the code and the message length.
pub(crate) fn decode_reply_header(b: &[u8; REPLY_HEADER_LEN]) -> Result<(u8, usize), String> {
    if b[0..4] != REPLY_MAGIC {
        return Err(format!(
            "reply starts with {:02x?}, not the reply magic",
            &b[0..4]
        ));
    }
    let code = b[4];
    if code != REPLY_OK && code != REPLY_ERROR {
        return Err(format!("unknown reply code {code}"));
    }
    let len = u32_at(b, 5) as usize;
    if len > MAX_REPLY_MESSAGE {
        return Err(format!(
            "reply message of {len} bytes exceeds {MAX_REPLY_MESSAGE}"
        ));
    }
    Ok((code, len))
}

/// The longest prefix of `s` of at most `max` bytes that ends at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            flags: 0,
            session: 0xdead_beef_0123_4567,
            rank: 3,
            frame_bytes: 1 << 20,
            token: [5; TOKEN_LEN],
        }
    }

    #[test]
    fn hello_round_trips_and_is_checked() {
        let h = hello();
        let b = h.encode();
        assert_eq!(&b[..8], b"AXSVTCP\0");
        assert_eq!(Hello::decode(&b), Some(h));
        assert_eq!(h.check(h.session, &h.token, 1 << 20), Ok(3));

        let mut bad = b;
        bad[0] = b'x';
        assert_eq!(Hello::decode(&bad), None);
        assert!(
            h.check(1, &h.token, 1 << 20)
                .unwrap_err()
                .contains("session")
        );
        assert!(
            h.check(h.session, &h.token, 1 << 19)
                .unwrap_err()
                .contains("frame size")
        );
        let v9 = Hello { version: 9, ..h };
        assert!(
            v9.check(h.session, &h.token, 1 << 20)
                .unwrap_err()
                .contains("version 9")
        );
        let flagged = Hello { flags: 1, ..h };
        assert!(flagged.check(h.session, &h.token, 1 << 20).is_err());
        let zero = Hello {
            frame_bytes: 0,
            ..h
        };
        assert!(zero.check(h.session, &h.token, 1 << 20).is_err());
        let mut other = h.token;
        other[TOKEN_LEN - 1] ^= 0x80;
        assert!(
            h.check(h.session, &other, 1 << 20)
                .unwrap_err()
                .contains("wrong job token")
        );
        assert!(same_token(&h.token, &h.token) && !same_token(&h.token, &other));
    }

    #[test]
    fn frame_head_round_trips() {
        let runs = [(0u64, 5u32), (100, 7)];
        let mut out = Vec::new();
        encode_frame_head(&mut out, 9, &runs, 12);
        assert_eq!(out.len(), FRAME_HEADER_LEN + 2 * RUN_ENTRY_LEN);
        assert_eq!(&out[..4], b"AXFR");
        let h = FrameHeader::decode(out[4..FRAME_HEADER_LEN].try_into().unwrap());
        assert_eq!(
            h,
            FrameHeader {
                file: 9,
                runs: 2,
                payload: 12
            }
        );
        assert_eq!(h.check(12), Ok((24, 12)));
        let mut parsed = Vec::new();
        decode_run_table(&out[FRAME_HEADER_LEN..], 12, &mut parsed).unwrap();
        assert_eq!(parsed, runs);
    }

    #[test]
    fn lying_frame_headers_are_refused_before_allocation() {
        let huge = FrameHeader {
            file: 0,
            runs: 1,
            payload: u64::MAX,
        };
        assert!(huge.check(1 << 20).unwrap_err().contains("payload"));
        let many = FrameHeader {
            file: 0,
            runs: u32::MAX,
            payload: 10,
        };
        assert!(many.check(1 << 20).unwrap_err().contains("runs"));
        let none = FrameHeader {
            file: 0,
            runs: 0,
            payload: 10,
        };
        assert!(none.check(1 << 20).is_err());
        let empty = FrameHeader {
            file: 0,
            runs: 1,
            payload: 0,
        };
        assert!(empty.check(1 << 20).is_err());
    }

    #[test]
    fn inconsistent_run_tables_are_refused() {
        let mut out = Vec::new();
        let mut parsed = Vec::new();
        encode_frame_head(&mut out, 0, &[(0, 5), (10, 5)], 11);
        let e = decode_run_table(&out[FRAME_HEADER_LEN..], 11, &mut parsed).unwrap_err();
        assert!(e.contains("add up to 10"), "{e}");

        out.clear();
        encode_frame_head(&mut out, 0, &[(u64::MAX - 2, 5)], 5);
        let e = decode_run_table(&out[FRAME_HEADER_LEN..], 5, &mut parsed).unwrap_err();
        assert!(e.contains("2^64"), "{e}");

        out.clear();
        encode_frame_head(&mut out, 0, &[(0, 0), (0, 5)], 5);
        let e = decode_run_table(&out[FRAME_HEADER_LEN..], 5, &mut parsed).unwrap_err();
        assert!(e.contains("empty run"), "{e}");
    }

    #[test]
    fn replies_round_trip_and_long_messages_are_cut_at_a_char_boundary() {
        let ok = encode_reply(Ok(()));
        assert_eq!(ok.len(), REPLY_HEADER_LEN);
        assert_eq!(
            decode_reply_header(ok[..].try_into().unwrap()),
            Ok((REPLY_OK, 0))
        );

        let long = "é".repeat(MAX_REPLY_MESSAGE);
        let err = encode_reply(Err(&long));
        let (code, len) = decode_reply_header(err[..REPLY_HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(code, REPLY_ERROR);
        assert!(len <= MAX_REPLY_MESSAGE);
        assert!(std::str::from_utf8(&err[REPLY_HEADER_LEN..]).is_ok());
        assert_eq!(err.len(), REPLY_HEADER_LEN + len);

        let mut bad = ok.clone();
        bad[4] = 7;
        assert!(decode_reply_header(bad[..].try_into().unwrap()).is_err());
        let mut bad = ok;
        bad[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_reply_header(bad[..].try_into().unwrap()).is_err());
    }

    #[test]
    fn end_marker_layout() {
        let e = encode_end(0x0102_0304_0506_0708);
        assert_eq!(&e[..4], b"AXEN");
        assert_eq!(u64_at(&e, 4), 0x0102_0304_0506_0708);
    }
}
