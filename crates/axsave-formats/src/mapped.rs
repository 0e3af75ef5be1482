//! Read-only memory maps of checkpoint files, for reading metadata in place.
//!
//! Readers map a data file only to look at a few pages of it (zip directories, pickles,
//! safetensors headers) and drop the map before any bulk copy starts. Each touched page of a
//! map brings a whole large folio of the page cache into the resident set (hundreds of KB on
//! recent kernels), so a reader that touches many places of one file (the DCP reader, one
//! item per tensor chunk) reads them with positioned reads instead. Bulk data is read with
//! positioned reads by the executor.

use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use crate::error::{FormatError, Result};

/// A mapped file (or an empty buffer for an empty file, which cannot be mapped).
pub struct Mapped {
    map: Option<memmap2::Mmap>,
}

impl Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// Maps `path` read-only.
pub fn map(path: &Path) -> Result<Mapped> {
    let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
    let len = file.metadata().map_err(|e| FormatError::io(path, e))?.len();
    if len == 0 {
        return Ok(Mapped { map: None });
    }
    // SAFETY: the map is read-only and private to this process. The one way it could change
    // under us is another process truncating or rewriting the file while we read, which a
    // checkpoint being consolidated must not suffer anyway; the executor's identity check
    // (size and modification time before and after) reports such a change.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
    Ok(Mapped { map: Some(map) })
}

/// Reads a whole small file (metadata, JSON, pickles).
pub fn read_small(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| FormatError::io(path, e))?;
    if meta.len() > limit {
        return Err(FormatError::invalid(
            path,
            format!(
                "{} bytes is too large for a metadata file (limit {limit})",
                meta.len()
            ),
        ));
    }
    std::fs::read(path).map_err(|e| FormatError::io(path, e))
}
