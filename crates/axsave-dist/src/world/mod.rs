//! Who am I: rank, world size, local rank, node, launcher and rendezvous endpoint, read from the
//! environment the launcher left behind.
//!
//! [`detect`] is a pure function of an environment lookup, so every launcher can be tested with
//! a plain map; [`detect_from_process_env`] applies it to the real environment. Values that are
//! set but empty count as unset (a shell's `RANK= axsave …` clears a variable that way).
//!
//! # Which launcher
//!
//! Launchers nest (`srun torchrun …`; Open MPI's `mpirun` starts its remote daemons through
//! `srun`), so the outer launcher's variables leak into the inner launcher's processes. The rule:
//!
//! 1. **torchrun** — `TORCHELASTIC_RUN_ID` is present. Everything comes from torchrun's
//!    variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`,
//!    `TORCHELASTIC_USE_AGENT_STORE`, `TORCHELASTIC_RESTART_COUNT`, `MASTER_ADDR`,
//!    `MASTER_PORT`). Under `srun torchrun` the `SLURM_PROCID`/`SLURM_NTASKS` seen by workers
//!    count torchrun *agents* and are ignored.
//! 2. **MPI** — Open MPI (`OMPI_COMM_WORLD_*`), PMIx (`PMIX_RANK`), MVAPICH
//!    (`MV2_COMM_WORLD_*`), MPICH / Intel MPI Hydra (`PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`,
//!    `MPI_LOCALNRANKS`; Cray PALS `PMI_LOCAL_RANK`/`PMI_LOCAL_SIZE`). MVAPICH is checked before
//!    the generic `PMI_*` variables because MVAPICH may set both and its own are more specific.
//!    When a Slurm step is *also* visible (`SLURM_STEP_ID` set) the two are compared:
//!    * they agree on rank and world size → this is `srun --mpi=pmi2|pmix axsave`: a Slurm step
//!      whose MPI plugin added its variables; the Slurm step is used (it also knows the node).
//!    * they disagree, or the Slurm variables do not parse → this is `mpirun` inside an `sbatch`
//!      allocation, and the `SLURM_*` variables belong to the step that runs the MPI daemons; the
//!      MPI variables win and the Slurm step is ignored.
//! 3. **Slurm step** — `SLURM_STEP_ID` is set (by `srun`): `SLURM_PROCID`,
//!    `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`, `SLURM_NPROCS`), `SLURM_LOCALID`,
//!    `SLURM_NODEID`, and the local world size from `SLURM_STEP_TASKS_PER_NODE` (else
//!    `SLURM_TASKS_PER_NODE`, syntax `2(x3),1`) at this node's index. The batch script itself
//!    has `SLURM_PROCID=0` and `SLURM_NTASKS=N` but no step: a program run there directly is a
//!    single process and must not wait for N-1 peers that will never come.
//! 4. **Plain env** — `RANK` and `WORLD_SIZE` set by hand (or by `axsave launch`); optional
//!    `LOCAL_RANK`, `LOCAL_WORLD_SIZE` (default: everyone on this node), `GROUP_RANK` or
//!    `NODE_RANK`, and `AXSAVE_RUN_ID` as the run id.
//! 5. **Single** process, world size 1.
//!
//! # Rendezvous endpoint
//!
//! * `MASTER_ADDR` if set. Otherwise loopback for a world of one; otherwise the first host of
//!   the Slurm node list (`SLURM_STEP_NODELIST` for a Slurm step, else `SLURM_JOB_NODELIST`,
//!   else `SLURM_NODELIST`; under MPI the step list is skipped because it is the daemon step's,
//!   which leaves out the node `mpirun` runs on); otherwise loopback when every rank is on this
//!   node; otherwise unknown (`None`). With an arbitrary task distribution rank 0 need not be on
//!   the first node; the caller that hosts the store should check.
//! * `MASTER_PORT` if set. Otherwise, inside a Slurm job, `15000 + the last four digits of
//!   SLURM_JOB_ID` (PyTorch Lightning's convention, so concurrent jobs on a node rarely collide;
//!   two steps of one job running at once would), else 29500 (torch's default).
//!
//! # Node rank
//!
//! torchrun (`GROUP_RANK`) and Slurm (`SLURM_NODEID`) say which node this is. MPI launchers do
//! not (Open MPI's `OMPI_COMM_WORLD_NODE_RANK` is a per-node process index, not a node index),
//! so there it is `Some(0)` when every rank is on this node and `None` otherwise; group ranks by
//! host name through the store if it is needed.

use std::fmt;

use thiserror::Error;

use crate::hostlist::{self, HostlistError};

mod env;
mod launchers;

use env::{Core, Env};
pub use launchers::is_launcher_variable;
use launchers::{mpi, plain_env, slurm_step, torchrun};

/// The program that started this process, as far as the environment tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Launcher {
    /// `torchrun` / `python -m torch.distributed.run` (elastic agent).
    Torchrun,
    /// A Slurm job step (`srun`), including `srun --mpi=pmi2|pmix`.
    Slurm,
    /// Open MPI's `mpirun`/`mpiexec`, or another PMIx launcher (`prterun`).
    OpenMpi,
    /// MPICH or Intel MPI (Hydra), or another launcher that exports `PMI_RANK`/`PMI_SIZE`.
    Mpich,
    /// MVAPICH2 (`mpirun_rsh`).
    Mvapich,
    /// `RANK`/`WORLD_SIZE` set by hand or by `axsave launch`.
    Env,
    /// No launcher: one process.
    Single,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::Torchrun => "torchrun",
            Launcher::Slurm => "slurm",
            Launcher::OpenMpi => "openmpi",
            Launcher::Mpich => "mpich",
            Launcher::Mvapich => "mvapich",
            Launcher::Env => "env",
            Launcher::Single => "single",
        })
    }
}

/// This process's place in the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the run.
    pub world_size: usize,
    /// Rank among the processes on this node, `0..local_world_size`.
    pub local_rank: usize,
    /// Number of processes on this node.
    pub local_world_size: usize,
    /// Index of this node, when the launcher says (see the module doc).
    pub node_rank: Option<usize>,
    /// Who started us.
    pub launcher: Launcher,
    /// Host of the rendezvous store, when known (see the module doc).
    pub master_addr: Option<String>,
    /// Port of the rendezvous store.
    pub master_port: u16,
    /// An id shared by every rank of this run, when the launcher provides one (torchrun's
    /// `TORCHELASTIC_RUN_ID`, which is the literal `none` for a static rendezvous; Slurm
    /// `<job>.<step>`; `PMIX_NAMESPACE`; ...).
    pub run_id: Option<String>,
    /// torchrun's agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE=True`): every rank,
    /// rank 0 included, is a client of `master_addr:master_port`.
    pub use_agent_store: bool,
    /// torchrun's `TORCHELASTIC_RESTART_COUNT` (0 elsewhere).
    pub restart_count: u32,
}

/// Loopback used when every rank is on this node.
const LOOPBACK: &str = "127.0.0.1";
/// torch's default `MASTER_PORT`.
const DEFAULT_MASTER_PORT: u16 = 29500;
/// Base of the port derived from a Slurm job id.
const SLURM_PORT_BASE: u16 = 15000;

impl World {
    /// A world of one process: what runs without any launcher.
    pub fn single() -> World {
        World {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            node_rank: Some(0),
            launcher: Launcher::Single,
            master_addr: Some(LOOPBACK.to_owned()),
            master_port: DEFAULT_MASTER_PORT,
            run_id: None,
            use_agent_store: false,
            restart_count: 0,
        }
    }

    /// More than one process takes part.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// This process must host the rendezvous store at `master_port`: rank 0 of a world of more
    /// than one, unless torchrun's agent already hosts it. A world of one needs no store.
    pub fn hosts_store(&self) -> bool {
        self.is_distributed() && self.rank == 0 && !self.use_agent_store
    }

    /// Key namespace for this run's store keys, `axsave/<run id>/<restart count>`, with
    /// `default` for a missing run id. Includes the restart count, as torch does, so keys of
    /// a failed attempt cannot satisfy the next one.
    pub fn store_namespace(&self) -> String {
        format!(
            "axsave/{}/{}",
            self.run_id.as_deref().unwrap_or("default"),
            self.restart_count
        )
    }

    /// Logs the detected world at debug level.
    pub fn log_detected(&self) {
        tracing::debug!(
            rank = self.rank,
            world_size = self.world_size,
            local_rank = self.local_rank,
            local_world_size = self.local_world_size,
            node_rank = ?self.node_rank,
            launcher = %self.launcher,
            master_addr = ?self.master_addr,
            master_port = self.master_port,
            run_id = ?self.run_id,
            use_agent_store = self.use_agent_store,
            restart_count = self.restart_count,
            "detected world"
        );
    }
}

/// Why the environment does not describe a usable world.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WorldError {
    /// The launcher was recognised by one variable but another it always sets is missing
    /// (e.g. `TORCHELASTIC_RUN_ID` without `RANK`, `RANK` without `WORLD_SIZE`).
    #[error("{launcher} launch detected ({because}) but {var} is not set")]
    Missing {
        /// The variable that is missing (or one of the alternatives).
        var: &'static str,
        /// The launcher that was recognised.
        launcher: Launcher,
        /// Which variable gave the launcher away.
        because: &'static str,
    },
    /// A variable that must hold a non-negative integer does not.
    #[error("{var}={value:?} is not a non-negative integer")]
    NotANumber {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// A world size (or local world size) of zero.
    #[error("{var} is 0; a world needs at least one process")]
    EmptyWorld {
        /// The variable that said so.
        var: &'static str,
    },
    /// A rank outside `0..size`.
    #[error("{launcher}: {rank_var}={rank} is out of range for {size_var}={size}")]
    RankOutOfRange {
        /// The launcher.
        launcher: Launcher,
        /// The rank variable.
        rank_var: &'static str,
        /// Its value.
        rank: usize,
        /// The size variable it was checked against.
        size_var: &'static str,
        /// Its value.
        size: usize,
    },
    /// More processes on this node than in the whole world.
    #[error("{launcher}: {local_var}={local} exceeds the world size {world}")]
    LocalWorldTooLarge {
        /// The launcher.
        launcher: Launcher,
        /// The local size variable.
        local_var: &'static str,
        /// Its value.
        local: usize,
        /// The world size.
        world: usize,
    },
    /// A Slurm `tasks per node` list (`2(x3),1`) that does not parse.
    #[error("{var}={value:?} is not a Slurm tasks-per-node list: {reason}")]
    BadTasksPerNode {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A node index beyond the nodes of the tasks-per-node list.
    #[error("SLURM_NODEID={node} but {var}={value:?} lists only {nodes} nodes")]
    NodeOutOfRange {
        /// The node index.
        node: usize,
        /// The tasks-per-node variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// How many nodes it lists.
        nodes: usize,
    },
    /// A Slurm node list that does not parse.
    #[error("{var} is not a valid Slurm hostlist: {source}")]
    Hostlist {
        /// The variable.
        var: &'static str,
        /// The parse error.
        source: HostlistError,
    },
    /// A port that is not in `1..=65535`, or a job id that yields no port.
    #[error("{var}={value:?} does not give a TCP port (1..=65535)")]
    BadPort {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
}

/// Detects the world from an environment lookup (see the module doc for the rules).
pub fn detect(env: &dyn Fn(&str) -> Option<String>) -> Result<World, WorldError> {
    let env = Env { lookup: env };
    let core = if env.has("TORCHELASTIC_RUN_ID") {
        torchrun(&env)?
    } else {
        match (mpi(&env)?, env.has("SLURM_STEP_ID")) {
            (Some(m), true) => match slurm_step(&env) {
                Ok(s) if m.agrees_with(&s) => s,
                _ => m.finish(&env)?,
            },
            (Some(m), false) => m.finish(&env)?,
            (None, true) => slurm_step(&env)?,
            (None, false) if env.has("RANK") || env.has("WORLD_SIZE") => plain_env(&env)?,
            (None, false) => Core::single(),
        }
    };
    core.validate()?;
    let master_addr = master_addr(&env, &core)?;
    let master_port = master_port(&env)?;
    Ok(World {
        rank: core.rank,
        world_size: core.world_size,
        local_rank: core.local_rank,
        local_world_size: core.local_world_size,
        node_rank: core.node_rank,
        launcher: core.launcher,
        master_addr,
        master_port,
        run_id: core.run_id,
        use_agent_store: core.use_agent_store,
        restart_count: core.restart_count,
    })
}

/// [`detect`] applied to this process's environment. Variables that are not valid Unicode
/// count as unset.
pub fn detect_from_process_env() -> Result<World, WorldError> {
    detect(&|name| std::env::var(name).ok())
}

fn master_addr(env: &Env<'_>, core: &Core) -> Result<Option<String>, WorldError> {
    if let Some(addr) = env.get("MASTER_ADDR") {
        return Ok(Some(addr.trim().to_owned()));
    }
    if core.world_size == 1 {
        return Ok(Some(LOOPBACK.to_owned()));
    }
    let lists: &[&'static str] = if core.launcher == Launcher::Slurm {
        &[
            "SLURM_STEP_NODELIST",
            "SLURM_JOB_NODELIST",
            "SLURM_NODELIST",
        ]
    } else {
        &["SLURM_JOB_NODELIST", "SLURM_NODELIST"]
    };
    if let Some((var, list)) = env.first(lists) {
        let first =
            hostlist::first_host(&list).map_err(|source| WorldError::Hostlist { var, source })?;
        if first.is_some() {
            return Ok(first);
        }
    }
    if core.world_size == core.local_world_size {
        return Ok(Some(LOOPBACK.to_owned()));
    }
    Ok(None)
}

fn master_port(env: &Env<'_>) -> Result<u16, WorldError> {
    if let Some(value) = env.get("MASTER_PORT") {
        return match value.trim().parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(WorldError::BadPort {
                var: "MASTER_PORT",
                value,
            }),
        };
    }
    if let Some((var, job)) = env.first(&["SLURM_JOB_ID", "SLURM_JOBID"]) {
        let digits = job.trim();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(WorldError::BadPort { var, value: job });
        }
        let last4 = &digits[digits.len().saturating_sub(4)..];
        // At most 9999, so the sum stays below 25000.
        let n: u16 = last4.parse().map_err(|_| WorldError::BadPort {
            var,
            value: job.clone(),
        })?;
        return Ok(SLURM_PORT_BASE + n);
    }
    Ok(DEFAULT_MASTER_PORT)
}

#[cfg(test)]
mod tests;
