//! DeepSpeed ZeRO checkpoints (stages 1, 2 and 3), consolidated exactly as DeepSpeed 0.19.8's
//! `zero_to_fp32.py` does, but as a [`Catalog`] whose pieces point into the checkpoint's own
//! files: no tensor data is read or copied here.
//!
//! A save directory holds `latest` (the tag, e.g. `global_step2`) and `<tag>/`, which holds
//! `*_model_states.pt` (rank 0's only for stages 1/2, one per rank for stage 3) and one
//! `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt` per data-parallel rank. Every file is a
//! `torch.save` zip; only its central directory and `data.pkl` are looked at.
//!
//! What comes out, in zero_to_fp32's order:
//! - the persistent buffers (`buffer_names`), from rank 0's `module`, floating ones as F32 (the
//!   pieces keep the stored dtype; the executor converts);
//! - the frozen parameters (`frozen_param_shapes`, stage ≥ 2 only): stage 2 from rank 0's
//!   `frozen_param_fragments` (whole tensors), stage 3 from every rank's fragment;
//! - the trainable parameters (`param_shapes`), from the fp32 master partitions of the optimizer
//!   files: stage 1/2 `single_partition_of_fp32_groups` concatenated over ranks per group, stage 3
//!   `fp32_flat_groups`, each parameter taking `ceil(numel / world)` elements on every rank.
//!
//! Every floating tensor is reported as F32, as the `zero_to_fp32.py` script writes it (its
//! library function `get_fp32_state_dict_from_zero_checkpoint` leaves frozen parameters in the
//! model dtype; bf16/fp16 → fp32 is exact, so only the dtype differs). Tied parameters
//! (`shared_params`, alias → source) are listed once, under the source name: safetensors forbids
//! aliases, and transformers drops the alias (the `lm_head.weight` of tied embeddings) and re-ties
//! it on load. [`Catalog::notes`] says which names were dropped.
//!
//! As in zero_to_fp32, ZeRO-1 checkpoints yield no frozen parameters (DeepSpeed records none
//! below stage 2; a note names what `module` holds but the output lacks), padding elements are
//! never read (stage 3 padding is not always zero), and zero_to_fp32's consistency checks are
//! made (file count against `partition_count`, consumed against available elements), each error
//! naming the file or directory at fault. [`read_partial`] reads what one machine sees of a
//! checkpoint whose rank files are spread over machines, for [`Catalog::merge`].

use std::path::{Path, PathBuf};

use crate::catalog::Catalog;
use crate::error::{FormatError, Result};

mod files;
mod stages;
mod states;

pub use files::{LATEST, MODEL_SUFFIX, OPTIM_SUFFIX};
use files::{ckpt_files, only_tag, read_latest, safe_tag, tag_hint};
use stages::read_in;

/// Whether `dir` holds a ZeRO checkpoint: `*_optim_states.pt` and `*_model_states.pt` files in
/// the tag directory that `latest` names, or in `dir` itself.
pub fn is_zero(dir: &Path) -> bool {
    let holds = |d: &Path| {
        ckpt_files(d, OPTIM_SUFFIX).is_ok_and(|f| !f.is_empty())
            && ckpt_files(d, MODEL_SUFFIX).is_ok_and(|f| !f.is_empty())
    };
    holds(dir) || read_latest(dir).is_ok_and(|tag| holds(&dir.join(tag)))
}

/// The directory that holds the rank files: `dir/<tag>` where `latest` names the tag, or `dir`
/// itself when it holds the files (a `global_stepN` directory given directly).
pub fn tag_dir(dir: &Path) -> Result<PathBuf> {
    let latest = dir.join(LATEST);
    if latest.is_file() {
        let tag = read_latest(dir)?;
        let d = dir.join(&tag);
        if !d.is_dir() {
            return Err(FormatError::invalid(
                &latest,
                format!(
                    "names the tag {tag:?}, but {} does not exist (an interrupted save, or a tag that was deleted)",
                    d.display()
                ),
            ));
        }
        return Ok(d);
    }
    if ckpt_files(dir, OPTIM_SUFFIX).is_ok_and(|f| !f.is_empty()) {
        return Ok(dir.to_path_buf());
    }
    Err(FormatError::NotACheckpoint {
        path: dir.to_path_buf(),
        why: format!(
            "no `latest` file and no *{OPTIM_SUFFIX} files (a DeepSpeed save directory, or one of its global_stepN directories){}",
            tag_hint(dir)
        ),
    })
}

/// Reads the ZeRO checkpoint in `dir` (a save directory with `latest`, or a tag directory).
pub fn read(dir: &Path) -> Result<Catalog> {
    let tdir = tag_dir(dir)?;
    read_in(dir, &tdir, false)
}

/// Reads the checkpoint of tag `tag` in the save directory `dir`, ignoring `latest`
/// (zero_to_fp32's `-t TAG`).
pub fn read_tag(dir: &Path, tag: &str) -> Result<Catalog> {
    let rel = safe_tag(tag)
        .ok_or_else(|| FormatError::invalid(dir, format!("tag {tag:?} is not a directory name")))?;
    let tdir = dir.join(rel);
    if !tdir.is_dir() {
        return Err(FormatError::NotACheckpoint {
            path: tdir,
            why: format!("no tag directory {tag:?}{}", tag_hint(dir)),
        });
    }
    read_in(dir, &tdir, false)
}

/// Reads what this process can see of a ZeRO checkpoint whose rank files may be spread over
/// machines (DeepSpeed's node-local storage): pieces only for the files present, placed by the
/// rank number in each file name. Tiling is not checked here; [`Catalog::merge`] does that once
/// every rank's part is in.
///
/// Placing a stage 1/2 partition needs `param_shapes` from `mp_rank_00_model_states.pt`, so a
/// process that sees optimizer files must also see that file; for stage 3 any rank's model-state
/// file will do. Buffers and stage 2 frozen parameters come from rank 0's model-state file only.
/// A process that sees no rank file at all gets [`FormatError::NotACheckpoint`]: the catalog's
/// format carries the ZeRO stage, which only the rank files record.
pub fn read_partial(dir: &Path) -> Result<Catalog> {
    let tdir = match tag_dir(dir) {
        Ok(t) => t,
        // `latest` is written by global rank 0 only; elsewhere look for the tag directories.
        Err(e @ FormatError::NotACheckpoint { .. }) => only_tag(dir).ok_or(e)?,
        Err(e) => return Err(e),
    };
    read_in(dir, &tdir, true)
}

#[cfg(test)]
mod tests {
    use super::files::{FlatSrc, natural_key, rank_in_name};
    use super::stages::cut;
    use super::*;
    use crate::catalog::Region;
    use crate::dtype::DType;
    use crate::zip::ZipEntry;

    #[test]
    fn natural_order_puts_rank_2_before_rank_10() {
        let mut names = [
            "bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt",
            "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
            "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        ];
        names.sort_by_key(|n| natural_key(n));
        let ranks: Vec<usize> = names.iter().map(|n| rank_in_name(n).unwrap()).collect();
        assert_eq!(ranks, [0, 1, 2, 10]);
        // Digit runs compare as numbers, text as text, position by position.
        assert!(natural_key("a9b") < natural_key("a10a"));
        assert!(natural_key("a010") == natural_key("a10"));
        assert!(natural_key("mp_rank_00") < natural_key("zero_pp_rank_0"));
        assert_eq!(rank_in_name("mp_rank_00_model_states.pt"), None);
    }

    #[test]
    fn tags_stay_inside_the_save_directory() {
        assert!(safe_tag("global_step12").is_some());
        for bad in ["", "..", "../x", "/abs", "a/../../b"] {
            assert!(safe_tag(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn cut_splits_a_range_over_runs() {
        let run = |file: usize, offset: u64, len: u64| FlatSrc {
            file,
            offset,
            len,
            dtype: DType::F32,
            record: ZipEntry {
                name: "data/0".into(),
                data_offset: offset,
                size: len * 4,
                crc32: 7,
            },
        };
        let (a, b) = (run(0, 64, 10), run(1, 128, 9));
        let spans = [(0, &a), (10, &b)];
        let pieces = cut(&spans, 8, 5);
        let got: Vec<(usize, u64, Region)> = pieces
            .iter()
            .map(|p| (p.file, p.offset, p.region.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (0, 64 + 8 * 4, Region::Flat { start: 0, len: 2 }),
                (1, 128, Region::Flat { start: 2, len: 3 })
            ]
        );
        // Only a piece reading its whole record carries the record's CRC.
        assert!(pieces.iter().all(|p| p.checksum.is_none()));
        let whole = cut(&spans, 10, 9);
        assert_eq!(whole[0].checksum.map(|c| c.crc32), Some(7));
        assert!(cut(&spans, 19, 0).is_empty());
    }
}
