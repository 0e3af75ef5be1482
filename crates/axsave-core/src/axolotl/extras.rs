//! The files that go beside the weights: the tokenizer, `config.json` and
//! `generation_config.json`, found where Axolotl and transformers leave them, never downloaded.

use std::path::{Path, PathBuf};

use axsave_formats::DType;
use serde_json::Value;

use crate::error::{CoreError, Result};

/// The files a tokenizer's `save_pretrained` writes (fast and slow, old and new transformers).
pub const TOKENIZER_FILES: [&str; 11] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "spiece.model",
];

/// A small file to write beside the weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extra {
    /// File name in the output directory.
    pub name: String,
    /// Its content.
    pub bytes: Vec<u8>,
    /// Where it came from.
    pub from: PathBuf,
}

/// The local Hugging Face hub cache snapshot of a model id (`org/name`), if there is one:
/// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, then
/// `models--org--name/snapshots/<revision of refs/main>` (or the newest snapshot).
pub fn hub_snapshot(model_id: &str, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if model_id.is_empty() || model_id.starts_with('/') || model_id.starts_with('.') {
        return None;
    }
    let cache = env("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| env("HF_HOME").map(|h| Path::new(&h).join("hub")))
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".cache/huggingface/hub")))?;
    let repo = cache.join(format!("models--{}", model_id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let p = snapshots.join(rev.trim());
        if p.is_dir() {
            return Some(p);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// Reads the tokenizer files of the first directory of `search` that has any.
pub fn find_tokenizer(search: &[PathBuf]) -> Result<Vec<Extra>> {
    for dir in search {
        let present: Vec<&str> = TOKENIZER_FILES
            .iter()
            .copied()
            .filter(|f| dir.join(f).is_file())
            .collect();
        if present.iter().any(|f| {
            matches!(
                *f,
                "tokenizer.json" | "tokenizer_config.json" | "tokenizer.model" | "vocab.json"
            )
        }) {
            return present
                .into_iter()
                .map(|f| {
                    let from = dir.join(f);
                    let bytes = std::fs::read(&from).map_err(|e| CoreError::io(&from, e))?;
                    Ok(Extra {
                        name: f.to_string(),
                        bytes,
                        from,
                    })
                })
                .collect();
        }
    }
    Ok(Vec::new())
}

/// Reads `config.json` and `generation_config.json`, each from the first directory of `search`
/// that has it (Axolotl's output_dir has a `config.json` but no `generation_config.json`; the
/// base model has both).
pub fn find_model_config(search: &[PathBuf]) -> Result<Vec<Extra>> {
    let mut out = Vec::new();
    for f in ["config.json", "generation_config.json"] {
        if let Some(from) = search.iter().map(|d| d.join(f)).find(|p| p.is_file()) {
            let bytes = std::fs::read(&from).map_err(|e| CoreError::io(&from, e))?;
            out.push(Extra {
                name: f.to_string(),
                bytes,
                from,
            });
        }
    }
    Ok(out)
}

/// Drops FSDP2's `FSDP` class prefix from one architecture name: exactly that prefix, once
/// (`FSDPLlamaForCausalLM` → `LlamaForCausalLM`), never letters one by one as Python's
/// `lstrip("FSDP")` would (`PhiForCausalLM` stays).
pub fn fix_architecture(name: &str) -> &str {
    match name.strip_prefix("FSDP") {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_uppercase()) => rest,
        _ => name,
    }
}

/// torch's name for a dtype in `config.json` (`bfloat16`, `float16`, `float32`).
fn torch_dtype_name(d: DType) -> &'static str {
    d.torch_name()
}

/// Rewrites `config.json`: the `FSDP` prefix off `architectures`, and the dtype key
/// (`torch_dtype` or `dtype`, whichever the file uses; `torch_dtype` when it has neither) set to
/// the dtype the weights were written in, when given. Keys stay sorted with an indent of 2, as
/// transformers writes the file. Returns the new bytes and what changed.
pub fn fix_config(
    bytes: &[u8],
    from: &Path,
    dtype: Option<DType>,
) -> Result<(Vec<u8>, Vec<String>)> {
    let mut v: Value = serde_json::from_slice(bytes)
        .map_err(|e| CoreError::Config(format!("{}: not JSON: {e}", from.display())))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(CoreError::Config(format!(
            "{}: not a JSON object",
            from.display()
        )));
    };
    let mut changes = Vec::new();
    if let Some(Value::Array(archs)) = obj.get_mut("architectures") {
        for a in archs.iter_mut() {
            if let Value::String(s) = a {
                let fixed = fix_architecture(s).to_string();
                if fixed != *s {
                    changes.push(format!("architectures: {s} -> {fixed}"));
                    *s = fixed;
                }
            }
        }
    }
    if let Some(d) = dtype {
        let key = if obj.contains_key("dtype") && !obj.contains_key("torch_dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        let new = Value::from(torch_dtype_name(d));
        if obj.get(key) != Some(&new) {
            changes.push(format!("{key}: {}", torch_dtype_name(d)));
            obj.insert(key.to_string(), new);
        }
    }
    Ok((super::json::json_sorted(&v).into_bytes(), changes))
}

/// Checks `tokenizer.json` with the `tokenizers` library and returns its vocabulary size
/// (added tokens included).
pub fn tokenizer_vocab(extra: &Extra) -> Result<usize> {
    let t = tokenizers::Tokenizer::from_bytes(&extra.bytes).map_err(|e| {
        CoreError::Config(format!(
            "{}: not a tokenizer the tokenizers library can load: {e}",
            extra.from.display()
        ))
    })?;
    Ok(t.get_vocab_size(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsdp_prefix_exactly() {
        assert_eq!(fix_architecture("FSDPLlamaForCausalLM"), "LlamaForCausalLM");
        assert_eq!(fix_architecture("PhiForCausalLM"), "PhiForCausalLM");
        assert_eq!(
            fix_architecture("DeepseekV3ForCausalLM"),
            "DeepseekV3ForCausalLM"
        );
        assert_eq!(fix_architecture("FalconForCausalLM"), "FalconForCausalLM");
        assert_eq!(fix_architecture("FSDPPhi3ForCausalLM"), "Phi3ForCausalLM");
    }

    #[test]
    fn config_rewrite_keeps_the_dtype_key_the_file_uses() {
        let p = Path::new("config.json");
        let (b, ch) = fix_config(
            br#"{"architectures": ["FSDPLlamaForCausalLM"], "dtype": "float32", "hidden_size": 8}"#,
            p,
            Some(DType::BF16),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["architectures"][0], "LlamaForCausalLM");
        assert_eq!(v["dtype"], "bfloat16");
        assert!(v.get("torch_dtype").is_none());
        assert_eq!(ch.len(), 2);
        let (b, _) = fix_config(br#"{"torch_dtype": "float32"}"#, p, Some(DType::F16)).unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["torch_dtype"], "float16");
        assert!(fix_config(b"[1]", p, None).is_err());
    }

    #[test]
    fn hub_cache_layout() {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("models--org--m");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        let cache = t.path().to_string_lossy().into_owned();
        let env = |k: &str| (k == "HF_HUB_CACHE").then(|| cache.clone());
        assert_eq!(
            hub_snapshot("org/m", &env),
            Some(repo.join("snapshots/abc123"))
        );
        assert_eq!(hub_snapshot("org/other", &env), None);
        assert_eq!(hub_snapshot("./local", &env), None);
    }
}
