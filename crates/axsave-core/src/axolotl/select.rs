//! Which checkpoint to read when the config names none: what Axolotl's own merge would pick,
//! without its traps (string-sorted checkpoint numbers, half-written checkpoints).

use std::path::{Path, PathBuf};

use axsave_formats::dcp;

use crate::error::{CoreError, Result};

/// The checkpoint chosen, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    /// The directory to read.
    pub source: PathBuf,
    /// The `checkpoint-N` directory it lies in, if any (its files are searched for the tokenizer
    /// and `adapter_config.json`).
    pub checkpoint_dir: Option<PathBuf>,
    /// One line for the log: what was chosen and why.
    pub why: String,
    /// Newer directories that were passed over because they are incomplete.
    pub warnings: Vec<String>,
}

/// `checkpoint-N` subdirectories of `dir`, newest (highest N) first.
fn checkpoints(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    // By number: checkpoint-20 is newer than checkpoint-9.
    v.sort_by_key(|e| std::cmp::Reverse(e.0));
    v
}

/// A DeepSpeed checkpoint directory: it holds `latest` naming a tag directory that exists.
fn deepspeed_complete(dir: &Path) -> Option<String> {
    let tag = std::fs::read_to_string(dir.join("latest")).ok()?;
    let tag = tag.trim().to_string();
    dir.join(&tag).is_dir().then_some(tag)
}

/// Picks the checkpoint under `output_dir`: the final FSDP save `pytorch_model_fsdp_0` when
/// complete, else the newest `checkpoint-N/pytorch_model_fsdp_0` that is complete (a DCP save
/// writes its `.metadata` last); for DeepSpeed, `output_dir` itself when its `latest` tag
/// exists, else the newest `checkpoint-N` whose does.
pub fn choose(output_dir: &Path, deepspeed: bool) -> Result<Chosen> {
    let mut warnings = Vec::new();
    let ckpts = checkpoints(output_dir);
    if !deepspeed {
        let final_save = output_dir.join("pytorch_model_fsdp_0");
        if dcp::is_dcp(&final_save) {
            return Ok(Chosen {
                why: format!("{} (the final save)", final_save.display()),
                source: final_save,
                checkpoint_dir: None,
                warnings,
            });
        }
        for (n, dir) in &ckpts {
            let src = dir.join("pytorch_model_fsdp_0");
            if dcp::is_dcp(&src) {
                return Ok(Chosen {
                    why: format!(
                        "{} (the newest complete checkpoint, step {n})",
                        src.display()
                    ),
                    source: src,
                    checkpoint_dir: Some(dir.clone()),
                    warnings,
                });
            }
            if src.is_dir() {
                warnings.push(format!(
                    "{} is incomplete (no .metadata: the save was interrupted); using an older checkpoint",
                    src.display()
                ));
            }
        }
    }
    if let Some(tag) = deepspeed_complete(output_dir) {
        return Ok(Chosen {
            why: format!(
                "{} (DeepSpeed tag {tag} from its `latest`)",
                output_dir.display()
            ),
            source: output_dir.to_path_buf(),
            checkpoint_dir: None,
            warnings,
        });
    }
    for (n, dir) in &ckpts {
        if let Some(tag) = deepspeed_complete(dir) {
            return Ok(Chosen {
                why: format!(
                    "{} (DeepSpeed tag {tag}, the newest complete checkpoint, step {n})",
                    dir.display()
                ),
                source: dir.clone(),
                checkpoint_dir: Some(dir.clone()),
                warnings,
            });
        }
        if deepspeed && dir.is_dir() {
            warnings.push(format!(
                "{} has no usable `latest` tag (the save was interrupted?); using an older checkpoint",
                dir.display()
            ));
        }
    }
    Err(CoreError::Config(format!(
        "found no checkpoint under output_dir {}: looked for pytorch_model_fsdp_0/ with .metadata, checkpoint-N/pytorch_model_fsdp_0/, and DeepSpeed `latest` + global_stepN (set axsave.source or --source to the checkpoint to read)",
        output_dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dcp_dir(p: &Path, complete: bool) {
        std::fs::create_dir_all(p).unwrap();
        std::fs::write(p.join("__0_0.distcp"), b"x").unwrap();
        if complete {
            std::fs::write(p.join(".metadata"), b"x").unwrap();
        }
    }

    #[test]
    fn numeric_order_and_incomplete_checkpoints() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path();
        dcp_dir(&out.join("checkpoint-9/pytorch_model_fsdp_0"), true);
        dcp_dir(&out.join("checkpoint-20/pytorch_model_fsdp_0"), true);
        dcp_dir(&out.join("checkpoint-30/pytorch_model_fsdp_0"), false);
        let c = choose(out, false).unwrap();
        assert_eq!(c.source, out.join("checkpoint-20/pytorch_model_fsdp_0"));
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("checkpoint-30"));
        // The final save wins when complete.
        dcp_dir(&out.join("pytorch_model_fsdp_0"), true);
        assert_eq!(
            choose(out, false).unwrap().source,
            out.join("pytorch_model_fsdp_0")
        );
    }

    #[test]
    fn deepspeed_latest() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path();
        for (n, complete) in [(5, true), (12, true), (40, false)] {
            let d = out.join(format!("checkpoint-{n}"));
            std::fs::create_dir_all(d.join(format!("global_step{n}"))).unwrap();
            if complete {
                std::fs::write(d.join("latest"), format!("global_step{n}")).unwrap();
            }
        }
        let c = choose(out, true).unwrap();
        assert_eq!(c.source, out.join("checkpoint-12"));
        assert!(c.warnings[0].contains("checkpoint-40"));
        std::fs::create_dir_all(out.join("global_step99")).unwrap();
        std::fs::write(out.join("latest"), "global_step99\n").unwrap();
        assert_eq!(choose(out, true).unwrap().source, out.to_path_buf());
        assert!(choose(&out.join("nothing"), false).is_err());
    }
}
