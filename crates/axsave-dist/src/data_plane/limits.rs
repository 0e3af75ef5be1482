//! Frame limits both data transports enforce, so that a frame length always fits a run
//! length (`u32`) and an MPI count (`int`), and memory stays bounded.

/// Most runs in one frame. Bounds the run table (12 bytes a run) independently of the
/// payload, which matters when runs are tiny.
pub const MAX_RUNS_PER_FRAME: usize = 64 * 1024;
/// Largest `frame_bytes` a transport's options allow.
pub const MAX_FRAME_BYTES: usize = 1 << 30;
