//! `axsave merge-lora --config cfg.yml`: where Axolotl's `merge-lora` finds the base and the
//! adapter, and where it writes.

use std::path::{Path, PathBuf};

use crate::axolotl::config::{AxolotlConfig, resolve};
use crate::axolotl::extras::hub_snapshot;
use crate::error::{CoreError, Result};

/// The base, adapter and output directories an Axolotl config names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergePaths {
    /// `base_model`: a local directory, or its snapshot in the local Hugging Face cache.
    pub base: PathBuf,
    /// `lora_model_dir` when set, else `output_dir` (as `axolotl merge-lora` does).
    pub adapter: PathBuf,
    /// `output_dir/merged`.
    pub output: PathBuf,
}

/// Resolves the paths of a merge as Axolotl's `merge-lora` does, relative to `cwd`, never
/// downloading: a `base_model` that is neither a local directory nor in the local hub cache is
/// an error. `env` reads environment variables (`HF_HUB_CACHE`, `HF_HOME`, `HOME`).
pub fn merge_paths(
    cfg: &AxolotlConfig,
    cwd: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<MergePaths> {
    let base_model = cfg
        .base_model
        .as_deref()
        .ok_or_else(|| CoreError::Config("the config has no base_model".into()))?;
    let local = resolve(cwd, base_model);
    let base = if local.is_dir() {
        local
    } else if let Some(snap) = hub_snapshot(base_model, env) {
        snap
    } else {
        return Err(CoreError::Config(format!(
            "base_model {base_model} is neither a local directory nor in the local Hugging Face cache (axsave never downloads)"
        )));
    };
    let output_dir = cfg
        .output_dir
        .as_deref()
        .ok_or_else(|| CoreError::Config("the config has no output_dir".into()))?;
    let output_dir = resolve(cwd, output_dir);
    let adapter = match cfg.lora_model_dir.as_deref() {
        Some(d) if !d.is_empty() => resolve(cwd, d),
        _ => output_dir.clone(),
    };
    Ok(MergePaths {
        base,
        adapter,
        output: super::merged_dir(&output_dir),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_as_axolotl_merges() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("base")).unwrap();
        let none = |_: &str| None;
        let cfg = AxolotlConfig::parse("base_model: base\noutput_dir: out\n").unwrap();
        let p = merge_paths(&cfg, t.path(), &none).unwrap();
        assert_eq!(p.base, t.path().join("base"));
        assert_eq!(p.adapter, t.path().join("out"));
        assert_eq!(p.output, t.path().join("out/merged"));
        let cfg = AxolotlConfig::parse("base_model: base\noutput_dir: out\nlora_model_dir: lora\n")
            .unwrap();
        assert_eq!(
            merge_paths(&cfg, t.path(), &none).unwrap().adapter,
            t.path().join("lora")
        );
        let cfg = AxolotlConfig::parse("base_model: org/missing\noutput_dir: out\n").unwrap();
        let e = merge_paths(&cfg, t.path(), &none).unwrap_err().to_string();
        assert!(
            e.contains("org/missing") && e.contains("never downloads"),
            "{e}"
        );
    }
}
