//! The rendezvous store: PyTorch's TCPStore wire protocol, client and server.
//!
//! * [`protocol`] — command numbering (torch ≥ 2.1), framing and limits.
//! * [`client`] — [`StoreClient`]: talks to torch's servers (libuv and classic; torchrun's
//!   agent store) and to ours.
//! * [`server`] — [`StoreServer`]: what rank 0 hosts when no torchrun agent does; torch's own
//!   clients can use it too.
//! * [`rendezvous`] — barrier, broadcast and failure flag built on the client.
//!
//! Only small data belongs here (addresses, ids, plans, success or failure): torch's libuv
//! server caps values at 8 MiB and holds everything in the agent's memory.

pub mod client;
pub mod protocol;
pub mod rendezvous;
pub mod server;

pub use client::{ClientOptions, StoreClient, StoreError};
pub use rendezvous::{CoordError, Failure};
pub use server::{ServerError, ServerOptions, StoreServer};
