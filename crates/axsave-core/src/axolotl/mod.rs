//! Axolotl semantics: its YAML config, the checkpoint its run left, PEFT adapters, and the
//! tokenizer and config files that go beside the weights.

pub mod config;
pub mod extras;
pub mod peft;
pub mod select;

use std::path::Path;

use axsave_formats::DType;
use serde_json::Value;

use crate::error::Result;
use crate::layout::Layout;
use extras::Extra;

/// JSON as Python writes it with `json.dumps(v, indent=2, sort_keys=True)`, plus a newline (the
/// form of transformers' `config.json` and PEFT's `adapter_config.json`).
pub fn json_sorted(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sort(&m[k]))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    let mut s = serde_json::to_string_pretty(&sort(v)).unwrap_or_default();
    s.push('\n');
    s
}

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

/// Removes what a save consumed (with `--cleanup`, after success): the checkpoint directory, and
/// for DeepSpeed the `latest` pointer beside a consumed tag directory. Refuses to remove a
/// directory that holds the output.
pub fn cleanup_source(source: &Path, output: &Path) -> Result<Vec<String>> {
    let src = source
        .canonicalize()
        .map_err(|e| crate::CoreError::io(source, e))?;
    let out = output
        .canonicalize()
        .unwrap_or_else(|_| output.to_path_buf());
    if out.starts_with(&src) {
        return Err(crate::CoreError::Config(format!(
            "--cleanup would remove {}, which holds the output {}: not removed",
            src.display(),
            out.display()
        )));
    }
    let mut removed = Vec::new();
    // A DeepSpeed checkpoint directory holding `latest`: the tag directory is what was consumed.
    if let Ok(tag) = std::fs::read_to_string(src.join("latest")) {
        let tag_dir = src.join(tag.trim());
        if tag_dir.is_dir() && !out.starts_with(&tag_dir) {
            std::fs::remove_dir_all(&tag_dir).map_err(|e| crate::CoreError::io(&tag_dir, e))?;
            removed.push(tag_dir.display().to_string());
            let latest = src.join("latest");
            std::fs::remove_file(&latest).map_err(|e| crate::CoreError::io(&latest, e))?;
            removed.push(latest.display().to_string());
            return Ok(removed);
        }
    }
    std::fs::remove_dir_all(&src).map_err(|e| crate::CoreError::io(&src, e))?;
    removed.push(src.display().to_string());
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_json_like_python() {
        let v: Value = serde_json::from_str(r#"{"b": 1, "a": {"d": [1, 2], "c": null}}"#).unwrap();
        assert_eq!(
            json_sorted(&v),
            "{\n  \"a\": {\n    \"c\": null,\n    \"d\": [\n      1,\n      2\n    ]\n  },\n  \"b\": 1\n}\n"
        );
    }

    #[test]
    fn cleanup_refuses_to_remove_the_output() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("ckpt");
        std::fs::create_dir_all(src.join("out")).unwrap();
        assert!(cleanup_source(&src, &src.join("out")).is_err());
        assert!(src.exists());
        let other = t.path().join("final");
        std::fs::create_dir_all(&other).unwrap();
        assert_eq!(cleanup_source(&src, &other).unwrap().len(), 1);
        assert!(!src.exists());
    }
}
