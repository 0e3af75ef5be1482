//! How axsave turns a checkpoint catalog into safetensors files: the layout (what the output
//! will be), the plan (who reads and writes what), the executor (moving bytes with bounded
//! memory) and finalization (temporary names, fsync, atomic renames).

pub mod axolotl;
pub mod bootstrap;
pub mod cancel;
pub mod direct;
pub mod distributed;
pub mod error;
pub mod execute;
pub mod fault;
pub mod finalize;
pub mod geometry;
pub mod gpu;
pub mod host;
pub mod interrupt;
pub mod layout;
pub mod lock;
pub mod merge_lora;
pub mod naming;
pub mod output;
pub mod parent;
pub mod plan;
pub mod progress;
pub mod report;
pub mod route;
pub mod runtag;
pub mod save;
pub mod scales;
pub mod size;
pub mod sources;
pub mod summary;
pub mod transport;
pub mod verify;

pub use error::{CoreError, Result};
