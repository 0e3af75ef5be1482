//! Errors of the core crate.

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
    /// Another rank failed, or the transport broke.
    #[error("{0}")]
    Remote(String),
    /// Another save holds the output directory's lock.
    #[error("{} is in use by another save ({holder}); wait for it to finish or choose another --output", dir.display())]
    Locked {
        /// The output directory.
        dir: PathBuf,
        /// Who holds the lock, as its lock file says.
        holder: String,
    },
    /// This process received a signal (SIGTERM, SIGINT, SIGHUP) and cancelled the save.
    #[error("interrupted by {}: the save was cancelled", crate::interrupt::signal_name(*signal))]
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

/// Result with [`CoreError`].
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
