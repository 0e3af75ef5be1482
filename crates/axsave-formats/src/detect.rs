//! Finding out what a source path holds, and reading it with the right reader.

use std::path::Path;

use crate::catalog::Catalog;
use crate::error::{FormatError, Result};
use crate::{dcp, st_reader, zero};

/// What kind of checkpoint a path holds, without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Detected {
    /// DCP with `.metadata` (or per-rank metadata).
    Dcp,
    /// DCP's Hugging Face mode shards (in the directory itself).
    DcpHf,
    /// A finished safetensors model.
    Safetensors,
    /// DeepSpeed ZeRO (`latest` + `global_stepN/*_optim_states.pt`, or a tag directory).
    DeepSpeed,
}

/// Detects the format of `path` (a directory, or a single safetensors file / index).
pub fn detect(path: &Path) -> Result<Detected> {
    if !path.exists() {
        return Err(FormatError::NotACheckpoint {
            path: path.to_path_buf(),
            why: "no such file or directory".into(),
        });
    }
    if path.is_file() {
        let name = path.to_string_lossy();
        if name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json") {
            return Ok(Detected::Safetensors);
        }
        return Err(FormatError::NotACheckpoint {
            path: path.to_path_buf(),
            why: "a file that is neither .safetensors nor a .safetensors.index.json; give the checkpoint directory".into(),
        });
    }
    if dcp::is_dcp(path) {
        return Ok(Detected::Dcp);
    }
    if zero::is_zero(path) {
        return Ok(Detected::DeepSpeed);
    }
    if !st_reader::hf_shards(path)?.is_empty() {
        return Ok(Detected::DcpHf);
    }
    if st_reader::model_files(path).is_ok() {
        return Ok(Detected::Safetensors);
    }
    // A DeepSpeed `latest` that cannot be followed (a tag outside the directory, a missing tag
    // directory) says so, rather than a hint about what the subdirectories hold.
    if path.join(zero::LATEST).is_file() {
        zero::tag_dir(path)?;
    }
    Err(FormatError::NotACheckpoint {
        path: path.to_path_buf(),
        why: hint(path),
    })
}

/// Reads `path` with the reader its format needs.
pub fn open(path: &Path) -> Result<Catalog> {
    match detect(path)? {
        Detected::Dcp => dcp::read(path),
        Detected::DcpHf => st_reader::read_hf(path),
        Detected::Safetensors => st_reader::read_model(path),
        Detected::DeepSpeed => zero::read(path),
    }
}

/// Reads what this rank can see of a checkpoint of a known format (see [`Catalog::merge`]).
/// A DCP checkpoint's metadata comes as bytes, since it may live on another rank's disk.
pub fn open_partial(
    path: &Path,
    format: Detected,
    dcp_metadata: &[(String, Vec<u8>)],
) -> Result<Catalog> {
    match format {
        Detected::Dcp => dcp::read_partial(path, dcp_metadata),
        Detected::DcpHf => st_reader::read_hf_partial(path),
        Detected::Safetensors => st_reader::read_model_partial(path),
        Detected::DeepSpeed => zero::read_partial(path),
    }
}

/// What to tell a user whose directory holds no checkpoint: the subdirectories that do.
fn hint(dir: &Path) -> String {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut names: Vec<_> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.path())
            .collect();
        names.sort();
        for sub in names {
            let holds = dcp::is_dcp(&sub)
                || zero::is_zero(&sub)
                || st_reader::hf_shards(&sub).is_ok_and(|s| !s.is_empty());
            if holds {
                found.push(sub.display().to_string());
            }
        }
    }
    if found.is_empty() {
        "looked for DCP (.metadata + .distcp), DeepSpeed ZeRO (latest + global_stepN/*_optim_states.pt), DCP Hugging Face shards (shard-*-model-*.safetensors) and safetensors (model.safetensors or an index)".into()
    } else {
        format!(
            "it holds none itself, but these subdirectories do: {}",
            found.join(", ")
        )
    }
}
