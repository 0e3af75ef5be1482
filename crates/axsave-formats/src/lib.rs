//! Readers for the checkpoints distributed training leaves on disk, and the safetensors layout.
//!
//! Every reader turns its files into one neutral [`Catalog`]: each tensor's name, dtype and
//! shape, and the pieces it was saved in (which region, which file, which bytes, which strides).
//! Readers know nothing of ranks or outputs.
//!
//! - [`pickle`]: a pickle machine that builds values and never executes anything;
//! - [`zip`] and [`torchsave`]: `torch.save` archives read in place;
//! - [`dcp`]: PyTorch Distributed Checkpoint (`.metadata` + `.distcp`);
//! - [`zero`]: DeepSpeed ZeRO 1/2/3 checkpoints, read as `zero_to_fp32.py` consolidates them;
//! - [`convert`]: dtype conversions bit-identical to torch's `.to()`.

pub mod catalog;
pub mod convert;
pub mod dcp;
pub mod detect;
pub mod dtype;
pub mod error;
pub mod mapped;
pub mod pickle;
pub mod st_header;
pub mod st_reader;
#[cfg(any(test, feature = "torch-fixtures"))]
pub mod torch_fixtures;
pub mod torchsave;
pub mod zero;
pub mod zip;

pub use catalog::{
    Catalog, Checksum, Encoding, Format, Piece, RecordCheck, Region, SourceFile, TensorEntry,
};
pub use dtype::DType;
pub use error::{FormatError, Result};
