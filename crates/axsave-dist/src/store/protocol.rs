//! PyTorch c10d TCPStore wire protocol, torch ≥ 2.1 numbering.
//!
//! Plain TCP, no message framing: each request is a one-byte command followed by its
//! arguments; replies come back in request order, one outstanding request per connection.
//! Integers are the raw little-endian bytes of the C type (torch memcpys native integers; every
//! platform torch ships for is little-endian). Strings and byte values are a `u64` length then
//! the bytes. Checked byte for byte against torch 2.9.1's client and both of its servers.
//!
//! | code | command | request | reply |
//! |---|---|---|---|
//! | 0 | VALIDATE | `u32` [`VALIDATE_MAGIC`] | none |
//! | 1 | SET | key, value | none |
//! | 2 | COMPARE_SET | key, expected, desired | value after the operation |
//! | 3 | GET | key | value |
//! | 4 | ADD | key, `i64` delta | `i64` new value (stored as ASCII decimal) |
//! | 5 | CHECK | `u64` n, n keys | `u8` 0 ready / 1 not ready |
//! | 6 | WAIT | `u64` n, n keys | `u8` 0 once every key exists |
//! | 7 | GETNUMKEYS | — | `i64` |
//! | 8 | DELETE_KEY | key | `i64` keys deleted |
//! | 9 | APPEND | key, value | none |
//! | 10 | MULTI_GET | `u64` n, n keys | n values |
//! | 11 | MULTI_SET | `i64` n, n (key, value) | none |
//! | 12 | CANCEL_WAIT | — | `u8` 1 (possibly after a late `u8` 0) |
//! | 13 | PING | `u32` nonce | `u32` nonce |
//! | 14 | QUEUE_PUSH | key, value | none |
//! | 15 | QUEUE_POP | key | `i64` length before the pop, then the value if it was > 0 |
//! | 16 | QUEUE_LEN | key | `i64` |

use std::io::{self, Read};

/// Argument of VALIDATE, the first message on every connection (`00 ce f7 85 3c` on the wire).
pub const VALIDATE_MAGIC: u32 = 0x3C85_F7CE;

/// Reply to CHECK when every key exists.
pub const CHECK_READY: u8 = 0;
/// Reply to CHECK when a key is missing.
pub const CHECK_NOT_READY: u8 = 1;
/// Reply to WAIT once every key exists.
pub const WAIT_STOP_WAITING: u8 = 0;
/// Reply to CANCEL_WAIT.
pub const WAIT_CANCELED: u8 = 1;

/// Longest key torch's libuv server accepts (`MAX_STRING_LEN`); longer keys close the
/// connection there.
pub const LIBUV_MAX_KEY_LEN: usize = 8 * 1024;
/// Largest value torch's libuv server accepts in one request (`MAX_PAYLOAD_LEN`).
pub const LIBUV_MAX_VALUE_LEN: usize = 8 * 1024 * 1024;
/// Most keys torch's libuv server accepts in one CHECK/WAIT/MULTI_GET/MULTI_SET.
pub const LIBUV_MAX_KEY_COUNT: usize = 128 * 1024;

/// One request type (`QueryType` in torch's `TCPStoreBackend.hpp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Command {
    /// Handshake; must be the first message.
    Validate = 0,
    /// Store a value.
    Set = 1,
    /// Store a value if the current one matches.
    CompareSet = 2,
    /// Read a value (no waiting; torch's client WAITs first).
    Get = 3,
    /// Add to a decimal counter.
    Add = 4,
    /// Do all keys exist, without waiting.
    Check = 5,
    /// Reply once all keys exist.
    Wait = 6,
    /// Number of keys.
    GetNumKeys = 7,
    /// Delete a key.
    DeleteKey = 8,
    /// Append bytes to a value (creating it).
    Append = 9,
    /// Read several values.
    MultiGet = 10,
    /// Store several values.
    MultiSet = 11,
    /// Abandon the pending WAIT.
    CancelWait = 12,
    /// Liveness check sent by torch ≥ 2.5 clients after VALIDATE.
    Ping = 13,
    /// Push to a queue (libuv server only in torch).
    QueuePush = 14,
    /// Pop from a queue without blocking.
    QueuePop = 15,
    /// Length of a queue.
    QueueLen = 16,
}

impl Command {
    /// The command for a wire byte, if it is one.
    pub fn from_byte(b: u8) -> Option<Command> {
        use Command::*;
        Some(match b {
            0 => Validate,
            1 => Set,
            2 => CompareSet,
            3 => Get,
            4 => Add,
            5 => Check,
            6 => Wait,
            7 => GetNumKeys,
            8 => DeleteKey,
            9 => Append,
            10 => MultiGet,
            11 => MultiSet,
            12 => CancelWait,
            13 => Ping,
            14 => QueuePush,
            15 => QueuePop,
            16 => QueueLen,
            _ => return None,
        })
    }
}

/// Builds one request in memory so it goes out in a single write.
#[derive(Debug)]
pub(crate) struct Request {
    buf: Vec<u8>,
}

impl Request {
    pub(crate) fn new(cmd: Command) -> Request {
        let mut buf = Vec::with_capacity(64);
        buf.push(cmd as u8);
        Request { buf }
    }

    pub(crate) fn u32(mut self, v: u32) -> Request {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn u64(mut self, v: u64) -> Request {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn i64(mut self, v: i64) -> Request {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn bytes(mut self, v: &[u8]) -> Request {
        self.buf.extend_from_slice(&(v.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(v);
        self
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

pub(crate) fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

pub(crate) fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub(crate) fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

pub(crate) fn read_i64(r: &mut impl Read) -> io::Result<i64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(i64::from_le_bytes(b))
}

/// Outcome of reading a length-prefixed value with a size cap.
pub(crate) enum Capped {
    /// The value.
    Value(Vec<u8>),
    /// The announced length was above the cap; nothing after the length was read.
    TooLong(u64),
}

/// Reads a `u64` length and that many bytes, refusing lengths above `max` before allocating.
/// Memory grows with the bytes actually received, so a peer that announces a huge length and
/// then stalls cannot make us allocate it.
pub(crate) fn read_sized(r: &mut impl Read, max: usize) -> io::Result<Capped> {
    let len = read_u64(r)?;
    if len > max as u64 {
        return Ok(Capped::TooLong(len));
    }
    let mut v = Vec::with_capacity((len as usize).min(1 << 20));
    let got = r.by_ref().take(len).read_to_end(&mut v)?;
    if (got as u64) < len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    Ok(Capped::Value(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_bytes_match_torch() {
        // torch's test_store.py::TestClientProtocol asserts exactly these five bytes.
        let b = Request::new(Command::Validate)
            .u32(VALIDATE_MAGIC)
            .into_bytes();
        assert_eq!(b, [0x00, 0xce, 0xf7, 0x85, 0x3c]);
    }

    #[test]
    fn set_bytes_match_torch() {
        // Captured from torch 2.9.1's client: store.set("k", "v1").
        let b = Request::new(Command::Set)
            .bytes(b"/k")
            .bytes(b"v1")
            .into_bytes();
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(hex, "0102000000000000002f6b02000000000000007631");
    }

    #[test]
    fn command_bytes_round_trip() {
        for b in 0..=16u8 {
            let c = Command::from_byte(b).unwrap();
            assert_eq!(c as u8, b);
        }
        assert_eq!(Command::from_byte(17), None);
        assert_eq!(Command::from_byte(255), None);
    }

    #[test]
    fn read_sized_caps_and_eof() {
        let mut ok: &[u8] = &[3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c'];
        assert!(matches!(read_sized(&mut ok, 3), Ok(Capped::Value(v)) if v == b"abc"));
        let mut big: &[u8] = &[0xff; 8];
        assert!(matches!(
            read_sized(&mut big, 100),
            Ok(Capped::TooLong(u64::MAX))
        ));
        let mut short: &[u8] = &[5, 0, 0, 0, 0, 0, 0, 0, b'a'];
        assert!(read_sized(&mut short, 100).is_err());
    }
}
