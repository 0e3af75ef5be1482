//! What each rank can see of the source: the files in its view of the checkpoint directory,
//! with a cheap identity (size, modification time), and the format it detects there.

use std::path::Path;

use axsave_formats::detect::{self, Detected};

use crate::error::{CoreError, Result};

/// One file a rank sees.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileId {
    /// Name relative to the checkpoint directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

/// What one rank sees.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Inventory {
    /// The files, sorted by name.
    pub files: Vec<FileId>,
    /// Device and inode of each of `files` (kept apart from them: on a network file system the
    /// device number differs between machines that see the same file, and `files` must stay
    /// equal there).
    #[serde(default)]
    pub ids: Vec<(u64, u64)>,
    /// The format this rank detects on its own (none when, say, it holds only `.distcp` files
    /// and another rank holds the metadata).
    pub detected: Option<Detected>,
    /// Names of DCP metadata files among `files`.
    pub metadata: Vec<String>,
    /// Which checkpoint this rank's view is ([`super::identity`]).
    #[serde(default)]
    pub identity: super::identity::Identity,
    /// The node this rank runs on ([`crate::host::node_id`]): bytes between ranks of one node
    /// stay on the host.
    #[serde(default)]
    pub node: String,
    /// The absolute directory this rank lists (empty when it sees none), where a rank of the
    /// same node may open the files (`super::borrow`).
    #[serde(default)]
    pub root: String,
}

/// Lists the regular files of `source` (a directory; a single file for safetensors inputs).
pub fn take(source: &Path) -> Result<Inventory> {
    use std::os::unix::fs::MetadataExt;
    let mut files = Vec::new();
    let (dir, only): (&Path, Option<&std::ffi::OsStr>) = if source.is_file() {
        (
            source.parent().unwrap_or(Path::new(".")),
            source.file_name(),
        )
    } else {
        (source, None)
    };
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let e = e.map_err(|e| CoreError::io(dir, e))?;
                if only.is_some_and(|o| o != e.file_name()) {
                    continue;
                }
                let meta = match e.metadata() {
                    Ok(m) if m.is_file() => m,
                    _ => continue,
                };
                files.push((
                    FileId {
                        name: e.file_name().to_string_lossy().into_owned(),
                        size: meta.len(),
                        mtime_ns: mtime_ns(&meta),
                    },
                    (meta.dev(), meta.ino()),
                ));
            }
        }
        // A rank that sees no source at all still takes part (it may write or relay nothing).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(CoreError::io(dir, e)),
    }
    files.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let (files, ids): (Vec<FileId>, Vec<(u64, u64)>) = files.into_iter().unzip();
    let root = if files.is_empty() {
        String::new()
    } else {
        std::fs::canonicalize(dir)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let metadata = files
        .iter()
        .filter(|f| axsave_formats::dcp::is_metadata_name(&f.name))
        .map(|f| f.name.clone())
        .collect();
    Ok(Inventory {
        files,
        ids,
        root,
        detected: detect::detect(source).ok(),
        metadata,
        identity: super::identity::Identity::of(source)?,
        node: crate::host::node_id(),
    })
}

/// Modification time of a file in nanoseconds since the epoch (0 where unknown).
pub fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Replaces `{rank}`, `{local_rank}` and `{node_rank}` in a source path, for checkpoints on
/// node-local disks (`/scratch/{node_rank}/ckpt`) or one directory per rank.
pub fn expand_source(
    template: &str,
    rank: usize,
    local_rank: usize,
    node_rank: Option<usize>,
) -> Result<String> {
    let mut s = template
        .replace("{rank}", &rank.to_string())
        .replace("{local_rank}", &local_rank.to_string());
    if s.contains("{node_rank}") {
        let n = node_rank.ok_or_else(|| {
            CoreError::Layout(
                "--source uses {node_rank}, but the launcher does not say which node this is"
                    .into(),
            )
        })?;
        s = s.replace("{node_rank}", &n.to_string());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        assert_eq!(
            expand_source("/d/{node_rank}/r{rank}-{local_rank}", 5, 1, Some(2)).unwrap(),
            "/d/2/r5-1"
        );
        assert_eq!(expand_source("/plain", 5, 1, None).unwrap(), "/plain");
        assert!(expand_source("/d/{node_rank}", 0, 0, None).is_err());
    }
}
