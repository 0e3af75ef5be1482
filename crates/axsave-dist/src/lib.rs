//! axsave-dist: where this process stands in a distributed run, and how ranks meet.
//!
//! * [`world`] — detect rank, world size, local rank, node, launcher and the rendezvous
//!   endpoint from the environment of torchrun, a Slurm step, Open MPI / PMIx, MPICH / Intel
//!   MPI, MVAPICH, hand-set `RANK`/`WORLD_SIZE`, or nothing (one process). A pure function of
//!   an environment lookup.
//! * [`hostlist`] — Slurm hostlist expansion (`node[01-04,07]`), used for the default
//!   `MASTER_ADDR` under Slurm.
//! * [`store`] — PyTorch's TCPStore wire protocol: a blocking client (for torchrun's agent
//!   store or our own server) and a server (hosted by rank 0 otherwise), plus a barrier, a
//!   broadcast and a failure flag on top.
//! * [`address`] — which addresses the store and the data listeners bind and publish (the
//!   rules as pure functions, and the probes: is an address this host's, the source address
//!   of a route, a free port).
//! * [`data_plane`] — moves tensor bytes from the rank that reads a piece to the rank that
//!   writes its output file: runs of `(file, offset, bytes)` over plain TCP ([`TcpSender`] →
//!   [`TcpReceiver`], handed to a [`Sink`] that writes them) or MPI, both behind one
//!   [`DataPlane`]. The store only carries small rendezvous data.
//!
//! With the `pmix` feature, [`pmix`] opens the PMIx client library at run time, so that ranks
//! started by `mpirun` on several nodes find rank 0's store without MPI linked in.
//!
//! With the `mpi` feature (needs an MPI library and libclang at build time), `data_plane::mpi`
//! adds the same data plane over MPI for jobs started by `mpirun`/`srun --mpi`:
//! `MpiContext::init` brings MPI up on a progress thread that makes every MPI call of the
//! process, `MpiContext::broadcast` bootstraps the store (rank 0 broadcasts its address, so no
//! `MASTER_ADDR` is needed), and `MpiTransport` hands out `MpiSender`s and an `MpiReceiver`
//! that take the same [`Sink`] as TCP. `MpiContext::abort` takes the whole job down when a
//! rank cannot recover.
//!
//! With the `cuda` feature, `data_plane::DevicePlane` moves device buffers between the ranks'
//! GPUs in rounds that axsave-core's GPU executor schedules; `data_plane::nccl`, opened at run
//! time, carries them.

#![warn(missing_docs)]

pub mod address;
pub mod data_plane;
pub mod hostlist;
mod net;
#[cfg(feature = "pmix")]
pub mod pmix;
pub mod store;
pub mod world;

pub use data_plane::{
    DataPlane, DataPlaneError, PlaneReceiver, PlaneSender, ReceiveStats, SharedSink, Sink,
    SinkError, TcpOptions, TcpReceiver, TcpSender, TransportError,
};
pub use store::{ClientOptions, ServerOptions, StoreClient, StoreError, StoreServer};
pub use world::{Launcher, World, WorldError, detect, detect_from_process_env};
