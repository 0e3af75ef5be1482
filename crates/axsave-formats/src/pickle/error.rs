//! What may go wrong reading a pickle, and the bounds a pickle must stay within.

/// Bounds that keep a hostile or damaged pickle from exhausting memory or the stack of code
/// that walks the result.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most nodes (containers, objects, globals) the arena may hold.
    pub max_nodes: usize,
    /// Deepest nesting of containers allowed.
    pub max_depth: usize,
    /// Largest stack (values plus marks) allowed.
    pub max_stack: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_nodes: 20_000_000,
            max_depth: 1_000,
            max_stack: 10_000_000,
        }
    }
}

/// Why a pickle could not be read. Every error carries the byte offset of the opcode at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("pickle error at byte {offset}: {kind}")]
pub struct PickleError {
    /// Byte offset of the opcode being executed, from the start of the pickle.
    pub offset: u64,
    /// What went wrong.
    pub kind: PickleErrorKind,
}

/// The kinds of [`PickleError`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PickleErrorKind {
    /// The data ended before `STOP` (or in the middle of an opcode's argument).
    #[error("unexpected end of data")]
    Truncated,
    /// A byte that is no pickle opcode.
    #[error("unknown opcode 0x{0:02x}")]
    UnknownOpcode(u8),
    /// An opcode axsave deliberately does not support (extension registry, out-of-band buffers).
    #[error("unsupported opcode {0}")]
    Unsupported(&'static str),
    /// `PROTO` named a protocol newer than 5.
    #[error("unsupported pickle protocol {0}")]
    Protocol(u8),
    /// An opcode needed more values on the stack than there were.
    #[error("stack underflow")]
    StackUnderflow,
    /// An opcode needed a `MARK` and found none.
    #[error("no MARK on the stack")]
    NoMark,
    /// An opcode found a value of the wrong kind (e.g. `APPEND` onto a dict).
    #[error("{0}")]
    BadOperand(String),
    /// A memo index that was never stored.
    #[error("memo entry {0} is missing")]
    MissingMemo(u64),
    /// A string argument that is not valid UTF-8 or a number that does not parse.
    #[error("malformed argument: {0}")]
    Malformed(String),
    /// One of the [`Limits`] was exceeded.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// `STOP` left other values on the stack, or the stack was empty.
    #[error("STOP with {0} values on the stack (expected 1)")]
    BadStop(usize),
}
