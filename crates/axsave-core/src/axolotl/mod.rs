//! Axolotl semantics: its YAML config, the checkpoint its run left, PEFT adapters, and the
//! tokenizer and config files that go beside the weights.

pub mod config;
pub mod extras;
pub mod json;
pub mod peft;
pub mod resolve;
pub mod select;

use std::path::{Path, PathBuf};

use axsave_formats::DType;

use crate::error::Result;
use crate::layout::Layout;
use extras::Extra;
pub use json::json_sorted;

/// The small files written beside the weights, committed with them.
#[derive(Clone, Debug, Default)]
pub struct Extras {
    /// Copied as they are (tokenizer files, `generation_config.json`, `adapter_config.json`).
    pub files: Vec<Extra>,
    /// `config.json`, rewritten at commit time (see [`extras::fix_config`]).
    pub model_config: Option<Extra>,
    /// Whether `config.json` gets the dtype the weights were written in (full weights only).
    pub set_dtype: bool,
    /// The tokenizer's vocabulary size, to compare with the embedding.
    pub tokenizer_vocab: Option<usize>,
}

impl Extras {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.model_config.is_none()
    }

    /// The files to write for this layout: `config.json` fixed, the others as they are. Logs
    /// what changed and warns when the embedding has fewer rows than the tokenizer has tokens.
    pub fn render(&self, layout: &Layout) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out: Vec<(String, Vec<u8>)> = self
            .files
            .iter()
            .map(|e| (e.name.clone(), e.bytes.clone()))
            .collect();
        if let Some(c) = &self.model_config {
            let dtype = if self.set_dtype {
                main_float_dtype(layout)
            } else {
                None
            };
            let (bytes, changes) = extras::fix_config(&c.bytes, &c.from, dtype)?;
            for ch in changes {
                tracing::info!("config.json: {ch}");
            }
            out.push((c.name.clone(), bytes));
        }
        if let Some(vocab) = self.tokenizer_vocab
            && let Some((name, rows)) = embedding_rows(layout)
            && rows < vocab as u64
        {
            tracing::warn!(
                "{name} has {rows} rows but the tokenizer has {vocab} tokens: tokens past row {rows} have no embedding"
            );
        }
        Ok(out)
    }

    /// Where each file comes from, for `--dry-run`.
    pub fn sources(&self) -> Vec<(String, String)> {
        self.files
            .iter()
            .chain(self.model_config.iter())
            .map(|e| (e.name.clone(), e.from.display().to_string()))
            .collect()
    }
}

/// The floating dtype most of the output's bytes are in (what `config.json` should say).
fn main_float_dtype(layout: &Layout) -> Option<DType> {
    let mut by: Vec<(DType, u64)> = Vec::new();
    for t in layout
        .tensors
        .iter()
        .filter(|t| t.dtype.is_convertible_float())
    {
        match by.iter_mut().find(|(d, _)| *d == t.dtype) {
            Some((_, n)) => *n += t.nbytes,
            None => by.push((t.dtype, t.nbytes)),
        }
    }
    by.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
}

/// The input embedding's row count: the first 2-D tensor named like one.
fn embedding_rows(layout: &Layout) -> Option<(String, u64)> {
    layout
        .tensors
        .iter()
        .find(|t| {
            t.shape.len() == 2
                && (t.name.ends_with("embed_tokens.weight")
                    || t.name.ends_with("wte.weight")
                    || t.name.ends_with("word_embeddings.weight"))
        })
        .map(|t| (t.name.clone(), t.shape[0]))
}

/// What `--cleanup` removes after a successful save, decided before anything is written (so that
/// a conflict fails the save at once) and used as is by `--dry-run` and by the run.
///
/// - A DeepSpeed checkpoint directory holding `latest`: the tag directory `latest` names and
///   `latest` itself (the other tags, `zero_to_fp32.py` and the rest stay).
/// - Any other checkpoint directory: the directory.
/// - A `--source` that is a symbolic link to a directory: what it points to (what was read, by
///   the rules above) and then the link, which would otherwise dangle.
///
/// Refused, before writing: a source that is a file (a single safetensors file: `--cleanup`
/// removes checkpoint directories only), and an output inside what would be removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupPlan {
    /// What goes, in this order.
    pub remove: Vec<PathBuf>,
}

impl CleanupPlan {
    /// Decides what `--cleanup` of `source` removes, with the output going to `output`. A
    /// source that does not exist (a rank that sees nothing of a node-local checkpoint) gives
    /// an empty plan.
    pub fn new(source: &Path, output: &Path) -> Result<CleanupPlan> {
        let Ok(link_meta) = std::fs::symlink_metadata(source) else {
            return Ok(CleanupPlan::default());
        };
        let src = source
            .canonicalize()
            .map_err(|e| crate::CoreError::io(source, e))?;
        if !src.is_dir() {
            return Err(crate::CoreError::Config(format!(
                "--cleanup removes the checkpoint directory a save read, but --source {} is a file: remove it yourself after the save, or leave out --cleanup",
                source.display()
            )));
        }
        let out = resolve_existing_prefix(output);
        let mut remove = Vec::new();
        let tag_dir = std::fs::read_to_string(src.join("latest"))
            .ok()
            .map(|t| src.join(t.trim()))
            .filter(|d| d.is_dir() && d.starts_with(&src) && d != &src);
        match tag_dir {
            Some(tag_dir) => {
                if out.starts_with(&tag_dir) {
                    return Err(holds_output(&tag_dir, &out));
                }
                remove.push(tag_dir);
                remove.push(src.join("latest"));
            }
            None => {
                if out.starts_with(&src) {
                    return Err(holds_output(&src, &out));
                }
                remove.push(src);
            }
        }
        if link_meta.file_type().is_symlink() {
            remove.push(std::path::absolute(source).unwrap_or_else(|_| source.to_path_buf()));
        }
        Ok(CleanupPlan { remove })
    }

    /// Removes what the plan names; returns what it removed.
    pub fn execute(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for p in &self.remove {
            let Ok(meta) = std::fs::symlink_metadata(p) else {
                continue;
            };
            if meta.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            }
            .map_err(|e| crate::CoreError::io(p, e))?;
            removed.push(p.display().to_string());
        }
        Ok(removed)
    }
}

fn holds_output(dir: &Path, out: &Path) -> crate::CoreError {
    crate::CoreError::Config(format!(
        "--cleanup would remove {}, which holds the output {}: choose an output outside the checkpoint, or leave out --cleanup",
        dir.display(),
        out.display()
    ))
}

/// Where `path` is or will be (the output may not exist yet): each existing prefix resolved as
/// the kernel would (symbolic links, `..`), the missing rest taken as `create_dir_all` would
/// make it.
fn resolve_existing_prefix(path: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut cur = PathBuf::new();
    let mut exists = true;
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                cur.pop();
            }
            other => {
                cur.push(other.as_os_str());
                if exists {
                    match cur.canonicalize() {
                        Ok(c) => cur = c,
                        Err(_) => exists = false,
                    }
                }
            }
        }
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_refuses_to_remove_the_output() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("ckpt");
        std::fs::create_dir_all(src.join("out")).unwrap();
        assert!(CleanupPlan::new(&src, &src.join("out")).is_err());
        // Not yet existing, and reached through `..`: still inside.
        assert!(CleanupPlan::new(&src, &t.path().join("x/../ckpt/new/out")).is_err());
        assert!(src.exists());
        let other = t.path().join("final");
        let plan = CleanupPlan::new(&src, &other).unwrap();
        assert_eq!(plan.remove, [src.canonicalize().unwrap()]);
        assert_eq!(plan.execute().unwrap().len(), 1);
        assert!(!src.exists());
    }

    #[test]
    fn cleanup_plans() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        // DeepSpeed: the tag directory and `latest`, nothing else.
        let ds = root.join("ds");
        std::fs::create_dir_all(ds.join("global_step2")).unwrap();
        std::fs::create_dir_all(ds.join("global_step1")).unwrap();
        std::fs::write(ds.join("latest"), "global_step2\n").unwrap();
        let plan = CleanupPlan::new(&ds, &root.join("out")).unwrap();
        assert_eq!(plan.remove, [ds.join("global_step2"), ds.join("latest")]);
        assert!(CleanupPlan::new(&ds, &ds.join("global_step2/out")).is_err());
        // A link: its target, then the link.
        let link = root.join("link");
        std::os::unix::fs::symlink(&ds, &link).unwrap();
        let plan = CleanupPlan::new(&link, &root.join("out")).unwrap();
        assert_eq!(
            plan.remove,
            [ds.join("global_step2"), ds.join("latest"), link.clone()]
        );
        // The output inside the link's target is found through the link.
        assert!(CleanupPlan::new(&link, &ds.join("global_step2/x")).is_err());
        // A file is refused; a missing source plans nothing.
        std::fs::write(root.join("model.safetensors"), b"x").unwrap();
        let err = CleanupPlan::new(&root.join("model.safetensors"), &root.join("out"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a file"), "{err}");
        assert_eq!(
            CleanupPlan::new(&root.join("missing"), &root.join("out")).unwrap(),
            CleanupPlan::default()
        );
    }
}
