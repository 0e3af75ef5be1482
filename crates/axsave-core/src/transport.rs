//! Which transport moves the bytes between ranks, and why: a pure rule over what every rank
//! reported ([`Caps`]), so all ranks reach the same answer from the same reports.
//!
//! The capabilities half of [`crate::route`]: `select` answers for the bytes that cross nodes.
//! `--transport auto` takes NCCL when every rank bound a GPU and loaded NCCL; otherwise MPI
//! when this build has it and `mpirun` (or another MPI launcher) started the job; otherwise
//! TCP. An explicit `nccl` or `mpi` that cannot be had is an error, never a silent fallback.

use axsave_dist::{Launcher, World};

/// What `--transport` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum TransportRequest {
    /// By where bytes go ([`crate::route`]): a rank's own pieces on the CPU, same-node ones by
    /// the host, cross-node ones over NCCL when every rank has a GPU and NCCL, else MPI or TCP.
    Auto,
    /// NCCL between GPUs; fails at once where a rank has no GPU or no NCCL.
    Nccl,
    /// MPI point-to-point (a build with the `mpi` feature, started by an MPI launcher).
    Mpi,
    /// TCP connections between ranks; the GPU is not used.
    Tcp,
}

impl TransportRequest {
    /// Parses `auto`, `nccl`, `mpi`, `tcp` (the Axolotl config's `axsave.transport`).
    pub fn parse(s: &str) -> Option<TransportRequest> {
        Some(match s.to_ascii_lowercase().as_str() {
            "auto" => TransportRequest::Auto,
            "nccl" => TransportRequest::Nccl,
            "mpi" => TransportRequest::Mpi,
            "tcp" => TransportRequest::Tcp,
            _ => return None,
        })
    }

    /// Whether this request may use a GPU (so a rank should look for one).
    pub fn wants_gpu(self) -> bool {
        matches!(self, TransportRequest::Auto | TransportRequest::Nccl)
    }
}

/// The transport a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// NCCL.
    Nccl,
    /// MPI.
    Mpi,
    /// TCP.
    Tcp,
}

impl Transport {
    /// The name as `--transport` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Nccl => "nccl",
            Transport::Mpi => "mpi",
            Transport::Tcp => "tcp",
        }
    }
}

/// What one rank can do, as it tells the others during the rendezvous.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Caps {
    /// The GPU this rank bound (`"0: NVIDIA H200"`), or why it has none (`"no CUDA driver"`).
    pub gpu: Result<String, String>,
    /// The NCCL it loaded (`"2.21.5 (libnccl.so.2)"`), or why not.
    pub nccl: Result<String, String>,
    /// A globally unique id of the bound GPU (its UUID), to see ranks that share one.
    pub gpu_id: Option<String>,
    /// `NCCL_MULTI_RANK_GPU_ENABLE=1` is set here (NCCL ≥ 2.30.3 then lets ranks share a GPU).
    pub shared_gpu_ok: bool,
}

impl Caps {
    /// A rank that did not look (`--transport tcp`/`mpi`, or a build without CUDA).
    pub fn none(why: &str) -> Caps {
        Caps {
            gpu: Err(why.to_string()),
            nccl: Err(why.to_string()),
            gpu_id: None,
            shared_gpu_ok: false,
        }
    }

    /// Why this rank cannot use NCCL, or `None` when it can.
    pub fn nccl_missing(&self) -> Option<String> {
        match (&self.gpu, &self.nccl) {
            (Err(e), _) => Some(e.clone()),
            (Ok(_), Err(e)) => Some(e.clone()),
            (Ok(_), Ok(_)) => None,
        }
    }
}

/// The transport picked, and the reason to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The transport.
    pub transport: Transport,
    /// Why, in a few words (`"no CUDA driver: using tcp"`).
    pub why: String,
}

pub use crate::error::Unavailable;

/// Picks the transport from every rank's report (`caps[r]` is rank r's) and whether MPI is
/// available ([`mpi_available`]). `Err` says why an explicit request cannot be met.
pub fn select(request: TransportRequest, caps: &[Caps], mpi: bool) -> Result<Choice, Unavailable> {
    let mut missing: Vec<(usize, String)> = caps
        .iter()
        .enumerate()
        .filter_map(|(r, c)| c.nccl_missing().map(|m| (r, m)))
        .collect();
    // NCCL refuses two ranks on one GPU ("Duplicate GPU detected") unless every rank allows
    // it; a launcher that runs more ranks than a node has GPUs ends up there.
    if missing.is_empty() && !caps.iter().all(|c| c.shared_gpu_ok) {
        for (r, c) in caps.iter().enumerate() {
            let Some(id) = &c.gpu_id else { continue };
            if let Some(first) = caps[..r].iter().position(|o| o.gpu_id.as_ref() == Some(id)) {
                missing.push((
                    r,
                    format!(
                        "shares its GPU with rank {first} (NCCL needs one GPU per rank; NCCL ≥ 2.30.3 allows sharing with NCCL_MULTI_RANK_GPU_ENABLE=1)"
                    ),
                ));
            }
        }
    }
    let who = |m: &[(usize, String)]| -> String {
        let Some((r, why)) = m.first() else {
            return "no rank reported what it has".into();
        };
        let others = m.len() - 1;
        // Every rank short of NCCL for the same reason (no driver anywhere): just the reason.
        if m.len() == caps.len() && m.iter().all(|(_, w)| w == why) {
            why.clone()
        } else if others == 0 {
            format!("rank {r}: {why}")
        } else {
            format!(
                "rank {r}: {why} (and {others} more rank{})",
                if others == 1 { "" } else { "s" }
            )
        }
    };
    let nccl_ok = !caps.is_empty() && missing.is_empty();
    match request {
        TransportRequest::Tcp => Ok(Choice {
            transport: Transport::Tcp,
            why: "--transport tcp".into(),
        }),
        TransportRequest::Mpi if mpi => Ok(Choice {
            transport: Transport::Mpi,
            why: "--transport mpi".into(),
        }),
        TransportRequest::Mpi => Err(if axsave_dist::data_plane::MPI_BUILT {
            Unavailable::NoMpiLauncher
        } else {
            Unavailable::MpiNotBuilt
        }),
        TransportRequest::Nccl if nccl_ok => Ok(Choice {
            transport: Transport::Nccl,
            why: "--transport nccl".into(),
        }),
        TransportRequest::Nccl => Err(Unavailable::NoNccl {
            every_rank: caps.len() != 1,
            why: who(&missing),
        }),
        TransportRequest::Auto if nccl_ok => Ok(Choice {
            transport: Transport::Nccl,
            why: if caps.len() == 1 {
                "a GPU and NCCL: using nccl".into()
            } else {
                "every rank has a GPU and NCCL: using nccl".into()
            },
        }),
        TransportRequest::Auto => {
            let (transport, name) = if mpi {
                (Transport::Mpi, "mpi")
            } else {
                (Transport::Tcp, "tcp")
            };
            Ok(Choice {
                transport,
                why: format!("{}: using {name}", who(&missing)),
            })
        }
    }
}

/// Whether a launcher is an MPI one (so MPI can carry the bytes).
pub fn launched_by_mpi(launcher: Launcher) -> bool {
    matches!(
        launcher,
        Launcher::OpenMpi | Launcher::Mpich | Launcher::Mvapich
    )
}

/// Whether the MPI transport can be used here: built with feature `mpi`, and started by an MPI
/// launcher.
pub fn mpi_available(world: &World) -> bool {
    axsave_dist::data_plane::MPI_BUILT && launched_by_mpi(world.launcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu() -> Caps {
        gpu_on("GPU-0")
    }

    fn gpu_on(id: &str) -> Caps {
        Caps {
            gpu: Ok("0: NVIDIA H200".into()),
            nccl: Ok("2.21.5 (libnccl.so.2)".into()),
            gpu_id: Some(id.into()),
            shared_gpu_ok: false,
        }
    }

    fn no_driver() -> Caps {
        Caps::none("no CUDA driver")
    }

    fn no_nccl() -> Caps {
        Caps {
            gpu: Ok("1: NVIDIA H200".into()),
            nccl: Err("NCCL not found".into()),
            gpu_id: Some("GPU-1".into()),
            shared_gpu_ok: false,
        }
    }

    #[test]
    fn ranks_sharing_a_gpu_do_not_get_nccl_unless_allowed() {
        let shared = [gpu_on("A"), gpu_on("B"), gpu_on("A")];
        let c = select(TransportRequest::Auto, &shared, false).unwrap();
        assert_eq!(c.transport, Transport::Tcp);
        assert!(
            c.why.starts_with("rank 2: shares its GPU with rank 0"),
            "{}",
            c.why
        );
        let e = select(TransportRequest::Nccl, &shared, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("NCCL_MULTI_RANK_GPU_ENABLE"), "{e}");
        let allowed: Vec<Caps> = shared
            .iter()
            .cloned()
            .map(|mut c| {
                c.shared_gpu_ok = true;
                c
            })
            .collect();
        assert_eq!(
            select(TransportRequest::Auto, &allowed, false)
                .unwrap()
                .transport,
            Transport::Nccl
        );
    }

    #[test]
    fn auto_takes_nccl_only_when_every_rank_can() {
        let c = select(TransportRequest::Auto, &[gpu_on("A"), gpu_on("B")], false).unwrap();
        assert_eq!(c.transport, Transport::Nccl);
        assert_eq!(c.why, "every rank has a GPU and NCCL: using nccl");
        let c = select(TransportRequest::Auto, &[gpu_on("A"), no_nccl()], false).unwrap();
        assert_eq!(c.transport, Transport::Tcp);
        assert_eq!(c.why, "rank 1: NCCL not found: using tcp");
        let c = select(TransportRequest::Auto, &[no_driver()], false).unwrap();
        assert_eq!(c.transport, Transport::Tcp);
        assert_eq!(c.why, "no CUDA driver: using tcp");
        let c = select(TransportRequest::Auto, &[no_driver(), no_driver()], false).unwrap();
        assert_eq!(c.why, "no CUDA driver: using tcp");
        let c = select(
            TransportRequest::Auto,
            &[gpu_on("A"), no_driver(), no_driver(), no_nccl()],
            false,
        )
        .unwrap();
        assert_eq!(
            c.why,
            "rank 1: no CUDA driver (and 2 more ranks): using tcp"
        );
    }

    #[test]
    fn auto_prefers_mpi_to_tcp_when_it_has_it() {
        let c = select(TransportRequest::Auto, &[no_driver(), gpu()], true).unwrap();
        assert_eq!(c.transport, Transport::Mpi);
        assert_eq!(c.why, "rank 0: no CUDA driver: using mpi");
        // NCCL still wins when everyone can.
        let c = select(TransportRequest::Auto, &[gpu_on("A"), gpu_on("B")], true).unwrap();
        assert_eq!(c.transport, Transport::Nccl);
    }

    #[test]
    fn explicit_requests_are_met_or_refused() {
        assert_eq!(
            select(TransportRequest::Tcp, &[gpu()], true)
                .unwrap()
                .transport,
            Transport::Tcp
        );
        assert_eq!(
            select(TransportRequest::Nccl, &[gpu_on("A"), gpu_on("B")], false)
                .unwrap()
                .transport,
            Transport::Nccl
        );
        let e = select(TransportRequest::Nccl, &[gpu(), no_driver()], true)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--transport nccl needs a GPU and NCCL on every rank: rank 1: no CUDA driver"
        );
        let e = select(TransportRequest::Nccl, &[no_driver()], false)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with(": no CUDA driver"), "{e}");
        assert_eq!(
            select(TransportRequest::Mpi, &[gpu()], true)
                .unwrap()
                .transport,
            Transport::Mpi
        );
        let e = select(TransportRequest::Mpi, &[gpu()], false).unwrap_err();
        let expected = if axsave_dist::data_plane::MPI_BUILT {
            Unavailable::NoMpiLauncher
        } else {
            Unavailable::MpiNotBuilt
        };
        assert_eq!(e, expected);
        let e = e.to_string();
        assert!(e.starts_with("--transport mpi"), "{e}");
        assert!(select(TransportRequest::Nccl, &[], false).is_err());
    }

    #[test]
    fn names_round_trip() {
        for (s, r) in [
            ("auto", TransportRequest::Auto),
            ("NCCL", TransportRequest::Nccl),
            ("mpi", TransportRequest::Mpi),
            ("tcp", TransportRequest::Tcp),
        ] {
            assert_eq!(TransportRequest::parse(s), Some(r));
        }
        assert_eq!(TransportRequest::parse("gloo"), None);
        assert_eq!(Transport::Nccl.as_str(), "nccl");
        assert!(TransportRequest::Auto.wants_gpu() && !TransportRequest::Tcp.wants_gpu());
    }

    #[test]
    fn only_mpi_launchers_count_for_mpi() {
        assert!(launched_by_mpi(Launcher::OpenMpi));
        assert!(launched_by_mpi(Launcher::Mpich));
        assert!(!launched_by_mpi(Launcher::Torchrun));
        assert!(!launched_by_mpi(Launcher::Slurm));
        assert!(!launched_by_mpi(Launcher::Single));
    }
}
