//! Blocking TCPStore client, wire compatible with torch's c10d `TCPStore` client.
//!
//! * Connects with retry and backoff until a deadline (the server may not be up yet), trying
//!   every address the host resolves to (IPv6 and IPv4), then sends VALIDATE. It never sends
//!   PING: torch ≤ 2.4 servers close the connection on it.
//! * Keys go on the wire as `"/" + namespace + key`, exactly as torch's client (`keyPrefix_ =
//!   "/"`) and `PrefixStore` build them, so a torch client with
//!   `PrefixStore("axsave/run/0", TCPStore(...))` sees the same keys as
//!   `StoreClient::connect(...).with_namespace("axsave/run/0")`.
//! * `get`/`multi_get` first WAIT for the keys, then read them, as torch does (torch's classic
//!   server drops the connection on a GET of a missing key).
//! * Waits are bounded by a deadline: the socket is polled until then; on timeout the client
//!   sends CANCEL_WAIT and reads until WAIT_CANCELED, so the connection stays usable.
//! * Every other reply must arrive within [`ClientOptions::io_timeout`]. After any transport or
//!   protocol error the connection is marked broken and later calls fail fast
//!   ([`StoreError::Broken`]); [`StoreClient::reconnect`] opens a fresh one.
//!
//! One request is outstanding at a time and a WAIT occupies the connection, so use one client
//! per thread (`reconnect` gives another connection to the same store).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::net::{GaveUp, MIN_TIMEOUT, attempt_timeout, connect_with_backoff, is_timeout};

use super::protocol::{
    self, CHECK_NOT_READY, CHECK_READY, Capped, Command, LIBUV_MAX_KEY_COUNT, LIBUV_MAX_KEY_LEN,
    LIBUV_MAX_VALUE_LEN, Request, VALIDATE_MAGIC, WAIT_CANCELED, WAIT_STOP_WAITING,
};

/// Limits and timeouts of a [`StoreClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long [`StoreClient::connect`] keeps retrying (torch's default store timeout is 300 s).
    pub connect_timeout: Duration,
    /// How long any reply other than a WAIT may take before the connection is given up.
    pub io_timeout: Duration,
    /// Longest key accepted, namespace and leading `/` included (torch's libuv server: 8 KiB).
    pub max_key_len: usize,
    /// Largest value sent in one request (torch's libuv server closes the connection above
    /// 8 MiB; raise it only for our own [`StoreServer`](super::StoreServer) configured to match).
    pub max_value_len: usize,
    /// Largest value accepted in a reply (guards memory against a confused peer).
    pub max_reply_len: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(300),
            io_timeout: Duration::from_secs(60),
            max_key_len: LIBUV_MAX_KEY_LEN,
            max_value_len: LIBUV_MAX_VALUE_LEN,
            max_reply_len: 256 * 1024 * 1024,
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// No connection could be made before the connect deadline: nothing listens there yet (or
    /// ever), the host does not resolve, or a firewall drops the packets.
    #[error("could not connect to the store at {endpoint} within {waited:?}: {last_error}")]
    ConnectTimeout {
        /// `host:port` as given.
        endpoint: String,
        /// How long we tried.
        waited: Duration,
        /// The last failure seen.
        last_error: String,
    },
    /// The store closed the connection: the process hosting it died or exited, or it rejected
    /// our request (torch's servers close on requests they cannot parse or limits they hit).
    #[error(
        "the store at {peer} closed the connection during {op} (server gone, or it rejected the request)"
    )]
    Closed {
        /// Address of the store.
        peer: SocketAddr,
        /// The operation that was running.
        op: &'static str,
    },
    /// A reply did not come within [`ClientOptions::io_timeout`]: the store host is hung or
    /// unreachable.
    #[error("no reply from the store at {peer} within {timeout:?} during {op}")]
    NoReply {
        /// Address of the store.
        peer: SocketAddr,
        /// The operation that was running.
        op: &'static str,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// Another socket error.
    #[error("I/O error talking to the store at {peer} during {op}: {source}")]
    Io {
        /// Address of the store.
        peer: SocketAddr,
        /// The operation that was running.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The store answered something the protocol does not allow (not a TCPStore, or a
    /// different protocol version).
    #[error("unexpected reply from the store at {peer} to {op}: {detail}")]
    Protocol {
        /// Address of the store.
        peer: SocketAddr,
        /// The operation that was running.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// Keys were still missing at the deadline. The connection remains usable.
    #[error("timed out after {waited:?} waiting for store keys {keys:?}")]
    WaitTimeout {
        /// The keys waited for (without namespace).
        keys: Vec<String>,
        /// How long we waited.
        waited: Duration,
    },
    /// A key longer than [`ClientOptions::max_key_len`]; nothing was sent.
    #[error("store key of {len} bytes exceeds the limit of {max} bytes")]
    KeyTooLong {
        /// Its length on the wire.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value larger than [`ClientOptions::max_value_len`]; nothing was sent.
    #[error("store value of {len} bytes exceeds the limit of {max} bytes")]
    ValueTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More keys in one request than torch's servers accept; nothing was sent.
    #[error("{count} keys in one store request exceed the limit of {max}")]
    TooManyKeys {
        /// Keys in the request.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An earlier error left the connection in an unknown state; open a new one.
    #[error("store connection is unusable after an earlier error: {reason}")]
    Broken {
        /// The earlier error.
        reason: String,
    },
}

/// Longest wait between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A connection to a TCPStore server (ours or torch's).
#[derive(Debug)]
pub struct StoreClient {
    stream: TcpStream,
    peer: SocketAddr,
    host: String,
    port: u16,
    options: ClientOptions,
    /// `/` then each namespace segment followed by `/`.
    prefix: String,
    broken: Option<String>,
}

impl StoreClient {
    /// Connects to `host:port`, retrying until [`ClientOptions::connect_timeout`], and sends
    /// VALIDATE. `host` may be a name, an IPv4 address or an IPv6 address (with or without
    /// brackets).
    pub fn connect(
        host: &str,
        port: u16,
        options: ClientOptions,
    ) -> Result<StoreClient, StoreError> {
        let host = host
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let (stream, peer) = open(&host, port, &options)?;
        Ok(StoreClient {
            stream,
            peer,
            host,
            port,
            options,
            prefix: "/".to_owned(),
            broken: None,
        })
    }

    /// A new connection to the same store with the same options and namespace.
    pub fn reconnect(&self) -> Result<StoreClient, StoreError> {
        let (stream, peer) = open(&self.host, self.port, &self.options)?;
        Ok(StoreClient {
            stream,
            peer,
            host: self.host.clone(),
            port: self.port,
            options: self.options.clone(),
            prefix: self.prefix.clone(),
            broken: None,
        })
    }

    /// Puts later keys under `namespace`, like torch's `PrefixStore(namespace, store)`: key `k`
    /// becomes `namespace + "/" + k`. Calls nest like nested `PrefixStore`s.
    pub fn with_namespace(mut self, namespace: &str) -> StoreClient {
        self.prefix.push_str(namespace);
        self.prefix.push('/');
        self
    }

    /// The namespace in effect, as the part between the leading `/` and the key.
    pub fn namespace(&self) -> &str {
        &self.prefix[1..]
    }

    /// The address actually connected to.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The local end of the connection: the source address of this host's route to the store.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Stores `value` under `key`.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let k = self.wire_key(key)?;
        self.check_value(value)?;
        let req = Request::new(Command::Set).bytes(k.as_bytes()).bytes(value);
        self.run(|c| c.send(req, "set"))
    }

    /// Waits until `key` exists (up to `deadline`), then returns its value.
    pub fn get(&mut self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        let k = self.wire_key(key)?;
        self.wait_wire(std::slice::from_ref(&k), &[key], deadline)?;
        let req = Request::new(Command::Get).bytes(k.as_bytes());
        self.run(|c| {
            c.send(req, "get")?;
            c.read_value("get")
        })
    }

    /// Adds `delta` to the decimal counter at `key` (created at 0) and returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let k = self.wire_key(key)?;
        let req = Request::new(Command::Add).bytes(k.as_bytes()).i64(delta);
        self.run(|c| {
            c.send(req, "add")?;
            c.read_i64("add")
        })
    }

    /// Whether all `keys` exist now, without waiting.
    pub fn check(&mut self, keys: &[&str]) -> Result<bool, StoreError> {
        let wire = self.wire_keys(keys)?;
        let req = keyed(Request::new(Command::Check), &wire);
        self.run(|c| {
            c.send(req, "check")?;
            match c.read_u8("check")? {
                CHECK_READY => Ok(true),
                CHECK_NOT_READY => Ok(false),
                other => Err(c.protocol("check", format!("reply byte {other}"))),
            }
        })
    }

    /// Waits until all `keys` exist, or fails with [`StoreError::WaitTimeout`] at `deadline`
    /// (the connection stays usable).
    pub fn wait(&mut self, keys: &[&str], deadline: Instant) -> Result<(), StoreError> {
        let wire = self.wire_keys(keys)?;
        self.wait_wire(&wire, keys, deadline)
    }

    /// Atomically: if `key` holds `expected` (or is missing and `expected` is empty), store
    /// `desired`. Returns the value after the operation. As in torch, a missing key with a
    /// non-empty `expected` returns `expected` and stores nothing.
    pub fn compare_set(
        &mut self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let k = self.wire_key(key)?;
        self.check_value(expected)?;
        self.check_value(desired)?;
        let req = Request::new(Command::CompareSet)
            .bytes(k.as_bytes())
            .bytes(expected)
            .bytes(desired);
        self.run(|c| {
            c.send(req, "compare_set")?;
            c.read_value("compare_set")
        })
    }

    /// Waits until all `keys` exist (up to `deadline`), then returns their values in order.
    pub fn multi_get(
        &mut self,
        keys: &[&str],
        deadline: Instant,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let wire = self.wire_keys(keys)?;
        self.wait_wire(&wire, keys, deadline)?;
        let req = keyed(Request::new(Command::MultiGet), &wire);
        self.run(|c| {
            c.send(req, "multi_get")?;
            (0..wire.len()).map(|_| c.read_value("multi_get")).collect()
        })
    }

    /// Stores several key/value pairs in one request.
    pub fn multi_set(&mut self, pairs: &[(&str, &[u8])]) -> Result<(), StoreError> {
        if pairs.len() > LIBUV_MAX_KEY_COUNT {
            return Err(StoreError::TooManyKeys {
                count: pairs.len(),
                max: LIBUV_MAX_KEY_COUNT,
            });
        }
        let mut req = Request::new(Command::MultiSet).i64(pairs.len() as i64);
        for (key, value) in pairs {
            let k = self.wire_key(key)?;
            self.check_value(value)?;
            req = req.bytes(k.as_bytes()).bytes(value);
        }
        self.run(|c| c.send(req, "multi_set"))
    }

    /// Deletes `key`; `true` if it existed.
    pub fn delete_key(&mut self, key: &str) -> Result<bool, StoreError> {
        let k = self.wire_key(key)?;
        let req = Request::new(Command::DeleteKey).bytes(k.as_bytes());
        self.run(|c| {
            c.send(req, "delete_key")?;
            Ok(c.read_i64("delete_key")? == 1)
        })
    }

    /// Number of keys in the whole store (all namespaces, torch's own keys included).
    pub fn num_keys(&mut self) -> Result<u64, StoreError> {
        self.run(|c| {
            c.send(Request::new(Command::GetNumKeys), "num_keys")?;
            let n = c.read_i64("num_keys")?;
            u64::try_from(n).map_err(|_| c.protocol("num_keys", format!("negative count {n}")))
        })
    }

    /// Appends `value` to the value at `key` (creating it).
    pub fn append(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let k = self.wire_key(key)?;
        self.check_value(value)?;
        let req = Request::new(Command::Append)
            .bytes(k.as_bytes())
            .bytes(value);
        self.run(|c| c.send(req, "append"))
    }

    /// Pushes `value` onto the queue `key` (torch's libuv server and ours; torch's classic
    /// server closes the connection).
    pub fn queue_push(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let k = self.wire_key(key)?;
        self.check_value(value)?;
        let req = Request::new(Command::QueuePush)
            .bytes(k.as_bytes())
            .bytes(value);
        self.run(|c| c.send(req, "queue_push"))
    }

    /// Pops the front of the queue `key` without waiting; `None` when it is empty.
    pub fn queue_pop(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let k = self.wire_key(key)?;
        let req = Request::new(Command::QueuePop).bytes(k.as_bytes());
        self.run(|c| {
            c.send(req, "queue_pop")?;
            match c.read_i64("queue_pop")? {
                0 => Ok(None),
                n if n > 0 => c.read_value("queue_pop").map(Some),
                n => Err(c.protocol("queue_pop", format!("negative length {n}"))),
            }
        })
    }

    /// Length of the queue `key` (0 when it does not exist).
    pub fn queue_len(&mut self, key: &str) -> Result<u64, StoreError> {
        let k = self.wire_key(key)?;
        let req = Request::new(Command::QueueLen).bytes(k.as_bytes());
        self.run(|c| {
            c.send(req, "queue_len")?;
            let n = c.read_i64("queue_len")?;
            u64::try_from(n).map_err(|_| c.protocol("queue_len", format!("negative length {n}")))
        })
    }

    // ---- internals ----

    fn wire_key(&self, key: &str) -> Result<String, StoreError> {
        let k = format!("{}{}", self.prefix, key);
        if k.len() > self.options.max_key_len {
            return Err(StoreError::KeyTooLong {
                len: k.len(),
                max: self.options.max_key_len,
            });
        }
        Ok(k)
    }

    fn wire_keys(&self, keys: &[&str]) -> Result<Vec<String>, StoreError> {
        if keys.len() > LIBUV_MAX_KEY_COUNT {
            return Err(StoreError::TooManyKeys {
                count: keys.len(),
                max: LIBUV_MAX_KEY_COUNT,
            });
        }
        keys.iter().map(|k| self.wire_key(k)).collect()
    }

    fn check_value(&self, value: &[u8]) -> Result<(), StoreError> {
        if value.len() > self.options.max_value_len {
            return Err(StoreError::ValueTooLarge {
                len: value.len(),
                max: self.options.max_value_len,
            });
        }
        Ok(())
    }

    /// Runs one exchange; any error except a clean wait timeout breaks the connection.
    fn run<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if let Some(reason) = &self.broken {
            return Err(StoreError::Broken {
                reason: reason.clone(),
            });
        }
        let result = f(self);
        if let Err(e) = &result {
            if !matches!(e, StoreError::WaitTimeout { .. }) {
                self.broken = Some(e.to_string());
                // Nothing more will be read or written on it.
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        result
    }

    fn wait_wire(
        &mut self,
        wire: &[String],
        keys: &[&str],
        deadline: Instant,
    ) -> Result<(), StoreError> {
        let req = keyed(Request::new(Command::Wait), wire);
        let started = Instant::now();
        self.run(|c| {
            c.send(req, "wait")?;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match c.try_read_u8(left.max(MIN_TIMEOUT), "wait")? {
                    Some(WAIT_STOP_WAITING) => return Ok(()),
                    Some(other) => return Err(c.protocol("wait", format!("reply byte {other}"))),
                    // Timer fired (possibly a little early): look at the deadline again.
                    None => continue,
                }
            }
            c.send(Request::new(Command::CancelWait), "cancel_wait")?;
            match c.read_u8("cancel_wait")? {
                WAIT_CANCELED => Err(StoreError::WaitTimeout {
                    keys: keys.iter().map(|k| k.to_string()).collect(),
                    waited: started.elapsed(),
                }),
                // The keys arrived while the cancel was on its way; the server then still
                // answers the cancel. The keys exist, so the wait succeeded after all.
                WAIT_STOP_WAITING => match c.read_u8("cancel_wait")? {
                    WAIT_CANCELED => Ok(()),
                    other => Err(c.protocol("cancel_wait", format!("reply byte {other}"))),
                },
                other => Err(c.protocol("cancel_wait", format!("reply byte {other}"))),
            }
        })
    }

    fn send(&mut self, req: Request, op: &'static str) -> Result<(), StoreError> {
        let bytes = req.into_bytes();
        self.stream
            .write_all(&bytes)
            .map_err(|e| self.io_error(op, e))
    }

    fn set_read_timeout(&mut self, t: Duration, op: &'static str) -> Result<(), StoreError> {
        self.stream
            .set_read_timeout(Some(t.max(MIN_TIMEOUT)))
            .map_err(|e| self.io_error(op, e))
    }

    /// One byte, or `None` if nothing came within `timeout` (nothing consumed then).
    fn try_read_u8(
        &mut self,
        timeout: Duration,
        op: &'static str,
    ) -> Result<Option<u8>, StoreError> {
        self.set_read_timeout(timeout, op)?;
        let mut b = [0u8; 1];
        loop {
            return match self.stream.read(&mut b) {
                Ok(0) => Err(StoreError::Closed {
                    peer: self.peer,
                    op,
                }),
                Ok(_) => Ok(Some(b[0])),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => Ok(None),
                Err(e) => Err(self.io_error(op, e)),
            };
        }
    }

    fn read_u8(&mut self, op: &'static str) -> Result<u8, StoreError> {
        self.set_read_timeout(self.options.io_timeout, op)?;
        protocol::read_u8(&mut self.stream).map_err(|e| self.io_error(op, e))
    }

    fn read_i64(&mut self, op: &'static str) -> Result<i64, StoreError> {
        self.set_read_timeout(self.options.io_timeout, op)?;
        protocol::read_i64(&mut self.stream).map_err(|e| self.io_error(op, e))
    }

    fn read_value(&mut self, op: &'static str) -> Result<Vec<u8>, StoreError> {
        self.set_read_timeout(self.options.io_timeout, op)?;
        match protocol::read_sized(&mut self.stream, self.options.max_reply_len) {
            Ok(Capped::Value(v)) => Ok(v),
            Ok(Capped::TooLong(n)) => Err(self.protocol(
                op,
                format!(
                    "value of {n} bytes exceeds max_reply_len {}",
                    self.options.max_reply_len
                ),
            )),
            Err(e) => Err(self.io_error(op, e)),
        }
    }

    fn protocol(&self, op: &'static str, detail: String) -> StoreError {
        StoreError::Protocol {
            peer: self.peer,
            op,
            detail,
        }
    }

    fn io_error(&self, op: &'static str, e: io::Error) -> StoreError {
        match e.kind() {
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected => StoreError::Closed {
                peer: self.peer,
                op,
            },
            _ if is_timeout(&e) => StoreError::NoReply {
                peer: self.peer,
                op,
                timeout: self.options.io_timeout,
            },
            _ => StoreError::Io {
                peer: self.peer,
                op,
                source: e,
            },
        }
    }
}

fn keyed(req: Request, wire: &[String]) -> Request {
    wire.iter()
        .fold(req.u64(wire.len() as u64), |r, k| r.bytes(k.as_bytes()))
}

/// Connects and validates, retrying with backoff until the connect deadline.
fn open(
    host: &str,
    port: u16,
    options: &ClientOptions,
) -> Result<(TcpStream, SocketAddr), StoreError> {
    let endpoint = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    connect_with_backoff(options.connect_timeout, MAX_BACKOFF, None, |deadline| {
        // Resolve on every round: the name may only become resolvable later (new nodes).
        let addrs: Vec<SocketAddr> = match (host, port).to_socket_addrs() {
            Ok(addrs) => addrs.collect(),
            Err(e) => return Err(format!("cannot resolve {host}: {e}")),
        };
        if addrs.is_empty() {
            return Err(format!("{host} resolves to no address"));
        }
        let mut last_error = String::from("no attempt made before the deadline");
        for addr in addrs {
            if deadline <= Instant::now() {
                break;
            }
            match try_connect(addr, attempt_timeout(deadline), options) {
                Ok(stream) => return Ok((stream, addr)),
                Err(e) => last_error = format!("{addr}: {e}"),
            }
        }
        Err(last_error)
    })
    .map_err(|gave_up| match gave_up {
        GaveUp::TimedOut { waited, last_error } => StoreError::ConnectTimeout {
            endpoint,
            waited,
            last_error,
        },
        // Without a cancel flag it cannot be cancelled.
        GaveUp::Cancelled => StoreError::ConnectTimeout {
            endpoint,
            waited: Duration::ZERO,
            last_error: "cancelled".to_owned(),
        },
    })
}

fn try_connect(
    addr: SocketAddr,
    timeout: Duration,
    options: &ClientOptions,
) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    // Requests are written whole; do not let Nagle hold back the small ones.
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(options.io_timeout.max(MIN_TIMEOUT)))?;
    stream.set_read_timeout(Some(options.io_timeout.max(MIN_TIMEOUT)))?;
    let validate = Request::new(Command::Validate)
        .u32(VALIDATE_MAGIC)
        .into_bytes();
    stream.write_all(&validate)?;
    Ok(stream)
}
