//! Which transport carries pieces between ranks, and the MPI bootstrap.

use anyhow::Result;
use axsave_core::distributed::Net;
use axsave_dist::{Launcher, World};

use crate::cli::TransportArg;
use crate::commands::UsageError;

/// What `--transport` resolved to, and why (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// TCP between ranks.
    Tcp,
    /// MPI point-to-point.
    Mpi,
}

/// Whether the launcher is an MPI launcher.
pub fn launched_by_mpi(l: Launcher) -> bool {
    matches!(l, Launcher::OpenMpi | Launcher::Mpich | Launcher::Mvapich)
}

/// Picks the transport: `auto` takes MPI when built with it and launched by mpirun, else TCP.
pub fn choose(
    requested: TransportArg,
    launcher: Launcher,
    mpi_built: bool,
) -> Result<(Choice, String)> {
    let by_mpi = launched_by_mpi(launcher);
    match requested {
        TransportArg::Tcp => Ok((Choice::Tcp, "--transport tcp".into())),
        TransportArg::Mpi if !mpi_built => Err(UsageError(
            "--transport mpi: this axsave was built without MPI (rebuild with `cargo build --release --features mpi`)".into(),
        )
        .into()),
        TransportArg::Mpi if !by_mpi => Err(UsageError(format!(
            "--transport mpi needs the ranks to be started by mpirun/mpiexec (started by {launcher})"
        ))
        .into()),
        TransportArg::Mpi => Ok((Choice::Mpi, "--transport mpi".into())),
        TransportArg::Auto if mpi_built && by_mpi => {
            Ok((Choice::Mpi, format!("started by {launcher} and built with MPI")))
        }
        TransportArg::Auto if by_mpi => Ok((
            Choice::Tcp,
            format!("started by {launcher} but built without MPI: using tcp"),
        )),
        TransportArg::Auto => Ok((Choice::Tcp, format!("started by {launcher}: using tcp"))),
    }
}

/// The transport, set up. Under MPI, rank 0 hosts the store on a free port and MPI tells every
/// rank where (so no MASTER_ADDR is needed); the MPI context lives as long as the returned guard.
pub struct Ready {
    /// The data plane for the coordinator.
    pub net: Net,
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

/// Sets up the chosen transport, adjusting `world` for the MPI bootstrap.
pub fn setup(choice: Choice, world: &mut World, timeout: std::time::Duration) -> Result<Ready> {
    match choice {
        Choice::Tcp => Ok(Ready {
            net: Net::Tcp,
            #[cfg(feature = "mpi")]
            mpi: None,
        }),
        #[cfg(feature = "mpi")]
        Choice::Mpi => mpi_setup(world, timeout),
        #[cfg(not(feature = "mpi"))]
        Choice::Mpi => {
            let _ = (world, timeout);
            anyhow::bail!("built without MPI")
        }
    }
}

#[cfg(feature = "mpi")]
fn mpi_setup(world: &mut World, timeout: std::time::Duration) -> Result<Ready> {
    use axsave_dist::transport::mpi::{MpiContext, MpiOptions};
    let ctx = MpiContext::init().map_err(|e| anyhow::anyhow!("MPI initialisation failed: {e}"))?;
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
    world.master_addr = Some(host);
    world.master_port = port;
    world.use_agent_store = false;
    let mut h = crc32fast::Hasher::new();
    h.update(text.as_bytes());
    let net = ctx
        .transport(MpiOptions {
            session: h.finalize() as u64,
            io_timeout: timeout,
            ..MpiOptions::default()
        })
        .map_err(|e| anyhow::anyhow!("MPI transport: {e}"))?;
    Ok(Ready {
        net: Net::Mpi(net),
        mpi: Some(ctx),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_mpi_only_when_built_with_it_and_under_mpirun() {
        let c = |r, l, b| choose(r, l, b).map(|(c, _)| c).ok();
        assert_eq!(
            c(TransportArg::Auto, Launcher::OpenMpi, true),
            Some(Choice::Mpi)
        );
        assert_eq!(
            c(TransportArg::Auto, Launcher::Mpich, true),
            Some(Choice::Mpi)
        );
        assert_eq!(
            c(TransportArg::Auto, Launcher::OpenMpi, false),
            Some(Choice::Tcp)
        );
        assert_eq!(
            c(TransportArg::Auto, Launcher::Torchrun, true),
            Some(Choice::Tcp)
        );
        assert_eq!(
            c(TransportArg::Tcp, Launcher::OpenMpi, true),
            Some(Choice::Tcp)
        );
        assert_eq!(c(TransportArg::Mpi, Launcher::Slurm, true), None);
        assert_eq!(c(TransportArg::Mpi, Launcher::OpenMpi, false), None);
        let (_, why) = choose(TransportArg::Auto, Launcher::OpenMpi, false).unwrap();
        assert!(why.contains("without MPI"), "{why}");
    }
}
