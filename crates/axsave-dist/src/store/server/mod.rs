//! TCPStore server: answers torch's c10d clients (≥ 2.1) and ours.
//!
//! Blocking sockets, one thread per connection, all data in memory behind one mutex. The store
//! only ever holds small rendezvous data (addresses, ids, plans), so simplicity wins over
//! throughput.
//!
//! Behaviour, where torch's two servers differ choosing the more forgiving one:
//! * The first message on a connection must be VALIDATE with the right magic, else the
//!   connection is dropped (torch's classic server does the same).
//! * Every command is answered, PING and the QUEUE commands included (torch ≥ 2.5 clients send
//!   PING right after VALIDATE).
//! * GET/MULTI_GET of a missing key returns an empty value (libuv; classic drops the
//!   connection). Clients should WAIT first, as torch's and ours do.
//! * WAIT replies once every key exists; a key counts as existing if it has a value or is a
//!   non-empty queue (libuv). SET, ADD, APPEND, COMPARE_SET (when it stores), MULTI_SET and
//!   QUEUE_PUSH wake waiters.
//! * CANCEL_WAIT answers WAIT_CANCELED; if the keys arrived first the client gets the late
//!   STOP_WAITING before it, never after (both are written under the store lock).
//! * A connection with a pending WAIT may only send CANCEL_WAIT; anything else is a protocol
//!   violation and drops it (torch's clients never do this).
//! * Limits like libuv's: keys ≤ 8 KiB, values ≤ 8 MiB, ≤ 128 Ki keys per request; and on what
//!   the store holds in all ([`ServerOptions::max_keys`], [`ServerOptions::max_held_bytes`]);
//!   violating requests drop the connection. The value limit is configurable
//!   ([`ServerOptions::max_value_len`]) because axsave's own broadcasts may need more; torch
//!   clients are unaffected by a higher limit.
//! * ADD on a value that is not a decimal integer, or one that would overflow, drops the
//!   connection (torch's servers fail the same way: the protocol has no error reply).
//!
//! A dropped connection never affects the others. Idle connections are kept indefinitely
//! (torch clients hold theirs for the whole job); writes have a timeout so a client that stops
//! reading cannot stall the server.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::net;

use super::protocol::{LIBUV_MAX_KEY_COUNT, LIBUV_MAX_KEY_LEN, LIBUV_MAX_VALUE_LEN};

mod connection;
mod state;

use connection::serve;
use state::State;

/// Configuration of a [`StoreServer`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Addresses to listen on. Empty: every interface on [`ServerOptions::port`], IPv6 and
    /// IPv4 (a dual-stack `[::]` socket, plus `0.0.0.0` if the system keeps them apart, or
    /// `0.0.0.0` alone without IPv6).
    pub bind: Vec<SocketAddr>,
    /// Port used when `bind` is empty; 0 picks a free port (see [`StoreServer::port`]).
    pub port: u16,
    /// Longest key accepted (libuv: 8 KiB).
    pub max_key_len: usize,
    /// Largest value accepted in one request (libuv: 8 MiB).
    pub max_value_len: usize,
    /// Most keys in one CHECK/WAIT/MULTI_GET/MULTI_SET (libuv: 128 Ki).
    pub max_keys_per_request: usize,
    /// Most distinct keys (and queues) held. axsave sets a handful per rank plus the chunks of
    /// its broadcasts, so the default (64 Ki) serves ten thousand ranks; a client that keeps
    /// adding keys past it is dropped instead of growing the server without bound.
    pub max_keys: usize,
    /// Most bytes of keys and values held in all (default 1 GiB, far above what a rendezvous
    /// holds: addresses, inventories and the plan); a request that would pass it is dropped.
    pub max_held_bytes: usize,
    /// Most simultaneous connections; further ones are closed at once.
    pub max_connections: usize,
    /// How long one reply may take to write before the connection is dropped.
    pub write_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            bind: Vec::new(),
            port: 0,
            max_key_len: LIBUV_MAX_KEY_LEN,
            max_value_len: LIBUV_MAX_VALUE_LEN,
            max_keys_per_request: LIBUV_MAX_KEY_COUNT,
            max_keys: 64 * 1024,
            max_held_bytes: 1 << 30,
            max_connections: 16 * 1024,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Binding a listening socket failed (port in use, address not local, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// Configuring a listening socket failed.
    #[error("cannot configure the store's listening socket: {source}")]
    Listener {
        /// The error.
        source: io::Error,
    },
    /// The accept thread could not be started (out of threads or memory).
    #[error("cannot start the store's accept thread: {source}")]
    Spawn {
        /// The error.
        source: io::Error,
    },
}

/// How often [`StoreServer::wait_for_disconnects`] looks at the connection count.
const DISCONNECT_POLL: Duration = Duration::from_millis(5);
/// Stack of a connection thread: the handler is shallow and buffers live on the heap.
const CONN_STACK: usize = 256 * 1024;

/// A running TCPStore server. Dropping it shuts it down.
#[derive(Debug)]
pub struct StoreServer {
    addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// Binds and starts serving in background threads.
    pub fn start(options: ServerOptions) -> Result<StoreServer, ServerError> {
        let listeners = bind(&options)?;
        let mut addrs = Vec::with_capacity(listeners.len());
        for l in &listeners {
            l.set_nonblocking(true)
                .map_err(|source| ServerError::Listener { source })?;
            addrs.push(
                l.local_addr()
                    .map_err(|source| ServerError::Listener { source })?,
            );
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            options,
        });
        let s = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("axsave-store-accept".into())
            .spawn(move || accept_loop(listeners, s))
            .map_err(|source| ServerError::Spawn { source })?;
        Ok(StoreServer {
            addrs,
            shared,
            accept: Some(accept),
        })
    }

    /// The port listened on (of the first address, when several were bound).
    pub fn port(&self) -> u16 {
        self.addrs.first().map_or(0, |a| a.port())
    }

    /// Every address listened on.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Number of client connections open now.
    pub fn connection_count(&self) -> usize {
        self.shared.conns().len()
    }

    /// Waits until every client has disconnected, or until `deadline`; true if they all did.
    /// The rank hosting the store calls this (after closing its own client) before shutting
    /// down, so a peer that is still between its last requests is not cut off.
    pub fn wait_for_disconnects(&self, deadline: Instant) -> bool {
        loop {
            if self.connection_count() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(DISCONNECT_POLL);
        }
    }

    /// Stops accepting, closes every connection and joins every thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(accept) = self.accept.take() {
            self.shared.stopping.store(true, Ordering::SeqCst);
            // The accept thread closes and joins the connection threads before it returns.
            let _ = accept.join();
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind(options: &ServerOptions) -> Result<Vec<TcpListener>, ServerError> {
    if !options.bind.is_empty() {
        return options
            .bind
            .iter()
            .map(|&addr| {
                TcpListener::bind(addr).map_err(|source| ServerError::Bind { addr, source })
            })
            .collect();
    }
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, options.port));
    match TcpListener::bind(v6) {
        Ok(l6) => {
            let port = l6
                .local_addr()
                .map_err(|source| ServerError::Listener { source })?
                .port();
            let mut out = vec![l6];
            // On a dual-stack system this fails (the IPv6 socket already takes IPv4); where
            // IPv6 sockets are IPv6-only it gives IPv4 clients their own socket.
            if let Ok(l4) = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
                out.push(l4);
            }
            Ok(out)
        }
        Err(_) => {
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, options.port));
            TcpListener::bind(v4)
                .map(|l| vec![l])
                .map_err(|source| ServerError::Bind { addr: v4, source })
        }
    }
}

/// State shared by the accept thread and the connection threads.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    stopping: AtomicBool,
    /// A handle on every open connection, to shut them down on stop.
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
    options: ServerOptions,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the store down with it; the data stays consistent
        // because every mutation completes under the lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, TcpStream>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn accept_loop(listeners: Vec<TcpListener>, shared: Arc<Shared>) {
    net::accept_loop(
        listeners,
        &shared.stopping,
        "store",
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
    if shared.conns().len() >= shared.options.max_connections {
        tracing::debug!(%peer, "store connection refused: too many connections");
        return None;
    }
    let setup = || -> io::Result<(TcpStream, TcpStream)> {
        // Accepted sockets must block even though the listener does not.
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(shared.options.write_timeout))?;
        Ok((stream.try_clone()?, stream.try_clone()?))
    };
    let (reader, registry) = match setup() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "store connection setup failed");
            return None;
        }
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared.conns().insert(id, registry);
    let s = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("axsave-store-conn".into())
        .stack_size(CONN_STACK)
        .spawn(move || {
            let writer = Arc::new(Mutex::new(stream));
            match serve(id, reader, &writer, &s) {
                Ok(()) => {}
                Err(e) => tracing::debug!(%peer, error = %e, "store connection dropped"),
            }
            s.state().cancel(id);
            if let Some(st) = s.conns().remove(&id) {
                let _ = st.shutdown(Shutdown::Both);
            }
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "cannot start a store connection thread");
            if let Some(st) = shared.conns().remove(&id) {
                let _ = st.shutdown(Shutdown::Both);
            }
            None
        }
    }
}
