//! The MPI bootstrap: under mpirun, a build with MPI starts it before the rendezvous. (Which
//! transport carries the pieces is agreed by the ranks: `axsave_core::transport::select`.)

use anyhow::Result;
use axsave_core::distributed::Net;
use axsave_core::transport::TransportRequest;
use axsave_dist::{Launcher, World};

/// Whether to start MPI: built with it, started by an MPI launcher, and TCP not asked for. MPI
/// then tells the ranks where rank 0's store is (no MASTER_ADDR needed) and is there to carry
/// the pieces if the transport choice takes it.
pub fn wants_mpi(request: TransportRequest, launcher: Launcher) -> bool {
    cfg!(feature = "mpi")
        && axsave_core::transport::launched_by_mpi(launcher)
        && request != TransportRequest::Tcp
}

/// The transport, set up. Under MPI, rank 0 hosts the store on a free port and MPI tells every
/// rank where (so no MASTER_ADDR is needed); the MPI context lives as long as the returned guard.
pub struct Ready {
    /// The data plane for the coordinator.
    pub net: Net,
    /// Under MPI: the job token rank 0 minted and broadcast (a private channel).
    pub job_token: Option<[u8; axsave_dist::transport::TOKEN_LEN]>,
    /// Keeps MPI alive (and aborts the job on failure, see [`Ready::fail`]).
    #[cfg(feature = "mpi")]
    pub mpi: Option<axsave_dist::transport::mpi::MpiContext>,
}

impl Ready {
    /// After a failure: under MPI, say why and abort the job, so that no rank can wait for
    /// this one (its temporaries were removed already); otherwise nothing (the caller reports
    /// the error and exits non-zero).
    pub fn fail(&self, e: &dyn std::fmt::Display) {
        #[cfg(feature = "mpi")]
        if let Some(ctx) = &self.mpi {
            tracing::error!("{e}");
            ctx.abort(1);
        }
        let _ = e;
    }
}

/// Sets up MPI when `use_mpi` (adjusting `world` for its bootstrap), else nothing.
pub fn setup(use_mpi: bool, world: &mut World, timeout: std::time::Duration) -> Result<Ready> {
    #[cfg(feature = "mpi")]
    if use_mpi {
        return mpi_setup(world, timeout);
    }
    let _ = (use_mpi, &world, timeout);
    Ok(Ready {
        net: Net::Tcp,
        job_token: None,
        #[cfg(feature = "mpi")]
        mpi: None,
    })
}

#[cfg(feature = "mpi")]
fn mpi_setup(world: &mut World, timeout: std::time::Duration) -> Result<Ready> {
    use axsave_dist::transport::mpi::MpiContext;
    let ctx = MpiContext::init().map_err(|e| anyhow::anyhow!("MPI initialisation failed: {e}"))?;
    // Once MPI is up, a rank that fails must abort the job: MPI_Finalize waits for every rank,
    // and the others would wait for this one in the rendezvous.
    match bootstrap(&ctx, world, timeout).and_then(|net| Ok((net, job_token(&ctx, world)?))) {
        Ok((net, token)) => Ok(Ready {
            net: Net::Mpi(net),
            job_token: Some(token),
            mpi: Some(ctx),
        }),
        Err(e) => {
            tracing::error!("{e:#}");
            ctx.abort(1)
        }
    }
}

/// Rank 0 mints the job token and MPI hands it to every rank: a channel only the job's ranks
/// share, unlike the store.
#[cfg(feature = "mpi")]
fn job_token(
    ctx: &axsave_dist::transport::mpi::MpiContext,
    world: &World,
) -> Result<[u8; axsave_dist::transport::TOKEN_LEN]> {
    let mine = (world.rank == 0).then(axsave_core::distributed::random_token);
    let got = ctx
        .broadcast(0, mine.as_ref().map(|t| t.as_slice()))
        .map_err(|e| anyhow::anyhow!("MPI broadcast of the job token failed: {e}"))?;
    got.as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("malformed job token from rank 0 ({} bytes)", got.len()))
}

/// Rank 0 tells every rank where its store will listen; then the MPI data plane.
#[cfg(feature = "mpi")]
fn bootstrap(
    ctx: &axsave_dist::transport::mpi::MpiContext,
    world: &mut World,
    timeout: std::time::Duration,
) -> Result<axsave_dist::transport::mpi::MpiTransport> {
    use axsave_dist::transport::mpi::MpiOptions;
    if ctx.size() != world.world_size || ctx.rank() != world.rank {
        anyhow::bail!(
            "MPI says rank {} of {}, the environment says rank {} of {}",
            ctx.rank(),
            ctx.size(),
            world.rank,
            world.world_size
        );
    }
    // Rank 0 tells everyone where its store will listen: MASTER_ADDR when the user set one,
    // else its host name; a port free right now.
    let value = if world.rank == 0 {
        let host =
            std::env::var("MASTER_ADDR").unwrap_or_else(|_| ctx.processor_name().to_string());
        let port = std::net::TcpListener::bind(("0.0.0.0", 0))?
            .local_addr()?
            .port();
        Some(format!("{host}:{port}"))
    } else {
        None
    };
    let got = ctx
        .broadcast(0, value.as_deref().map(str::as_bytes))
        .map_err(|e| anyhow::anyhow!("MPI bootstrap broadcast failed: {e}"))?;
    let text = String::from_utf8_lossy(&got).into_owned();
    let (host, port) = text
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("malformed bootstrap address {text:?}"))?;
    // A name that does not resolve here never will within the rendezvous timeout: say so now
    // rather than retrying the connection for minutes (a node without the others' names in its
    // DNS or /etc/hosts, a container without its host name).
    if world.rank != 0 {
        use std::net::ToSocketAddrs;
        if let Err(e) = (host.as_str(), port).to_socket_addrs() {
            anyhow::bail!(
                "rank 0's store is at {host}:{port}, but {host:?} does not resolve on this node ({e}); set MASTER_ADDR to an address every node can reach"
            );
        }
    }
    world.master_addr = Some(host);
    world.master_port = port;
    world.use_agent_store = false;
    let mut h = crc32fast::Hasher::new();
    h.update(text.as_bytes());
    ctx.transport(MpiOptions {
        session: h.finalize() as u64,
        io_timeout: timeout,
        ..MpiOptions::default()
    })
    .map_err(|e| anyhow::anyhow!("MPI transport: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpi_only_under_an_mpi_launcher_and_not_for_tcp() {
        let built = cfg!(feature = "mpi");
        assert_eq!(wants_mpi(TransportRequest::Auto, Launcher::OpenMpi), built);
        assert_eq!(wants_mpi(TransportRequest::Nccl, Launcher::Mpich), built);
        assert!(!wants_mpi(TransportRequest::Tcp, Launcher::OpenMpi));
        assert!(!wants_mpi(TransportRequest::Auto, Launcher::Torchrun));
    }
}
