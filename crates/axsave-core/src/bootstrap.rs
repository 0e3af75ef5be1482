//! Before the rendezvous: under mpirun, a build with MPI starts MPI, which tells every rank
//! where rank 0's store is and can carry the pieces; without MPI, PMIx can tell the address.
//! (Which transport carries the pieces is agreed by the ranks: [`crate::transport::select`].)

use axsave_dist::{Launcher, World};

use crate::distributed::Net;
use crate::transport::TransportRequest;

/// Why the bootstrap failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// An MPI call failed (`what` names it).
    #[cfg(feature = "mpi")]
    #[error("{what}: {source}")]
    Mpi {
        /// The step: "MPI initialisation failed", "MPI bootstrap broadcast failed", …
        what: &'static str,
        /// What MPI said.
        #[source]
        source: axsave_dist::data_plane::mpi::MpiError,
    },
    /// MPI's idea of this rank differs from the environment's.
    #[error("MPI says rank {mpi_rank} of {mpi_size}, the environment says rank {rank} of {size}")]
    RankMismatch {
        /// Rank according to MPI.
        mpi_rank: usize,
        /// World size according to MPI.
        mpi_size: usize,
        /// Rank according to the launcher's variables.
        rank: usize,
        /// World size according to the launcher's variables.
        size: usize,
    },
    /// Rank 0 sent something that is not what it should be.
    #[error("malformed {what} {text:?}")]
    Malformed {
        /// What was expected ("bootstrap address", "store address from PMIx", "job token").
        what: &'static str,
        /// What came.
        text: String,
    },
    /// Rank 0's host name does not resolve on this node.
    #[error(
        "rank 0's store is at {host}:{port}{via}, but {host:?} does not resolve on this node ({source}); set MASTER_ADDR to an address every node can reach"
    )]
    Unresolvable {
        /// The host rank 0 gave.
        host: String,
        /// Its port.
        port: u16,
        /// " (from PMIx)" or nothing.
        via: &'static str,
        /// The resolver's answer.
        #[source]
        source: std::io::Error,
    },
    /// No port could be reserved for the store.
    #[error("cannot find a free port for the store: {0}")]
    Port(#[source] std::io::Error),
    /// `AXSAVE_JOB_TOKEN` is not a token (a usage error: exit code 2).
    #[error("AXSAVE_JOB_TOKEN must be {} hex digits (as `axsave launch` sets it)", 2 * axsave_dist::data_plane::TOKEN_LEN)]
    BadJobToken,
    /// Rank 0 has no host name to publish.
    #[error("this host has no name to tell the other ranks")]
    NoHostName,
    /// Every rank is on one node but PMIx did not deliver rank 0's address.
    #[cfg(feature = "pmix")]
    #[error(
        "rank 0's store address could not come through PMIx: {0} (--rendezvous-timeout bounds the wait)"
    )]
    Pmix(#[source] axsave_dist::pmix::PmixError),
    /// Ranks on several nodes, no MASTER_ADDR, and PMIx did not deliver rank 0's address.
    #[cfg(feature = "pmix")]
    #[error(
        "{launcher} started ranks on several nodes and gives no MASTER_ADDR, and rank 0's address cannot come through PMIx: {source}; set MASTER_ADDR to the host of rank 0"
    )]
    PmixAcrossNodes {
        /// The launcher.
        launcher: Launcher,
        /// What PMIx said.
        #[source]
        source: axsave_dist::pmix::PmixError,
    },
}

type Result<T, E = BootstrapError> = std::result::Result<T, E>;

/// `AXSAVE_JOB_TOKEN`, which `axsave launch` sets for its ranks: the secret every data
/// connection of the job must present (64 hex digits).
pub fn job_token_from_env(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<[u8; axsave_dist::data_plane::TOKEN_LEN]>> {
    match env("AXSAVE_JOB_TOKEN") {
        None => Ok(None),
        Some(v) => crate::distributed::unhex(&v)
            .map(Some)
            .ok_or(BootstrapError::BadJobToken),
    }
}

/// A free port on every local address right now (rank 0's store binds it soon after).
#[cfg(any(feature = "mpi", feature = "pmix"))]
fn free_port() -> Result<u16> {
    axsave_dist::address::free_port().map_err(BootstrapError::Port)
}

/// `host:port` as rank 0 published it.
#[cfg(any(feature = "mpi", feature = "pmix"))]
fn host_port(text: &str, what: &'static str) -> Result<(String, u16)> {
    text.rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| BootstrapError::Malformed {
            what,
            text: text.to_string(),
        })
}

/// A name that does not resolve here never will within the rendezvous timeout: say so now
/// rather than retrying the connection for minutes (a node without the others' names in its
/// DNS or /etc/hosts, a container without its host name).
#[cfg(any(feature = "mpi", feature = "pmix"))]
fn check_resolves(host: &str, port: u16, via: &'static str) -> Result<()> {
    use std::net::ToSocketAddrs;
    match (host, port).to_socket_addrs() {
        Ok(_) => Ok(()),
        Err(source) => Err(BootstrapError::Unresolvable {
            host: host.to_string(),
            port,
            via,
            source,
        }),
    }
}

/// Whether to start MPI: built with it, started by an MPI launcher, and TCP not asked for. MPI
/// then tells the ranks where rank 0's store is (no MASTER_ADDR needed) and is there to carry
/// the pieces if the transport choice takes it.
pub fn wants_mpi(request: TransportRequest, launcher: Launcher) -> bool {
    cfg!(feature = "mpi")
        && crate::transport::launched_by_mpi(launcher)
        && request != TransportRequest::Tcp
}

/// The transport, set up. Under MPI, rank 0 hosts the store on a free port and MPI tells every
/// rank where (so no MASTER_ADDR is needed); the MPI context lives as long as the returned guard.
pub struct Ready {
    /// The data plane for the coordinator.
    pub net: Net,
    /// Under MPI: the job token rank 0 minted and broadcast (a private channel); else the one
    /// `AXSAVE_JOB_TOKEN` gives.
    pub job_token: Option<[u8; axsave_dist::data_plane::TOKEN_LEN]>,
    /// Keeps MPI alive (and aborts the job on failure, see [`Ready::fail`]).
    #[cfg(feature = "mpi")]
    pub mpi: Option<axsave_dist::data_plane::mpi::MpiContext>,
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

/// Sets up MPI when `use_mpi` (adjusting `world` for its bootstrap), else, under a PMIx launcher
/// without MASTER_ADDR, learns rank 0's store through PMIx (waiting up to `join_timeout`).
pub fn setup(
    use_mpi: bool,
    world: &mut World,
    timeout: std::time::Duration,
    join_timeout: std::time::Duration,
) -> Result<Ready> {
    #[cfg(feature = "mpi")]
    if use_mpi {
        return mpi_setup(world, timeout);
    }
    #[cfg(feature = "pmix")]
    if wants_pmix(world, &|k| std::env::var(k).ok()) {
        pmix_bootstrap(world, join_timeout)?;
    }
    let _ = (use_mpi, &world, timeout, join_timeout);
    Ok(Ready {
        net: Net::Tcp,
        job_token: job_token_from_env(&|k| std::env::var(k).ok())?,
        #[cfg(feature = "mpi")]
        mpi: None,
    })
}

/// Whether to ask PMIx where rank 0's store is: started by Open MPI's `mpirun` (or another
/// PMIx launcher) on more than one rank, MPI not in use, and no `MASTER_ADDR` given.
#[cfg(feature = "pmix")]
fn wants_pmix(world: &World, env: &dyn Fn(&str) -> Option<String>) -> bool {
    world.is_distributed()
        && world.launcher == Launcher::OpenMpi
        && axsave_dist::pmix::launched_by_pmix(env)
        && env("MASTER_ADDR").is_none()
}

/// Rank 0 posts `host:port` of its store through PMIx (its host name, or loopback when every
/// rank is on its node; MASTER_PORT or a port free right now); every rank takes it as MASTER_ADDR/MASTER_PORT. Without libpmix a job on
/// one node keeps the loopback default; across nodes that is an error naming MASTER_ADDR.
#[cfg(feature = "pmix")]
fn pmix_bootstrap(world: &mut World, join_timeout: std::time::Duration) -> Result<()> {
    let value = if world.rank == 0 {
        // Every rank on this node: the loopback default (the world's); else the host name.
        let host = match &world.master_addr {
            Some(local) => local.clone(),
            None => crate::host::known_hostname().ok_or(BootstrapError::NoHostName)?,
        };
        let port = if std::env::var_os("MASTER_PORT").is_some() {
            world.master_port
        } else {
            free_port()?
        };
        Some(format!("{host}:{port}"))
    } else {
        None
    };
    let text = match axsave_dist::pmix::share_from_rank0(world.rank, value.as_deref(), join_timeout)
    {
        Ok(t) => t,
        Err(e) => {
            if world.master_addr.is_some() && matches!(e, axsave_dist::pmix::PmixError::Load(_)) {
                // Every rank on this node: the loopback default works without libpmix (and
                // every rank here lacks it alike).
                tracing::debug!("PMIx unavailable, using {:?}: {e}", world.master_addr);
                return Ok(());
            }
            if world.master_addr.is_some() {
                return Err(BootstrapError::Pmix(e));
            }
            return Err(BootstrapError::PmixAcrossNodes {
                launcher: world.launcher,
                source: e,
            });
        }
    };
    let (host, port) = host_port(&text, "store address from PMIx")?;
    if world.rank != 0 {
        check_resolves(&host, port, " (from PMIx)")?;
    }
    tracing::debug!("rank 0's store is at {host}:{port} (from PMIx)");
    world.master_addr = Some(host);
    world.master_port = port;
    Ok(())
}

#[cfg(feature = "mpi")]
fn mpi_setup(world: &mut World, timeout: std::time::Duration) -> Result<Ready> {
    use axsave_dist::data_plane::mpi::MpiContext;
    let ctx = MpiContext::init().map_err(|source| BootstrapError::Mpi {
        what: "MPI initialisation failed",
        source,
    })?;
    // Once MPI is up, a rank that fails must abort the job: MPI_Finalize waits for every rank,
    // and the others would wait for this one in the rendezvous.
    match bootstrap(&ctx, world, timeout).and_then(|net| Ok((net, job_token(&ctx, world)?))) {
        Ok((net, token)) => Ok(Ready {
            net: Net::Mpi(net),
            job_token: Some(token),
            mpi: Some(ctx),
        }),
        Err(e) => {
            tracing::error!("{e}");
            ctx.abort(1)
        }
    }
}

/// Rank 0 mints the job token and MPI hands it to every rank: a channel only the job's ranks
/// share, unlike the store.
#[cfg(feature = "mpi")]
fn job_token(
    ctx: &axsave_dist::data_plane::mpi::MpiContext,
    world: &World,
) -> Result<[u8; axsave_dist::data_plane::TOKEN_LEN]> {
    let mine = (world.rank == 0).then(crate::distributed::random_token);
    let got = ctx
        .broadcast(0, mine.as_ref().map(|t| t.as_slice()))
        .map_err(|source| BootstrapError::Mpi {
            what: "MPI broadcast of the job token failed",
            source,
        })?;
    got.as_slice()
        .try_into()
        .map_err(|_| BootstrapError::Malformed {
            what: "job token from rank 0",
            text: format!("({} bytes)", got.len()),
        })
}

/// Rank 0 tells every rank where its store will listen; then the MPI data plane.
#[cfg(feature = "mpi")]
fn bootstrap(
    ctx: &axsave_dist::data_plane::mpi::MpiContext,
    world: &mut World,
    timeout: std::time::Duration,
) -> Result<axsave_dist::data_plane::mpi::MpiTransport> {
    use axsave_dist::data_plane::mpi::MpiOptions;
    if ctx.size() != world.world_size || ctx.rank() != world.rank {
        return Err(BootstrapError::RankMismatch {
            mpi_rank: ctx.rank(),
            mpi_size: ctx.size(),
            rank: world.rank,
            size: world.world_size,
        });
    }
    // Rank 0 tells everyone where its store will listen: MASTER_ADDR when the user set one,
    // else its host name; a port free right now.
    let value = if world.rank == 0 {
        let host =
            std::env::var("MASTER_ADDR").unwrap_or_else(|_| ctx.processor_name().to_string());
        let port = free_port()?;
        Some(format!("{host}:{port}"))
    } else {
        None
    };
    let got = ctx
        .broadcast(0, value.as_deref().map(str::as_bytes))
        .map_err(|source| BootstrapError::Mpi {
            what: "MPI bootstrap broadcast failed",
            source,
        })?;
    let text = String::from_utf8_lossy(&got).into_owned();
    let (host, port) = host_port(&text, "bootstrap address")?;
    if world.rank != 0 {
        check_resolves(&host, port, "")?;
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
    .map_err(|source| BootstrapError::Mpi {
        what: "MPI transport",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "pmix")]
    #[test]
    fn pmix_only_under_mpirun_across_ranks_without_master_addr() {
        let mut world = World::single();
        world.world_size = 4;
        world.local_world_size = 2;
        world.launcher = Launcher::OpenMpi;
        let pmix = |k: &str| (k == "PMIX_RANK" || k == "PMIX_NAMESPACE").then(|| "0".to_string());
        assert!(wants_pmix(&world, &pmix));
        let with_master = |k: &str| match k {
            "MASTER_ADDR" => Some("node0".to_string()),
            _ => pmix(k),
        };
        assert!(!wants_pmix(&world, &with_master));
        assert!(!wants_pmix(&world, &|_: &str| None));
        world.launcher = Launcher::Slurm;
        assert!(!wants_pmix(&world, &pmix));
        world.launcher = Launcher::OpenMpi;
        world.world_size = 1;
        assert!(!wants_pmix(&world, &pmix));
    }

    #[test]
    fn job_token_from_the_environment() {
        assert_eq!(job_token_from_env(&|_: &str| None).unwrap(), None);
        let hex = |v: &'static str| move |k: &str| (k == "AXSAVE_JOB_TOKEN").then(|| v.to_string());
        let t = job_token_from_env(&hex("0f".repeat(32).leak())).unwrap();
        assert_eq!(t, Some([0x0f; axsave_dist::data_plane::TOKEN_LEN]));
        let e = job_token_from_env(&hex("abc")).unwrap_err();
        assert!(matches!(e, BootstrapError::BadJobToken));
        assert_eq!(
            e.to_string(),
            "AXSAVE_JOB_TOKEN must be 64 hex digits (as `axsave launch` sets it)"
        );
    }

    #[test]
    fn mpi_only_under_an_mpi_launcher_and_not_for_tcp() {
        let built = cfg!(feature = "mpi");
        assert_eq!(wants_mpi(TransportRequest::Auto, Launcher::OpenMpi), built);
        assert_eq!(wants_mpi(TransportRequest::Nccl, Launcher::Mpich), built);
        assert!(!wants_mpi(TransportRequest::Tcp, Launcher::OpenMpi));
        assert!(!wants_mpi(TransportRequest::Auto, Launcher::Torchrun));
    }
}
