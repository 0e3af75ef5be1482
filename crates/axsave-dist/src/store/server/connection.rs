//! One client connection: handshake, then request after request until it closes or breaks
//! the protocol.

use std::collections::HashSet;
use std::io::{self, BufReader, ErrorKind};
use std::net::TcpStream;
use std::sync::Arc;

use thiserror::Error;

use super::super::protocol::{
    self, CHECK_NOT_READY, CHECK_READY, Capped, Command, VALIDATE_MAGIC, WAIT_CANCELED,
    WAIT_STOP_WAITING,
};
use super::state::{Waiter, Writer, write_to};
use super::{ServerOptions, Shared};

/// Why a connection was dropped (logged at debug level only).
#[derive(Debug, Error)]
pub(super) enum ConnDrop {
    /// The socket failed mid-request.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol or a limit.
    #[error("{0}")]
    Protocol(String),
}

type Served = Result<(), ConnDrop>;

fn violation(msg: impl Into<String>) -> ConnDrop {
    ConnDrop::Protocol(msg.into())
}

/// Serves one connection until it closes or misbehaves.
pub(super) fn serve(id: u64, stream: TcpStream, writer: &Writer, shared: &Shared) -> Served {
    let mut r = BufReader::new(stream);
    let opts = &shared.options;
    // Handshake.
    match protocol::read_u8(&mut r) {
        Ok(0) => {}
        Ok(b) => {
            return Err(violation(format!(
                "first message is command {b}, not VALIDATE"
            )));
        }
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let magic = protocol::read_u32(&mut r)?;
    if magic != VALIDATE_MAGIC {
        return Err(violation(format!("bad VALIDATE magic {magic:#x}")));
    }
    loop {
        let byte = match protocol::read_u8(&mut r) {
            Ok(b) => b,
            // A clean close between requests.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let cmd =
            Command::from_byte(byte).ok_or_else(|| violation(format!("unknown command {byte}")))?;
        if cmd != Command::CancelWait && shared.state().waiters.contains_key(&id) {
            return Err(violation(format!("{cmd:?} sent while a WAIT is pending")));
        }
        let reply: Option<Vec<u8>> = match cmd {
            Command::Validate => return Err(violation("VALIDATE sent twice")),
            Command::Ping => Some(protocol::read_u32(&mut r)?.to_le_bytes().to_vec()),
            Command::Set => {
                let key = read_key(&mut r, opts)?;
                let value = read_value(&mut r, opts)?;
                let mut st = shared.state();
                st.room_for(&key, value.len(), true, opts)
                    .map_err(violation)?;
                st.set(key, value);
                None
            }
            Command::CompareSet => {
                let key = read_key(&mut r, opts)?;
                let expected = read_value(&mut r, opts)?;
                let desired = read_value(&mut r, opts)?;
                let mut st = shared.state();
                st.room_for(&key, desired.len(), true, opts)
                    .map_err(violation)?;
                let now = match st.kv.get(&key) {
                    None if expected.is_empty() => {
                        st.set(key, desired.clone());
                        desired
                    }
                    // torch answers `expected` here although nothing was stored.
                    None => expected,
                    Some(current) if *current == expected => {
                        st.set(key, desired.clone());
                        desired
                    }
                    Some(current) => current.clone(),
                };
                Some(bytes_reply(&now))
            }
            Command::Get => {
                let key = read_key(&mut r, opts)?;
                let st = shared.state();
                Some(bytes_reply(st.kv.get(&key).map_or(&[][..], |v| v)))
            }
            Command::Add => {
                let key = read_key(&mut r, opts)?;
                let delta = protocol::read_i64(&mut r)?;
                let mut st = shared.state();
                let old = match st.kv.get(&key) {
                    None => 0,
                    Some(v) => std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.trim().parse::<i64>().ok())
                        .ok_or_else(|| violation("ADD on a value that is not a decimal integer"))?,
                };
                let new = old
                    .checked_add(delta)
                    .ok_or_else(|| violation("ADD overflows i64"))?;
                let text = new.to_string().into_bytes();
                st.room_for(&key, text.len(), true, opts)
                    .map_err(violation)?;
                st.set(key, text);
                Some(new.to_le_bytes().to_vec())
            }
            Command::Check => {
                let keys = read_keys(&mut r, opts)?;
                let st = shared.state();
                let ready = keys.iter().all(|k| st.exists(k));
                Some(vec![if ready { CHECK_READY } else { CHECK_NOT_READY }])
            }
            Command::Wait => {
                let keys = read_keys(&mut r, opts)?;
                let mut st = shared.state();
                let missing: HashSet<Vec<u8>> =
                    keys.into_iter().filter(|k| !st.exists(k)).collect();
                if missing.is_empty() {
                    Some(vec![WAIT_STOP_WAITING])
                } else {
                    for k in &missing {
                        st.waiting_on.entry(k.clone()).or_default().push(id);
                    }
                    st.waiters.insert(
                        id,
                        Waiter {
                            missing,
                            writer: Arc::clone(writer),
                        },
                    );
                    // The reply comes from whoever sets the last key, or from CANCEL_WAIT.
                    None
                }
            }
            Command::CancelWait => {
                // Under the store lock, so a STOP_WAITING for this wait is either already
                // written or never will be.
                let mut st = shared.state();
                st.cancel(id);
                if !write_to(writer, &[WAIT_CANCELED]) {
                    return Err(violation("cannot write the reply"));
                }
                None
            }
            Command::GetNumKeys => Some((shared.state().kv.len() as i64).to_le_bytes().to_vec()),
            Command::DeleteKey => {
                let key = read_key(&mut r, opts)?;
                let mut st = shared.state();
                let old = st.kv.remove(&key);
                if let Some(old) = &old {
                    st.held -= key.len() + old.len();
                }
                let n = i64::from(old.is_some());
                Some(n.to_le_bytes().to_vec())
            }
            Command::Append => {
                let key = read_key(&mut r, opts)?;
                let value = read_value(&mut r, opts)?;
                let mut st = shared.state();
                st.room_for(&key, value.len(), false, opts)
                    .map_err(violation)?;
                st.held += value.len()
                    + if st.kv.contains_key(&key) {
                        0
                    } else {
                        key.len()
                    };
                st.kv
                    .entry(key.clone())
                    .or_default()
                    .extend_from_slice(&value);
                st.wake(&key);
                None
            }
            Command::MultiGet => {
                let keys = read_keys(&mut r, opts)?;
                let st = shared.state();
                let mut out = Vec::new();
                for k in &keys {
                    out.extend_from_slice(&bytes_reply(st.kv.get(k).map_or(&[][..], |v| v)));
                }
                Some(out)
            }
            Command::MultiSet => {
                let n = protocol::read_i64(&mut r)?;
                let n = usize::try_from(n)
                    .ok()
                    .filter(|&n| n <= opts.max_keys_per_request)
                    .ok_or_else(|| violation(format!("MULTI_SET of {n} keys")))?;
                let mut pairs = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let key = read_key(&mut r, opts)?;
                    let value = read_value(&mut r, opts)?;
                    pairs.push((key, value));
                }
                let mut st = shared.state();
                for (k, v) in pairs {
                    st.room_for(&k, v.len(), true, opts).map_err(violation)?;
                    st.set(k, v);
                }
                None
            }
            Command::QueuePush => {
                let key = read_key(&mut r, opts)?;
                let value = read_value(&mut r, opts)?;
                let mut st = shared.state();
                st.room_for(&key, value.len(), false, opts)
                    .map_err(violation)?;
                st.held += value.len()
                    + if st.queues.contains_key(&key) {
                        0
                    } else {
                        key.len()
                    };
                st.queues.entry(key.clone()).or_default().push_back(value);
                st.wake(&key);
                None
            }
            Command::QueuePop => {
                let key = read_key(&mut r, opts)?;
                let mut st = shared.state();
                let q = st.queues.get_mut(&key);
                let len = q.as_ref().map_or(0, |q| q.len());
                let mut out = (len as i64).to_le_bytes().to_vec();
                if let Some(v) = q.and_then(|q| q.pop_front()) {
                    out.extend_from_slice(&bytes_reply(&v));
                    st.held -= v.len();
                }
                Some(out)
            }
            Command::QueueLen => {
                let key = read_key(&mut r, opts)?;
                let len = shared.state().queues.get(&key).map_or(0, |q| q.len());
                Some((len as i64).to_le_bytes().to_vec())
            }
        };
        if let Some(bytes) = reply {
            if !write_to(writer, &bytes) {
                return Err(violation("cannot write the reply"));
            }
        }
    }
}

fn bytes_reply(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + v.len());
    out.extend_from_slice(&(v.len() as u64).to_le_bytes());
    out.extend_from_slice(v);
    out
}

fn read_key(r: &mut impl io::Read, opts: &ServerOptions) -> Result<Vec<u8>, ConnDrop> {
    match protocol::read_sized(r, opts.max_key_len)? {
        Capped::Value(v) => Ok(v),
        Capped::TooLong(n) => Err(violation(format!(
            "key of {n} bytes exceeds the limit of {}",
            opts.max_key_len
        ))),
    }
}

fn read_value(r: &mut impl io::Read, opts: &ServerOptions) -> Result<Vec<u8>, ConnDrop> {
    match protocol::read_sized(r, opts.max_value_len)? {
        Capped::Value(v) => Ok(v),
        Capped::TooLong(n) => Err(violation(format!(
            "value of {n} bytes exceeds the limit of {}",
            opts.max_value_len
        ))),
    }
}

fn read_keys(r: &mut impl io::Read, opts: &ServerOptions) -> Result<Vec<Vec<u8>>, ConnDrop> {
    let n = protocol::read_u64(r)?;
    if n > opts.max_keys_per_request as u64 {
        return Err(violation(format!(
            "{n} keys in one request exceed the limit of {}",
            opts.max_keys_per_request
        )));
    }
    (0..n).map(|_| read_key(r, opts)).collect()
}
