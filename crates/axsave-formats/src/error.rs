//! The one error type of the format readers. Every variant names the file it is about.

use std::path::PathBuf;

use crate::pickle::PickleError;

/// Why a checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A file could not be opened, read or mapped (missing, unreadable, a directory, ...).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A pickle inside the file is damaged or uses something the reader refuses.
    #[error("{}: pickle error at byte {}: {}", path.display(), base + source.offset, source.kind)]
    Pickle {
        /// The file.
        path: PathBuf,
        /// Offset of the pickle within the file (the error's own offset is relative to it).
        base: u64,
        /// The pickle machine's error.
        #[source]
        source: PickleError,
    },
    /// A zip archive (a `torch.save` file, or a DCP item inside a `.distcp`) is damaged.
    #[error("{}: damaged zip archive at byte {offset}: {msg}", path.display())]
    Zip {
        /// The file.
        path: PathBuf,
        /// Absolute offset in the file where the damage was found.
        offset: u64,
        /// What was wrong.
        msg: String,
    },
    /// The file parses but does not hold what its format requires (a missing key, a wrong type,
    /// chunks that do not tile a tensor, ...).
    #[error("{}: {msg}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What was wrong, in words a user can act on.
        msg: String,
    },
    /// A byte range named by the metadata lies (partly) past the end of its file: the file is
    /// truncated, or the metadata belongs to another save.
    #[error(
        "{}: {what} at bytes {offset}..{end} lies past the end of the file ({len} bytes): the file is truncated or does not belong to this checkpoint",
        path.display()
    )]
    OutOfBounds {
        /// The file.
        path: PathBuf,
        /// What was being looked for.
        what: String,
        /// First byte of the range.
        offset: u64,
        /// One past the last byte of the range.
        end: u64,
        /// Actual file length.
        len: u64,
    },
    /// Something valid that axsave does not handle (an unknown DCP transform, a sparse or
    /// quantized tensor, an unknown dtype).
    #[error("{}: {what} is not supported", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What was found.
        what: String,
    },
    /// The directory holds no checkpoint of a known format.
    #[error("{}: no checkpoint found: {why}", path.display())]
    NotACheckpoint {
        /// The directory (or file) given.
        path: PathBuf,
        /// What was looked for and not found.
        why: String,
    },
    /// Bytes read from a file do not match the checksum the file records: the data is damaged.
    #[error(
        "{}: bytes {offset}..{end} are damaged (crc32 {found:08x}, the archive records {expected:08x})",
        path.display()
    )]
    Checksum {
        /// The file.
        path: PathBuf,
        /// First byte covered by the checksum.
        offset: u64,
        /// One past the last byte covered.
        end: u64,
        /// The recorded CRC-32.
        expected: u32,
        /// The CRC-32 of what was read.
        found: u32,
    },
}

impl FormatError {
    /// Shorthand for [`FormatError::Invalid`].
    pub fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        FormatError::Invalid {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// Shorthand for [`FormatError::Unsupported`].
    pub fn unsupported(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        FormatError::Unsupported {
            path: path.into(),
            what: what.into(),
        }
    }

    /// Shorthand for [`FormatError::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result with [`FormatError`].
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
