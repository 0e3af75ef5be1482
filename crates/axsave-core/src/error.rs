//! Errors of the core crate: [`CoreError`], and the typed errors it wraps that no other crate
//! defines ([`PlanError`], [`Unavailable`]; re-exported where they arise, `plan` and
//! `transport`). They live here so that this module imports no other module of the crate: every
//! module returns [`Result`] without an import loop.

use std::path::PathBuf;

use axsave_formats::FormatError;

/// Why a save (or a verify) failed.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The checkpoint could not be read.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The output layout cannot be made (no tensors, names that collide, ...).
    #[error("cannot lay out the output: {0}")]
    Layout(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The output directory already holds a model and `--force` was not given.
    #[error("{} already holds {}; pass --force to replace it", dir.display(), names.join(", "))]
    OutputExists {
        /// The output directory.
        dir: PathBuf,
        /// The files found.
        names: Vec<String>,
    },
    /// The Axolotl config (or a file it names) is wrong, or what it describes cannot be found.
    #[error("{0}")]
    Config(String),
    /// A dtype conversion the executor cannot do.
    #[error("cannot convert tensor {tensor} from {from} to {to}")]
    Convert {
        /// The tensor.
        tensor: String,
        /// Stored dtype.
        from: String,
        /// Wanted dtype.
        to: String,
    },
    /// A LoRA adapter cannot be merged into its base (a tensor that does not fit, a missing
    /// module, an unsupported setting); the message names the tensor or the setting.
    #[error("{0}")]
    Merge(String),
    /// `verify` found a difference.
    #[error("{0}")]
    Mismatch(String),
    /// The GPU could not do its part (CUDA or NCCL failed, or no device where one is needed).
    #[error("GPU: {0}")]
    Gpu(String),
    /// The ranks disagree (world size, arguments, checkpoint, job token), one is missing, or
    /// one sees what another does not; the message names the rank and what to do.
    #[error("{0}")]
    Remote(String),
    /// Another rank reported a failure.
    #[error("rank {rank} failed: {message}")]
    PeerFailed {
        /// The rank.
        rank: usize,
        /// What it reported.
        message: String,
    },
    /// A value another rank put in the store cannot be read.
    #[error("malformed {what} from another rank: {source}")]
    Malformed {
        /// What the value was.
        what: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The plan (who reads and writes what) cannot be made.
    #[error("cannot plan the copy: {0}")]
    Plan(#[from] PlanError),
    /// The rendezvous store failed.
    #[error(transparent)]
    Store(#[from] axsave_dist::StoreError),
    /// A step through the store failed (a broadcast, a wait, the failure flag).
    #[error(transparent)]
    Coord(#[from] axsave_dist::store::CoordError),
    /// Rank 0 could not start the rendezvous store.
    #[error(
        "rank 0 cannot host the rendezvous store on port {port}: {source} (set MASTER_PORT to a free port)"
    )]
    StoreServer {
        /// The port asked for.
        port: u16,
        /// Why it failed.
        #[source]
        source: axsave_dist::store::ServerError,
    },
    /// The TCP data plane failed.
    #[error(transparent)]
    Transport(#[from] axsave_dist::TransportError),
    /// The transport asked for (`--transport mpi|nccl`) is not available here.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// The GPUs' data plane (NCCL) failed: a call, a peer, a timeout, or the library.
    #[cfg(feature = "cuda")]
    #[error("GPU: {0}")]
    DevicePlane(axsave_dist::data_plane::DevicePlaneError),
    /// The MPI data plane failed.
    #[cfg(feature = "mpi")]
    #[error(transparent)]
    Mpi(#[from] axsave_dist::data_plane::mpi::MpiError),
    /// `source`, with what was being done when it happened (the peer, the address).
    #[error("{context}: {source}")]
    Context {
        /// What was being done.
        context: String,
        /// What failed.
        #[source]
        source: Box<CoreError>,
    },
    /// A bug in axsave: a state the code should never reach.
    #[error("internal error (a bug in axsave): {0}")]
    Internal(String),
    /// Another save holds the output directory's lock.
    #[error("{} is in use by another save ({holder}); wait for it to finish or choose another --output", dir.display())]
    Locked {
        /// The output directory.
        dir: PathBuf,
        /// Who holds the lock, as its lock file says.
        holder: String,
    },
    /// This process received a signal (SIGTERM, SIGINT, SIGHUP) and cancelled the save.
    #[error("interrupted by {}: the save was cancelled", signal_name(*signal))]
    Interrupted {
        /// The signal number.
        signal: i32,
    },
    /// The run was cancelled (another part failed first).
    #[error("cancelled")]
    Cancelled,
}

impl CoreError {
    /// Shorthand for [`CoreError::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The data plane's error keeps its transport's variant.
impl From<axsave_dist::data_plane::DataPlaneError> for CoreError {
    fn from(e: axsave_dist::data_plane::DataPlaneError) -> Self {
        use axsave_dist::data_plane::DataPlaneError;
        match e {
            DataPlaneError::Tcp(e) => CoreError::Transport(e),
            #[cfg(feature = "mpi")]
            DataPlaneError::Mpi(e) => CoreError::Mpi(e),
        }
    }
}

/// The GPUs' data plane's cancellation is the run's ([`CoreError::Cancelled`]); its other
/// errors keep their own variant.
#[cfg(feature = "cuda")]
impl From<axsave_dist::data_plane::DevicePlaneError> for CoreError {
    fn from(e: axsave_dist::data_plane::DevicePlaneError) -> Self {
        match e {
            axsave_dist::data_plane::DevicePlaneError::Cancelled => CoreError::Cancelled,
            e => CoreError::DevicePlane(e),
        }
    }
}

/// Adds what was being done to an error ([`CoreError::Context`]).
pub trait ResultExt<T> {
    /// Wraps the error, if any, with `context()` (called only on failure).
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<CoreError>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| CoreError::Context {
            context: context(),
            source: Box::new(e.into()),
        })
    }
}

/// Result with [`CoreError`].
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Why no plan can be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No rank can read a file the output needs.
    #[error("no rank can read {file}, which holds part of tensor {tensor}")]
    Unreadable {
        /// The file.
        file: String,
        /// A tensor that needs it.
        tensor: String,
    },
}

/// Why an explicit `--transport` cannot be met.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// `--transport mpi` outside an MPI launcher.
    #[error("--transport mpi needs an MPI launcher (mpirun, mpiexec, srun --mpi)")]
    NoMpiLauncher,
    /// `--transport mpi` from a binary built without MPI.
    #[error("--transport mpi: this axsave was built without MPI (cargo feature `mpi`)")]
    MpiNotBuilt,
    /// `--transport nccl` where a rank has no GPU or no NCCL (or shares its GPU).
    #[error("--transport nccl needs a GPU and NCCL{}: {why}", if *.every_rank { " on every rank" } else { "" })]
    NoNccl {
        /// Whether there are several ranks (the message says "on every rank").
        every_rank: bool,
        /// Which rank lacks what (`"rank 1: no CUDA driver"`).
        why: String,
    },
}

/// The usual name of a signal number, or "signal N".
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGKILL => "SIGKILL".into(),
        _ => format!("signal {sig}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_the_typed_cause_and_the_old_message() {
        let cause = axsave_dist::TransportError::AlreadyStarted;
        let e = Err::<(), _>(cause)
            .context(|| "sending to rank 3".into())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "sending to rank 3: the transport receiver was already started"
        );
        match &e {
            CoreError::Context { source, .. } => {
                assert!(matches!(**source, CoreError::Transport(_)))
            }
            other => panic!("{other:?}"),
        }
        // The chain is walkable down to the transport's error.
        let inner = std::error::Error::source(&e).unwrap();
        assert!(inner.to_string().contains("already started"));
    }

    #[test]
    fn a_plan_error_is_not_called_a_layout_error() {
        let e: CoreError = PlanError::Unreadable {
            file: "__3_0.distcp".into(),
            tensor: "w".into(),
        }
        .into();
        assert_eq!(
            e.to_string(),
            "cannot plan the copy: no rank can read __3_0.distcp, which holds part of tensor w"
        );
    }

    #[test]
    fn a_peer_s_failure_reads_as_before() {
        let e = CoreError::PeerFailed {
            rank: 2,
            message: "disk full".into(),
        };
        assert_eq!(e.to_string(), "rank 2 failed: disk full");
    }
}
