//! One reader per launcher: what torchrun, a Slurm step, the MPI launchers and a hand-set
//! environment say about this process.

use super::env::{Core, Env, required};
use super::{Launcher, WorldError};

pub(super) fn torchrun(env: &Env<'_>) -> Result<Core, WorldError> {
    const BECAUSE: &str = "TORCHELASTIC_RUN_ID is set";
    let req = |var| required(env, var, Launcher::Torchrun, BECAUSE);
    let restart_count = match env.number("TORCHELASTIC_RESTART_COUNT")? {
        Some(n) => u32::try_from(n).map_err(|_| WorldError::NotANumber {
            var: "TORCHELASTIC_RESTART_COUNT",
            value: n.to_string(),
        })?,
        None => 0,
    };
    Ok(Core {
        launcher: Launcher::Torchrun,
        rank: req("RANK")?,
        rank_var: "RANK",
        world_size: req("WORLD_SIZE")?,
        size_var: "WORLD_SIZE",
        local_rank: req("LOCAL_RANK")?,
        local_rank_var: "LOCAL_RANK",
        local_world_size: req("LOCAL_WORLD_SIZE")?,
        local_size_var: "LOCAL_WORLD_SIZE",
        node_rank: Some(req("GROUP_RANK")?),
        run_id: env.get("TORCHELASTIC_RUN_ID"),
        // torch compares with the exact string Python's str(True) gives.
        use_agent_store: env.get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
        restart_count,
    })
}

pub(super) fn slurm_step(env: &Env<'_>) -> Result<Core, WorldError> {
    const BECAUSE: &str = "SLURM_STEP_ID is set";
    let missing = |var| WorldError::Missing {
        var,
        launcher: Launcher::Slurm,
        because: BECAUSE,
    };
    let rank = required(env, "SLURM_PROCID", Launcher::Slurm, BECAUSE)?;
    let (size_var, world_size) = env
        .first_number(&["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"])?
        .ok_or_else(|| missing("SLURM_STEP_NUM_TASKS"))?;
    let local_rank = required(env, "SLURM_LOCALID", Launcher::Slurm, BECAUSE)?;
    let node = required(env, "SLURM_NODEID", Launcher::Slurm, BECAUSE)?;
    let (tpn_var, tpn) = env
        .first(&["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"])
        .ok_or_else(|| missing("SLURM_STEP_TASKS_PER_NODE"))?;
    let local_world_size = tasks_on_node(tpn_var, &tpn, node)?;
    let run_id = match (
        env.get("SLURM_JOB_ID").or_else(|| env.get("SLURM_JOBID")),
        env.get("SLURM_STEP_ID"),
    ) {
        (Some(job), Some(step)) => Some(format!("{job}.{step}")),
        (None, step) => step,
        (job, None) => job,
    };
    Ok(Core {
        launcher: Launcher::Slurm,
        rank,
        rank_var: "SLURM_PROCID",
        world_size,
        size_var,
        local_rank,
        local_rank_var: "SLURM_LOCALID",
        local_world_size,
        local_size_var: tpn_var,
        node_rank: Some(node),
        run_id,
        use_agent_store: false,
        restart_count: 0,
    })
}

/// Upper bound on the repeat count in `N(xM)`: far beyond any cluster, small enough that the
/// running node count cannot overflow.
const MAX_NODES: usize = 1 << 24;

/// Tasks on node `node` according to a Slurm tasks-per-node list such as `2(x3),1`.
pub(super) fn tasks_on_node(
    var: &'static str,
    value: &str,
    node: usize,
) -> Result<usize, WorldError> {
    let bad = |reason| WorldError::BadTasksPerNode {
        var,
        value: value.to_owned(),
        reason,
    };
    let number = |text: &str| -> Result<usize, WorldError> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.len() > 9 {
            return Err(bad("expected a count"));
        }
        text.parse().map_err(|_| bad("expected a count"))
    };
    let mut first_node = 0usize;
    let mut found = None;
    for item in value.trim().split(',') {
        let item = item.trim();
        let (count, repeat) = match item.split_once('(') {
            Some((count, rest)) => {
                let inner = rest
                    .strip_suffix(')')
                    .and_then(|r| r.strip_prefix('x'))
                    .ok_or_else(|| bad("expected N(xM)"))?;
                (number(count)?, number(inner)?)
            }
            None => (number(item)?, 1),
        };
        if repeat == 0 {
            return Err(bad("repeat count is 0"));
        }
        if repeat > MAX_NODES {
            return Err(bad("repeat count too large"));
        }
        if found.is_none() && node >= first_node && node - first_node < repeat {
            found = Some(count);
        }
        first_node += repeat;
        if first_node > MAX_NODES {
            return Err(bad("too many nodes"));
        }
    }
    found.ok_or(WorldError::NodeOutOfRange {
        node,
        var,
        value: value.to_owned(),
        nodes: first_node,
    })
}

/// What the MPI variables say, before deciding whether a Slurm step overrides them.
pub(super) struct MpiVars {
    launcher: Launcher,
    because: &'static str,
    rank: usize,
    rank_var: &'static str,
    size: Option<(&'static str, usize)>,
    local_rank: Option<(&'static str, usize)>,
    local_size: Option<(&'static str, usize)>,
    run_id: Option<String>,
}

impl MpiVars {
    /// The MPI variables describe the same process as the Slurm step `step` (same rank, and
    /// same size where MPI gives one): `srun --mpi=...` rather than `mpirun` in an allocation.
    pub(super) fn agrees_with(&self, step: &Core) -> bool {
        self.rank == step.rank && self.size.is_none_or(|(_, n)| n == step.world_size)
    }

    pub(super) fn finish(self, env: &Env<'_>) -> Result<Core, WorldError> {
        let missing = |var| WorldError::Missing {
            var,
            launcher: self.launcher,
            because: self.because,
        };
        let size_hint = match self.launcher {
            Launcher::OpenMpi => "OMPI_COMM_WORLD_SIZE",
            Launcher::Mvapich => "MV2_COMM_WORLD_SIZE",
            _ => "PMI_SIZE",
        };
        let local_hint = match self.launcher {
            Launcher::OpenMpi => ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
            Launcher::Mvapich => ("MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
            _ => ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        };
        let (size_var, world_size) = self.size.ok_or_else(|| missing(size_hint))?;
        let (local_rank_var, local_rank) = self.local_rank.ok_or_else(|| missing(local_hint.0))?;
        let (local_size_var, local_world_size) =
            self.local_size.ok_or_else(|| missing(local_hint.1))?;
        let run_id = self
            .run_id
            .or_else(|| env.get("SLURM_JOB_ID"))
            .or_else(|| env.get("SLURM_JOBID"));
        Ok(Core {
            launcher: self.launcher,
            rank: self.rank,
            rank_var: self.rank_var,
            world_size,
            size_var,
            local_rank,
            local_rank_var,
            local_world_size,
            local_size_var,
            node_rank: Core::node_if_all_local(world_size, local_world_size),
            run_id,
            use_agent_store: false,
            restart_count: 0,
        })
    }
}

pub(super) fn mpi(env: &Env<'_>) -> Result<Option<MpiVars>, WorldError> {
    let with_name = |var: &'static str| -> Result<Option<(&'static str, usize)>, WorldError> {
        Ok(env.number(var)?.map(|n| (var, n)))
    };
    if let Some(rank) = env.number("OMPI_COMM_WORLD_RANK")? {
        return Ok(Some(MpiVars {
            launcher: Launcher::OpenMpi,
            because: "OMPI_COMM_WORLD_RANK is set",
            rank,
            rank_var: "OMPI_COMM_WORLD_RANK",
            size: with_name("OMPI_COMM_WORLD_SIZE")?,
            local_rank: with_name("OMPI_COMM_WORLD_LOCAL_RANK")?,
            local_size: with_name("OMPI_COMM_WORLD_LOCAL_SIZE")?,
            run_id: env
                .get("PMIX_NAMESPACE")
                .or_else(|| env.get("OMPI_MCA_ess_base_jobid")),
        }));
    }
    if let Some(rank) = env.number("PMIX_RANK")? {
        // PMIx exports no size; the only env sources are Open MPI's (handled above) and a
        // Slurm step (`srun --mpi=pmix`, handled by the agreement check in detect()).
        return Ok(Some(MpiVars {
            launcher: Launcher::OpenMpi,
            because: "PMIX_RANK is set",
            rank,
            rank_var: "PMIX_RANK",
            size: None,
            local_rank: None,
            local_size: None,
            run_id: env.get("PMIX_NAMESPACE"),
        }));
    }
    if let Some(rank) = env.number("MV2_COMM_WORLD_RANK")? {
        return Ok(Some(MpiVars {
            launcher: Launcher::Mvapich,
            because: "MV2_COMM_WORLD_RANK is set",
            rank,
            rank_var: "MV2_COMM_WORLD_RANK",
            size: with_name("MV2_COMM_WORLD_SIZE")?,
            local_rank: with_name("MV2_COMM_WORLD_LOCAL_RANK")?,
            local_size: with_name("MV2_COMM_WORLD_LOCAL_SIZE")?,
            run_id: None,
        }));
    }
    if let Some(rank) = env.number("PMI_RANK")? {
        return Ok(Some(MpiVars {
            launcher: Launcher::Mpich,
            because: "PMI_RANK is set",
            rank,
            rank_var: "PMI_RANK",
            size: with_name("PMI_SIZE")?,
            local_rank: env.first_number(&["MPI_LOCALRANKID", "PMI_LOCAL_RANK"])?,
            local_size: env.first_number(&["MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"])?,
            run_id: None,
        }));
    }
    Ok(None)
}

pub(super) fn plain_env(env: &Env<'_>) -> Result<Core, WorldError> {
    let because = if env.has("RANK") {
        "RANK is set"
    } else {
        "WORLD_SIZE is set"
    };
    let req = |var| required(env, var, Launcher::Env, because);
    let rank = req("RANK")?;
    let world_size = req("WORLD_SIZE")?;
    let (local_size_var, local_world_size) = env
        .first_number(&["LOCAL_WORLD_SIZE"])?
        .unwrap_or(("WORLD_SIZE", world_size));
    let local_rank = match env.number("LOCAL_RANK")? {
        Some(n) => n,
        // Everyone on this node: the local rank is the rank.
        None if local_world_size == world_size => rank,
        None => {
            return Err(WorldError::Missing {
                var: "LOCAL_RANK",
                launcher: Launcher::Env,
                because: "LOCAL_WORLD_SIZE is below WORLD_SIZE",
            });
        }
    };
    let node_rank = match env.first_number(&["GROUP_RANK", "NODE_RANK"])? {
        Some((_, n)) => Some(n),
        None => Core::node_if_all_local(world_size, local_world_size),
    };
    Ok(Core {
        launcher: Launcher::Env,
        rank,
        rank_var: "RANK",
        world_size,
        size_var: "WORLD_SIZE",
        local_rank,
        local_rank_var: "LOCAL_RANK",
        local_world_size,
        local_size_var,
        node_rank,
        run_id: env.get("AXSAVE_RUN_ID"),
        use_agent_store: false,
        restart_count: 0,
    })
}

/// Prefixes of the variables the launchers above set (torchrun's agent, Slurm, Open MPI, PMI /
/// PMIx, MVAPICH). A process that starts ranks of its own (`axsave launch`) removes them from
/// the ranks' environment: launchers nest, and [`detect`](super::detect) gives these precedence
/// over the plain `RANK`/`WORLD_SIZE`, so a stale one would make every rank believe it belongs
/// to the outer job.
const LAUNCHER_PREFIXES: &[&str] = &[
    "TORCHELASTIC_",
    "SLURM_",
    "OMPI_COMM_WORLD_",
    "PMI_",
    "PMIX_",
    "MV2_",
];

/// Whole names of launcher variables outside [`LAUNCHER_PREFIXES`]: Hydra's local rank and
/// size, and `NODE_RANK` (the node index Lightning and accelerate read).
const LAUNCHER_NAMES: &[&str] = &["MPI_LOCALRANKID", "MPI_LOCALNRANKS", "NODE_RANK"];

/// Whether `name` is a variable of a launcher that [`detect`](super::detect) recognises by
/// its own variables (every one but the plain `env` launcher's `RANK`, `WORLD_SIZE`, …).
pub fn is_launcher_variable(name: &str) -> bool {
    LAUNCHER_PREFIXES.iter().any(|p| name.starts_with(p)) || LAUNCHER_NAMES.contains(&name)
}
