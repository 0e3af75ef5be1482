//! `axsave launch`, the supervisor: a small local launcher, like `torchrun --standalone --nproc-per-node N
//! --no-python`, for one machine.
//!
//! It starts N copies of this executable (or of `--exe`, a hidden option for tests) with the
//! given arguments, each with the variables torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`, …) plus `AXSAVE_RUN_ID` and a
//! random `AXSAVE_JOB_TOKEN` (the secret the ranks' data connections present), so
//! every child detects the `env` launcher (see `axsave_dist::world`).
//!
//! # Output
//!
//! Each child's stdout and stderr are pipes read by one thread each; every line is written to
//! the launcher's stdout / stderr as one write under the stream's lock, so lines of different
//! ranks never mix. stderr lines (the ranks' logs) get a `[rank r] ` prefix; stdout lines (the
//! ranks' results, such as the `--json` summary rank 0 prints) are passed on as they are, so
//! that `axsave launch … --json | jq` works, unless `--tag-output` asks for the prefix there
//! too (as torchrun leaves stdout alone and mpirun tags it only with `--tag-output`). Bytes are
//! passed through as they are (non-UTF-8 included); a last line without a newline gets one; a
//! line longer than 64 KiB is cut into several lines rather than buffered without bound.
//!
//! # Stopping
//!
//! When a rank exits non-zero or is killed by a signal, the others are sent SIGTERM, and SIGKILL
//! after the grace period; the launcher then exits with the failed rank's exit code when it is
//! in 1..=125 (1 otherwise: codes above 125 are the shell's "cannot run" and "killed by signal"
//! codes and would be misread if passed on). SIGINT, SIGTERM and SIGHUP received by the launcher
//! are forwarded to the ranks, with the same grace period; a second one kills them at once; the
//! launcher then exits 128 + the signal number, as a shell reports an interrupted command.
//!
//! Each rank runs in its own process group and is signalled as a group, so whatever a rank
//! started (a shell script's children) is stopped with it. A consequence is that Ctrl-C in a
//! terminal reaches only the launcher, which forwards it: every rank gets it exactly once (Ctrl-Z,
//! which is not forwarded, suspends the launcher but not the ranks). On
//! Linux each rank also gets SIGTERM if the launcher dies without cleaning up (SIGKILL, the OOM
//! killer), so no rank keeps running unattended.

mod output;
mod signals;
mod supervisor;

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;

use output::drain_output;
use supervisor::{Cause, Rank, Supervisor, describe, exit_code_for, signal_name, spawn_rank};

/// Start N local ranks of axsave, each with the variables torchrun would give it.
///
/// Like `torchrun --standalone --nproc-per-node N --no-python axsave ARGS…` on one machine: every
/// rank gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT
/// (a free port unless --master-port), a shared AXSAVE_RUN_ID and a random AXSAVE_JOB_TOKEN
/// that every data connection between the ranks must present. Variables of other launchers
/// (TORCHELASTIC_*, SLURM_*, OMPI_COMM_WORLD_*, PMI_*, PMIX_*, MV2_*, MPI_LOCALRANKID,
/// MPI_LOCALNRANKS, NODE_RANK) are removed from the ranks' environment, so that `axsave launch`
/// run inside an sbatch script or an MPI job does not make the ranks believe they belong to it.
///
/// Each line a rank prints on stderr (its log) is shown on stderr with a `[rank r] ` prefix; its
/// stdout lines (results, such as the summary of --json, which only rank 0 prints) go to stdout
/// unchanged, whole lines at a time, so that `axsave launch -n 4 -- … --json | jq` reads
/// plain JSON; --tag-output prefixes them too. When a rank fails, the others get SIGTERM, then SIGKILL after --grace-period, and the
/// launcher exits with the failed rank's exit code (1 if it was killed or its code is above 125).
/// Ctrl-C (SIGINT), SIGTERM and SIGHUP are passed on to the ranks; a second one kills them at
/// once; the launcher then exits 128 + the signal number.
#[derive(Args, Debug, Clone)]
#[command(after_help = "Examples:\n  \
        axsave launch -n 4 -- --source ckpt --output out\n  \
        axsave launch -n 8 --master-port 29600 -- --source ckpt --output out --dtype bf16\n  \
        axsave launch -n 4 -- --source ckpt --output out --json | jq .files\n\n\
        Exit codes: 0 every rank succeeded; the failed rank's code (1 when it was killed by a \
        signal or its code is above 125); 128 + N when the launcher got signal N; 2 bad usage.")]
pub struct LaunchArgs {
    /// Number of ranks (processes) to start on this machine.
    #[arg(
        short = 'n',
        long = "nproc-per-node",
        visible_alias = "nproc",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub nproc: u32,

    /// Rendezvous port given to the ranks as MASTER_PORT (default: a free port).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub master_port: Option<u16>,

    /// Rendezvous address given to the ranks as MASTER_ADDR.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub master_addr: String,

    /// Seconds the other ranks get to exit after SIGTERM before they are sent SIGKILL.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = parse_seconds)]
    pub grace_period: Duration,

    /// Prefix the ranks' stdout lines with `[rank r] ` too, as their stderr lines always are
    /// (like mpirun's --tag-output). Off by default, so that what the ranks print as results
    /// (the JSON summary of --json) stays machine-readable.
    #[arg(long)]
    pub tag_output: bool,

    /// Program to start instead of this axsave (for tests and debugging: any program can be
    /// launched with the ranks' environment, e.g. `--exe /bin/sh -- -c 'echo $RANK'`).
    #[arg(long, value_name = "PATH", hide = true)]
    pub exe: Option<PathBuf>,

    /// The arguments every rank runs axsave with, after `--`.
    #[arg(last = true, required = true, value_name = "ARGS")]
    pub args: Vec<OsString>,
}

/// `--grace-period`: a non-negative number of seconds, fractions allowed.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("not a number of seconds: {s:?}"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("not a usable number of seconds: {s:?}"))
}

/// Why a launch could not go ahead (the ranks' own failures are exit codes, not errors).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The path of the running executable is unknown.
    #[error("cannot find the axsave executable: {0}")]
    Executable(#[source] io::Error),
    /// No port was free for `MASTER_PORT`.
    #[error("cannot find a free port for MASTER_PORT: {0}")]
    FreePort(#[source] io::Error),
    /// The signal handlers could not be installed.
    #[error("cannot install the signal handlers: {0}")]
    Signals(#[source] io::Error),
    /// A rank could not be started (the ranks started before it were stopped).
    #[error("cannot start rank {rank} ({}): {source}", exe.display())]
    Spawn {
        /// The rank that failed to start.
        rank: u32,
        /// The program it was to run.
        exe: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// How long, once every rank has exited, the launcher waits for the rest of their output. The
/// pipes normally close when the ranks exit; a process a rank left running in the background
/// keeps them open, and the launcher should not wait for it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `name` is another launcher's variable that must not reach the ranks (see
/// [`axsave_dist::world::is_launcher_variable`]).
pub(crate) fn is_foreign_launcher_var(name: &OsStr) -> bool {
    name.to_str()
        .is_some_and(axsave_dist::world::is_launcher_variable)
}

/// What every rank of one launch shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Job {
    world_size: u32,
    master_addr: String,
    master_port: u16,
    run_id: String,
    /// The secret every rank's data connections present (`AXSAVE_JOB_TOKEN`, hex): only the
    /// ranks get it, through their environment.
    job_token: String,
}

impl Job {
    /// The variables rank `rank` is started with: torchrun's set for a single node, and the run
    /// id `axsave_dist::world` reads for the `env` launcher.
    pub(crate) fn rank_env(&self, rank: u32) -> Vec<(&'static str, String)> {
        let n = self.world_size.to_string();
        vec![
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", n.clone()),
            ("LOCAL_RANK", rank.to_string()),
            ("LOCAL_WORLD_SIZE", n.clone()),
            ("GROUP_RANK", "0".into()),
            ("GROUP_WORLD_SIZE", "1".into()),
            ("ROLE_RANK", rank.to_string()),
            ("ROLE_WORLD_SIZE", n),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("AXSAVE_RUN_ID", self.run_id.clone()),
            ("AXSAVE_JOB_TOKEN", self.job_token.clone()),
        ]
    }
}

/// A port nothing listens on now ([`axsave_dist::address::free_port`]); another program may
/// still take it before rank 0 binds it: `--master-port` is the way out when that matters.
fn free_port() -> io::Result<u16> {
    axsave_dist::address::free_port()
}

/// An id for one launch, unique enough to tell runs apart in logs and store namespaces: the
/// launcher's pid and the time in nanoseconds, in hex.
fn new_run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{nanos:x}", std::process::id())
}

/// Runs `axsave launch`: starts the ranks, forwards their output and signals, and returns the
/// exit code the launcher should end with. An `Err` means the launch itself failed (a rank could
/// not be started); the ranks already started are stopped first.
pub fn run(args: &LaunchArgs) -> Result<ExitCode, LaunchError> {
    let exe = match &args.exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().map_err(LaunchError::Executable)?,
    };
    let master_port = match args.master_port {
        Some(p) => p,
        None => free_port().map_err(LaunchError::FreePort)?,
    };
    let job = Job {
        world_size: args.nproc,
        master_addr: args.master_addr.clone(),
        master_port,
        run_id: new_run_id(),
        job_token: axsave_core::distributed::hex(&axsave_core::distributed::random_token()),
    };
    // Before any child exists: a signal arriving between a spawn and the handler would
    // otherwise kill the launcher and leave the ranks without anyone to stop them.
    signals::install().map_err(LaunchError::Signals)?;

    tracing::info!(
        "starting {} rank(s) of {} (MASTER_ADDR={} MASTER_PORT={} AXSAVE_RUN_ID={})",
        job.world_size,
        exe.display(),
        job.master_addr,
        job.master_port,
        job.run_id
    );

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut ranks: Vec<Rank> = Vec::with_capacity(job.world_size as usize);
    for rank in 0..job.world_size {
        match spawn_rank(&exe, &args.args, &job, rank, args.tag_output, &done_tx) {
            Ok(r) => ranks.push(r),
            Err(e) => {
                let mut sup = Supervisor::new(ranks, args.grace_period);
                sup.stop(Cause::StartFailed, libc::SIGTERM);
                sup.wait_all();
                return Err(LaunchError::Spawn {
                    rank,
                    exe,
                    source: e,
                });
            }
        }
    }
    // The reader threads hold the other senders; the channel disconnects when the last ends.
    drop(done_tx);

    let mut sup = Supervisor::new(ranks, args.grace_period);
    sup.wait_all();
    drain_output(&done_rx, DRAIN_TIMEOUT);

    Ok(match sup.cause {
        None => ExitCode::SUCCESS,
        Some(Cause::Signal(sig)) => {
            tracing::error!("interrupted by {}", signal_name(sig));
            ExitCode::from(128u8.saturating_add(u8::try_from(sig).unwrap_or(0)))
        }
        Some(Cause::Failed { rank, status }) => {
            tracing::error!("rank {rank} failed: it {}", describe(status));
            ExitCode::from(exit_code_for(status))
        }
        // Only set on the spawn error path above, which has returned.
        Some(Cause::StartFailed) => ExitCode::FAILURE,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use axsave_dist::{Launcher, detect};

    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("inf").is_err());
    }

    /// The environment a rank sees when `axsave launch` runs where other launchers left their
    /// variables (a torchrun worker inside an `srun` step inside an MPI job, all at once), as
    /// `axsave_dist::world` reads it: the plain `env` launcher with this launch's values.
    #[test]
    fn ranks_detect_the_env_launcher_whatever_the_parent_had() {
        let parent: HashMap<&str, &str> = [
            ("TORCHELASTIC_RUN_ID", "outer"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "3"),
            ("SLURM_JOB_NODELIST", "node[1-4]"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x4)"),
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("OMPI_COMM_WORLD_SIZE", "16"),
            ("PMIX_RANK", "5"),
            ("PMI_RANK", "5"),
            ("PMI_SIZE", "16"),
            ("MV2_COMM_WORLD_RANK", "5"),
            ("MV2_COMM_WORLD_SIZE", "16"),
            ("MPI_LOCALRANKID", "1"),
            ("MPI_LOCALNRANKS", "4"),
            ("NODE_RANK", "3"),
            ("RANK", "5"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "29500"),
            ("HOME", "/root"),
        ]
        .into_iter()
        .collect();
        let job = Job {
            world_size: 3,
            master_addr: "127.0.0.1".into(),
            master_port: 41000,
            run_id: "abc-123".into(),
            job_token: "00".repeat(32),
        };
        for rank in 0..3 {
            let mut env: HashMap<String, String> = parent
                .iter()
                .filter(|(k, _)| !is_foreign_launcher_var(OsStr::new(k)))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            env.extend(
                job.rank_env(rank)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v)),
            );
            assert_eq!(env.get("HOME").map(String::as_str), Some("/root"));
            let world = detect(&|k| env.get(k).cloned()).unwrap();
            assert_eq!(world.launcher, Launcher::Env);
            assert_eq!(world.rank, rank as usize);
            assert_eq!(world.world_size, 3);
            assert_eq!(world.local_rank, rank as usize);
            assert_eq!(world.local_world_size, 3);
            assert_eq!(world.node_rank, Some(0));
            assert_eq!(world.master_addr.as_deref(), Some("127.0.0.1"));
            assert_eq!(world.master_port, 41000);
            assert_eq!(world.run_id.as_deref(), Some("abc-123"));
        }
    }
}
