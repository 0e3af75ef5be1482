//! Proof that every rank reads the same checkpoint.
//!
//! Each rank digests the files that say which checkpoint its view of `--source` is (they are
//! small): DCP's `.metadata` (and per-rank `__N.metadata`), a safetensors index (or a single
//! file's header, or the headers of DCP's Hugging Face-mode shards), DeepSpeed's `latest` and the pickle (`data.pkl`) of each `*model_states.pt`
//! of the tag it reads, plus the checkpoint's own id where it has one (DCP's `save_id`, the
//! DeepSpeed tag). Every rank receives every rank's digests with the inventories and checks them
//! the same way: a file name two ranks both see must have the same digest, and save ids must
//! agree. A mismatch fails every rank, naming both sides. (Node-local `.distcp` files carry no
//! id of their own: a rank that sees none of these files can only be checked through the
//! ranks that do.)

use std::path::Path;

use crate::error::{CoreError, Result};

/// Largest identity file digested whole (a `.metadata` of a very large model is tens of MB).
const MAX_DIGESTED: u64 = 1 << 30;

/// What one rank's view of the source says about which checkpoint it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The source as this rank expanded it (absolute), and the host.
    pub path: String,
    /// Identity files seen, by name relative to the source, with their SHA-256 (hex).
    pub digests: Vec<(String, String)>,
    /// The checkpoint's id, where it records one.
    pub save_id: Option<String>,
}

impl Identity {
    /// Digests the identity files of `source` (a directory, or a single safetensors file).
    pub fn of(source: &Path) -> Result<Identity> {
        let shown = std::path::absolute(source).unwrap_or_else(|_| source.to_path_buf());
        let mut id = Identity {
            path: format!("{} on {}", shown.display(), crate::host::hostname()),
            ..Identity::default()
        };
        if source.is_file() {
            // A single safetensors file: its header says what it holds.
            if let Some(h) = safetensors_header(source)? {
                let name = source
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                id.digests.push((format!("{name} (header)"), sha256(&h)));
            }
            return Ok(id);
        }
        let Ok(entries) = std::fs::read_dir(source) else {
            return Ok(id);
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in &names {
            let path = source.join(name);
            if axsave_formats::dcp::is_metadata_name(name) {
                let bytes = read(&path)?;
                // Only the global `.metadata`: each rank's `__N.metadata` of a save without
                // collectives carries a save id of its own.
                if name == ".metadata" {
                    id.save_id = dcp_save_id(&bytes);
                }
                id.digests.push((name.clone(), sha256(&bytes)));
            } else if name.ends_with(".safetensors.index.json") {
                id.digests.push((name.clone(), sha256(&read(&path)?)));
            } else if (name == "model.safetensors"
                || (name.starts_with("shard-") && name.ends_with(".safetensors")))
                && let Some(h) = safetensors_header(&path)?
            {
                id.digests.push((format!("{name} (header)"), sha256(&h)));
            }
        }
        // DeepSpeed: the tag `latest` names (or this directory, when it is a tag directory).
        let tag_dir = match std::fs::read_to_string(source.join("latest")) {
            Ok(tag) => {
                let tag = tag.trim().to_string();
                id.digests.push(("latest".into(), sha256(tag.as_bytes())));
                id.save_id = Some(format!("DeepSpeed tag {tag}"));
                Some(source.join(tag))
            }
            Err(_) => None,
        };
        let dir = tag_dir.as_deref().unwrap_or(source);
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(id);
        };
        let mut states: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with("model_states.pt"))
            .collect();
        states.sort();
        if !states.is_empty() && id.save_id.is_none() {
            let tag = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            id.save_id = tag.map(|t| format!("DeepSpeed tag {t}"));
        }
        for name in states {
            let path = dir.join(&name);
            let map = axsave_formats::mapped::map(&path)?;
            let pickle = axsave_formats::zip::ZipIndex::parse(&*map)
                .ok()
                .and_then(|z| {
                    z.get("data.pkl")
                        .and_then(|e| z.bytes(&*map, e))
                        .map(sha256)
                });
            if let Some(d) = pickle {
                let rel = match &tag_dir {
                    Some(t) => format!(
                        "{}/{name}",
                        t.file_name().unwrap_or_default().to_string_lossy()
                    ),
                    None => name,
                };
                id.digests.push((format!("{rel} (data.pkl)"), d));
            }
        }
        Ok(id)
    }

    fn describe(&self, rank: usize, file: Option<(&str, &str)>) -> String {
        let mut s = format!("rank {rank} reads {}", self.path);
        let mut parts = Vec::new();
        if let Some((name, digest)) = file {
            parts.push(format!("{name} sha256 {}", &digest[..digest.len().min(16)]));
        }
        if let Some(id) = &self.save_id {
            parts.push(format!("save_id {id}"));
        }
        if !parts.is_empty() {
            s += &format!(" ({})", parts.join(", "));
        }
        s
    }
}

/// Checks that the ranks' identities (index = rank) describe one checkpoint.
pub fn check_same(ids: &[Identity]) -> Result<()> {
    let mismatch = |a: usize, b: usize, file: Option<&str>| {
        let da = file.and_then(|f| digest_of(&ids[a], f).map(|d| (f, d)));
        let db = file.and_then(|f| digest_of(&ids[b], f).map(|d| (f, d)));
        CoreError::Remote(format!(
            "the ranks read different checkpoints: {}, but {}; every rank must read the same checkpoint",
            ids[a].describe(a, da),
            ids[b].describe(b, db)
        ))
    };
    for (b, id) in ids.iter().enumerate() {
        for (name, digest) in &id.digests {
            // The first rank that saw this file is the reference.
            if let Some(a) = (0..b).find(|&a| digest_of(&ids[a], name).is_some())
                && digest_of(&ids[a], name) != Some(digest.as_str())
            {
                return Err(mismatch(a, b, Some(name)));
            }
        }
        if let Some(sid) = &id.save_id
            && let Some(a) = (0..b).find(|&a| ids[a].save_id.is_some())
            && ids[a].save_id.as_ref() != Some(sid)
        {
            return Err(mismatch(a, b, None));
        }
    }
    Ok(())
}

fn digest_of<'a>(id: &'a Identity, name: &str) -> Option<&'a str> {
    id.digests
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, d)| d.as_str())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    Ok(axsave_formats::mapped::read_small(path, MAX_DIGESTED)?)
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The 8-byte length and the JSON header of a safetensors file (`None` if it has none).
fn safetensors_header(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
    let mut len = [0u8; 8];
    if f.read_exact(&mut len).is_err() {
        return Ok(None);
    }
    let n = u64::from_le_bytes(len).min(100 << 20);
    let mut h = len.to_vec();
    f.take(n)
        .read_to_end(&mut h)
        .map_err(|e| CoreError::io(path, e))?;
    Ok(Some(h))
}

/// DCP's `storage_meta.save_id` (torch 2.4+), found as a `save_id` key of any dict in the
/// metadata pickle (the state of the `StorageMeta` object).
fn dcp_save_id(metadata: &[u8]) -> Option<String> {
    use axsave_formats::pickle::{Node, Value};
    let p = axsave_formats::pickle::parse(metadata).ok()?;
    (0..p.node_count()).find_map(|i| match p.node(&Value::Ref(i))? {
        Node::Dict(items) => items.iter().find_map(|(k, v)| {
            (p.as_str(k)? == "save_id")
                .then(|| p.as_str(v).map(str::to_owned))
                .flatten()
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(rel)
    }

    #[test]
    fn dcp_checkpoints_are_told_apart_by_metadata_and_save_id() {
        let a = Identity::of(&fixture("dcp/torch27_w2/checkpoint")).unwrap();
        let b = Identity::of(&fixture("dcp/torch215_w2/checkpoint")).unwrap();
        assert_eq!(a.digests.len(), 1);
        assert!(a.save_id.is_some() && b.save_id.is_some());
        assert_ne!(a.save_id, b.save_id);
        check_same(&[a.clone(), a.clone()]).unwrap();
        let err = check_same(&[a.clone(), b.clone()]).unwrap_err().to_string();
        assert!(
            err.contains("rank 0 reads") && err.contains("but rank 1 reads"),
            "{err}"
        );
        assert!(err.contains(".metadata sha256 "), "{err}");
        // A rank that sees no identity file proves nothing and contradicts nothing.
        check_same(&[a.clone(), Identity::default(), a]).unwrap();
    }

    /// Per-rank metadata (`__N.metadata`, torch 2.9+ saves without collectives): each file has
    /// its own save id, so node-local views of one such checkpoint are not a mismatch.
    #[test]
    fn per_rank_metadata_views_of_one_checkpoint_agree() {
        let t = tempfile::tempdir().unwrap();
        let src = fixture("dcp/per_rank_meta_w2/checkpoint");
        let ids: Vec<Identity> = (0..2)
            .map(|r| {
                let d = t.path().join(format!("rank{r}"));
                std::fs::create_dir_all(&d).unwrap();
                for f in [format!("__{r}.metadata"), format!("__{r}_0.distcp")] {
                    std::fs::copy(src.join(&f), d.join(&f)).unwrap();
                }
                Identity::of(&d).unwrap()
            })
            .collect();
        check_same(&ids).unwrap();
        let shared = Identity::of(&src).unwrap();
        check_same(&[shared.clone(), shared, ids[0].clone()]).unwrap();
    }

    #[test]
    fn deepspeed_and_safetensors_identities() {
        let z = Identity::of(&fixture("deepspeed/zero3_w2/checkpoint")).unwrap();
        assert!(
            z.save_id
                .as_deref()
                .is_some_and(|s| s.starts_with("DeepSpeed tag "))
        );
        assert!(
            z.digests
                .iter()
                .any(|(n, _)| n.ends_with("model_states.pt (data.pkl)"))
        );
        let s = Identity::of(&fixture("safetensors/sharded")).unwrap();
        assert!(
            s.digests.iter().any(|(n, _)| n.ends_with(".index.json")),
            "{s:?}"
        );
        let z2 = Identity::of(&fixture("deepspeed/zero2_w2/checkpoint")).unwrap();
        let z2a = Identity::of(&fixture("deepspeed/zero2_align_w2/checkpoint")).unwrap();
        check_same(&[z2.clone(), z2.clone()]).unwrap();
        // Same tag, same file names, different runs: the model states differ.
        assert!(check_same(&[z2, z2a]).is_err());
    }
}
